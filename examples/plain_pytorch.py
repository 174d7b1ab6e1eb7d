"""GradientMonitor in a hand-written PyTorch loop.

Autograd recap: tensors created with ``requires_grad=True`` (all ``nn.Parameter``s are) record
the operations applied to them; ``loss.backward()`` fills each one's ``.grad``. Before the first
``backward()`` a parameter's ``.grad`` is ``None`` (so ``p.grad.zero_()`` would fail there: use
``optimizer.zero_grad()``), and ``backward()`` *adds* to ``.grad``, so it must be reset each step.
``monitor.step()`` reads those ``.grad`` tensors, after ``backward()`` and before
``optimizer.step()``.

    python examples/plain_pytorch.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from graddiag import GradientMonitor
from graddiag.demos.data import digits_tensors
from graddiag.demos.models import build_mlp


def main(argv: list[str] | None = None) -> GradientMonitor:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x, y = digits_tensors()

    # requires_grad / backward / .grad on a single tensor, as in any autograd tutorial
    w = torch.tensor([2.0], requires_grad=True)
    assert w.grad is None  # nothing has flowed back yet
    (w**2 + 3 * w + 1).backward()
    print(f"d/dw (w^2 + 3w + 1) at w=2: {w.grad.item()}")  # 2w + 3 = 7

    model = build_mlp(64, 10, depth=6, width=64, activation="tanh", init="xavier")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with GradientMonitor(model, activation_every_n_steps=25) as monitor:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()  # fills p.grad for every parameter
            report = monitor.step()
            if report.should_skip:  # only with on_nonfinite/on_exploding="skip"
                continue
            optimizer.step()
    history = monitor.history
    first = history[history.layer == "0"].grad_norm
    print(f"first layer's gradient norm: median {first.median():.3g} over {len(first)} steps")
    print(f"findings: {[str(f) for f in monitor.findings] or 'none'}")
    return monitor


if __name__ == "__main__":
    main()
