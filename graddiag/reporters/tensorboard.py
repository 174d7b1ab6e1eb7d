"""TensorBoard view: scalars, a custom-scalars dashboard, findings text, gradient-flow figures and
(optionally) gradient-magnitude histograms, written through a ``SummaryWriter``."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graddiag.data.bins import HISTOGRAM_BINS, HISTOGRAM_EDGES
from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord
from graddiag.data.snapshots import RunSnapshot, StepSnapshot
from graddiag.data.tree import SiteMark
from graddiag.reporters.budget import DEFAULT_FIGURE_EVERY, FIGURE_TIME_SHARE, TimeBudget
from graddiag.reporters.checksums import CChecksums
from graddiag.reporters.events import write_image, write_scalars
from graddiag.reporters.figures import (
    FlowProfile,
    FlowRows,
    figure_to_array,
    first_figure_seconds,
    flow_profile,
    gradient_flow_figure,
    save_figure_atomically,
)
from graddiag.reporters.markdown import findings_markdown, summary_markdown
from graddiag.reporters.plugin_data import FINDINGS_TAG, LAYERS_TAG, findings_json, layers_json
from graddiag.reporters.scalars import event_metrics

log = logging.getLogger("graddiag")

FIGURE_FILE = "gradient_flow.png"


def dashboard_layout(prefix: str) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: one chart per statistic with all layers in it.

    Gradient norms span many decades, so their charts come first as log10 values (a vanishing
    layer at 1e-9 shows as -9, not as a line on zero under an exploding one); the linear charts
    follow.
    """
    p = re.escape(prefix)
    return {
        "graddiag: gradients (log10)": {
            "log10 gradient norm per layer": ["Multiline", [rf"^{p}log10_grad_norm/"]],
            "log10 layer gradient norms: median with min-max margin": [
                "Margin",
                [f"{prefix}log10_layer_norm/median", f"{prefix}log10_layer_norm/min",
                 f"{prefix}log10_layer_norm/max"],
            ],
            "log10 global gradient norm": ["Multiline", [rf"^{p}log10_global_grad_norm$"]],
            "log10 update ratio per layer": ["Multiline", [rf"^{p}log10_update_ratio/"]],
        },
        "graddiag: gradients": {
            "gradient norm per layer": ["Multiline", [rf"^{p}grad_norm/"]],
            "global gradient norm": ["Multiline", [rf"^{p}global_grad_norm$"]],
            "layer gradient norms: median with min-max margin": [
                "Margin",
                [f"{prefix}layer_norm/median", f"{prefix}layer_norm/min",
                 f"{prefix}layer_norm/max"],
            ],
            "active findings": ["Multiline", [rf"^{p}active_findings$"]],
            "skipped optimizer steps (cumulative)": ["Multiline", [rf"^{p}skipped_steps$"]],
        },
        "graddiag: parameters": {
            "parameter norm per layer": ["Multiline", [rf"^{p}param_norm/"]],
            "update ratio per layer": ["Multiline", [rf"^{p}update_ratio/"]],
        },
        "graddiag: activations": {
            "saturated fraction (sigmoid/tanh)": ["Multiline", [rf"^{p}saturated/"]],
            "dead fraction (ReLU-like)": ["Multiline", [rf"^{p}dead/"]],
            "mean local derivative (gain)": ["Multiline", [rf"^{p}gain/"]],
        },
    }


def _site_findings(findings: Sequence[Finding]) -> dict[str, tuple[str, float]]:
    """``{site: (kind, value)}`` of the latest ``dead_relu``/``saturated`` finding per site."""
    return {f.layer: (f.kind, f.value) for f in findings if f.kind in ("dead_relu", "saturated")}


class TensorBoardReporter:
    """Writes graddiag's TensorBoard artefacts.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (Lightning's
            ``TensorBoardLogger.experiment``).
        prefix: Prefix of every tag (default ``graddiag/``).
        scalars_every_n_steps: Scalar interval (the trainer's ``log_every_n_steps``).
        figure_every_n_steps: Gradient-flow image interval (0: only at the end). ``None``:
            on multiples of 500 steps while figures, the next one included, stay within 0.25 %
            of the wall time since the first step (each costs tenths of a second to seconds of
            Matplotlib; the first is assumed to cost 0.05 s + 4 ms per layer, at most 120); an
            integer:
            every recorded step divisible by it.
        save_png: Also save the final figure as ``gradient_flow.png`` in the writer's log dir.
    """

    def __init__(
        self,
        writer: Any,
        *,
        prefix: str = "graddiag/",
        scalars_every_n_steps: int = 50,
        figure_every_n_steps: int | None = None,
        save_png: bool = True,
    ) -> None:
        self.writer = writer
        self.prefix = prefix
        self.scalars_every = max(1, scalars_every_n_steps)
        self.figure_every = (DEFAULT_FIGURE_EVERY if figure_every_n_steps is None
                             else figure_every_n_steps)
        self._figure_budget = TimeBudget(
            self.figure_every, FIGURE_TIME_SHARE if figure_every_n_steps is None else None)
        self.save_png = save_png
        self._findings: tuple[Finding, ...] = ()
        self._marks: tuple[SiteMark, ...] = ()
        self._layout_written = False
        self._interval = FlowRows()  # the steps since the last figure
        self._run = FlowRows()  # every step of this layout, for the whole-run figure
        self._run_since = 0  # the first step in it
        self._flow_layers: list[str] = []  # the layout of both
        self._last_step = 0
        self._warned_histogram = False
        self.png_path: Path | None = None
        self._layers_seen: list[str] | None = None
        self._sites_seen: list[tuple[float, str, str, str]] = []
        self._layers_key: tuple[Any, ...] | None = None
        self._said_closed = False
        #: Set when a monitor that was never closed judges its last steps (dropped, or at exit).
        self.unattended = False
        self._checksums = CChecksums()  # the writer's event records checksummed in C until close

    def _closed(self) -> bool:
        """Whether this reporter's monitor was dropped without ``close()`` (or is judged at
        exit) after the user closed its torch ``SummaryWriter``: writing then would silently
        open a second event file. While training goes on, a closed writer is written to as
        torch does (Lightning reopens its logger's writer for a second fit). Said once at INFO."""
        if not self.unattended or getattr(self.writer, "file_writer", True) is not None:
            return False
        if not self._said_closed:
            self._said_closed = True
            log.info("graddiag: the SummaryWriter was closed; graddiag writes nothing more to it "
                     "(close the monitor before the writer to have its last steps written).")
        return True

    def report(self, snapshot: StepSnapshot) -> None:
        if not self._closed():
            self._checksummed(self._report, snapshot)

    def _checksummed(self, write: Callable[[Any], None], argument: Any) -> None:
        """``write(argument)`` with the writer's records checksummed in C; on an error (the
        reporter is then turned off) the writer gets TensorBoard's own method back."""
        self._checksums.cover(self.writer)
        try:
            write(argument)
        except BaseException:
            self._checksums.undo()
            raise

    def _report(self, snapshot: StepSnapshot) -> None:
        record, findings = snapshot.record, snapshot.new_findings
        self._findings, self._marks = snapshot.findings, snapshot.marks
        w, p, step = self.writer, self.prefix, record.step
        self._last_step = step
        if not self._layout_written:
            w.add_custom_scalars(dashboard_layout(p))
            self._layout_written = True
        self._layer_order(record)
        if step % self.scalars_every == 0:
            self._scalars(record, snapshot.active_count, snapshot.skipped_steps)
        if record.grad_histograms is not None:
            self._histograms(record)
        if findings:
            w.add_text(f"{p}findings", findings_markdown(list(self._findings)), step)
            w.add_text(f"{p}{FINDINGS_TAG}", findings_json(self._findings), step)
        if record.layers is not self._flow_layers and record.layers != self._flow_layers:
            self._interval, self._flow_layers = FlowRows(), record.layers
            self._run, self._run_since = FlowRows(), step
            self._figure_budget.first_cost = first_figure_seconds(len(record.layers))
        self._run.append(record.grad_norm, record.has_grad)
        if self.figure_every:
            self._interval.append(record.grad_norm, record.has_grad)
            due = self._figure_budget.due(step)
            if due and len(self._run) > 1:  # not on the first step alone
                started = self._figure_budget.clock()
                self._figure(self._interval.profile(), record.layers, step, f"steps up to {step}")
                self._figure_budget.spent(started)
                self._interval = FlowRows()

    def _layer_order(self, record: StepRecord) -> None:
        """Write the layer order and activation sites (for the graddiag tab) when they change."""
        if record.layers is self._layers_seen and record.activations is None:
            return
        self._layers_seen = record.layers
        acts = record.activations
        if acts is not None:
            family = dict(zip(acts.sites, acts.families))
            self._sites_seen = [(m.x, m.site, m.kind, family.get(m.site, ""))
                                for m in self._marks]
        key = (tuple(record.layers), tuple(self._sites_seen))
        if key != self._layers_key:
            self._layers_key = key
            self.writer.add_text(f"{self.prefix}{LAYERS_TAG}",
                                 layers_json(self.prefix, record.layers, self._sites_seen),
                                 record.step)

    def _scalars(self, record: StepRecord, active: int, skipped: int) -> None:
        """A logging step's scalars (see :func:`event_metrics`), in one event."""
        write_scalars(self.writer, event_metrics(record, self.prefix, active, skipped),
                      record.step)

    def _histograms(self, record: StepRecord) -> None:
        assert record.grad_histograms is not None
        limits = np.concatenate([HISTOGRAM_EDGES, [1e300]]).tolist()
        for layer, row in zip(record.layers, record.grad_histograms):
            counts = row[: HISTOGRAM_BINS - 1]  # finite values only; the last bin is NaN/Inf
            total = float(counts.sum())
            if total == 0:
                if not self._warned_histogram:
                    self._warned_histogram = True
                    log.warning("graddiag: layer '%s' has no finite gradient values at step %d; "
                                "its histogram is skipped", layer, record.step)
                continue
            used = np.flatnonzero(counts)
            low = 0.0 if used[0] == 0 else float(HISTOGRAM_EDGES[used[0] - 1])
            high = float(HISTOGRAM_EDGES[min(used[-1], len(HISTOGRAM_EDGES) - 1)])
            self.writer.add_histogram_raw(
                f"{self.prefix}grad_hist/{layer}", min=low, max=high, num=total,
                sum=float(row[-2]), sum_squares=float(row[-1]), bucket_limits=limits,
                bucket_counts=counts.tolist(), global_step=record.step,
            )

    def _figure(self, profile: FlowProfile, layers: Sequence[str], step: int, title: str) -> Any:
        marks = [(m.x, m.site, m.kind) for m in self._marks]
        fig = gradient_flow_figure(layers, profile, flagged={f.layer for f in self._findings},
                                   sites=marks, site_findings=_site_findings(self._findings),
                                   title=f"Gradient flow, {title}")
        write_image(self.writer, f"{self.prefix}gradient_flow", figure_to_array(fig), step)
        return fig

    def finish(self, run: RunSnapshot) -> None:
        """The whole-run figure (also saved as ``gradient_flow.png``) and the summary table."""
        if not self._closed():
            self._checksummed(self._finish, run)

    def _finish(self, run: RunSnapshot) -> None:
        self._findings, self._marks = run.findings, run.marks
        if run.records:
            self._last_step = max(self._last_step, run.last_step)
            fig = self._figure(self._whole_run(run), run.layers, self._last_step, "whole run")
            logdir = _logdir(self.writer)
            if self.save_png and logdir is not None:
                self._save_png(fig, Path(logdir) / FIGURE_FILE)
            self.writer.add_text(f"{self.prefix}summary",
                                 summary_markdown(run.summary, skipped_steps=run.skipped_steps),
                                 self._last_step)

    def _whole_run(self, run: RunSnapshot) -> FlowProfile:
        """Every step this reporter saw of the final layout, and the kept records from before
        the first of them (a resumed run's history, thinned to its bound)."""
        if not len(self._run) or tuple(self._flow_layers) != tuple(run.layers):
            return flow_profile([r.grad_norm for r in run.records],
                                [r.has_grad for r in run.records])
        earlier = [(r.grad_norm, r.has_grad) for r in run.records if r.step < self._run_since]
        return self._run.profile(earlier)

    def _save_png(self, fig: Any, path: Path) -> None:
        try:
            self.png_path = save_figure_atomically(fig, path)
        except OSError as error:  # a full disk: no truncated PNG, and the text still gets written
            log.warning("graddiag: could not save %s (%s); the figure is still in TensorBoard's "
                        "Images tab.", path, error)

    def close(self) -> None:
        """Write out the queued events and give the writer TensorBoard's own checksums back."""
        try:
            self.flush()
        finally:
            self._checksums.undo()

    def flush(self) -> None:
        """Write out the writer's queued events (a closed torch ``SummaryWriter`` stays closed);
        a monitor never closed flushes last: the writer then gets TensorBoard's own checksums
        back."""
        try:
            self.writer.flush()
        finally:
            if self.unattended:
                self._checksums.undo()


def _logdir(writer: Any) -> str | None:
    get = getattr(writer, "get_logdir", None)
    if callable(get):
        return str(get())
    return getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
