"""Running activation statistics of one site during one step, reduced on device."""

from __future__ import annotations

import torch

from graddiag.measure.activations.specs import ActivationSpec


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

