"""How to analyse one activation: its kind, family and local derivative |f'(x)|."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

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

