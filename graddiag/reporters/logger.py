"""Scalars through any Lightning logger's ``log_metrics`` (CSVLogger, WandbLogger, TensorBoard...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graddiag.data.snapshots import StepSnapshot
from graddiag.reporters.scalars import scalar_metrics


class LoggerReporter:
    """Sends each record's scalars to Lightning loggers every ``every_n_steps`` steps.

    Args:
        loggers: Objects with ``log_metrics(metrics, step)`` (Lightning loggers).
        every_n_steps: Log records whose step is divisible by this (the trainer's
            ``log_every_n_steps`` by default in the callback).
        prefix: Prepended to every key.
    """

    def __init__(
        self,
        loggers: Sequence[Any],
        every_n_steps: int,
        prefix: str,
    ) -> None:
        self.loggers = list(loggers)
        self.every_n_steps = max(1, every_n_steps)
        self.prefix = prefix

    def report(self, snapshot: StepSnapshot) -> None:
        if not self.loggers or snapshot.step % self.every_n_steps:
            return
        metrics = scalar_metrics(snapshot.record, self.prefix, snapshot.active_count,
                                 snapshot.skipped_steps)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=snapshot.step)
