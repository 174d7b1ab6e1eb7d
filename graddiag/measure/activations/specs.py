"""How to analyse one activation: its kind, family and local derivative |f'(x)|."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

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
        passes: For a derivative that is 1 or 0 (ReLU, ReLU6): ``(output, params) ->`` a bool
            tensor of the elements where it is 1 (NaN: 0), or a float tensor of 1.0 there and
            0.0 elsewhere (the built-ins', cheaper on a CPU). The statistics then count those
            elements instead of computing and summing ``derivative`` (``None``: not such a
            derivative).
    """

    kind: str
    family: Family
    derivative: Derivative
    needs_input: bool = False
    passes: Callable[[torch.Tensor, dict[str, float]], torch.Tensor] | None = None


def _sigmoid(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return y * (1.0 - y)


def _tanh(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return 1.0 - y * y


def _relu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return (y > 0).float()


def _relu_passes(y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    """1.0 where ``y > 0``, else 0.0 (NaN too), from float operations (cheaper than booleans)."""
    return y.sign().clamp_(min=0.0).nan_to_num_(0.0)


def _band_passes(y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    """1.0 strictly inside ``(min_val, max_val)``, else 0.0 (NaN too)."""
    above = (y - p.get("min_val", -1.0)).sign_().clamp_(min=0.0)
    under = (p.get("max_val", 1.0) - y).sign_().clamp_(min=0.0)
    return above.mul_(under).nan_to_num_(0.0)


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
    if p.get("tanh"):  # nn.GELU(approximate="tanh"), F.gelu(..., approximate="tanh")
        return _gelu_tanh(x, y, p)
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


_GELU_TANH_K = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    """``0.5 x (1 + tanh(k (x + 0.044715 x^3)))``, GPT-2's ``gelu_new``: one site, not a tanh."""
    assert x is not None
    t = torch.tanh(_GELU_TANH_K * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_TANH_K * (1.0 + 3 * 0.044715 * x * x)


def _clipped_gelu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    inside = (y > p.get("min_val", -10.0)) & (y < p.get("max_val", 10.0))
    return _gelu(x, y, {}) * inside.float()


def _quick_gelu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    """``x sigmoid(1.702 x)`` (CLIP)."""
    assert x is not None
    s = torch.sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1.0 - s)


def _mish(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    assert x is not None
    t = torch.tanh(torch.nn.functional.softplus(x))
    return t + x * (1.0 - t * t) * torch.sigmoid(x)


def _hardswish(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    assert x is not None
    return torch.where(x < -3.0, 0.0, torch.where(x > 3.0, 1.0, (2.0 * x + 3.0) / 6.0))


def _relu_squared(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    return 2.0 * torch.sqrt(y.clamp_min(0.0))  # y = relu(x)^2, f' = 2 relu(x)


def _laplace(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    """``0.5 (1 + erf((x - mu) / (sigma sqrt 2)))``: a Gaussian CDF, saturating at 0 and 1."""
    assert x is not None
    mu, sigma = p.get("mu", 0.707107), p.get("sigma", 0.282095)
    z = (x - mu) / sigma
    return torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))


def _silu(x: torch.Tensor | None, y: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    assert x is not None
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


SIGMOID = ActivationSpec("sigmoid", "saturating", _sigmoid)
TANH = ActivationSpec("tanh", "saturating", _tanh)
RELU = ActivationSpec("relu", "rectifier", _relu, passes=_relu_passes)
LEAKY_RELU = ActivationSpec("leaky_relu", "rectifier", _leaky)
RELU6 = ActivationSpec("relu6", "rectifier", _band, passes=_band_passes)
HARDTANH = ActivationSpec("hardtanh", "saturating", _band)
HARDSIGMOID = ActivationSpec("hardsigmoid", "saturating", _band)
ELU = ActivationSpec("elu", "rectifier", _elu)
GELU = ActivationSpec("gelu", "rectifier", _gelu, needs_input=True)
SILU = ActivationSpec("silu", "rectifier", _silu, needs_input=True)
GELU_TANH = ActivationSpec("gelu_tanh", "rectifier", _gelu_tanh, needs_input=True)
CLIPPED_GELU = ActivationSpec("clipped_gelu", "rectifier", _clipped_gelu, needs_input=True)
QUICK_GELU = ActivationSpec("quick_gelu", "rectifier", _quick_gelu, needs_input=True)
MISH = ActivationSpec("mish", "rectifier", _mish, needs_input=True)
HARDSWISH = ActivationSpec("hardswish", "rectifier", _hardswish, needs_input=True)
RELU_SQUARED = ActivationSpec("relu_squared", "rectifier", _relu_squared)
LAPLACE = ActivationSpec("laplace", "saturating", _laplace, needs_input=True)

_RELU6_PARAMS = {"min_val": 0.0, "max_val": 6.0}
_HARDSIGMOID_PARAMS = {"min_val": 0.0, "max_val": 1.0, "slope": 1.0 / 6.0}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: float) -> float:
    if len(args) > pos:
        return float(args[pos])
    return float(kwargs.get(name, default))

