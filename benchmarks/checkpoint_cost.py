"""What graddiag's state adds to a checkpoint at the default history bound (200,000 rows).

Trains a 21-layer MLP (narrow, so the run is quick) with ``GradientMonitor`` defaults until the
history holds ``--rows`` rows, then times ``torch.save`` of ``monitor.state_dict()`` and
``torch.load(weights_only=True)`` + ``load_state_dict`` into a fresh monitor, median of
``--repeats``. Prints the rows, records, tensors in the state, bytes and times.

    python benchmarks/checkpoint_cost.py [--rows 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
from torch import nn

from graddiag import GradientMonitor


def _model(depth: int = 21, width: int = 8) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width, width if i < depth - 1 else 2), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _count_tensors(state: object) -> int:
    if isinstance(state, torch.Tensor):
        return 1
    if isinstance(state, dict):
        return sum(_count_tensors(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_count_tensors(v) for v in state)
    return 0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = _model()
    x = torch.randn(16, 8)
    monitor = GradientMonitor(model, reporters=[], max_history_rows=args.rows)
    layers = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    for _ in range(args.rows // layers):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        monitor.step()
    monitor.close()
    saves, loads, size = [], [], 0
    for _ in range(args.repeats):
        buffer = io.BytesIO()
        start = time.perf_counter()
        torch.save(monitor.state_dict(), buffer)
        saves.append(time.perf_counter() - start)
        size = buffer.tell()
        buffer.seek(0)
        fresh = GradientMonitor(model, reporters=[], max_history_rows=args.rows)
        start = time.perf_counter()
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        loads.append(time.perf_counter() - start)
        fresh.close()
    result = {
        "rows": monitor._history.rows, "records": len(monitor._history.records),
        "tensors": _count_tensors(monitor.state_dict()), "mb": size / 1e6,
        "save_s": statistics.median(saves), "load_s": statistics.median(loads),
    }
    print(f"history: {result['rows']:,} rows in {result['records']:,} records; state: "
          f"{result['tensors']:,} tensors, {result['mb']:.2f} MB; save {result['save_s']:.3f} s, "
          f"load (weights_only=True) {result['load_s']:.3f} s (median of {args.repeats})")
    return result


if __name__ == "__main__":
    main()
