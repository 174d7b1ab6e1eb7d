"""Reading graddiag's TensorBoard event files back into pandas."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from graddiag.reporters.event_files import event_file_problem
from graddiag.reporters.markdown import parse_findings_markdown

EVENT_GLOB = "events.out.tfevents.*"


@dataclass
class LogData:
    """Everything graddiag wrote under one log directory.

    Attributes:
        scalars: Long format: ``run``, ``tag``, ``statistic``, ``layer``, ``step``, ``value``;
            per run and tag, steps in increasing order, each once: where the events of a tag
            go back to an earlier step (a run resumed from a checkpoint, or started again, in
            the same directory), the earlier events from that step on are dropped (TensorBoard
            does so only after a restart marker, which torch's writer does not write).
        findings: ``run`` plus the columns of the findings table (kind, layer, step, ...).
        texts: ``{(run, tag): latest text}``.
        images: ``{run: [image tags]}``.
        problems: ``"<event file>: <what is wrong>"`` for each event file that could not be read
            to its end (corrupted or truncated); what was readable is in the other fields.
    """

    scalars: pd.DataFrame
    findings: pd.DataFrame
    texts: dict[tuple[str, str], str]
    images: dict[str, list[str]]
    problems: list[str] = field(default_factory=list)


def find_runs(logdir: Path) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold event files."""
    return sorted({p.parent for p in logdir.rglob(EVENT_GLOB)})


def read_logs(logdir: str | Path, prefix: str = "graddiag/") -> LogData:
    """Read every run under ``logdir`` with TensorBoard's own event reader.

    Raises:
        FileNotFoundError: if ``logdir`` does not exist.
        ValueError: if it holds no event files, or none with graddiag data.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"log directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a directory")
    runs = find_runs(root)
    if not runs:
        raise ValueError(f"no TensorBoard event files ({EVENT_GLOB}) under {str(root)!r}")
    rows: list[dict[str, object]] = []
    texts: dict[tuple[str, str], str] = {}
    images: dict[str, list[str]] = {}
    finding_tables = []
    problems = []
    for path in sorted(root.rglob(EVENT_GLOB)):
        problem = event_file_problem(path)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    for run_dir in runs:
        run = str(run_dir.relative_to(root)) if run_dir != root else "."
        acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0,
                                                                ea.IMAGES: 1})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            if not tag.startswith(prefix):
                continue
            statistic, _, layer = tag[len(prefix):].partition("/")
            for step, value in _without_orphans([(e.step, e.value) for e in acc.Scalars(tag)]):
                rows.append({"run": run, "tag": tag, "statistic": statistic, "layer": layer,
                             "step": step, "value": value})
        for tag in tags.get("tensors", []):
            if not tag.startswith(prefix):
                continue
            events = acc.Tensors(tag)
            if events:
                values = events[-1].tensor_proto.string_val
                if values:  # torch's SummaryWriter stores text under "<tag>/text_summary"
                    texts[(run, tag.removesuffix("/text_summary"))] = values[0].decode("utf-8")
        images[run] = [t for t in tags.get("images", []) if t.startswith(prefix)]
        text = texts.get((run, f"{prefix}findings"))
        if text:
            table = parse_findings_markdown(text)
            table.insert(0, "run", run)
            finding_tables.append(table)
    scalars = pd.DataFrame(rows, columns=["run", "tag", "statistic", "layer", "step", "value"])
    if scalars.empty and not texts:
        damaged = f"; unreadable event files: {'; '.join(problems)}" if problems else ""
        raise ValueError(f"no graddiag data (tags starting with {prefix!r}) under "
                         f"{str(root)!r}{damaged}")
    findings = (pd.concat(finding_tables, ignore_index=True) if finding_tables else
                pd.DataFrame(columns=["run", "kind", "layer", "step", "value", "threshold",
                                      "evidence", "remedy"]))
    return LogData(scalars, findings, texts, images, problems)


def _without_orphans(events: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """``(step, value)`` in the order written, without the orphans: an event at a step at or
    below one written before starts again from there (a run resumed from a checkpoint writes
    again the steps between it and the crash; a run started again in the same directory
    begins at 0), so the earlier events from that step on are dropped."""
    kept: list[tuple[int, float]] = []
    for step, value in events:
        while kept and kept[-1][0] >= step:
            kept.pop()
        kept.append((step, value))
    return kept


def layer_summary(scalars: pd.DataFrame) -> pd.DataFrame:
    """Per run and layer: records, median/min/max/last gradient norm."""
    grad = scalars[scalars.statistic == "grad_norm"]
    if grad.empty:
        return pd.DataFrame(columns=["run", "layer", "records", "median", "min", "max", "last"])
    order = grad.drop_duplicates(["run", "layer"])[["run", "layer"]]
    stats = (grad.sort_values("step").groupby(["run", "layer"], sort=False)["value"]
             .agg(records="count", median="median", min="min", max="max", last="last")
             .reset_index())
    return order.merge(stats, on=["run", "layer"], how="left")
