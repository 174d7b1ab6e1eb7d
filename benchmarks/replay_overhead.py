"""Cost of replay-on-onset on healthy steps: with it, without it, and the A/A noise.

Healthy training never replays; what remains per step (inside Lightning) is a reference to the
batch and a copy of the random state on measured steps. Configurations take turns every step in
one Trainer run (see ``benchmarks/harness.py``); the headline is the mean step time over plain
training's::

    python benchmarks/replay_overhead.py [--steps 400] [--threads 1] [--quick]
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    AA,
    DEFAULTS,
    PLAIN,
    measure_lightning,
    mlp,
    print_ratios,
    variant_arguments,
)
from graddiag.measure.replay import RngState  # noqa: E402

REPLAY_OFF = "graddiag defaults, replay_nonfinite=False"
harness.LIGHTNING_CONFIGS[REPLAY_OFF] = harness._diagnostics(replay_nonfinite=False)
CONFIGS = [PLAIN, AA, DEFAULTS, REPLAY_OFF]


def main(argv: list[str] | None = None) -> int:
    args = variant_arguments(__doc__ or "", argv, steps=400)
    number = 200 if args.quick else 20000
    for stmt in ("torch.get_rng_state()", "RngState.capture()"):
        best = min(timeit.repeat(stmt, globals={"torch": torch, "RngState": RngState},
                                 number=number, repeat=7)) / number
        print(f"{stmt:<28} {best * 1e6:6.2f} us per call (best of 7 x {number})")
    steps, model = (6, lambda: mlp(depth=4, width=64)) if args.quick else (args.steps, mlp)
    stats = measure_lightning(model, CONFIGS, steps, warmup=2 if args.quick else 10)
    print(f"\nLightning, {'MLP 4x64' if args.quick else 'MLP 20x256'}, {steps} timed steps per "
          f"configuration, taking turns every step (plain {stats[PLAIN]['mean'] * 1e3:.2f} ms)")
    print_ratios(stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
