"""What the front-loaded schedule costs: graddiag defaults against ``early_steps=0`` and plain.

One model and one batch; the configurations take turns every optimizer step in one process (so
they share the machine's drifts), each monitor numbering its own calls from 0, so its early
steps fall inside the timed window. Prints the **mean** step time of each configuration over
all its steps (the expensive early steps included) and the one-off extra time of the first
steps. Usage::

    python benchmarks/early_steps.py               # MLP 20x256, 500 steps per configuration
    python benchmarks/early_steps.py --steps 1000 --json out.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import loop_arguments, mlp  # noqa: E402
from graddiag import GradientMonitor  # noqa: E402

CONFIGS = ["plain", "plain again (A/A)", "graddiag defaults", "graddiag early_steps=0"]


def measure(steps: int, depth: int, width: int) -> dict[str, list[float]]:
    """Per-step wall times of each configuration, interleaved every step."""
    torch.manual_seed(0)
    model = mlp(depth=depth, width=width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def train_step(monitor: GradientMonitor | None, call: int) -> None:
        # each monitor watches only its own steps' forward passes (watch=None below)
        with monitor.watch_activations(call) if monitor is not None else nullcontext():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.step(call)
        optimizer.step()

    for _ in range(20):  # warm-up without monitors: every monitor's step 0 is timed
        train_step(None, 0)
    monitors = {
        "graddiag defaults": GradientMonitor(model, reporters=[], optimizers=optimizer,
                                             watch=None),
        "graddiag early_steps=0": GradientMonitor(model, reporters=[], optimizers=optimizer,
                                                  early_steps=0, watch=None),
    }
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for i in range(steps * len(CONFIGS)):
        name = CONFIGS[i % len(CONFIGS)]
        start = time.perf_counter()
        train_step(monitors.get(name), len(times[name]))
        times[name].append(time.perf_counter() - start)
    for monitor in monitors.values():
        monitor.close()
    return times


def main(argv: list[str] | None = None) -> int:
    args = loop_arguments(__doc__.splitlines()[0], argv, steps=500)
    times = measure(args.steps, args.depth, args.width)
    base = statistics.fmean(times["plain"])
    print(f"MLP {args.depth}x{args.width}, {args.steps} steps per configuration, interleaved; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"  {'configuration':<26} {'mean ms':>8} {'mean ratio':>10} {'steps 0-4 ms':>13}")
    result = {}
    for name in CONFIGS:
        mean = statistics.fmean(times[name])
        first = sum(times[name][:5])
        result[name] = {"mean_ms": mean * 1e3, "ratio": mean / base, "first5_ms": first * 1e3}
        print(f"  {name:<26} {mean * 1e3:>8.2f} {mean / base:>10.3f} {first * 1e3:>13.1f}")
    extra = result["graddiag defaults"]["first5_ms"] - result["graddiag early_steps=0"]["first5_ms"]
    print(f"  one-off extra time of the early steps: {extra:.1f} ms")
    result["early_extra_ms"] = {"value": extra}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
