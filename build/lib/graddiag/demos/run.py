"""``make demo``: a real training run on the digits data with diagnostics on.

Trains a deep sigmoid MLP (the textbook vanishing-gradient case) and a Kaiming-initialised ReLU
MLP of the same depth, prints graddiag's findings for each and where the TensorBoard logs are.
Run with ``python -m graddiag.demos.run``.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import DeepMLP
from graddiag.lightning.callback import GradientDiagnostics
from graddiag.reporters.console import render_findings

DEMOS = {
    "deep-sigmoid": dict(depth=10, width=64, activation="sigmoid", init="default",
                         optimizer="sgd", lr=0.1),
    "deep-relu-kaiming": dict(depth=10, width=64, activation="relu", init="kaiming",
                              optimizer="adam", lr=1e-3),
}


def run_demo(name: str, *, epochs: int, logdir: Path, seed: int = 0) -> GradientDiagnostics:
    """Train one demo network with diagnostics; returns the callback holding the results."""
    pl.seed_everything(seed, verbose=False)
    callback = GradientDiagnostics(activation_every_n_steps=10)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(str(logdir), name=name),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    model = DeepMLP(**DEMOS[name])  # type: ignore[arg-type]
    trainer.fit(model, DigitsDataModule(batch_size=64))
    accuracy = float(trainer.callback_metrics.get("val_acc", float("nan")))
    print(f"\n=== {name}: {trainer.global_step} steps, validation accuracy {accuracy:.1%}")
    print(render_findings(callback.findings))
    for finding in callback.findings[:1]:
        print(f"\nFirst finding in full:\n  {finding.message}\n  Try: {finding.remedy}")
    return callback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--logdir", type=Path, default=Path("graddiag_logs"))
    args = parser.parse_args(argv)
    logging.getLogger("graddiag").setLevel(logging.ERROR)  # the demo prints its own tables
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    for name in DEMOS:
        run_demo(name, epochs=args.epochs, logdir=args.logdir)
    print(f"\nTensorBoard logs: {args.logdir.resolve()}")
    for png in sorted(args.logdir.rglob("gradient_flow.png")):
        print(f"Gradient-flow figure: {png}")
    print(f"View them with:  .venv/bin/tensorboard --logdir {args.logdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
