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
from benchmarks.harness import (  # noqa: E402
    AA,
    DEFAULTS,
    PLAIN,
    measure_variants,
    print_ratios,
    variant_arguments,
)
from graddiag.measure.replay import RngState  # noqa: E402

REPLAY_OFF = {"graddiag defaults, replay_nonfinite=False": {"replay_nonfinite": False}}


def main(argv: list[str] | None = None) -> int:
    args = variant_arguments(__doc__ or "", argv, steps=400)
    number = 200 if args.quick else 20000
    for stmt in ("torch.get_rng_state()", "RngState.capture()"):
        best = min(timeit.repeat(stmt, globals={"torch": torch, "RngState": RngState},
                                 number=number, repeat=7)) / number
        print(f"{stmt:<28} {best * 1e6:6.2f} us per call (best of 7 x {number})")
    stats, ran = measure_variants(args, [PLAIN, AA, DEFAULTS], REPLAY_OFF)
    print(f"\nLightning, {ran}")
    print_ratios(stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
