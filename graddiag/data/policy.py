"""What a step's findings ask the training loop to do: continue, skip, stop or raise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord

StepAction = Literal["continue", "skip", "stop", "raise"]
#: Actions from mild to severe; ranks that disagree take the most severe one.
ACTIONS_BY_SEVERITY: tuple[StepAction, ...] = ("continue", "skip", "stop", "raise")
#: The finding kinds whose action the settings choose (``on_nonfinite``, ``on_exploding``).
ALARM_KINDS: tuple[str, ...] = ("nonfinite", "exploding")


def severity(action: str) -> int:
    """Rank of an action in :data:`ACTIONS_BY_SEVERITY` (``"warn"`` ranks as ``"continue"``)."""
    return 0 if action == "warn" else ACTIONS_BY_SEVERITY.index(action)  # type: ignore[arg-type]


def decide(active: Callable[[str], bool], on_nonfinite: str, on_exploding: str) -> StepAction:
    """The most severe action asked for by a condition that holds on this step.

    Args:
        active: Whether a condition of a finding kind holds now (after its patience).
        on_nonfinite: The action for non-finite gradients (``warn``, ``skip``, ``stop``, ``raise``).
        on_exploding: The action for exploding gradients.
    """
    chosen = 0
    for kind, action in (("nonfinite", on_nonfinite), ("exploding", on_exploding)):
        if active(kind):
            chosen = max(chosen, severity(action))
    return ACTIONS_BY_SEVERITY[chosen]


@dataclass
class StepReport:
    """What :meth:`GradientMonitor.step` decided for one optimizer step.

    Attributes:
        step: The optimizer step.
        recorded: Whether this step was measured (``False`` on steps skipped by the cadence).
        findings: Findings that began on this step, and on the kept plain steps judged with it
            (see the option ``evaluate_every_n_records``; each names its own step).
        action: ``"continue"``, or ``"skip"``/``"stop"``/``"raise"`` when ``on_nonfinite`` or
            ``on_exploding`` asks for it and that condition holds on this step.
        record: The measurements, when recorded and judged on this step (``None`` on a plain
            step kept for its block: its record reaches history and the reporters when the
            block is judged, and the judging step's report holds that step's own record).
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
