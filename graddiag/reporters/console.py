"""Findings as log lines on the ``graddiag`` logger, once per onset."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from graddiag.data.findings import Finding
from graddiag.data.snapshots import StepSnapshot

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("graddiag")


class ConsoleReporter:
    """Logs each finding once, as a warning, when it begins."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger

    def report(self, snapshot: StepSnapshot) -> None:
        if snapshot.record.amp_overflow:
            self.logger.info(
                "graddiag: AMP overflow at step %d: inf/NaN in the fp16-scaled gradients; the "
                "grad scaler skips this step and lowers its scale (not an alarm).", snapshot.step)
        for finding in snapshot.new_findings:
            self.logger.warning("graddiag %s", finding)


def render_findings(findings: list[Finding]) -> str:
    """A plain-text table of findings (kind, layer, step, value) followed by their messages."""
    if not findings:
        return "No findings: no vanishing, exploding, non-finite or missing gradients."
    head = f"{'kind':<12} {'layer':<24} {'step':>6} {'value':>10}"
    lines = [head, "-" * len(head)]
    for f in findings:
        lines.append(f"{f.kind:<12} {f.layer[:24]:<24} {f.step:>6} {f.value:>10.3g}")
    return "\n".join(lines)


def summary_screen(summary: pd.DataFrame, findings: list[Finding], max_rows: int = 16) -> str:
    """A one-screen end-of-fit summary: findings by kind, then one line per layer.

    Long models show their first and last layers and every flagged one, within ``max_rows``.
    """
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    verdict = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no findings"
    lines = [f"graddiag summary: {verdict}"]
    if summary.empty:
        return lines[0]
    flagged = summary[summary["findings"] > 0]
    keep = set(summary.index[:3]) | set(summary.index[-3:]) | set(flagged.index[: max_rows - 6])
    head = f"  {'layer':<28} {'median |g|':>11} {'min':>10} {'max':>10}  findings"
    lines += [head, "  " + "-" * (len(head) - 2)]
    previous = -1
    for i, row in summary.iterrows():
        if i not in keep:
            continue
        if previous >= 0 and i != previous + 1:
            lines.append("  ...")
        previous = int(i)
        kinds = row["first_finding"] if row["findings"] else ""
        if row["findings"] > 1:
            kinds = f"{kinds} (+{row['findings'] - 1})"
        lines.append(f"  {str(row['layer'])[:28]:<28} {row['grad_norm_median']:>11.3g} "
                     f"{row['grad_norm_min']:>10.3g} {row['grad_norm_max']:>10.3g}  {kinds}")
    return "\n".join(lines)
