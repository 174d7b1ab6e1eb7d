"""GradientMonitor: the framework-free pipeline model -> probes -> rules -> findings -> reporters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from graddiag.data.errors import GradientAlarm
from graddiag.data.findings import Finding
from graddiag.data.options import MonitorConfig
from graddiag.data.records import StepRecord
from graddiag.measure.activations import (
    ActivationProbe,
    ActivationRegistry,
    default_registry,
)
from graddiag.measure.histograms import HistogramProbe
from graddiag.measure.layers import ForwardOrderRecorder, discover_layers
from graddiag.measure.norms import GradientProbe
from graddiag.measure.parameters import ParameterProbe
from graddiag.measure.transfer import to_host
from graddiag.pipeline.history import History
from graddiag.reporters import ConsoleReporter, Reporter, SafeReporter
from graddiag.reporters.summary import summarize
from graddiag.reporters.tables import save_table
from graddiag.rules.activation import DeadReluRule, SaturatedRule
from graddiag.rules.explain import Explainer
from graddiag.rules.ruleset import RuleSet

log = logging.getLogger("graddiag")

StepAction = Literal["continue", "skip", "stop", "raise"]
_ACTION_RANK = {"warn": 0, "continue": 0, "skip": 1, "stop": 2, "raise": 3}


@dataclass
class StepReport:
    """What :meth:`GradientMonitor.step` decided for one optimizer step.

    Attributes:
        step: The optimizer step.
        recorded: Whether this step was measured (``False`` on steps skipped by the cadence).
        findings: Findings that began on this step.
        action: ``"continue"``, or ``"skip"``/``"stop"``/``"raise"`` when ``on_nonfinite`` or
            ``on_exploding`` asks for it and that condition holds on this step.
        record: The measurements, when recorded.
    """

    step: int
    recorded: bool
    findings: list[Finding] = field(default_factory=list)
    action: StepAction = "continue"
    record: StepRecord | None = None

    @property
    def should_skip(self) -> bool:
        """Skip the optimizer step (also true when training should stop or raise)."""
        return self.action != "continue"

    @property
    def should_stop(self) -> bool:
        return self.action in ("stop", "raise")


class GradientMonitor:
    """Records per-layer gradient statistics of ``model`` and raises findings.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``::

        monitor = GradientMonitor(model)
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if monitor.step().should_skip:
                continue
            optimizer.step()
        monitor.close()

    Args:
        model: The monitored module; layer names are relative to it.
        reporters: Where records and findings go. ``None`` logs findings on the console.
        activation_registry: Activation types and functions to analyse (default: built-ins).
        **options: Any field of :class:`~graddiag.data.options.MonitorConfig`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reporters: Sequence[Reporter] | None = None,
        activation_registry: ActivationRegistry | None = None,
        config: MonitorConfig | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is not None and options:
            raise ValueError(f"pass either config or options, not both (got {sorted(options)})")
        self.config = config if config is not None else MonitorConfig.from_options(**options)
        self.model = model
        self.index = discover_layers(model, self.config.include, self.config.exclude)
        if not len(self.index):
            log.warning(
                "graddiag: %s has no trainable parameters (none with requires_grad=True); "
                "there are no gradients to monitor.", type(model).__name__,
            )
        self.reporters = [
            SafeReporter(r) for r in ([ConsoleReporter()] if reporters is None else reporters)
        ]
        self.rules = RuleSet(
            self.config,
            extra=[
                SaturatedRule(self.config.saturated_fraction, self.config.activation_patience),
                DeadReluRule(self.config.dead_fraction, self.config.activation_patience),
            ],
        )
        self._history = History(self.config.max_history_rows)
        self.findings: list[Finding] = []
        self._order: ForwardOrderRecorder | None = ForwardOrderRecorder(self.index)
        self._grad_probe: GradientProbe | None = None
        self._optimizer_probes: dict[int, GradientProbe] = {}
        self._layer_names: list[str] = self.index.names
        self._param_probe: ParameterProbe | None = None
        self._histogram_probe: HistogramProbe | None = None
        self._activations: ActivationProbe | None = None
        if self.config.activation_every_n_steps:
            self._activations = ActivationProbe(
                model,
                activation_registry or default_registry,
                derivative_floor=self.config.derivative_floor,
                functional=self.config.functional_activations,
            )
        self._explainer = Explainer(model)
        for reporter in self.reporters:
            bind = getattr(reporter.inner, "bind", None)
            if callable(bind):
                bind(self)
        self._next_step = 0
        self._closed = False
        self.prepare(0)

    # ----------------------------------------------------------------- cadence
    def is_recorded(self, step: int) -> bool:
        """Whether ``step`` is measured at all (gradients, parameters or activations)."""
        c = self.config
        return (
            step % c.every_n_steps == 0
            or self._param_step(step)
            or self._activation_step(step)
            or self._histogram_step(step)
        )

    def _histogram_step(self, step: int) -> bool:
        n = self.config.histogram_every_n_steps
        return bool(n) and step % n == 0

    def _param_step(self, step: int) -> bool:
        n = self.config.param_every_n_steps
        return bool(n) and step % n == 0

    def _activation_step(self, step: int) -> bool:
        n = self.config.activation_every_n_steps
        return bool(n) and step % n == 0

    def prepare(self, step: int) -> None:
        """Arm activation hooks if the forward pass about to run belongs to an activation step.

        :meth:`step` calls this for the following step itself; the Lightning callback calls it
        at the start of every batch.
        """
        if self._activations is None or self._closed:
            return
        if self._activation_step(step):
            self._activations.arm()
        else:
            self._activations.disarm()

    def pause_activations(self) -> None:
        """Stop collecting activation statistics until the next :meth:`prepare` (backward pass)."""
        if self._activations is not None:
            self._activations.pause()

    # ----------------------------------------------------------------- measuring
    def _settle_layout(self) -> None:
        if self._order is not None:
            order = self._order.finish()
            self._order = None
            self.index.reorder(order)
            self._layer_names = self.index.names  # one list shared by every record
        if self._grad_probe is None:
            self._grad_probe = GradientProbe(self.index, self.config.norm_type)
            if self.config.param_every_n_steps:
                self._param_probe = ParameterProbe(self.index)
            if self.config.histogram_every_n_steps:
                self._histogram_probe = HistogramProbe(self.index)

    def _probe_for(self, optimizer: int, params: Iterable[torch.Tensor] | None) -> GradientProbe:
        assert self._grad_probe is not None
        if params is None:
            return self._grad_probe
        probe = self._optimizer_probes.get(optimizer)
        if probe is None:
            ids = {id(p) for p in params}
            probe = GradientProbe(self.index, self.config.norm_type, only=ids)
            if probe.measured.all():
                probe = self._grad_probe
            self._optimizer_probes[optimizer] = probe
        return probe

    def measure(
        self,
        step: int,
        *,
        optimizer: int = 0,
        params: Iterable[torch.Tensor] | None = None,
        amp_scale: torch.Tensor | float | None = None,
        grads_scaled: bool = False,
        clip_norm: float | None = None,
    ) -> StepRecord | None:
        """Measure ``step`` if the cadence says so; ``None`` otherwise. Copies to the host once."""
        if self._closed:
            raise RuntimeError("this GradientMonitor is closed")
        if not self.is_recorded(step):
            return None
        self._settle_layout()
        probe = self._probe_for(optimizer, params)
        device: dict[str, torch.Tensor] = {}  # everything this step sends to the host
        scale = None if amp_scale is None else torch.as_tensor(amp_scale, dtype=torch.float32)
        reading = probe.read(scale if grads_scaled else None)
        device["grad_norm"] = reading.layer_norms
        if scale is not None:
            device["amp_scale"] = scale.reshape(1)
        if self._param_probe is not None and self._param_step(step):
            device["param_norm"], update = self._param_probe.read()
            if update is not None:
                device["update_norm"] = update
        if self._histogram_probe is not None and self._histogram_step(step):
            device["histograms"] = self._histogram_probe.read()
        finish_activations = None
        if self._activations is not None and self._activations.has_data:
            act_chunks, finish_activations = self._activations.collect()
            device.update({f"act{i}": c for i, c in enumerate(act_chunks)})
        host = dict(zip(device, to_host(list(device.values()))))  # the one host copy

        grad_norm = host["grad_norm"]
        has_grad = np.asarray(reading.has_grad, dtype=bool)
        grad_norm[~has_grad] = np.nan
        param_norm = host.get("param_norm")
        update_ratio = None
        if "update_norm" in host:
            with np.errstate(divide="ignore", invalid="ignore"):
                update_ratio = np.where(param_norm > 0, host["update_norm"] / param_norm, np.nan)
        histograms = host.get("histograms")
        if histograms is not None:
            histograms = histograms.reshape(len(self.index), -1)
        activations = None
        if finish_activations is not None:
            activations = finish_activations([v for k, v in host.items() if k.startswith("act")])
        nonfinite: dict[int, dict[str, int]] = {}
        suspicious: set[int] = set()
        if not np.isfinite(host["grad_norm"][has_grad]).all():  # rare: look closer
            suspicious = {int(i) for i in np.flatnonzero(has_grad & ~np.isfinite(grad_norm))}
        # Under a GradScaler, inf/NaN gradients make the scaler skip the step: AMP overflow.
        amp_overflow = scale is not None and bool(suspicious)
        if suspicious and not amp_overflow:
            nonfinite = probe.nonfinite_elements(suspicious)
        clipped = None
        if clip_norm is not None and self.config.norm_type == 2.0:
            measured = grad_norm[has_grad]
            clipped = bool(np.sqrt(np.sum(np.square(measured))) > clip_norm)
        return StepRecord(
            step=step,
            layers=self._layer_names,
            grad_norm=grad_norm,
            has_grad=has_grad,
            missing=reading.missing,
            nonfinite=nonfinite,
            param_norm=param_norm,
            update_ratio=update_ratio,
            activations=activations,
            grad_histograms=histograms,
            optimizer=optimizer,
            measured=None if probe.measured.all() else probe.measured.copy(),
            amp_overflow=amp_overflow,
            amp_scale=float(host["amp_scale"][0]) if "amp_scale" in host else None,
            clipped=clipped,
        )

    # ----------------------------------------------------------------- deciding
    def evaluate(self, record: StepRecord) -> StepReport:
        """Apply the rules to a record, keep it, report it, and decide the action."""
        self._explainer.observe(record)
        findings = [self._explainer.explain(f, record) for f in self.rules.update(record)]
        self._history.append(record)
        if findings:
            self._history.pin(record.step)
            self.findings.extend(findings)
        for reporter in self.reporters:
            reporter.report(record, findings)
        return StepReport(record.step, True, findings, self._decide(), record)

    def _decide(self) -> StepAction:
        chosen = "continue"
        for kind, action in (("nonfinite", self.config.on_nonfinite),
                             ("exploding", self.config.on_exploding)):
            if self.rules.active(kind) and _ACTION_RANK[action] > _ACTION_RANK[chosen]:
                chosen = action
        return "continue" if chosen == "warn" else chosen  # type: ignore[return-value]

    def step(
        self,
        step: int | None = None,
        *,
        optimizer: int = 0,
        params: Iterable[torch.Tensor] | None = None,
        amp_scale: torch.Tensor | float | None = None,
        grads_scaled: bool = False,
        clip_norm: float | None = None,
        raise_on_alarm: bool = True,
        prepare_next: bool = True,
    ) -> StepReport:
        """Measure (on recorded steps) and evaluate the gradients of one optimizer step.

        Args:
            step: The step number; by default calls are numbered 0, 1, 2, ...
            optimizer: Index of the optimizer about to step (records are tagged with it).
            params: The parameters that optimizer updates; other layers are not measured on
                this step (several optimizers). ``None``: every monitored layer.
            amp_scale: Under fp16 AMP, the ``GradScaler``'s current scale (``scaler._scale``,
                a device tensor, travels with the one host copy). inf/NaN gradients then mean the
                scaler skips the step: reported as AMP overflow, not as an alarm, unless they
                persist with a scale below 1.
            grads_scaled: Gradients are still multiplied by ``amp_scale`` (no ``unscale_`` yet,
                e.g. fused optimizers); norms are divided by it on device.
            clip_norm: The gradient-clipping threshold (2-norm) applied after this step's
                measurement, if any; records then say whether clipping will act.
            raise_on_alarm: Raise :class:`~graddiag.data.errors.GradientAlarm` when the action is
                ``"raise"`` (otherwise it is only returned in the report).
            prepare_next: Arm activation hooks now if the next step is an activation step
                (plain loops); the Lightning callback arms them at the start of each batch.

        Returns:
            A :class:`StepReport`; ``report.should_skip`` tells a loop to skip ``optimizer.step()``.
        """
        current = self._next_step if step is None else int(step)
        self._next_step = current + 1
        record = self.measure(
            current, optimizer=optimizer, params=params, amp_scale=amp_scale,
            grads_scaled=grads_scaled, clip_norm=clip_norm,
        )
        report = StepReport(current, False) if record is None else self.evaluate(record)
        if prepare_next:
            self.prepare(current + 1)
        elif self._activations is not None:
            self._activations.disarm()
        if report.action == "raise" and raise_on_alarm:
            raise GradientAlarm(
                [f for f in report.findings if f.kind in ("nonfinite", "exploding")]
                or [f for f in self.findings if f.kind in ("nonfinite", "exploding")][-1:]
            )
        return report

    # ----------------------------------------------------------------- results
    @property
    def history(self) -> pd.DataFrame:
        """Long-format table: one row per recorded step and layer.

        Columns: ``step``, ``optimizer``, ``layer``, ``position`` (forward order), ``grad_norm``,
        ``param_norm``, ``update_ratio``, ``has_grad``, ``nonfinite``.
        """
        return self._history.frame()

    @property
    def activation_history(self) -> pd.DataFrame:
        """Long-format table: one row per activation step and activation site."""
        return self._history.activation_frame()

    @property
    def records(self) -> list[StepRecord]:
        """The kept step records (bounded by ``max_history_rows``)."""
        return list(self._history.records)

    def summary(self) -> pd.DataFrame:
        """Per-layer summary: median/min/max gradient norm, first and last finding."""
        return summarize(self.history, self.findings)

    def site_marks(self) -> list[tuple[float, str, str]]:
        """Where the last seen activation sites sit among the layers, for figures.

        Returns ``(x, site, kind)`` with ``x`` in layer-index units: a site between layers
        ``k-1`` and ``k`` (forward order) has ``x = k - 0.5``.
        """
        acts = self._explainer.activations
        if acts is None:
            return []
        layer_pos = [self._explainer.position.get(n, float("inf")) for n in self.index.names]
        marks = []
        for site, kind in zip(acts.sites, acts.kinds):
            where = self._explainer.site_position(site)
            marks.append((sum(1 for p in layer_pos if p < where) - 0.5, site, kind))
        return marks

    def save_history(self, path: str | Path) -> Path:
        """Write :attr:`history` to ``.csv`` or ``.parquet`` (by the file's extension)."""
        return save_table(self.history, path)

    def active_conditions(self) -> int:
        """How many reported conditions still hold (a layer still vanishing counts once)."""
        return self.rules.active_count()

    @property
    def closed(self) -> bool:
        return self._closed

    @staticmethod
    def empty_history() -> pd.DataFrame:
        return History(1).frame()

    @staticmethod
    def empty_activation_history() -> pd.DataFrame:
        return History(1).activation_frame()

    @staticmethod
    def empty_summary() -> pd.DataFrame:
        return summarize(History(1).frame(), [])

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove every hook and close the reporters. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._order is not None:
            self._order.finish()
            self._order = None
        if self._activations is not None:
            self._activations.close()
        for reporter in self.reporters:
            reporter.close()

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: rule state, findings, history and the step counter.

        Plain containers and tensors only, so checkpoints load with ``weights_only=True``.
        """
        return {
            "next_step": self._next_step,
            "rules": self.rules.state_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "history": self._history.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (a resumed run continues where it stopped)."""
        self._next_step = int(state["next_step"])
        self.rules.load_state_dict(state["rules"])
        self.findings = [Finding.from_dict(d) for d in state["findings"]]
        if "history" in state:
            self._history.load_state_dict(state["history"])
