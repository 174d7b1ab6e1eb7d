"""A custom ``torch.autograd.Function`` with its own backward: a hard threshold whose backward
is the derivative of a steep sigmoid (a surrogate gradient), checked with ``gradcheck`` and
monitored in training.

    python examples/custom_backward.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from graddiag import GradientMonitor
from graddiag.demos.data import digits_tensors


class SurrogateStep(torch.autograd.Function):
    """Forward: ``x > 0`` as 0/1. Backward: ``k * s(kx) * (1 - s(kx))``, the sigmoid's slope."""

    steepness = 4.0

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(SurrogateStep.steepness * x)
        return grad * SurrogateStep.steepness * s * (1 - s)


class SmoothStep(torch.autograd.Function):
    """The smooth function whose derivative SurrogateStep borrows (for gradcheck)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return torch.sigmoid(SurrogateStep.steepness * x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(SurrogateStep.steepness * x)
        return grad * SurrogateStep.steepness * s * (1 - s)


class SpikingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(SurrogateStep.apply(self.hidden(x)))


def main(argv: list[str] | None = None) -> GradientMonitor:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    probe = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SmoothStep.apply, (probe,)), "backward disagrees"
    print("gradcheck: the custom backward matches finite differences of the smooth step")

    torch.manual_seed(0)
    x, y = digits_tensors()
    model = SpikingMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with GradientMonitor(model) as monitor:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            monitor.step()
            optimizer.step()
    hidden = monitor.history.query("layer == 'hidden'").grad_norm
    print(f"hidden layer gradient norm through the surrogate: median {hidden.median():.3g}")
    print(f"findings: {[str(f) for f in monitor.findings] or 'none'}; final loss {loss.item():.3f}")
    return monitor


if __name__ == "__main__":
    main()
