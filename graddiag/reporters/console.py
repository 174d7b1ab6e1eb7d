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


def render_findings(findings: list[Finding]) -> str:
    """A plain-text table of findings (kind, layer, step, value) followed by their messages."""
    if not findings:
        return "No findings: no vanishing, exploding, non-finite or missing gradients."
    head = f"{'kind':<12} {'layer':<24} {'step':>6} {'value':>10}"
    lines = [head, "-" * len(head)]
    for f in findings:
        lines.append(f"{f.kind:<12} {f.layer[:24]:<24} {f.step:>6} {f.value:>10.3g}")
    return "\n".join(lines)
