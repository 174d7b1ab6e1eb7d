"""Activation statistics: how much gradient each activation site lets through.

A registry maps activation module types and functions to an :class:`ActivationSpec`: its kind,
its family (``"saturating"`` sigmoid/tanh-like or ``"rectifier"`` ReLU-like) and its local
derivative ``|f'(x)|``. On activation steps only, :class:`ActivationProbe` hooks the registered
modules and, optionally, intercepts functional calls (``torch.sigmoid``, ``F.relu``, ...) made
inside any ``forward`` through a ``TorchFunctionMode``; between those steps nothing is installed.

Per site and step it accumulates, on device:

* saturated fraction: elements whose ``|f'(x)|`` is below ``derivative_floor``;
* dead fraction: units (channels for 4-D/5-D outputs, the last dimension otherwise) whose
  ``|f'(x)|`` is below the floor for every sample;
* gain: the mean ``|f'(x)|``, the factor by which the site scales gradients passing back.

All arithmetic is done in float32 on upcast values, so float16/bfloat16 outputs are compared
with exact thresholds, not thresholds rounded to the low-precision type.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from graddiag.measure.layers import clean_name

log = logging.getLogger("graddiag")
from graddiag.data.records import ActivationRecord

Family = Literal["saturating", "rectifier"]
Derivative = Callable[[torch.Tensor | None, torch.Tensor, dict[str, float]], torch.Tensor]
ParamsOf = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class ActivationSpec:
    """How to analyse one activation.

    Attributes:
        kind: Short name used in tables and messages (``"sigmoid"``).
        family: ``"saturating"`` sites are checked for saturation, ``"rectifier"`` sites for
            dead units.
        derivative: ``(input or None, output, params) -> |f'(x)|`` on float32 tensors.
        needs_input: Whether ``derivative`` needs the input (otherwise the output suffices).
    """

    kind: str
    family: Family
    derivative: Derivative
    needs_input: bool = False


def _sigmoid(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return y * (1.0 - y)


def _tanh(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return 1.0 - y * y


def _relu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return (y > 0).float()


def _leaky(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return torch.where(y > 0, 1.0, abs(p.get("negative_slope", 0.01)))


def _band(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    inside = (y > p.get("min_val", -1.0)) & (y < p.get("max_val", 1.0))
    return inside.float() * p.get("slope", 1.0)


def _elu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    alpha = p.get("alpha", 1.0)
    return torch.where(y > 0, 1.0, y + alpha)


def _gelu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    assert x is not None
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _silu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    assert x is not None
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


SIGMOID = ActivationSpec("sigmoid", "saturating", _sigmoid)
TANH = ActivationSpec("tanh", "saturating", _tanh)
RELU = ActivationSpec("relu", "rectifier", _relu)
LEAKY_RELU = ActivationSpec("leaky_relu", "rectifier", _leaky)
RELU6 = ActivationSpec("relu6", "rectifier", _band)
HARDTANH = ActivationSpec("hardtanh", "saturating", _band)
HARDSIGMOID = ActivationSpec("hardsigmoid", "saturating", _band)
ELU = ActivationSpec("elu", "rectifier", _elu)
GELU = ActivationSpec("gelu", "rectifier", _gelu, needs_input=True)
SILU = ActivationSpec("silu", "rectifier", _silu, needs_input=True)

_RELU6_PARAMS = {"min_val": 0.0, "max_val": 6.0}
_HARDSIGMOID_PARAMS = {"min_val": 0.0, "max_val": 1.0, "slope": 1.0 / 6.0}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: float) -> float:
    if len(args) > pos:
        return float(args[pos])
    return float(kwargs.get(name, default))


@dataclass
class ActivationRegistry:
    """Maps module types and functions to activation specs. Open to user additions::

        registry = default_registry.copy()
        registry.register_module(MySwish, ActivationSpec("swish", "rectifier", swish_grad,
                                                         needs_input=True))
    """

    modules: dict[type, tuple[ActivationSpec, ParamsOf]] = field(default_factory=dict)
    functions: dict[Callable[..., Any], tuple[ActivationSpec, ParamsOf]] = field(default_factory=dict)

    def register_module(
        self, module_type: type, spec: ActivationSpec, params: ParamsOf | None = None
    ) -> None:
        """Analyse every module of ``module_type`` (and subclasses); ``params(module)`` gives
        the numbers ``spec.derivative`` needs."""
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise ValueError(f"module_type must be an nn.Module subclass, got {module_type!r}")
        self.modules[module_type] = (spec, params or (lambda module: {}))

    def register_function(
        self, function: Callable[..., Any], spec: ActivationSpec, params: ParamsOf | None = None
    ) -> None:
        """Analyse calls of ``function`` inside ``forward``; ``params(args, kwargs)`` gives
        the numbers ``spec.derivative`` needs."""
        if not callable(function):
            raise ValueError(f"function must be callable, got {function!r}")
        self.functions[function] = (spec, params or (lambda args, kwargs: {}))

    def for_module(self, module: nn.Module) -> tuple[ActivationSpec, dict[str, float]] | None:
        for cls in type(module).__mro__:
            entry = self.modules.get(cls)
            if entry is not None:
                return entry[0], entry[1](module)
        return None

    def copy(self) -> ActivationRegistry:
        return ActivationRegistry(dict(self.modules), dict(self.functions))


def _build_default() -> ActivationRegistry:
    r = ActivationRegistry()
    r.register_module(nn.Sigmoid, SIGMOID)
    r.register_module(nn.Tanh, TANH)
    r.register_module(nn.ReLU, RELU)
    r.register_module(nn.LeakyReLU, LEAKY_RELU, lambda m: {"negative_slope": m.negative_slope})
    # ReLU6 subclasses Hardtanh; its own entry comes first in the MRO walk.
    r.register_module(nn.ReLU6, RELU6, lambda m: dict(_RELU6_PARAMS))
    r.register_module(nn.Hardtanh, HARDTANH, lambda m: {"min_val": m.min_val, "max_val": m.max_val})
    r.register_module(nn.Hardsigmoid, HARDSIGMOID, lambda m: dict(_HARDSIGMOID_PARAMS))
    r.register_module(nn.ELU, ELU, lambda m: {"alpha": m.alpha})
    r.register_module(nn.GELU, GELU)
    r.register_module(nn.SiLU, SILU)
    for fn in (torch.sigmoid, torch.Tensor.sigmoid, torch.special.expit, F.sigmoid):
        r.register_function(fn, SIGMOID)
    for fn in (torch.tanh, torch.Tensor.tanh, F.tanh):
        r.register_function(fn, TANH)
    for fn in (torch.relu, torch.Tensor.relu, F.relu, torch.relu_, torch.Tensor.relu_):
        r.register_function(fn, RELU)
    r.register_function(
        F.leaky_relu, LEAKY_RELU,
        lambda a, k: {"negative_slope": _arg(a, k, 1, "negative_slope", 0.01)},
    )
    r.register_function(F.relu6, RELU6, lambda a, k: dict(_RELU6_PARAMS))
    r.register_function(
        F.hardtanh, HARDTANH,
        lambda a, k: {"min_val": _arg(a, k, 1, "min_val", -1.0),
                      "max_val": _arg(a, k, 2, "max_val", 1.0)},
    )
    r.register_function(F.hardsigmoid, HARDSIGMOID, lambda a, k: dict(_HARDSIGMOID_PARAMS))
    r.register_function(F.elu, ELU, lambda a, k: {"alpha": _arg(a, k, 1, "alpha", 1.0)})
    r.register_function(F.gelu, GELU)
    r.register_function(F.silu, SILU)
    return r


default_registry = _build_default()

# Operations whose derivative is zero everywhere: the graph stays connected, gradients are 0.
ZERO_GRADIENT_OPS = frozenset({"round", "floor", "ceil", "trunc", "sign", "round_", "floor_",
                               "ceil_", "trunc_", "sign_"})

_ATTRIBUTE_ACCESS = frozenset({"__get__", "__set__", "size", "dim", "numel", "is_floating_point"})


def _unit_dim(ndim: int) -> int:
    return 1 if ndim in (4, 5) else ndim - 1


class _Site:
    """Running statistics of one activation site during one step (device scalars)."""

    def __init__(self, name: str, spec: ActivationSpec) -> None:
        self.name = name
        self.spec = spec
        self.calls = 0
        self.elements = 0
        self.units = 0
        self.below: torch.Tensor | None = None
        self.gain: torch.Tensor | None = None
        self.alive: torch.Tensor | None = None

    def add(self, x: torch.Tensor | None, y: torch.Tensor, params: dict[str, float],
            floor: float) -> None:
        y32 = y.detach().float()
        x32 = x.detach().float() if x is not None else None
        d = self.spec.derivative(x32, y32, params).abs()
        if d.ndim == 0:
            d = d.reshape(1)
        below = d < floor
        below_sum = below.sum(dtype=torch.float32)
        gain_sum = d.sum(dtype=torch.float32)
        dim = _unit_dim(d.ndim)
        alive = (~below).movedim(dim, 0).reshape(d.shape[dim], -1).any(dim=1) if d.ndim > 1 else ~below
        if self.below is None:
            self.below, self.gain, self.alive = below_sum, gain_sum, alive
        else:
            self.below = self.below + below_sum
            self.gain = self.gain + gain_sum
            if self.alive is not None and self.alive.shape == alive.shape:
                self.alive = self.alive | alive
            else:  # the site ran with another width: unit statistics are not comparable
                self.alive = None
        self.calls += 1
        self.elements += d.numel()
        self.units = int(alive.numel())

    def sums(self, device: torch.device) -> torch.Tensor:
        """``[saturated elements, sum of |f'|, elements]`` on ``device``."""
        assert self.below is not None and self.gain is not None
        elements = torch.tensor(float(self.elements), device=device)
        return torch.stack([self.below.to(device), self.gain.to(device), elements])


def _data_parallel() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _reduce_across_ranks(
    sums: torch.Tensor, alive: list[torch.Tensor | None]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Sum the counts over ranks; a unit is alive if it fired on any rank. Two collectives."""
    dist = torch.distributed
    sums = sums.clone()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    present = [a for a in alive if a is not None]
    if present:
        flat = torch.cat([a.reshape(-1).to(torch.uint8) for a in present])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        parts = iter(torch.split(flat, [a.numel() for a in present]))
        alive = [next(parts).reshape(a.shape).bool() if a is not None else None for a in alive]
    return sums, alive


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
