"""The deep sigmoid network is flagged ``vanishing``; ReLU + Kaiming init fixes it, the finding
goes away and accuracy goes up.

    python examples/fix_vanishing.py [--epochs N]
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl

from graddiag import GradientDiagnostics
from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import DeepMLP

SETUPS = {
    "before: 10 x sigmoid, default init": dict(activation="sigmoid", init="default"),
    "after: 10 x ReLU, Kaiming init": dict(activation="relu", init="kaiming"),
}


def main(argv: list[str] | None = None) -> dict[str, tuple[GradientDiagnostics, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args(argv)
    results = {}
    for name, setup in SETUPS.items():
        pl.seed_everything(0, verbose=False)
        diagnostics = GradientDiagnostics(print_summary=False)
        trainer = pl.Trainer(max_epochs=args.epochs, max_steps=args.max_steps,
                             callbacks=[diagnostics], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        # lr 0.01: at 0.05 and above the 10-layer ReLU net loses many units to dead ReLUs early
        # and its accuracy swings with floating-point summation order (63-82 % at 0.05)
        trainer.fit(DeepMLP(depth=10, width=64, optimizer="sgd", lr=0.01, **setup),
                    DigitsDataModule())
        accuracy = float(trainer.callback_metrics["val_acc"])
        results[name] = (diagnostics, accuracy)
        vanishing = sorted({f.layer for f in diagnostics.findings if f.kind == "vanishing"})
        print(f"{name}: validation accuracy {accuracy:.1%}, vanishing layers: {vanishing or 'none'}")
    return results


if __name__ == "__main__":
    main()
