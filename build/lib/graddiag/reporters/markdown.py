"""Markdown tables for TensorBoard's Text tab (and for ``graddiag report`` to read back)."""

from __future__ import annotations

import math

import pandas as pd

from graddiag.data.findings import Finding

FINDINGS_HEADER = "| kind | layer | step | value | threshold | evidence | remedy |"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def findings_markdown(findings: list[Finding]) -> str:
    """All findings as a Markdown table, oldest first."""
    if not findings:
        return "No findings."
    lines = [FINDINGS_HEADER, "|---|---|---|---|---|---|---|"]
    for f in findings:
        threshold = "inf" if math.isinf(f.threshold) else f"{f.threshold:.3g}"
        lines.append(
            f"| {f.kind} | {_cell(f.layer)} | {f.step} | {f.value:.3g} | {threshold} | "
            f"{_cell(f.message)} | {_cell(f.remedy)} |"
        )
    return "\n".join(lines)


def parse_findings_markdown(text: str) -> pd.DataFrame:
    """Read back a table written by :func:`findings_markdown`."""
    columns = ["kind", "layer", "step", "value", "threshold", "evidence", "remedy"]
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith(FINDINGS_HEADER) or line.startswith("|---"):
            continue
        cells = [c.replace("\\|", "|").strip()
                 for c in _split_row(line.strip().strip("|"))]
        if len(cells) == len(columns):
            rows.append(cells)
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        table["step"] = table["step"].astype(int)
        table["value"] = table["value"].astype(float)
    return table


def _split_row(row: str) -> list[str]:
    cells, current, escaped = [], [], False
    for ch in row:
        if ch == "|" and not escaped:
            cells.append("".join(current))
            current = []
        else:
            current.append(ch)
        escaped = ch == "\\"
    cells.append("".join(current))
    return cells


def summary_markdown(summary: pd.DataFrame) -> str:
    """The per-layer summary table as Markdown."""
    if summary.empty:
        return "No layers recorded."
    cols = ["layer", "grad_norm_median", "grad_norm_min", "grad_norm_max", "findings",
            "first_finding", "first_finding_step"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in summary[cols].iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else f"{v:.3g}")
            else:
                cells.append("" if v is None else _cell(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
