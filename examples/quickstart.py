"""Quick start: one callback added to a Lightning Trainer.

    python examples/quickstart.py [--steps N]
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl

from graddiag import GradientDiagnostics
from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import DeepMLP


def main(argv: list[str] | None = None) -> GradientDiagnostics:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    diagnostics = GradientDiagnostics()  # every option has a default
    trainer = pl.Trainer(max_steps=args.steps, callbacks=[diagnostics], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(DeepMLP(depth=8, activation="sigmoid", optimizer="sgd", lr=0.1),
                DigitsDataModule())
    print(diagnostics.summary().to_string(index=False))
    for finding in diagnostics.findings:
        print(finding)
    return diagnostics


if __name__ == "__main__":
    main()
