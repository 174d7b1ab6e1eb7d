"""The registry from activation module types and functions to specs, open to user additions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graddiag.measure.activations.specs import (
    _HARDSIGMOID_PARAMS,
    _RELU6_PARAMS,
    CLIPPED_GELU,
    ELU,
    GELU,
    GELU_TANH,
    HARDSIGMOID,
    HARDSWISH,
    HARDTANH,
    LAPLACE,
    LEAKY_RELU,
    MISH,
    QUICK_GELU,
    RELU,
    RELU6,
    RELU_SQUARED,
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
        registry.register_module_name("mylib.layers.Swish", ...)  # without importing mylib

    A registered module is one site with its own derivative: the ``torch.tanh``/``F.gelu``
    calls it makes inside are not counted as sites of their own.
    """

    modules: dict[type, tuple[ActivationSpec, ParamsOf]] = field(default_factory=dict)
    functions: dict[Callable[..., Any], tuple[ActivationSpec, ParamsOf]] = field(default_factory=dict)
    #: ``"package.module.ClassName"`` -> spec: classes matched by where they are defined.
    module_names: dict[str, tuple[ActivationSpec, ParamsOf]] = field(default_factory=dict)
    _by_type: dict[type, tuple[ActivationSpec, ParamsOf] | None] = field(
        default_factory=dict, repr=False, compare=False)

    def register_module(
        self, module_type: type, spec: ActivationSpec, params: ParamsOf | None = None
    ) -> None:
        """Analyse every module of ``module_type`` (and subclasses); ``params(module)`` gives
        the numbers ``spec.derivative`` needs."""
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise ValueError(f"module_type must be an nn.Module subclass, got {module_type!r}")
        self.modules[module_type] = (spec, params or (lambda module: {}))
        self._by_type.clear()

    def register_module_name(
        self, qualified_name: str, spec: ActivationSpec, params: ParamsOf | None = None
    ) -> None:
        """Analyse modules whose class (or a base class) is ``qualified_name``, e.g.
        ``"transformers.activations.NewGELUActivation"``, without importing its package."""
        if not isinstance(qualified_name, str) or "." not in qualified_name:
            raise ValueError("qualified_name must be 'package.module.ClassName', "
                             f"got {qualified_name!r}")
        self.module_names[qualified_name] = (spec, params or (lambda module: {}))
        self._by_type.clear()

    def register_function(
        self, function: Callable[..., Any], spec: ActivationSpec, params: ParamsOf | None = None
    ) -> None:
        """Analyse calls of ``function`` inside ``forward``; ``params(args, kwargs)`` gives
        the numbers ``spec.derivative`` needs."""
        if not callable(function):
            raise ValueError(f"function must be callable, got {function!r}")
        self.functions[function] = (spec, params or (lambda args, kwargs: {}))

    def _entry(self, module_type: type) -> tuple[ActivationSpec, ParamsOf] | None:
        if module_type in self._by_type:
            return self._by_type[module_type]
        entry = None
        for cls in module_type.__mro__:
            entry = self.modules.get(cls) or self.module_names.get(
                f"{cls.__module__}.{cls.__qualname__}")
            if entry is not None:
                break
        self._by_type[module_type] = entry
        return entry

    def for_module(self, module: nn.Module) -> tuple[ActivationSpec, dict[str, float]] | None:
        entry = self._entry(type(module))
        return None if entry is None else (entry[0], entry[1](module))

    def is_activation(self, module: nn.Module) -> bool:
        """Whether ``module`` is a registered activation (one dictionary lookup once seen)."""
        return self._entry(type(module)) is not None

    def copy(self) -> ActivationRegistry:
        return ActivationRegistry(dict(self.modules), dict(self.functions), dict(self.module_names))


def _clip_params(module: Any) -> dict[str, float]:
    return {"min_val": float(module.min), "max_val": float(module.max)}


#: Hugging Face ``transformers.activations`` classes, matched by name (transformers is not
#: imported): each is one site with its own derivative, so GPT-2's ``gelu_new`` (built from
#: ``torch.tanh``) is a GELU, not a tanh site.
_HUGGING_FACE: list[tuple[str, ActivationSpec, ParamsOf | None]] = [
    ("GELUActivation", GELU, None),
    ("NewGELUActivation", GELU_TANH, None),
    ("FastGELUActivation", GELU_TANH, None),
    ("AccurateGELUActivation", GELU_TANH, None),
    ("GELUTanh", GELU_TANH, None),
    ("PytorchGELUTanh", GELU_TANH, None),
    ("QuickGELUActivation", QUICK_GELU, None),
    ("ClippedGELUActivation", CLIPPED_GELU, _clip_params),
    ("SiLUActivation", SILU, None),
    ("MishActivation", MISH, None),
    ("ReLUSquaredActivation", RELU_SQUARED, None),
    ("LaplaceActivation", LAPLACE, None),
]


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
    r.register_module(nn.GELU, GELU, lambda m: {"tanh": float(m.approximate == "tanh")})
    r.register_module(nn.SiLU, SILU)
    r.register_module(nn.Mish, MISH)
    r.register_module(nn.Hardswish, HARDSWISH)
    for name, spec, params in _HUGGING_FACE:
        r.register_module_name(f"transformers.activations.{name}", spec, params)
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
    r.register_function(
        F.gelu, GELU, lambda a, k: {"tanh": float(k.get("approximate", "none") == "tanh")})
    r.register_function(F.silu, SILU)
    r.register_function(F.mish, MISH)
    r.register_function(F.hardswish, HARDSWISH)
    return r


default_registry = _build_default()

# Operations whose derivative is zero everywhere: the graph stays connected, gradients are 0.
ZERO_GRADIENT_OPS = frozenset({"round", "floor", "ceil", "trunc", "sign", "round_", "floor_",
                               "ceil_", "trunc_", "sign_"})

_ATTRIBUTE_ACCESS = frozenset({"__get__", "__set__", "size", "dim", "numel", "is_floating_point"})

