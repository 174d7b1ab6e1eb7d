"""What graddiag's Lightning hooks cost on an ordinary step, hook by hook, and how many findings a
run gives.

A Lightning run of the benchmark MLP (20x256, batch 64, TensorBoardLogger, log_every_n_steps=10,
graddiag defaults) with wall-clock timers around each of graddiag's callback hooks and around
the fused read of a kept step. "Ordinary" steps are those after the first 20 that log nothing,
judge no block and measure nothing beyond the gradients; the median over them is printed, with
the same calls repeated warm (back to back on one step's state) for comparison. Then the
run's findings: how many, and on how many steps.

    python benchmarks/lightning_hooks.py [--steps 520] [--no-replay]

``--no-replay`` runs with ``replay_nonfinite=False``: no batch reference or random state kept
at each batch start.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.costs import Timers  # noqa: E402
from benchmarks.harness import Classifier, _data, mlp  # noqa: E402
from graddiag import GradientDiagnostics  # noqa: E402
from graddiag.lightning.step_inputs import step_inputs  # noqa: E402
from graddiag.measure.norms import GradientProbe  # noqa: E402
from graddiag.pipeline.monitor import GradientMonitor  # noqa: E402

HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_train_batch_end")


class _Clock(pl.Callback):
    def __init__(self, timed: Timers) -> None:
        self.timed = timed
        self.warm: dict[str, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.timed.step = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if trainer.global_step == 300:  # warm: the same call again and again, caches hot
            calls: dict[str, Callable[[], Any]] = {
                "step_inputs": lambda: step_inputs(trainer, optimizer),
                "expect_step": lambda: diagnostics(trainer).monitor.expect_step(300),
            }
            for label, call in calls.items():
                self.warm[label] = timeit.timeit(call, number=2000) / 2000


def diagnostics(trainer: pl.Trainer) -> GradientDiagnostics:
    return next(c for c in trainer.callbacks if isinstance(c, GradientDiagnostics))  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=520)
    parser.add_argument("--no-replay", action="store_true",
                        help="replay_nonfinite=False (no batch or random state kept per step)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch", "graddiag"):
        logging.getLogger(name).setLevel(logging.ERROR)
    timed = Timers()
    for hook in HOOKS:
        timed.wrap(hook, GradientDiagnostics, hook)
    timed.wrap("fused read into the row (GradientProbe.read_row)", GradientProbe, "read_row")
    timed.wrap("judging", GradientMonitor, "_judge")
    clock = _Clock(timed)
    cb = GradientDiagnostics(print_summary=False, replay_nonfinite=not args.no_replay)
    pl.seed_everything(0, verbose=False)
    try:
        with tempfile.TemporaryDirectory() as logdir:
            trainer = pl.Trainer(
                max_steps=args.steps, accelerator="cpu", devices=1,
                logger=TensorBoardLogger(logdir, name="hooks"), callbacks=[clock, cb],
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0)
            trainer.fit(Classifier(mlp()), DataLoader(_data(), batch_size=64, shuffle=True,
                                                      drop_last=True))
    finally:
        timed.restore()
    judged = timed.per_step["judging"]
    ordinary = [s for s in range(20, args.steps) if s % 10 and s % 50 != 49
                and judged.get(s, 0.0) < 5e-6]
    print(f"MLP 20x256, Lightning{', replay_nonfinite=False' if args.no_replay else ''}, "
          f"{args.steps} steps, {len(ordinary)} ordinary steps; "
          "median us per ordinary step (timers add about 1 us each):")
    total = 0.0
    for label in (*HOOKS, "fused read into the row (GradientProbe.read_row)"):
        median = statistics.median(timed.per_step[label].get(s, 0.0) for s in ordinary) * 1e6
        total += median if label in HOOKS else -median
        print(f"  {label:52s} {median:7.1f}")
    print(f"  {'the hooks beyond the fused read':52s} {total:7.1f}")
    print("the same calls warm (us per call): "
          + ", ".join(f"{k} {v * 1e6:.2f}" for k, v in clock.warm.items()))
    findings = cb.findings
    print(f"findings: {len(findings)} on {len({f.step for f in findings})} steps "
          f"({sorted({f.step for f in findings})})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
