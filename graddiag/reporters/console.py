"""Findings as log lines on the ``graddiag`` logger, once per onset."""

from __future__ import annotations

import logging

from graddiag.findings import Finding
from graddiag.records import StepRecord

log = logging.getLogger("graddiag")


class ConsoleReporter:
    """Logs each finding once, as a warning, when it begins."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger

    def report(self, record: StepRecord, findings: list[Finding]) -> None:
        for finding in findings:
            self.logger.warning("graddiag %s", finding)

    def close(self) -> None:
        pass
