"""Why graddiag's per-step host work costs more inside training than in a microbenchmark.

A training step streams tens of megabytes through the caches (weights, activations, gradients,
optimizer state); the few microseconds of Python, numpy and torch dispatch that graddiag runs per
step then start from cold caches. This script times the same small calls twice: repeated
back to back ("hot"), and right after a 32 MB sweep of memory ("after a sweep"), which is what
they meet after a backward pass. It then times ``GradientMonitor.step()`` on one model both ways:
called again and again on the same gradients, and inside a training loop. Usage::

    python benchmarks/cold_calls.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import mlp  # noqa: E402
from graddiag import GradientMonitor  # noqa: E402


def hot_and_cold(fn: Callable[[], object], sweep: torch.Tensor, repeats: int = 300
                 ) -> tuple[float, float]:
    """Median microseconds of ``fn`` called back to back, and right after a sweep of ``sweep``."""
    hot, cold = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        hot.append(time.perf_counter() - start)
        sweep.mul_(1.0000001)
        start = time.perf_counter()
        fn()
        cold.append(time.perf_counter() - start)
    return statistics.median(hot) * 1e6, statistics.median(cold) * 1e6


def main() -> int:
    torch.set_num_threads(1)
    sweep = torch.randn(8_000_000)  # 32 MB
    norms = torch.rand(41)
    values = np.random.default_rng(0).random(41)
    level = np.zeros(41)

    def numpy_ops() -> None:  # ten small array operations, as a rule runs them
        logs = np.log(values)
        step = logs - level
        step.max()
        step *= 0.1
        (values < 1e-3).any()
        (values > 1e3).any()
        np.isfinite(values).all()
        values.min()
        values.max()

    calls: dict[str, Callable[[], object]] = {
        "ten numpy operations on 41 values": numpy_ops,
        "four torch operations on 41 values": lambda: torch.zeros(41).add_(norms).pow(2).sum(),
        "tensor.numpy().astype(float64), 41 values": lambda: norms.numpy().astype(np.float64),
        "a 300-iteration Python loop": lambda: sum(i for i in range(300)),
    }
    print(f"torch {torch.__version__}, 1 thread; median microseconds")
    print(f"  {'call':<46} {'hot':>8} {'after a 32 MB sweep':>20}")
    for label, fn in calls.items():
        hot, cold = hot_and_cold(fn, sweep)
        print(f"  {label:<46} {hot:>8.1f} {cold:>20.1f}")

    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    monitor = GradientMonitor(model, watch=None, reporters=[], activation_every_n_steps=0,
                              param_every_n_steps=0)
    params = list(model.parameters())
    in_training, floor_in_training = [], []
    for step in range(300):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        start = time.perf_counter()
        torch._foreach_norm([p.grad for p in params if p.grad is not None])
        middle = time.perf_counter()
        monitor.step(step)
        end = time.perf_counter()
        if step >= 20:
            floor_in_training.append(middle - start)
            in_training.append(end - middle)
        optimizer.step()
    again = []
    for _ in range(300):
        start = time.perf_counter()
        monitor.step()
        again.append(time.perf_counter() - start)
    floor_again = []
    for _ in range(300):
        start = time.perf_counter()
        torch._foreach_norm([p.grad for p in params if p.grad is not None])
        floor_again.append(time.perf_counter() - start)
    print("\nMLP 20x256 (42 tensors), gradients only (no activation or parameter steps), mean us:")
    print(f"  {'':<36} {'called again and again':>22} {'inside training':>16}")
    print(f"  {'the floor (.grad list, _foreach_norm)':<36} "
          f"{statistics.fmean(floor_again) * 1e6:>22.0f} "
          f"{statistics.fmean(floor_in_training) * 1e6:>16.0f}")
    print(f"  {'GradientMonitor.step()':<36} {statistics.fmean(again) * 1e6:>22.0f} "
          f"{statistics.fmean(in_training) * 1e6:>16.0f}")
    monitor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
