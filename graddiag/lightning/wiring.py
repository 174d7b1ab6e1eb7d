"""Which reporters a Lightning run gets: the console, a TensorBoard reporter per TensorBoard
logger, the scalars for every other logger, and the user's own reporters."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from graddiag.lightning.compat import TENSORBOARD_LOGGERS
from graddiag.reporters import ConsoleReporter, Reporter
from graddiag.reporters.logger import LoggerReporter
from graddiag.reporters.tensorboard import TensorBoardReporter

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("graddiag")


def trainer_reporters(trainer: pl.Trainer, *, log_every_n_steps: int | None,
                      figure_every_n_steps: int | None, prefix: str,
                      extra: Sequence[Reporter]) -> list[Reporter]:
    """The reporters of ``trainer``'s global rank zero (none on other ranks); scalars go out
    every ``log_every_n_steps`` steps (``None``: the trainer's ``log_every_n_steps``)."""
    if trainer.global_rank != 0:
        return []
    every = log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
    reporters: list[Reporter] = [ConsoleReporter()]
    others = []
    for logger in trainer.loggers:
        if isinstance(logger, TENSORBOARD_LOGGERS):
            reporters.append(TensorBoardReporter(
                cast(Any, logger).experiment, prefix=prefix, scalars_every_n_steps=every,
                figure_every_n_steps=figure_every_n_steps,
            ))
        else:
            others.append(logger)
    if others:
        reporters.append(LoggerReporter(others, every, prefix))
        log.warning(
            "graddiag: %s get(s) graddiag's scalars only; the dashboard layout, findings "
            "text, gradient-flow figures and histograms need a TensorBoardLogger.",
            ", ".join(type(lg).__name__ for lg in others),
        )
    return [*reporters, *extra]
