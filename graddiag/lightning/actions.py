"""Carrying out a step's action in Lightning: every rank agrees on it, then a skipped or stopped
step applies nothing, and rank zero says why."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from graddiag.data.errors import GradientAlarm
from graddiag.data.options import MonitorConfig
from graddiag.data.policy import ALARM_KINDS, StepReport
from graddiag.lightning.step_inputs import optimizer_index
from graddiag.lightning.strategy import agree_on_action
from graddiag.pipeline.monitor import GradientMonitor

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("graddiag")


def apply_action(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, report: StepReport,
                 monitor: GradientMonitor | None, config: MonitorConfig) -> None:
    """Apply ``report``'s action (agreed over ranks): ``skip`` clears the gradients, ``stop``
    also ends the fit, ``raise`` raises :class:`~graddiag.data.errors.GradientAlarm`. Skips are
    logged on the first three and then at 10, 100, 1000, ... (all are counted)."""
    # with only "warn" actions no rank ever skips or stops (nothing to agree on, nothing to do)
    if config.on_nonfinite == "warn" and config.on_exploding == "warn":
        return
    action = report.action
    if trainer.world_size > 1:  # every rank takes the same decision
        action = agree_on_action(trainer.strategy, action)
    if action == "continue":
        return
    if report.action == "continue" and monitor is not None:  # another rank asked for it
        monitor.discard_update(report.step, optimizer_index(trainer, optimizer))
        if action == "skip":
            monitor.note_skipped()
    for group in optimizer.param_groups:  # nothing is applied: no gradient, no update
        for param in group["params"]:
            param.grad = None
    if action == "raise":
        raise GradientAlarm(
            [f for f in monitor.findings if f.kind in ALARM_KINDS][-1:]  # type: ignore[union-attr]
        )
    if not trainer.is_global_zero:
        trainer.should_stop = trainer.should_stop or action == "stop"
        return
    # findings of this step (a report may also carry earlier, judged steps' findings)
    reason = ("; ".join(sorted({f.kind for f in report.findings if f.step == report.step}))
              or _still_active(monitor))
    if action == "stop":
        trainer.should_stop = True
        log.warning("graddiag: stopping training at step %d (%s)", report.step, reason)
        return
    count = monitor.skipped_steps if monitor is not None else 0
    if count <= 3 or _is_power_of_ten(count):
        log.warning(
            "graddiag: skipped optimizer step %d (%s): the optimizer applied nothing; "
            "%d step(s) skipped so far%s.", report.step, reason, count,
            "" if count < 3 else " (further skips are counted in graddiag/skipped_steps "
            "and the end-of-fit summary, and reported here at 10, 100, 1000, ...)",
        )


def _still_active(monitor: GradientMonitor | None) -> str:
    kinds = [k for k in ALARM_KINDS if monitor is not None and monitor.rules.active(k)]
    return f"{' and '.join(kinds)} still active" if kinds else "another rank's alarm"


def _is_power_of_ten(n: int) -> bool:
    return n >= 10 and str(n).strip("0") == "1"
