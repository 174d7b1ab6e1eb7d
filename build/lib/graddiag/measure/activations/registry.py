"""The registry from activation module types and functions to specs, open to user additions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from graddiag.measure.activations.specs import (
    _HARDSIGMOID_PARAMS,
    _RELU6_PARAMS,
    ELU,
    GELU,
    HARDSIGMOID,
    HARDTANH,
    LEAKY_RELU,
    RELU,
    RELU6,
    SIGMOID,
    SILU,
    TANH,
    ActivationSpec,
    ParamsOf,
    _arg,
)


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

