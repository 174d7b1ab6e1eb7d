"""Train under a 2-process CPU strategy (gloo) and dump what every rank saw.

    python tests/distributed/run_ddp.py --strategy ddp_spawn --out DIR [--nan-rank 1]

Each rank writes ``rank{R}.json``: its findings, activation statistics, parameter checksum,
whether it logged, and how many steps it took. Used by tests/test_distributed.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger

from graddiag import GradientDiagnostics
from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import DeepMLP


class Model(DeepMLP):
    """A saturating sigmoid MLP; optionally one rank's loss turns NaN on step 3; rank 1 runs one
    extra activation site."""

    def __init__(self, nan_rank: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_rank = nan_rank

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_rank == 1:  # an activation site that only rank 1 runs
            torch.tanh(x)
        if self.global_step == 3 and self.global_rank == self.nan_rank:
            loss = loss * float("nan")
        return loss


class Dump(pl.Callback):
    def __init__(self, out: Path, diagnostics: GradientDiagnostics) -> None:
        self.out = out
        self.diagnostics = diagnostics

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        d = self.diagnostics
        acts = d.activation_history
        nonfinite = [f for f in d.findings if f.kind == "nonfinite"]
        replay_keys = ("replay", "phase", "op", "file", "line", "constant", "rank", "world_size")
        params = torch.cat([p.detach().flatten() for p in module.parameters()])
        result = {
            "findings": [[f.kind, f.layer, f.step, round(f.value, 6)] for f in d.findings],
            "activations": acts[["step", "site", "saturated_fraction", "dead_fraction"]]
            .round(6).values.tolist(),
            "grad_norms": d.history.grad_norm.round(8).tolist(),
            "param_sum": float(params.double().sum()),
            "params_finite": bool(torch.isfinite(params).all()),
            "global_step": trainer.global_step,
            "reporters": [type(r.inner).__name__ for r in d.monitor.reporters],
            "replay": {k: nonfinite[0].details.get(k) for k in replay_keys} if nonfinite else None,
            "message": nonfinite[0].message if nonfinite else None,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="ddp_spawn")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--action", default="skip")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    diagnostics = GradientDiagnostics(activation_every_n_steps=2, on_nonfinite=args.action,
                                      print_summary=False, progress_bar=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=args.strategy, max_steps=8,
        logger=TensorBoardLogger(str(args.out), name="tb"), log_every_n_steps=2,
        callbacks=[diagnostics, Dump(args.out, diagnostics)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    model = Model(args.nan_rank, depth=3, width=32, activation="sigmoid", init="normal",
                  init_std=6.0, optimizer="sgd", lr=0.05)
    trainer.fit(model, DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    main()
