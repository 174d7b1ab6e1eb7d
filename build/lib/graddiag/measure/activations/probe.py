"""Collects activation statistics of one module tree, only while armed."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from graddiag.data.records import ActivationRecord
from graddiag.measure.activations.registry import (
    _ATTRIBUTE_ACCESS,
    ZERO_GRADIENT_OPS,
    ActivationRegistry,
    ActivationSpec,
    default_registry,
)
from graddiag.measure.activations.statistics import (
    _data_parallel,
    _reduce_across_ranks,
    _Site,
)
from graddiag.measure.layers import clean_name

log = logging.getLogger("graddiag")


class _Interceptor(TorchFunctionMode):
    """Sees functional activations and graph-cutting operations during a recorded forward."""

    def __init__(self, probe: ActivationProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        probe = self.probe
        entry = probe.registry.functions.get(func)
        if entry is None or probe.inside_activation_module() or probe.paused:
            result = func(*args, **kwargs)
            if not probe.paused and torch.is_grad_enabled():
                probe.check_cut(func, args, result)
            return result
        spec, params_of = entry
        x = args[0] if args else kwargs.get("input")
        keep_input = spec.needs_input and isinstance(x, torch.Tensor)
        x_before = x.detach().clone() if keep_input and kwargs.get("inplace") else x
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            probe.record_function(spec, params_of(args, kwargs), x_before if keep_input else None, result)
        return result


class ActivationProbe:
    """Collects activation statistics of one module tree, only while armed."""

    def __init__(
        self,
        root: nn.Module,
        registry: ActivationRegistry = default_registry,
        *,
        derivative_floor: float = 0.01,
        functional: bool = True,
    ) -> None:
        self.root = root
        self.registry = registry
        self.floor = derivative_floor
        self.functional = functional
        self.names = {m: clean_name(n) for n, m in root.named_modules()}
        self.root_name = type(root).__name__
        compiled = [n for m, n in self.names.items() if type(m).__name__ == "OptimizedModule"]
        self.disabled = bool(compiled)
        if compiled:  # hooks inside compiled graphs would force recompilation or graph breaks
            log.info("graddiag: activation statistics are off: %s is torch.compile'd",
                     compiled[0] or self.root_name)
        self.sites: dict[str, _Site] = {}
        self.cut_ops: dict[str, list[str]] = {}
        self.paused = False
        self._handles: list[RemovableHandle] = []
        self._mode: _Interceptor | None = None
        self._stack: list[tuple[nn.Module, dict[str, int]]] = []
        self._busy = False

    # -- state
    @property
    def armed(self) -> bool:
        return bool(self._handles) or self._mode is not None

    @property
    def has_data(self) -> bool:
        return bool(self.sites) or bool(self.cut_ops)

    def arm(self) -> None:
        """Install hooks (and the function interceptor) until :meth:`disarm`."""
        self.paused = False
        if self.armed or self.disabled:
            return
        self._stack.clear()
        for module, name in self.names.items():
            found = self.registry.for_module(module)
            if found is not None:
                self._handles.append(module.register_forward_hook(self._module_hook(name, *found)))
        if self.functional:
            self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._push))
            self._handles.append(nn.modules.module.register_module_forward_hook(self._pop))
            self._mode = _Interceptor(self)
            self._mode.__enter__()

    def pause(self) -> None:
        """Ignore calls until the next :meth:`arm` (e.g. during the backward pass)."""
        self.paused = True

    def disarm(self) -> None:
        """Remove every hook and the interceptor; collected statistics stay until collected."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            try:
                mode.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - another mode was left above ours; never crash training
                pass
        self._stack.clear()

    def close(self) -> None:
        self.disarm()
        self.sites.clear()
        self.cut_ops.clear()

    # -- collection
    def _push(self, module: nn.Module, args: Any) -> None:
        if module in self.names:
            self._stack.append((module, {}))

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1][0] is module:
            self._stack.pop()

    def inside_activation_module(self) -> bool:
        return bool(self._stack) and self.registry.for_module(self._stack[-1][0]) is not None

    def _caller(self) -> tuple[str, dict[str, int]]:
        if self._stack:
            module, counts = self._stack[-1]
            return self.names[module] or self.root_name, counts
        return self.root_name, {}

    def _module_hook(self, name: str, spec: ActivationSpec, params: dict[str, float]):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.paused or not isinstance(output, torch.Tensor):
                return
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self._add(name or self.root_name, spec, params, x if spec.needs_input else None, output)

        return hook

    def record_function(self, spec: ActivationSpec, params: dict[str, float],
                        x: torch.Tensor | None, y: torch.Tensor) -> None:
        caller, counts = self._caller()
        counts[spec.kind] = counts.get(spec.kind, 0) + 1
        n = counts[spec.kind]
        name = f"{caller}:{spec.kind}" + (f"#{n}" if n > 1 else "")
        self._add(name, spec, params, x, y)

    def _add(self, name: str, spec: ActivationSpec, params: dict[str, float],
             x: torch.Tensor | None, y: torch.Tensor) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            with torch.no_grad():
                site = self.sites.get(name)
                if site is None:
                    site = self.sites[name] = _Site(name, spec)
                site.add(x, y, params, self.floor)
        finally:
            self._busy = False

    def check_cut(self, func: Callable[..., Any], args: tuple[Any, ...], result: Any) -> None:
        """Note an operation that cut the graph (or has zero derivative) on a tensor needing grad."""
        if self._busy or not self._stack:  # only inside a module's forward (not in loss/logging code)
            return
        needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if not needs_grad:
            return
        op = getattr(func, "__name__", str(func))
        if op in _ATTRIBUTE_ACCESS:
            return
        cut = isinstance(result, torch.Tensor) and not result.requires_grad
        if cut or op in ZERO_GRADIENT_OPS:
            caller, _ = self._caller()
            ops = self.cut_ops.setdefault(caller, [])
            label = op if cut else f"{op} (zero derivative)"
            if label not in ops:
                ops.append(label)

    def collect(self) -> tuple[list[torch.Tensor], Callable[[list[np.ndarray]], ActivationRecord]]:
        """Device tensors to copy to the host, and a function turning the copies into a record.
        Resets the statistics for the next activation step."""
        sites = [s for s in self.sites.values() if s.below is not None]
        cut_ops = {k: list(v) for k, v in self.cut_ops.items()}
        self.sites = {}
        self.cut_ops = {}
        chunks: list[torch.Tensor] = []
        if sites:
            home = sites[0].below.device  # type: ignore[union-attr]
            sums = torch.stack([s.sums(home) for s in sites])
            alive = [s.alive.to(home) if s.alive is not None else None for s in sites]
            if _data_parallel():  # every rank must see (and decide on) the same statistics
                sums, alive = _reduce_across_ranks(sums, alive)
            dead = torch.stack([
                (~a).sum(dtype=torch.float32) if a is not None
                else torch.tensor(math.nan, device=home) for a in alive
            ])
            chunks.append(torch.cat([sums, dead[:, None]], dim=1))

        def finish(host: list[np.ndarray]) -> ActivationRecord:
            values = host[0].reshape(len(sites), 4) if sites else np.zeros((0, 4))
            elements = values[:, 2]
            units = np.array([s.units for s in sites], dtype=float)
            with np.errstate(divide="ignore", invalid="ignore"):
                return ActivationRecord(
                    sites=[s.name for s in sites],
                    kinds=[s.spec.kind for s in sites],
                    families=[s.spec.family for s in sites],
                    saturated=values[:, 0] / elements,
                    dead=values[:, 3] / units,
                    gain=values[:, 1] / elements,
                    calls=np.array([s.calls for s in sites], dtype=float),
                    cut_ops=cut_ops,
                )

        return chunks, finish
