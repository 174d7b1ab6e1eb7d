"""What judging plain steps in blocks buys, and what the periodic statistics cost, inside
Lightning: graddiag's defaults (blocks of 8) against every step judged on itself
(``evaluate_every_n_records=1``), blocks of 32, and the defaults without activation and
parameter statistics, with the floor and the A/A noise. Configurations take turns every step in
one Trainer run (see ``benchmarks/harness.py``); the headline is the mean step time over plain
training's::

    python benchmarks/blocks.py [--steps 250] [--threads 1] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import (  # noqa: E402
    AA,
    DEFAULTS,
    FLOOR,
    PLAIN,
    measure_variants,
    print_ratios,
    variant_arguments,
)

VARIANTS = {
    "graddiag, every step judged on itself": {"evaluate_every_n_records": 1},
    "graddiag, blocks of 32": {"evaluate_every_n_records": 32},
    "graddiag, activation and parameter statistics off": {"activation_every_n_steps": 0,
                                                          "param_every_n_steps": 0},
}


def main(argv: list[str] | None = None) -> int:
    args = variant_arguments(__doc__ or "", argv, steps=250)
    stats, ran = measure_variants(args, [PLAIN, AA, FLOOR, DEFAULTS], VARIANTS)
    print(f"Lightning, TensorBoardLogger, log_every_n_steps=10, {ran}")
    print_ratios(stats, width=52)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
