"""GradientMonitor: the framework-free pipeline model -> measure -> rules -> explain -> history ->
reporters."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from functools import partial
from types import TracebackType
from typing import Any

import torch
from torch import nn

from graddiag.data.errors import GradientAlarm
from graddiag.data.findings import Finding
from graddiag.data.options import MonitorConfig
from graddiag.data.policy import ALARM_KINDS, StepReport, decide
from graddiag.data.records import StepRecord
from graddiag.data.schedule import Schedule
from graddiag.measure.activations import ActivationRegistry, default_registry
from graddiag.measure.activations.entry import WatchedEntry
from graddiag.measure.compiled import compiled_parts
from graddiag.measure.layers import discover_layers
from graddiag.measure.measurement import StepMeasurement
from graddiag.measure.ranks import as_reducer
from graddiag.measure.replay import ReplayArgument, check_replay
from graddiag.measure.tree import module_tree
from graddiag.measure.updates import UpdateTracker, as_optimizers
from graddiag.pipeline.activation_scope import ActivationScope
from graddiag.pipeline.arguments import (
    check_activation_registry,
    check_clipping,
    check_monitor_arguments,
    check_reporters,
)
from graddiag.pipeline.controls import WatchControls
from graddiag.pipeline.deferral import HostReadDeferral
from graddiag.pipeline.history import History
from graddiag.pipeline.persistence import monitor_state, restore_monitor
from graddiag.pipeline.replay import NonfiniteReplay
from graddiag.pipeline.reporting import Reporting
from graddiag.pipeline.results import MonitorResults
from graddiag.reporters import ConsoleReporter, Reporter
from graddiag.rules.activation import DeadReluRule, SaturatedRule
from graddiag.rules.explain import Explainer
from graddiag.rules.ruleset import RuleSet
from graddiag.rules.updates import update_rules

__all__ = ["GradientMonitor", "StepReport"]

log = logging.getLogger("graddiag")

#: Kept plain steps are judged at the latest this many seconds after the first of them.
MAX_BLOCK_SECONDS = 1.0


class GradientMonitor(MonitorResults, WatchControls):
    """Records per-layer gradient statistics of ``model`` and raises findings.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``::

        with GradientMonitor(model) as monitor:
            for x, y in data:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                if monitor.step().should_skip:
                    continue
                optimizer.step()

    Args:
        model: The monitored module; layer names are relative to it.
        reporters: Where step snapshots go (see :mod:`graddiag.reporters.base`). ``None`` logs
            findings on the console.
        activation_registry: Activation types and functions to analyse (default: built-ins).
        process_group: Sum activation statistics over these ranks (a ``torch.distributed``
            process group, or a :class:`~graddiag.measure.ranks.RankReducer`); then every rank
            must call :meth:`step` on the same steps. ``None``: this monitor never communicates.
        watch: The method of ``model`` whose calls are watched on activation steps (only in
            training mode with gradients enabled); ``None`` watches only inside
            :meth:`watch_activations`. The Lightning adapter passes ``"training_step"``.
        optimizers: The optimizer(s) training ``model``, if known: parameter steps then read
            each layer's learning rate and report trainable parameters that no optimizer holds
            (``not_in_optimizer``). :meth:`watch_optimizers` sets them later.
        **options: Any field of :class:`~graddiag.data.options.MonitorConfig`.
    """

    def __init__(self, model: nn.Module, *, reporters: Sequence[Reporter] | None = None,
                 activation_registry: ActivationRegistry | None = None,
                 config: MonitorConfig | None = None, process_group: Any = None,
                 watch: str | None = "forward",
                 optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                 **options: Any) -> None:
        check_monitor_arguments(model, config, options, watch)
        self.config = c = config if config is not None else MonitorConfig.from_options(**options)
        activation_registry = check_activation_registry(activation_registry)
        reporters = None if reporters is None else check_reporters(reporters)
        self.schedule = Schedule.from_config(c)
        self._begun = False  # the first step seen sets the schedule's start (see _begin)
        self.model = model
        self.index = discover_layers(model, c.include, c.exclude)
        if not len(self.index):
            log.warning("graddiag: %s has no trainable parameters (none with requires_grad=True); "
                        "there are no gradients to monitor.", type(model).__name__)
        tree = module_tree(model)
        self._reporting = Reporting([ConsoleReporter()] if reporters is None else reporters, tree)
        self.reporters = self._reporting.reporters
        self.rules = RuleSet(c, extra=[SaturatedRule(c.saturated_fraction, c.activation_patience),
                                       DeadReluRule(c.dead_fraction, c.activation_patience),
                                       *update_rules(c)])
        self._explainer = Explainer(tree)
        self._history = History(c.max_history_rows)
        self._findings: list[Finding] = []
        compiled = compiled_parts(model)
        self._activations = ActivationScope(model, c, self.schedule,
                                            activation_registry or default_registry,
                                            as_reducer(process_group), compiled, watch)
        self._updates = UpdateTracker(model, self.index, c, self.schedule)  # update ratios
        self._updates.watch(as_optimizers(optimizers))
        self._measurement = StepMeasurement(model, self.index, c.norm_type, self.schedule,
                                            record_order=not compiled, include=c.include,
                                            exclude=c.exclude, updates=self._updates)
        if self._activations.steps is not None:  # sites are timed on the layers' clock
            self._activations.steps.watch.arrival = self._measurement.live.arrival
        self._replay = NonfiniteReplay(model, c.replay_nonfinite, self._activations.unwatched)
        # on close, and on garbage collection of a monitor never closed: no wrapper, no hook left
        self._release = weakref.finalize(self, _release, self._activations.entry,
                                         self._measurement)
        self._next_step = 0
        # the last measures() question (step, lookahead, the schedule's start) and its answer
        self._asked: tuple[int, int, int, bool] = (-1, 0, 0, False)
        self.skipped_steps = 0  # optimizer steps skipped on graddiag's request ("skip" actions)
        self._closed = False
        #: Defer each recorded step's host read by one step (``None``: automatically, on CUDA
        #: with warn-only actions); see :mod:`graddiag.pipeline.deferral`.
        self.deferred_host_read: bool | None = None
        self._deferral = HostReadDeferral(c, self.index)
        self._action: str = "continue"  # the last judged step's action
        # plain steps may wait for a block: nothing decides on them (exploding only warns)
        self._blocks = c.evaluate_every_n_records > 1 and c.on_exploding == "warn"
        self._warn_only = c.on_nonfinite == "warn" and c.on_exploding == "warn"
        self._block_started = 0.0  # when the first of the kept plain steps was kept
        # a monitor never closed still judges its waiting steps and has its reporters flush
        # them: when it is dropped (``__del__``), or when the interpreter exits while it is
        # still alive (in this process: a forked child does not judge its parent's steps nor
        # write to its parent's reporters); reporters are finished and closed only by close()
        self._pid = os.getpid()
        self._judge_at_exit = partial(_judge_if_open, weakref.ref(self))
        atexit.register(self._judge_at_exit)

    # ----------------------------------------------------------------- one step
    def step(self, step: int | None = None, *, optimizer: int = 0,
             params: Iterable[torch.Tensor] | None = None,
             amp_scale: torch.Tensor | float | None = None, grads_scaled: bool = False,
             clip_norm: float | None = None, clip_value: float | None = None,
             raise_on_alarm: bool = True,
             replay: ReplayArgument = None) -> StepReport:
        """Measure (on recorded steps) and evaluate the gradients of one optimizer step.

        Args:
            step: The step number; by default calls are numbered 0, 1, 2, ...
            optimizer: Index of the optimizer about to step (records are tagged with it).
            params: The parameters that optimizer updates; other layers are not measured on
                this step (several optimizers). ``None``: every monitored layer.
            amp_scale: Under fp16 AMP, the ``GradScaler``'s scale (``scaler._scale``, a device
                tensor that travels with the one host copy). inf/NaN gradients then mean the
                scaler skips the step: reported as AMP overflow, not as an alarm, unless they
                persist with a scale below 1.
            grads_scaled: Gradients are still multiplied by ``amp_scale`` (fused optimizers);
                norms are divided by it on the device.
            clip_norm: The gradient-clipping threshold (2-norm) applied after this measurement;
                records then say whether clipping will act.
            clip_value: The threshold of gradient clipping by value (every element clamped to
                +-clip_value) applied after this measurement: a remedy for exploding gradients
                then knows that clipping is on.
            raise_on_alarm: Raise :class:`~graddiag.data.errors.GradientAlarm` when the action is
                ``"raise"`` (otherwise it is only returned in the report).
            replay: Recomputes this step's loss, e.g. ``lambda: loss_fn(model(x), y)`` (the
                same batch; no ``backward()``). Called only when a ``nonfinite`` finding begins
                (and ``replay_nonfinite`` is on): the step is re-run under checks and the
                finding names the first operation whose output or gradient became non-finite,
                and its source line. Weights, gradients, buffers and random state are left
                as they were. A :class:`~graddiag.measure.replay.ReplayRun` also carries the
                random state the forward began with.

        Returns:
            A :class:`StepReport`; ``report.should_skip`` tells a loop to skip ``optimizer.step()``.
            A plain step (gradient norms only, nothing to decide) is kept and judged with the
            next ``evaluate_every_n_records`` - 1 such steps, or a second later: its report then
            has no record and no findings yet; they come with the block's last step.
        """
        if self._closed:
            raise RuntimeError("this GradientMonitor is closed")
        if replay is not None:
            check_replay(replay)
        if clip_norm is not None or clip_value is not None:
            clip_norm, clip_value = check_clipping(clip_norm, clip_value)
        current = self._next_step if step is None else int(step)
        self._next_step = self._activations.upcoming = current + 1
        measured = self.measures(current)
        # a copy and nothing else, unless the step may decide (an action other than "warn"),
        # or a GradScaler may skip it (then the host read says so, and the copy is void)
        if (measured and amp_scale is None and self._warn_only
                and self.schedule.copies_only(current, self._updates.lookahead)):
            self._measurement.copy_weights(current, optimizer=optimizer, params=params)
            measured = False  # nothing read on the host: the step has no record
        if not measured and self._deferral.pending is None:
            return StepReport(current, False)  # nothing measured, nothing waiting to be read
        # measured from here on (or a deferred read is pending)
        deferred = self._deferring(replay)
        if (measured and amp_scale is None
                and self._try_keep(current, optimizer, params, clip_norm, clip_value,
                                   sent=deferred)):
            # kept: judged with its block; what was read on earlier steps has arrived (a
            # block sent to the host, a step measured in full): judged now, oldest first
            arrived = self._measurement.take_sent()
            finish = self._deferral.take()
            if finish is not None:
                arrived.append(finish())
            report = self._judge(arrived) or StepReport(current, True)
            if (self._measurement.kept_full
                    or time.perf_counter() - self._block_started > MAX_BLOCK_SECONDS):
                if self._measurement.sends_kept:
                    self._measurement.send_kept()  # read on the next step
                else:
                    report = self._judge_kept() or report
            return report
        report = StepReport(current, False)
        finish = earlier = None
        if measured:
            pack = self._activations.take(current)
            deferred = deferred and pack is None  # activation steps are read on the step
            earlier = self._judge_kept()  # steps kept before this one are judged before it
            finish = self._measurement.start(
                current, optimizer=optimizer, params=params, amp_scale=amp_scale,
                grads_scaled=grads_scaled, clip_norm=clip_norm, clip_value=clip_value,
                activations=pack,
                deferred=deferred)
        if deferred:  # evaluate the previous recorded step, whose copy has long arrived
            finish = self._deferral.swap(finish)
        elif self._deferral.pending is not None:
            self.flush()
        if finish is not None:
            report = self._evaluate(finish(), None if deferred else replay)
        if report.action == "raise" and raise_on_alarm:
            alarms = [f for f in self._findings if f.kind in ALARM_KINDS]
            raise GradientAlarm([f for f in report.findings if f.kind in ALARM_KINDS]
                                or alarms[-1:])
        if earlier is not None:  # what the kept steps found comes first (their steps named)
            report.findings = earlier.findings + report.findings
        return report

    def _try_keep(self, step: int, optimizer: int, params: Iterable[torch.Tensor] | None,
                  clip_norm: float | None, clip_value: float | None = None,
                  sent: bool = False) -> bool:
        """Keep ``step`` (read its gradient norms into a row) to be judged with the next block
        of plain steps (see the option ``evaluate_every_n_records``) if it is one: gradient
        norms only, nothing to decide on its own. ``False``: measure it in full. ``sent``:
        the host read is deferred, so the block travels to the host in one copy when full
        and is judged on the step after."""
        if (not self._blocks or self._action != "continue"
                or not self.schedule.keeps(step, self._updates.lookahead)):
            return False
        kept = self._measurement.keep(step, self.config.evaluate_every_n_records,
                                      optimizer=optimizer, params=params, clip_norm=clip_norm,
                                      clip_value=clip_value, sent=sent)
        if kept and self._measurement.kept == 1:  # the first of a block
            self._block_started = time.perf_counter()
        return kept

    def _judge_kept(self) -> StepReport | None:
        """Judge the kept plain steps, oldest first; one report for them all (the last step's
        record and action, every finding that began on any of them), or ``None`` if none."""
        return self._judge(self._measurement.take_kept())

    def _judge(self, records: list[StepRecord]) -> StepReport | None:
        """Judge ``records`` in order; one report for them all (see :meth:`_judge_kept`)."""
        report = None
        found: list[Finding] = []
        for record in records:
            report = self._evaluate(record)
            found.extend(report.findings)
        if report is not None:
            report.findings = found
        return report

    def measures(self, step: int) -> bool:
        """Whether :meth:`step` measures ``step`` (gradients, parameters, activations or a copy of
        the weights); adapters gather a step's inputs only then. Asked up to three times per
        step in Lightning: the last answer is kept."""
        lookahead = self._updates.lookahead
        asked = self._asked
        if asked[0] == step and asked[1] == lookahead and asked[2] == self.schedule.start:
            return asked[3]
        if not self._begun:  # the first step this monitor sees
            self._begin(step)
        measured = self.schedule.records(step, lookahead)
        self._asked = (step, lookahead, self.schedule.start, measured)
        return measured

    def _deferring(self, replay: ReplayArgument = None) -> bool:
        """Whether this step's host read is deferred (see :attr:`deferred_host_read`)."""
        return self._deferral.wanted(replay, self.deferred_host_read)

    def forget_waiting(self) -> None:
        """Drop the kept steps and a pending deferred read unjudged (before loading a state)."""
        self._measurement.discard_kept()
        self._updates.discard_copies()  # the weights are about to change under them
        self._deferral.take()
        self._action = "continue"

    def flush(self) -> StepReport | None:
        """Judge the steps still waiting: kept plain steps and a pending deferred host read."""
        report = self._judge_kept()
        finish = self._deferral.take()
        return report if finish is None else self._evaluate(finish())

    def _evaluate(self, record: StepRecord, replay: ReplayArgument = None) -> StepReport:
        self._explainer.observe(record)
        findings = self.rules.update(record)
        if findings:
            exploding = self.rules.holding("exploding")
            findings = [self._explainer.explain(f, record, exploding) for f in findings]
        findings = self._replay.annotate(findings, record.step, replay)  # op and line of a NaN
        self._history.append(record)
        if findings:
            self._history.pin(record.step)
            self._findings.extend(findings)
        action = self._action = decide(self.rules.active, self.config.on_nonfinite,
                                       self.config.on_exploding)
        if action != "continue" or record.amp_overflow:  # no update: a weight copy is void
            self._updates.discard_copy(record.step, record.optimizer)
        if action == "skip":
            self.note_skipped()
        self._reporting.report(record, findings, self._findings, self.rules.active_count(),
                               self.skipped_steps)
        return StepReport(record.step, True, findings, action, record)

    def discard_update(self, step: int, optimizer: int = 0) -> None:
        """Optimizer ``optimizer``'s step ``step`` applies nothing, although this monitor did not
        ask to skip it (another rank did): a weight copy taken on it is void, so the next
        parameter step reports no update ratio rather than a false 0."""
        self._updates.discard_copy(step, optimizer)

    def note_skipped(self) -> int:
        """Count one optimizer step that applies nothing; returns the count so far.

        The monitor counts the steps it asks to skip; an adapter that skips a step for another
        reason (another rank asked for it) counts it here.
        """
        self.skipped_steps += 1
        return self.skipped_steps

    # ----------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove the watch wrapper and every hook, hand reporters the run, close them. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        atexit.unregister(self._judge_at_exit)
        self._release()
        self._activations.close()
        self._reporting.close(self._history.records, self._measurement.layers, self._findings,
                              self.summary, self.skipped_steps)

    def __del__(self) -> None:
        """Dropped without :meth:`close`: the steps still waiting are judged, so that their
        findings reach the reporters, and the reporters flush them (a ``SummaryWriter``'s
        queue is written out); hooks go with the ``weakref`` finalizer."""
        handler = getattr(self, "_judge_at_exit", None)
        if handler is None or self._closed or sys.is_finalizing():
            return
        atexit.unregister(handler)
        _judge_waiting(self)

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state (see :func:`~graddiag.pipeline.persistence.monitor_state`)."""
        return monitor_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (see :func:`~graddiag.pipeline.persistence.restore_monitor`)."""
        restore_monitor(self, state)


def _judge_if_open(monitor: weakref.ReferenceType[GradientMonitor]) -> None:
    """At interpreter exit: judge the waiting steps of a monitor still alive and never closed."""
    alive = monitor()
    if alive is not None and not alive.closed:
        _judge_waiting(alive)


def _judge_waiting(monitor: GradientMonitor) -> None:
    """Judge a never-closed monitor's waiting steps and have its reporters flush them, in the
    process that kept them; a failure is logged, never raised (this runs from garbage
    collection or at exit). Reporters are not finished (no whole-run figure or summary: the
    run may go on with another monitor) nor closed (they may be shared)."""
    if monitor._pid != os.getpid():
        return
    try:
        monitor._reporting.unattended()
        monitor.flush()
        monitor._reporting.flush()
    except Exception as error:  # noqa: BLE001 - nothing may escape a finalizer
        log.warning("graddiag: the steps still waiting for their block could not be judged "
                    "(%s: %s); close() the monitor to have them judged in training.",
                    type(error).__name__, error)


def _release(entry: WatchedEntry | None, measurement: StepMeasurement) -> None:
    """Undo what a monitor installed on its model (runs on close and on garbage collection)."""
    if entry is not None:
        entry.remove()
    measurement.close()
