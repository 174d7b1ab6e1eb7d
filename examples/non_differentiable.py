"""A model that routes through argmax gets no gradient to its router; a straight-through
estimator (or Gumbel-softmax) fixes it.

argmax (like rounding, comparisons and integer casts) has no useful derivative: autograd
either stops at it (argmax, comparisons: ``.grad`` stays ``None``) or passes zeros (round,
floor, sign). graddiag reports ``no_gradient`` and names the operation it saw.

    python examples/non_differentiable.py [--steps N]
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl

from graddiag import GradientDiagnostics
from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import RoutedMLP


def train(estimator: str, steps: int) -> GradientDiagnostics:
    pl.seed_everything(0, verbose=False)
    diagnostics = GradientDiagnostics(activation_every_n_steps=5, print_summary=False)
    trainer = pl.Trainer(max_steps=steps, callbacks=[diagnostics], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(RoutedMLP(estimator=estimator), DigitsDataModule())
    return diagnostics


def main(argv: list[str] | None = None) -> dict[str, GradientDiagnostics]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    runs = {}
    for estimator in ("argmax", "straight_through", "gumbel"):
        runs[estimator] = diagnostics = train(estimator, args.steps)
        kinds = sorted({f.kind for f in diagnostics.findings})
        print(f"{estimator:>16}: findings {kinds or 'none'}")
        for finding in diagnostics.findings:
            if finding.kind == "no_gradient":
                print(f"                  {finding.message}")
    return runs


if __name__ == "__main__":
    main()
