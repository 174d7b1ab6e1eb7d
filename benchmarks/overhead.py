"""What graddiag costs a user: mean step time against plain training, logging steps included.

Every table's headline is the **mean** step time (total wall time of the timed steps over their
number, every logging, activation, parameter and figure step included) of a configuration over
plain training's, all configurations interleaved in one process (see ``benchmarks/harness.py``),
with an A/A control (plain against plain) showing the noise. Medians are a second column; they
hide the expensive steps. Usage::

    python benchmarks/overhead.py                 # full run (about 7 minutes on 2 idle CPU cores)
    python benchmarks/overhead.py --quick         # a few tiny steps, to check it still works
    python benchmarks/overhead.py --json out.json # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import costs  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    AA,
    DEFAULTS,
    EVERY10,
    FLOOR,
    LOOP_CONFIGS,
    PLAIN,
    Transformer,
    bootstrap_interval,
    measure_lightning,
    measure_loop,
    mlp,
    ratios,
    tensor_count,
)
from graddiag.reporters.budget import FIGURE_TIME_SHARE  # noqa: E402

LIGHTNING_MAIN = [PLAIN, AA, FLOOR, DEFAULTS, EVERY10]
LIGHTNING_RECIPES = [PLAIN, "graddiag everything every step",
                     "Lightning grad_norm + log_dict every step"]
# Histogram hooks queue work on TensorBoard's writer thread, which would run during the other
# configurations' steps: they are timed against plain training on their own.
HISTOGRAM_RECIPES = [PLAIN, "histogram hooks -> TensorBoard, every 10 steps",
                     "histogram hooks -> TensorBoard, every step"]


def say(text: str = "") -> None:
    print(text, flush=True)


def table(title: str, rows: dict[str, dict[str, float]], plain_ms: float, n: int) -> None:
    say(f"  -- {title} (plain {plain_ms:.2f} ms/step, {n} timed steps per configuration)")
    say(f"  {'configuration':<52} {'mean ratio':>10} {'median ratio':>12} {'ms/step':>8}")
    for name, row in rows.items():
        say(f"  {name:<52} {row['mean']:>10.3f} {row['median']:>12.3f} {row['ms']:>8.2f}")


def run_group(label: str, measure: Callable[[], dict[str, dict[str, float]]],
              out: dict[str, Any]) -> None:
    stats = measure()
    rows = ratios(stats)
    table(label, rows, stats[PLAIN]["mean"] * 1e3, int(stats[PLAIN]["n"]))
    out[label] = {"plain_ms": stats[PLAIN]["mean"] * 1e3, "rows": rows,
                  "times": {name: s["times"] for name, s in stats.items()}}


def above_floor(means: dict[str, float], figure: float) -> float:
    """Defaults over plain minus the floor over plain, the defaults' mean step stretched by the
    figures at their bound (``figure``: the share of the time left to training)."""
    return (means[DEFAULTS] / figure - means[FLOOR]) / means[PLAIN]


def every10_ratio(means: dict[str, float], figure: float) -> float:
    """``every_n_steps=10`` over plain, stretched by the figures at their bound."""
    return means[EVERY10] / figure / means[PLAIN]


def verdicts(results: dict[str, Any]) -> None:
    """The targets, read off this run. Inside Lightning graddiag also draws gradient-flow
    figures on multiples of 500 steps while they, the next one included, stay within 0.25 % of
    the wall time since the first step; a window of a few hundred steps holds none, so their
    bound is added before comparing: figures taking 0.25 % of the time make the mean step
    1 / (1 - 0.0025) times longer. Each comparison has its 95 % interval beside it (see
    :func:`~benchmarks.harness.bootstrap_interval`): a target inside its interval is within this
    run's noise."""
    say("\nTargets (mean ratios; floor = one _foreach_norm per step; inside Lightning with "
        "the figures at their bound, 0.25 % of the wall time; 95 % intervals from resampling "
        "the timed rounds):")
    for model, groups in results["models"].items():
        for label, group in groups.items():
            rows = group["rows"]
            if DEFAULTS not in rows or FLOOR not in rows:
                continue
            means = {name: statistics.fmean(t) for name, t in group["times"].items()}
            margin = 0.01 if label.startswith("hand-written") else 0.02
            figure = 1.0 - FIGURE_TIME_SHARE if label.startswith("Lightning") else 1.0
            above = group["above_floor"] = above_floor(means, figure)
            if label.startswith("Lightning"):
                group["defaults_with_figure"] = rows[DEFAULTS]["mean"] / figure
            low, high = group["above_floor_interval"] = bootstrap_interval(
                group["times"], lambda m, figure=figure: above_floor(m, figure))
            line = (f"  {model}, {label}: defaults {rows[DEFAULTS]['mean'] / figure:.3f} vs "
                    f"floor {rows[FLOOR]['mean']:.3f} + {margin:.2f} -> "
                    f"{'met' if above <= margin else 'MISSED'} (defaults - floor {above:.3f}, "
                    f"95 % interval {low:.3f} to {high:.3f})")
            if EVERY10 in rows:
                every = group["every10_with_figure"] = every10_ratio(means, figure)
                low, high = group["every10_interval"] = bootstrap_interval(
                    group["times"], lambda m, figure=figure: every10_ratio(m, figure))
                line += (f"; every_n_steps=10 {every:.3f} <= 1.01 -> "
                         f"{'met' if every <= 1.01 else 'MISSED'} (95 % interval "
                         f"{low:.3f} to {high:.3f})")
            say(line + f" (A/A {rows[AA]['mean']:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="graddiag overhead benchmark")
    parser.add_argument("--quick", action="store_true", help="a few tiny steps (smoke test)")
    parser.add_argument("--steps", type=int, default=250,
                        help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings steady on a small machine)")
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("pytorch_lightning", "lightning.pytorch", "graddiag"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    steps = 6 if args.quick else args.steps
    warmup = 2 if args.quick else 10
    recipe_steps = 4 if args.quick else max(30, steps // 8)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(affinity {sorted(os.sched_getaffinity(0))}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), commit {commit}")
    say("headline: mean step time over plain training's (total wall time of the timed steps); "
        "configurations interleaved one step at a time in one process, each with its own step "
        "numbers")
    results: dict[str, Any] = {"models": {}, "commit": commit, "torch": torch.__version__}
    models: dict[str, Callable[[], nn.Module]] = {"MLP 20x256": mlp,
                                                   "Transformer 16 layers": Transformer}
    if args.quick:
        models = {"MLP 4x64": lambda: mlp(depth=4, width=64)}
    elif args.models != "mlp,transformer":
        wanted = args.models.split(",")
        models = {k: v for k, v in models.items() if k.split()[0].lower() in wanted}
    for name, fn in models.items():
        say(f"\n{name} ({tensor_count(fn)} parameter tensors), batch 64")
        out = results["models"][name] = {}
        run_group("hand-written loop, GradientMonitor",
                  lambda fn=fn: measure_loop(fn, steps, warmup=warmup, configs=LOOP_CONFIGS),
                  out)
        for every in (10, 50):
            run_group(f"Lightning, TensorBoardLogger, log_every_n_steps={every}",
                      lambda fn=fn, every=every: measure_lightning(
                          fn, LIGHTNING_MAIN, steps, warmup=warmup, log_every_n_steps=every),
                      out)
        run_group("Lightning recipes, log_every_n_steps=10",
                  lambda fn=fn: measure_lightning(fn, LIGHTNING_RECIPES, recipe_steps,
                                                  warmup=warmup),
                  out)
        run_group("Lightning histogram recipes, log_every_n_steps=10",
                  lambda fn=fn: measure_lightning(fn, HISTOGRAM_RECIPES, recipe_steps,
                                                  warmup=warmup),
                  out)
    say("\nBiggest per-step costs (Lightning, TensorBoardLogger, log_every_n_steps=10, graddiag "
        f"defaults, {steps} steps; wall-clock timers around graddiag's functions):")
    results["costs"] = {}
    for name, fn in models.items():
        c = results["costs"][name] = costs.part_costs(fn, steps)
        say(f"  {name} (step {c['step_ms']:.2f} ms with graddiag)")
        say(f"  {'part':<58} {'ms/step':>8} {'calls':>6} {'ms/call':>8}")
        for label, row in sorted(c["parts"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
            say(f"  {label:<58} {row['ms_per_step']:>8.3f} {row['calls']:>6} "
                f"{row['ms_per_call']:>8.3f}")

    verdicts(results)

    say("\nWriting one logging step's scalars to TensorBoard (ms, flushed; best of two):")
    results["scalar_write"] = {}
    for name, fn in models.items():
        w = results["scalar_write"][name] = costs.scalar_write_cost(
            fn, repeats=20 if args.quick else 200)
        say(f"  {name}: {int(w['values'])} values: one add_scalar per key "
            f"{w['add_scalar per key']:.3f} ms, one event {w['one event']:.3f} ms "
            f"({w['add_scalar per key'] / w['one event']:.1f}x less)"
            + (f", one event with its checksums in C {w['one event, checksums in C']:.3f} ms "
               f"({w['add_scalar per key'] / w['one event, checksums in C']:.1f}x less)"
               if "one event, checksums in C" in w else ", checksums in C not available"))

    say("\nHost work of an ordinary recorded step against the fused read alone (the .grad "
        "list, one _foreach_norm, stacked; 16x16 linear layers side by side, monitor.step() "
        "with no logging, best of 5):")
    say(f"  {'tensors':>8} {'fused read us':>14} {'monitor.step us':>16} {'beyond the read us':>19}")
    results["scaling"] = costs.host_work_scaling([5] if args.quick else [5, 50, 500],
                                                 repeats=20 if args.quick else 300)
    for row in results["scaling"]:
        say(f"  {int(row['tensors']):>8} {row['fused_read_us']:>14.1f} {row['step_us']:>16.1f} "
            f"{row['beyond_us']:>19.1f}")
    say("  and the same models trained (hand-written loop, mean ratios):")
    say(f"  {'tensors':>8} {'plain ms':>9} {'A/A':>6} {'floor':>7} {'defaults':>9}")
    results["scaling_training"] = []
    for depth in ([4] if args.quick else [4, 49, 499]):
        def fn(d: int = depth) -> nn.Module:
            return mlp(depth=d, width=16)

        stats = measure_loop(fn, 6 if args.quick else 100, warmup=warmup,
                             configs=[PLAIN, AA, FLOOR, DEFAULTS])
        r = ratios(stats)
        row = {"tensors": tensor_count(fn), "plain_ms": stats[PLAIN]["mean"] * 1e3,
               "aa": r[AA]["mean"], "floor": r[FLOOR]["mean"], "defaults": r[DEFAULTS]["mean"]}
        results["scaling_training"].append(row)
        say(f"  {row['tensors']:>8} {row['plain_ms']:>9.2f} {row['aa']:>6.3f} {row['floor']:>7.3f} "
            f"{row['defaults']:>9.3f}")
    results["memory"] = memory_report(quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


MEMORY_CHILD = """
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from benchmarks.harness import mlp
from graddiag import GradientMonitor
torch.manual_seed(0)
model, steps, mode = mlp(depth={depth}), {steps}, {mode!r}
opt = torch.optim.Adam(model.parameters(), 1e-4)
x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
monitor = GradientMonitor(model, reporters=[]) if mode != "plain" else None
marks = []
for step in range(steps):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward()
    if monitor is not None: monitor.step()
    opt.step()
    if step in (steps // 10, steps - 1):
        marks.append(open("/proc/self/statm").read().split()[1])
page = resource.getpagesize()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, *(int(m) * page for m in marks))
"""


def memory_report(quick: bool) -> dict[str, float]:
    """Peak resident memory of plain training and graddiag defaults (separate processes), and
    the resident-memory growth between 10 % and 100 % of the run."""
    steps, depth = (20, 2) if quick else (1500, 20)
    root = str(Path(__file__).resolve().parents[1])
    out: dict[str, float] = {}
    for mode in ("plain", "graddiag"):
        code = MEMORY_CHILD.format(root=root, steps=steps, mode=mode, depth=depth)
        text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split()
        peak, early, late = (int(v) for v in text[-3:])
        out[f"{mode}_peak_mib"] = peak / 2**20
        out[f"{mode}_growth_mib"] = (late - early) / 2**20
    say(f"\nMemory (MLP {depth}x256, {steps} steps, hand-written loop, separate processes):")
    say(f"  peak RSS plain {out['plain_peak_mib']:.0f} MiB, graddiag defaults "
        f"{out['graddiag_peak_mib']:.0f} MiB "
        f"(+{out['graddiag_peak_mib'] - out['plain_peak_mib']:.1f} MiB)")
    say(f"  RSS growth from 10 % to 100 % of the run: plain {out['plain_growth_mib']:.1f} MiB, "
        f"graddiag {out['graddiag_growth_mib']:.1f} MiB")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
