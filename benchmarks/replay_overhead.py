"""Cost of replay-on-onset on healthy steps: with it, without it, and the A/A noise.

Healthy training never replays; what remains per step is a reference to the batch and a copy
of the random state (Lightning), or a closure passed to ``monitor.step`` (plain loops). Both
paths are timed with configurations interleaved every step in one process::

    python benchmarks/replay_overhead.py [--cycles 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import timeit
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.overhead import LOOP_CONFIGS, _print_ratios, measure, measure_loop, mlp  # noqa: E402
from graddiag.measure.replay import RngState  # noqa: E402

# 7 configurations: coprime with the logging (10) and activation (50) cadences
LIGHTNING = ["plain", "plain again (A/A control: the noise)", "floor (one _foreach_norm)",
             "graddiag defaults", "graddiag defaults, replay_nonfinite off",
             "graddiag every_n_steps=10", "graddiag, activations off"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("graddiag").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    for stmt in ("torch.get_rng_state()", "RngState.capture()"):
        best = min(timeit.repeat(stmt, globals={"torch": torch, "RngState": RngState},
                                 number=20000, repeat=7)) / 20000
        print(f"{stmt:<28} {best * 1e6:6.2f} us per call (best of 7 x 20000)")
    print(f"\nMLP 20x256, {args.cycles} cycles, configurations interleaved every step")
    print(f"  {'configuration':<46} {'median ratio':>12} {'mean ratio':>11} {'CPU-time':>9}")
    _print_ratios("hand-written loop, GradientMonitor", measure_loop(mlp, args.cycles * 3),
                  LOOP_CONFIGS)
    _print_ratios("Lightning", measure(mlp, LIGHTNING, args.cycles, 1), LIGHTNING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
