"""Markdown for TensorBoard's Text tab (and for ``graddiag report`` to read back).

TensorBoard renders Markdown tables in narrow columns, so long text never goes into a table
cell: the findings report is a short index table (kind, layer, step) followed by one block per
finding with a heading and paragraphs. Each block also carries the finding as JSON inside an
HTML comment, which TensorBoard's sanitizer drops from the page and :func:`parse_findings_markdown`
reads back exactly.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pandas as pd

from graddiag.data.findings import Finding
from graddiag.reporters.summary import norm_cell

FINDING_COLUMNS = ["kind", "layer", "step", "value", "threshold", "evidence", "remedy"]
LEGACY_FINDINGS_HEADER = "| kind | layer | step | value | threshold | evidence | remedy |"
_DATA_COMMENT = re.compile(r"<!-- graddiag-finding (\{.*?\}) -->")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def _text(text: object) -> str:
    """Plain text made literal for Markdown (no accidental emphasis, links or tables)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text).replace("\n", " "))


def _code(name: object) -> str:
    """A layer or site name as inline code."""
    return "`" + str(name).replace("`", "'").replace("|", "/").replace("\n", " ") + "`"


def _number(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _counts(findings: list[Finding]) -> str:
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def findings_markdown(findings: list[Finding]) -> str:
    """All findings, oldest first: a short index table, then one block per finding."""
    if not findings:
        return "No findings."
    s = "" if len(findings) == 1 else "s"
    lines = [f"**{len(findings)} finding{s}**, oldest first: {_counts(findings)}.", "",
             "| # | kind | layer | step |", "|---:|---|---|---:|"]
    lines += [f"| {i} | {f.kind} | {_code(f.layer)} | {f.step} |"
              for i, f in enumerate(findings, 1)]
    for i, f in enumerate(findings, 1):
        data = json.dumps({"kind": f.kind, "layer": f.layer, "step": f.step, "value": f.value,
                           "threshold": f.threshold, "evidence": f.message,
                           "remedy": f.remedy}).replace(">", "\\u003e")
        lines += ["", f"#### {i}. {f.kind}: {_code(f.layer)}, step {f.step}", "",
                  f"**Value** {_number(f.value)} (threshold {_number(f.threshold)})", "",
                  _text(f.message)]
        if f.remedy:
            lines += ["", f"**Try:** {_text(f.remedy)}"]
        lines += ["", f"<!-- graddiag-finding {data} -->"]
    return "\n".join(lines)


def parse_findings_markdown(text: str) -> pd.DataFrame:
    """Read back the findings written by :func:`findings_markdown` (or by its older table form).

    Returns columns ``kind``, ``layer``, ``step``, ``value``, ``threshold``, ``evidence``,
    ``remedy``, one row per finding, oldest first.
    """
    rows: list[dict[str, Any]] = [json.loads(m) for m in _DATA_COMMENT.findall(text)]
    if not rows and LEGACY_FINDINGS_HEADER in text:
        rows = _parse_legacy_table(text)
    table = pd.DataFrame(rows, columns=FINDING_COLUMNS)
    if len(table):
        table["step"] = table["step"].astype(int)
        table["value"] = table["value"].astype(float)
        table["threshold"] = table["threshold"].astype(float)
    return table


def _parse_legacy_table(text: str) -> list[dict[str, str]]:
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith(LEGACY_FINDINGS_HEADER):
            continue
        cells = [c.replace("\\|", "|").strip() for c in _split_row(line.strip().strip("|"))]
        if len(cells) == len(FINDING_COLUMNS):
            rows.append(dict(zip(FINDING_COLUMNS, cells)))
    return rows


def _split_row(row: str) -> list[str]:
    cells: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in row:
        if ch == "|" and not escaped:
            cells.append("".join(current))
            current = []
        else:
            current.append(ch)
        escaped = ch == "\\"
    cells.append("".join(current))
    return cells


def summary_markdown(summary: pd.DataFrame, *, skipped_steps: int = 0) -> str:
    """The end-of-fit summary: layers (short columns), then activation sites with findings."""
    if summary.empty:
        return "No layers recorded."
    sites = summary["activation_site"] if "activation_site" in summary else summary["records"] == 0
    layers, site_rows = summary[~sites], summary[sites]
    lines = []
    if skipped_steps:
        lines += [f"**{skipped_steps} optimizer step(s) skipped** (on_nonfinite/on_exploding "
                  "\"skip\": the optimizer applied nothing on them).", ""]
    lines += ["**Layers**, input side first: gradient norm over the recorded steps.", "",
              "| layer | median | min | max | findings |", "|---|---:|---:|---:|---|"]
    for _, row in layers.iterrows():
        cells = [norm_cell(row[c], row["nan_steps"])
                 for c in ("grad_norm_median", "grad_norm_min", "grad_norm_max")]
        lines.append(f"| {_code(row['layer'])} | {cells[0]} | {cells[1]} | {cells[2]} | "
                     f"{_finding_cell(row)} |")
    if len(site_rows):
        lines += ["", "**Activation sites** with findings:", "",
                  "| site | findings |", "|---|---|"]
        for _, row in site_rows.iterrows():
            lines.append(f"| {_code(row['layer'])} | {_finding_cell(row)} |")
    return "\n".join(lines)


def _finding_cell(row: pd.Series) -> str:
    if not row["findings"]:
        return ""
    text = f"{row['first_finding']} @ {int(row['first_finding_step'])}"
    return f"{text} (+{int(row['findings']) - 1})" if row["findings"] > 1 else text
