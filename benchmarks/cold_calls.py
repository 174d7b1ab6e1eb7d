"""Why graddiag's per-step host work costs more inside training than in a microbenchmark.

A training step streams tens of megabytes through the caches (weights, activations, gradients,
optimizer state); the few microseconds of Python, numpy and torch dispatch that graddiag runs per
step then start from cold caches. This script times the same small calls twice: repeated
back to back ("hot"), and right after a 32 MB sweep of memory ("after a sweep"), which is what
they meet after a backward pass. It then times ``GradientMonitor.step()`` on one model both ways
(called again and again on the same gradients, and inside a training loop), and the ordinary
step part by part inside training (the floor, the read and its host copy, the record, the row
of a step kept to be judged in a block, the whole step). Usage::

    python benchmarks/cold_calls.py
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import _data, mlp  # noqa: E402
from graddiag import GradientMonitor  # noqa: E402
from graddiag.measure.transfer import HostCopy  # noqa: E402


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
    parts_in_training()
    return 0


def parts_in_training(steps: int = 500) -> None:
    """The ordinary step part by part, inside training: plain, the floor, the floor's norms
    stacked into a row and checked finite (the least a kept row needs), the read and its host
    copy, the read, copy and record, a kept plain step's row (its records made eight at a time,
    not judged), and the whole gradients-only ``monitor.step()`` (kept steps judged in blocks),
    taking turns every step on one model (the order rotating each round); mean extra over
    plain."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = _data()
    xs, ys = data.tensors
    whole = GradientMonitor(model, watch=None, reporters=[], activation_every_n_steps=0,
                            param_every_n_steps=0)
    parts = GradientMonitor(model, watch=None, reporters=[], activation_every_n_steps=0,
                            param_every_n_steps=0)
    parts.step(0)  # settles the layers and builds the probe
    measurement = parts._measurement
    probe = measurement._probe_for(0, None)

    def kept_row(step: int) -> None:  # a plain step's row; every eighth, the block's records
        measurement.keep(step + 1, 8)
        if measurement.kept_full:
            measurement.take_kept()
    params = list(model.parameters())
    row = torch.zeros(len(params))
    row_values = memoryview(row.numpy())

    def checked_row(step: int) -> bool:  # the least a kept row needs: stacked, checked finite
        torch.stack(torch._foreach_norm([p.grad for p in params]), out=row)
        return math.isfinite(sum(row_values))
    configs: dict[str, Callable[[int], object]] = {
        "plain": lambda step: None,
        "the floor (.grad list, _foreach_norm)":
            lambda step: torch._foreach_norm([p.grad for p in params if p.grad is not None]),
        "the floor stacked into a row, checked finite": checked_row,
        "the read and its one host copy":
            lambda step: HostCopy([probe.read().layer_norms]).result(),
        "the read, the copy and the record": lambda step: measurement.start(step + 1)(),
        "a kept step's row (records made 8 at a time)": kept_row,
        "GradientMonitor.step() (gradients only)": lambda step: whole.step(step + 1),
    }
    names = list(configs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps * len(names)):
        name = names[(i + i // len(names)) % len(names)]
        own = i // len(names)
        batch = slice((i % 64) * 64, (i % 64 + 1) * 64)
        start = time.perf_counter()
        loss = F.cross_entropy(model(xs[batch]), ys[batch])
        optimizer.zero_grad()
        loss.backward()
        configs[name](own)
        optimizer.step()
        if own >= 10:
            times[name].append(time.perf_counter() - start)
    plain = statistics.fmean(times["plain"])
    print(f"\nThe ordinary step part by part, inside training (MLP 20x256, {steps} steps each, "
          f"taking turns; plain {plain * 1e3:.2f} ms): mean extra over plain, us")
    for name in names[1:]:
        print(f"  {name:<44} {(statistics.fmean(times[name]) - plain) * 1e6:>6.0f}")
    whole.close()
    parts.close()


if __name__ == "__main__":
    raise SystemExit(main())
