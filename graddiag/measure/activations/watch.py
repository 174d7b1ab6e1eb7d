"""The activation watch: hooks and a function interceptor that exist only inside ``watching()``.

``ActivationWatch.watching()`` is a real context: entering installs forward hooks on the
registered activation modules and (with ``functional=True``) a ``TorchFunctionMode`` plus a pair of
global module hooks that track which module's ``forward`` is running; leaving removes all of
them, also when the forward pass raises. Nothing is installed outside it. Statistics gathered
inside stay on the device until :meth:`ActivationWatch.take`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from graddiag.data.names import clean_name
from graddiag.measure.activations.call_sites import CallSites, call_site
from graddiag.measure.activations.registry import (
    _ATTRIBUTE_ACCESS,
    ZERO_GRADIENT_OPS,
    ActivationRegistry,
    ActivationSpec,
    default_registry,
)
from graddiag.measure.activations.statistics import _Site
from graddiag.measure.compat import (
    function_mode_stack,
    remove_function_mode,
    without_function_mode,
)
from graddiag.measure.order import GradientArrival

log = logging.getLogger("graddiag")


class _ZeroDerivative(dict):  # type: ignore[type-arg]
    """``func in it``: whether a torch function is one of :data:`ZERO_GRADIENT_OPS` (by name),
    looked up once per function."""

    def __contains__(self, func: object) -> bool:
        known = self.get(func)
        if known is None:
            known = self[func] = getattr(func, "__name__", None) in ZERO_GRADIENT_OPS
        return known


class _Interceptor(TorchFunctionMode):
    """Sees functional activations and graph-cutting operations during a watched forward."""

    def __init__(self, watch: ActivationWatch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        watch = self.watch
        entry = watch.registry.functions.get(func)
        if entry is None or watch.paused or watch.inside_activation_module():
            result = func(*args, **kwargs)
            # the usual operation keeps the graph: a tensor that requires grad, not zero-derivative
            if (type(result) is torch.Tensor and result.requires_grad
                    and func not in watch.zero_derivative):
                return result
            if not watch.paused and torch.is_grad_enabled():
                watch.check_cut(func, args, result)
            return result
        spec, params_of = entry
        x = args[0] if args else kwargs.get("input")
        keep_input = spec.needs_input and isinstance(x, torch.Tensor)
        x_before = x.detach().clone() if keep_input and kwargs.get("inplace") else x
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            watch.record_function(spec, params_of(args, kwargs), x_before if keep_input else None,
                                  result)
        return result

    def __exit__(self, *exc: object) -> None:
        above = remove_function_mode(self)  # the top of the stack, unless a mode was left open
        if above:
            log.warning(
                "graddiag: %d TorchFunctionMode(s) entered inside the watched forward pass were "
                "still active when it ended; graddiag's interceptor left from under them and "
                "they stay active.", above)


class ActivationWatch:
    """Collects activation statistics of one module tree, only inside :meth:`watching`.

    Args:
        root: The monitored module; sites are named relative to it.
        registry: Activation module types and functions to analyse.
        derivative_floor: Local derivative below which a unit passes almost no gradient.
        functional: Also intercept functional activations and note graph-cutting operations.
    """

    def __init__(
        self,
        root: nn.Module,
        registry: ActivationRegistry = default_registry,
        *,
        derivative_floor: float = 0.01,
        functional: bool = True,
    ) -> None:
        self.registry = registry
        self.floor = derivative_floor
        self.functional = functional
        self._root = root
        self.names = {m: clean_name(n) for n, m in root.named_modules()}
        self.root_name = type(root).__name__
        self.sites: dict[str, _Site] = {}
        self.cut_ops: dict[str, list[str]] = {}
        self.paused = False
        self._live: ExitStack | None = None
        self._mode: _Interceptor | None = None
        self._installed = False
        # the running modules, each with the functional activation sites of its call (made at its
        # first functional activation; until then the length of the log below when it began),
        # and the modules whose forward began in the watched pass (what fed each call)
        self._stack: list[tuple[nn.Module, CallSites | int]] = []
        self._modules_run: list[int] = []
        self._root_sites: CallSites | None = None  # calls outside any module's forward
        # per activation module called more than once in this pass: its calls, told apart as
        # functional ones are (a module called once per time step of a recurrent cell acts on
        # the same units); until then its first call's output node and the modules' log length
        self._module_calls: dict[str, CallSites] = {}
        self._module_first: dict[str, tuple[Any, int]] = {}
        self._busy = False
        self.arrival: GradientArrival | None = None  # times the gradient through each site
        self.forward_passes = 0  # watched passes: tells a reused site from another micro-batch
        self.zero_derivative = _ZeroDerivative()  # the functions in ZERO_GRADIENT_OPS seen
        self.skipped: set[str] = set()  # sites warned about once as unmeasurable

    # -- the context
    @property
    def active(self) -> bool:
        """Whether a :meth:`watching` context is open (paused or not)."""
        return self._live is not None

    @contextmanager
    def watching(self, running: nn.Module | None = None) -> Iterator[None]:
        """Watch the forward pass run inside this context; a nested call joins the open watch.

        Args:
            running: The module whose ``forward`` this context sits in, if any (calls made
                directly in it are attributed to it).
        """
        if self._live is not None:
            yield
            return
        self._live = ExitStack()
        self.forward_passes += 1
        try:
            if running is not None:
                self._stack.append((running, len(self._modules_run)))
            self._install(self._live)
            yield
        finally:
            live, self._live = self._live, None
            self.paused = False
            self._stack.clear()
            self._modules_run.clear()
            self._root_sites = None
            self._module_calls.clear()
            self._module_first.clear()
            live.close()

    def _install(self, stack: ExitStack) -> None:
        self.names = {m: clean_name(n) for n, m in self._root.named_modules()}  # modules change
        self._installed = True
        stack.callback(setattr, self, "_installed", False)
        for module, name in self.names.items():
            found = self.registry.for_module(module)
            if found is not None:
                stack.callback(module.register_forward_hook(self._module_hook(name, *found)).remove)
        if self.functional:
            register = nn.modules.module
            stack.callback(register.register_module_forward_pre_hook(self._push).remove)
            stack.callback(register.register_module_forward_hook(self._pop, always_call=True).remove)
            self._mode = stack.enter_context(_Interceptor(self))
            stack.callback(setattr, self, "_mode", None)

    def pause(self) -> None:
        """Leave the watch for a backward pass run inside the watched call (manual optimization).

        Hooks and the interceptor are removed until :meth:`resume`; should another function mode
        sit above graddiag's, they stay installed but ignore every call instead.
        """
        if self._live is None or self.paused:
            return
        self.paused = True
        stack = function_mode_stack()
        if self._mode is None or (stack and stack[-1] is self._mode):
            self._live.close()
            self._live = ExitStack()

    def resume(self) -> None:
        """Watch again after :meth:`pause` (the rest of the watched call is forward work)."""
        if self._live is None or not self.paused:
            return
        self.paused = False
        if not self._installed:
            self._install(self._live)

    # -- collection
    @property
    def has_data(self) -> bool:
        return bool(self.sites) or bool(self.cut_ops)

    def take(self) -> tuple[list[_Site], dict[str, list[str]]]:
        """The sites seen (forward order) and the cut operations; resets both."""
        sites = [s for s in self.sites.values() if s.gain is not None]
        cut_ops = {k: list(v) for k, v in self.cut_ops.items()}
        self.discard()
        return sites, cut_ops

    def discard(self) -> None:
        """Forget what was collected (statistics of a step that is not measured)."""
        self.sites = {}
        self.cut_ops = {}

    def _push(self, module: nn.Module, args: Any) -> None:
        if module._parameters:  # a layer (or a norm, an embedding): tells call sites apart
            self._modules_run.append(id(module))
        self._stack.append((module, len(self._modules_run)))

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1][0] is module:
            self._stack.pop()

    def inside_activation_module(self) -> bool:
        return bool(self._stack) and self.registry.for_module(self._stack[-1][0]) is not None

    def _caller(self) -> tuple[str, CallSites] | None:
        """The running module of the watched tree and its functional call sites; ``None`` in
        another model."""
        if not self._stack:  # called directly in the watched method (``training_step``)
            if self._root_sites is None:
                self._root_sites = CallSites(self._modules_run)
            return self.root_name, self._root_sites
        module, sites = self._stack[-1]
        name = self.names.get(module)
        if name is None:
            return None
        if isinstance(sites, int):
            sites = CallSites(self._modules_run, start=sites)
            self._stack[-1] = (module, sites)
        return name or self.root_name, sites

    def _module_hook(self, name: str, spec: ActivationSpec, params: dict[str, float]
                     ) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.paused or not isinstance(output, torch.Tensor):
                return
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self._add(name or self.root_name, spec, params, x if spec.needs_input else None, output,
                      position=self._module_position(name, spec.kind, module, output))

        return hook

    def _module_position(self, name: str, kind: str, module: nn.Module,
                         output: torch.Tensor) -> int:
        """The call position in this pass of this call of activation module ``name``: 0 for its
        first call, and for a later one the position of an earlier call whose units it acts on
        (a time step of a recurrent cell), else a new one (see
        :mod:`graddiag.measure.activations.call_sites`)."""
        calls = self._module_calls.get(name)
        if calls is None:
            first = self._module_first.get(name)
            if first is None:  # the usual module, called once per pass, compares nothing
                self._module_first[name] = (output.grad_fn, len(self._modules_run))
                return 0
            node, mark = first  # called again: the first call is numbered as it happened
            calls = self._module_calls[name] = CallSites(self._modules_run, start=mark)
            calls.number(kind, module, node, at=mark)
        return calls.number(kind, module, output.grad_fn)[0] - 1

    def record_function(self, spec: ActivationSpec, params: dict[str, float],
                        x: torch.Tensor | None, y: torch.Tensor) -> None:
        """Add a functional activation's call to its site: ``{module}:{kind}``, numbered
        ``#2``, ``#3``, ... by first call within the running module's call; calls over time
        steps of one recurrent cell are one site (see
        :mod:`graddiag.measure.activations.call_sites`)."""
        caller = self._caller()
        if caller is None:
            return
        name, sites = caller
        n, joined = sites.number(spec.kind, call_site(2), y.grad_fn)
        self._add(f"{name}:{spec.kind}" + (f"#{n}" if n > 1 else ""), spec, params, x, y,
                  same_units=joined)

    def _add(self, name: str, spec: ActivationSpec, params: dict[str, float],
             x: torch.Tensor | None, y: torch.Tensor, *, same_units: bool = False,
             position: int | None = None) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            if self.arrival is not None:
                self.arrival.watch_site(name, y)
            # graddiag's own operations do not pass through its interceptor
            with without_function_mode(self._mode), torch.no_grad():
                site = self.sites.get(name)
                if site is None:
                    site = self.sites[name] = _Site(name, spec)
                site.add(x, y, params, self.floor, forward_pass=self.forward_passes,
                         skipped=self.skipped, same_units=same_units, position=position)
        finally:
            self._busy = False

    def check_cut(self, func: Callable[..., Any], args: tuple[Any, ...], result: Any) -> None:
        """Note an operation that cut the graph (or has zero derivative) on a tensor needing grad."""
        if self._busy or not self._stack:  # only inside a module's forward (not in loss code)
            return
        needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if not needs_grad:
            return
        op = getattr(func, "__name__", str(func))
        if op in _ATTRIBUTE_ACCESS:
            return
        cut = isinstance(result, torch.Tensor) and not result.requires_grad
        if cut or op in ZERO_GRADIENT_OPS:
            caller = self._caller()
            if caller is None:
                return
            ops = self.cut_ops.setdefault(caller[0], [])
            label = op if cut else f"{op} (zero derivative)"
            if label not in ops:
                ops.append(label)
