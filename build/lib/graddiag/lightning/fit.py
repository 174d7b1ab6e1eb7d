"""``graddiag fit``: YAML-driven experiments on LightningCLI (jsonargparse).

Model and data are given by ``class_path``/``init_args`` (any LightningModule and
LightningDataModule); the ``diagnostics:`` section configures the :class:`GradientDiagnostics`
callback that every run gets, type-checked and documented in ``graddiag fit --help``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from graddiag.lightning.callback import GradientDiagnostics


class GraddiagCLI(LightningCLI):
    """LightningCLI with a ``diagnostics`` section for :class:`GradientDiagnostics`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(GradientDiagnostics, "diagnostics")


def run_cli(args: list[str], **kwargs: Any) -> GraddiagCLI:
    """Run ``graddiag fit``-style arguments in process; returns the CLI (trainer, model, ...)."""
    return GraddiagCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )


def diagnostics_of(cli: LightningCLI) -> GradientDiagnostics:
    """The GradientDiagnostics callback of a finished CLI run."""
    for callback in cli.trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, GradientDiagnostics):
            return callback
    raise LookupError("no GradientDiagnostics callback in this run")
