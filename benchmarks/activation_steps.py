"""What one activation step and one parameter step cost, part by part, in a hand-written loop.

Plain training, gradients only (activation and parameter statistics off), activation
statistics on every step and parameter statistics on every step take turns every optimizer step
in one process (so they share the machine's drifts), each on its own copy of one model (a
monitor's hooks then never fire in another configuration's passes) and one batch. Prints the mean milliseconds of the forward pass, the backward pass,
``monitor.step()`` and the whole step of each, and what an activation step and a parameter
step add to a gradients-only step (graddiag's defaults take one of each every 50 steps).
Usage::

    python benchmarks/activation_steps.py               # MLP 20x256, 250 steps each
    python benchmarks/activation_steps.py --steps 400 --json out.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import loop_arguments, mlp  # noqa: E402
from graddiag import GradientMonitor  # noqa: E402

PARTS = ("forward", "backward", "monitor.step()", "whole step")
GRADIENTS = "gradients only"
OPTIONS = {
    "plain": None,
    "plain again (A/A)": None,
    GRADIENTS: {"activation_every_n_steps": 0, "param_every_n_steps": 0},
    "activation statistics every step": {"activation_every_n_steps": 1, "param_every_n_steps": 0},
    "parameter statistics every step": {"activation_every_n_steps": 0, "param_every_n_steps": 1},
}


def measure(steps: int, depth: int, width: int, warmup: int = 20
            ) -> dict[str, dict[str, list[float]]]:
    """Per-step wall times of each configuration and part, interleaved every step."""
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    runs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, GradientMonitor | None]] = {}
    for name, options in OPTIONS.items():
        torch.manual_seed(0)
        model = mlp(depth=depth, width=width)
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        monitor = None if options is None else GradientMonitor(
            model, reporters=[], optimizers=optimizer, early_steps=0, **options)
        runs[name] = model, optimizer, monitor
    times: dict[str, dict[str, list[float]]] = {name: {part: [] for part in PARTS}
                                                for name in OPTIONS}
    for call in range(warmup + steps):
        for name, (model, optimizer, monitor) in runs.items():
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            forward = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            backward = time.perf_counter()
            if monitor is not None:
                monitor.step(call)
            stepped = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
            if call >= warmup:
                for part, seconds in zip(PARTS, (forward - start, backward - forward,
                                                 stepped - backward, end - start)):
                    times[name][part].append(seconds)
    for _, _, monitor in runs.values():
        if monitor is not None:
            monitor.close()
    return times


def main(argv: list[str] | None = None) -> int:
    args = loop_arguments(__doc__.splitlines()[0], argv, steps=250)
    times = measure(args.steps, args.depth, args.width)
    means = {name: {part: statistics.fmean(t) * 1e3 for part, t in parts.items()}
             for name, parts in times.items()}
    print(f"MLP {args.depth}x{args.width}, {args.steps} steps per configuration, interleaved; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); mean ms per step")
    print(f"  {'configuration':<34}" + "".join(f"{part:>16}" for part in PARTS))
    for name, row in means.items():
        print(f"  {name:<34}" + "".join(f"{row[part]:>16.3f}" for part in PARTS))
    result: dict[str, dict[str, float]] = {name: dict(row) for name, row in means.items()}
    for name in ("activation statistics every step", "parameter statistics every step"):
        extra = {part: means[name][part] - means[GRADIENTS][part] for part in PARTS}
        result[f"extra: {name}"] = extra
        print(f"  {name} adds to a gradients-only step: "
              + ", ".join(f"{part} {value:+.3f}" for part, value in extra.items()) + " ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
