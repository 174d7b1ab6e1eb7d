"""Findings as log lines on the ``graddiag`` logger, once per onset."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from graddiag.data.findings import Finding
from graddiag.data.snapshots import StepSnapshot
from graddiag.reporters.labels import abbreviate
from graddiag.reporters.summary import norm_cell

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("graddiag")


class ConsoleReporter:
    """Logs each finding once, as a warning, when it begins.

    Findings of one kind that begin on the same step (a whole network exploding at once) make
    one warning that lists the layers, with the full explanation of the first one.
    """

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger

    def report(self, snapshot: StepSnapshot) -> None:
        if snapshot.record.amp_overflow:
            self.logger.info(
                "graddiag: AMP overflow at step %d: inf/NaN in the fp16-scaled gradients; the "
                "grad scaler skips this step and lowers its scale (not an alarm).", snapshot.step)
        groups: dict[str, list[Finding]] = {}
        for finding in snapshot.new_findings:
            groups.setdefault(finding.kind, []).append(finding)
        for group in groups.values():
            self.logger.warning("graddiag %s", group[0] if len(group) == 1 else grouped(group))


def grouped(findings: list[Finding], max_listed: int = 12) -> str:
    """One message for several findings of one kind on one step: the layers with their values,
    then the first finding's explanation and remedy."""
    first = findings[0]
    listed = ", ".join(f"'{f.layer}' ({f.value:.3g})" for f in findings[:max_listed])
    more = f" and {len(findings) - max_listed} more" if len(findings) > max_listed else ""
    text = (f"[{first.kind}] step {first.step}, {len(findings)} layers: {listed}{more}. "
            f"First, '{first.layer}': {first.message}")
    return f"{text} Try: {first.remedy}" if first.remedy else text


def render_findings(findings: list[Finding]) -> str:
    """A plain-text table of findings (kind, layer, step, value) followed by their messages."""
    if not findings:
        return "No findings: no vanishing, exploding, non-finite or missing gradients."
    head = f"{'kind':<16} {'layer':<24} {'step':>6} {'value':>10}"
    lines = [head, "-" * len(head)]
    for f in findings:
        lines.append(f"{f.kind:<16} {f.layer[:24]:<24} {f.step:>6} {f.value:>10.3g}")
    return "\n".join(lines)


def summary_screen(
    summary: pd.DataFrame,
    findings: list[Finding],
    max_rows: int = 16,
    *,
    skipped_steps: int = 0,
    interrupted_at: int | None = None,
) -> str:
    """A one-screen end-of-fit summary: findings by kind, one line per layer, then the
    activation sites that have findings.

    Long models show their first and last layers and every flagged one, within ``max_rows``.

    Args:
        skipped_steps: Optimizer steps skipped on graddiag's request (``"skip"`` actions).
        interrupted_at: The step at which training was interrupted (Ctrl-C, an exception).
    """
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    verdict = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no findings"
    head_line = f"graddiag summary: {verdict}"
    if skipped_steps:
        head_line += f"; {skipped_steps} optimizer step(s) skipped"
    if interrupted_at is not None:
        head_line += f" (training interrupted at step {interrupted_at})"
    lines = [head_line]
    if summary.empty:
        return lines[0]
    sites = summary[summary["activation_site"]] if "activation_site" in summary else summary[:0]
    summary = summary.drop(index=sites.index).reset_index(drop=True)
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
        cells = [norm_cell(row[c], row["nan_steps"])
                 for c in ("grad_norm_median", "grad_norm_min", "grad_norm_max")]
        lines.append(f"  {abbreviate(str(row['layer'])):<28} {cells[0]:>11} "
                     f"{cells[1]:>10} {cells[2]:>10}  {kinds}")
    if len(sites):
        last = {f.layer: f for f in findings}
        lines += ["", f"  {'activation site':<28} {'finding':<11} {'step':>6} {'value':>7}",
                  "  " + "-" * 55]
        for _, row in sites.head(max_rows).iterrows():
            f = last[row["layer"]]
            more = f" (+{row['findings'] - 1} earlier)" if row["findings"] > 1 else ""
            lines.append(f"  {abbreviate(str(row['layer'])):<28} {f.kind:<11} {f.step:>6} "
                         f"{f.value:>7.0%}{more}")
        if len(sites) > max_rows:
            lines.append(f"  ... and {len(sites) - max_rows} more activation sites")
    return "\n".join(lines)
