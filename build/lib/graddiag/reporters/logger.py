"""Scalars through any Lightning logger's ``log_metrics`` (CSVLogger, WandbLogger, TensorBoard...)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord
from graddiag.reporters.scalars import scalar_metrics


class LoggerReporter:
    """Sends each record's scalars to Lightning loggers every ``every_n_steps`` steps.

    Args:
        loggers: Objects with ``log_metrics(metrics, step)`` (Lightning loggers).
        every_n_steps: Log records whose step is divisible by this (the trainer's
            ``log_every_n_steps`` by default in the callback).
        prefix: Prepended to every key.
        active_findings: Returns how many conditions are active now (for the count scalar).
    """

    def __init__(
        self,
        loggers: Sequence[Any],
        every_n_steps: int,
        prefix: str,
        active_findings: Callable[[], int] = lambda: 0,
    ) -> None:
        self.loggers = list(loggers)
        self.every_n_steps = max(1, every_n_steps)
        self.prefix = prefix
        self.active_findings = active_findings

    def report(self, record: StepRecord, findings: list[Finding]) -> None:
        if not self.loggers or record.step % self.every_n_steps:
            return
        metrics = scalar_metrics(record, self.prefix, self.active_findings())
        for logger in self.loggers:
            logger.log_metrics(metrics, step=record.step)

    def close(self) -> None:
        pass
