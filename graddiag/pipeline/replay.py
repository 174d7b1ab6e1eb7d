"""Replay on first onset: when a ``nonfinite`` finding begins, name the operation and the line.

The monitor calls :meth:`NonfiniteReplay.annotate` with the findings of each evaluated step.
On healthy steps it returns at once; when a ``nonfinite`` finding has just begun it re-runs
the step (:func:`~graddiag.measure.replay.replay_step`) and adds what the replay found to the
finding, before reporters see it and before any ``skip``/``stop``/``raise`` action is taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from torch import nn

from graddiag.data.findings import Finding
from graddiag.data.replay import ReplayOutcome
from graddiag.measure.replay import ReplayArgument, ReplayPlan, as_plan, replay_step
from graddiag.rules.replay import with_replay

log = logging.getLogger("graddiag")


class NonfiniteReplay:
    """Replays a step once when its ``nonfinite`` finding begins.

    Args:
        model: The monitored module; the replay differentiates its trainable parameters.
        enabled: ``replay_nonfinite``; when ``False`` findings pass through unchanged.
        unwatched: A context in which the model's forward passes count for no step's activation
            statistics (the replay runs inside it).
    """

    def __init__(self, model: nn.Module, enabled: bool,
                 unwatched: Callable[[], AbstractContextManager[None]]) -> None:
        self.model = model
        self.enabled = enabled
        self.unwatched = unwatched
        self.replayed_step: int | None = None

    def annotate(self, findings: list[Finding], step: int,
                 replay: ReplayArgument = None) -> list[Finding]:
        """``findings`` with every ``nonfinite`` one carrying the replay's result."""
        if not self.enabled or not any(f.kind == "nonfinite" for f in findings):
            return findings
        plan = as_plan(replay)
        outcome = self._outcome(step, plan)
        if plan is not None:
            try:  # every rank that saw this onset calls share, so collectives match
                outcome = plan.share(outcome)
            except Exception as error:  # noqa: BLE001 - diagnostics never break training
                log.warning("graddiag: could not combine the replay across ranks: %s", error)
        if outcome.status == "located":
            log.info("graddiag: replay of step %d located %s in %s:%s (%.2f s)", step,
                     outcome.op, outcome.file, outcome.line, outcome.seconds)
        return [with_replay(f, outcome) if f.kind == "nonfinite" else f for f in findings]

    def _outcome(self, step: int, plan: ReplayPlan | None) -> ReplayOutcome:
        if plan is None:
            return ReplayOutcome.skipped("no_closure")
        if self.replayed_step == step:
            return ReplayOutcome.skipped("already_replayed")
        self.replayed_step = step
        try:
            with self.unwatched():
                return replay_step(self.model, plan)
        except Exception as error:  # noqa: BLE001
            log.warning("graddiag: the replay of step %d failed: %s", step, error)
            return ReplayOutcome(status="failed", reason="error", reason_detail=str(error)[:300])
