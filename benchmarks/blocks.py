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
from benchmarks import harness  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    AA,
    DEFAULTS,
    FLOOR,
    PLAIN,
    measure_lightning,
    mlp,
    print_ratios,
    variant_arguments,
)

VARIANTS = {
    "graddiag, every step judged on itself": {"evaluate_every_n_records": 1},
    "graddiag, blocks of 32": {"evaluate_every_n_records": 32},
    "graddiag, activation and parameter statistics off": {"activation_every_n_steps": 0,
                                                          "param_every_n_steps": 0},
}
for _name, _options in VARIANTS.items():
    harness.LIGHTNING_CONFIGS[_name] = harness._diagnostics(**_options)
CONFIGS = [PLAIN, AA, FLOOR, DEFAULTS, *VARIANTS]


def main(argv: list[str] | None = None) -> int:
    args = variant_arguments(__doc__ or "", argv, steps=250)
    steps, model = (6, lambda: mlp(depth=4, width=64)) if args.quick else (args.steps, mlp)
    stats = measure_lightning(model, CONFIGS, steps, warmup=2 if args.quick else 10)
    print(f"Lightning, TensorBoardLogger, log_every_n_steps=10, "
          f"{'MLP 4x64' if args.quick else 'MLP 20x256'}, {steps} timed steps per configuration, "
          f"taking turns every step (plain {stats[PLAIN]['mean'] * 1e3:.2f} ms)")
    print_ratios(stats, width=52)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
