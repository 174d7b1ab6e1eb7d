"""Cost of replay-on-onset on healthy steps: with it, without it, and the A/A noise.

Healthy training never replays; what remains per step (inside Lightning) is a reference to the
batch and a copy of the random state on measured steps. Configurations take turns every step in
one Trainer run (see ``benchmarks/harness.py``); the headline is the mean step time over plain
training's::

    python benchmarks/replay_overhead.py [--steps 400] [--threads 1] [--quick]
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
from benchmarks import harness  # noqa: E402
from benchmarks.harness import AA, DEFAULTS, PLAIN, measure_lightning, mlp, ratios  # noqa: E402
from graddiag.measure.replay import RngState  # noqa: E402

REPLAY_OFF = "graddiag defaults, replay_nonfinite=False"
harness.LIGHTNING_CONFIGS[REPLAY_OFF] = harness._diagnostics(replay_nonfinite=False)
CONFIGS = [PLAIN, AA, DEFAULTS, REPLAY_OFF]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few tiny steps (smoke test)")
    args = parser.parse_args(argv)
    for name in ("pytorch_lightning", "lightning.pytorch", "graddiag"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    number = 200 if args.quick else 20000
    for stmt in ("torch.get_rng_state()", "RngState.capture()"):
        best = min(timeit.repeat(stmt, globals={"torch": torch, "RngState": RngState},
                                 number=number, repeat=7)) / number
        print(f"{stmt:<28} {best * 1e6:6.2f} us per call (best of 7 x {number})")
    steps, model = (6, lambda: mlp(depth=4, width=64)) if args.quick else (args.steps, mlp)
    stats = measure_lightning(model, CONFIGS, steps, warmup=2 if args.quick else 10)
    print(f"\nLightning, {'MLP 4x64' if args.quick else 'MLP 20x256'}, {steps} timed steps per "
          f"configuration, taking turns every step (plain {stats[PLAIN]['mean'] * 1e3:.2f} ms)")
    print(f"  {'configuration':<46} {'mean ratio':>10} {'median ratio':>12}")
    for name, row in ratios(stats).items():
        print(f"  {name:<46} {row['mean']:>10.3f} {row['median']:>12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
