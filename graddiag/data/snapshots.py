"""What reporters receive: immutable snapshots of a step and of the whole run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord
from graddiag.data.tree import SiteMark

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, eq=False)
class StepSnapshot:
    """One recorded step, as a reporter sees it.

    Attributes:
        record: The step's measurements.
        new_findings: Findings that began on this step.
        findings: Every finding so far, oldest first (restored ones after a resume included).
        active_count: Reported conditions that still hold (a layer still vanishing counts once).
        marks: Where the latest activation sites sit among the layers (for figures).
        skipped_steps: Optimizer steps skipped so far on a ``"skip"`` action (this one included).
    """

    record: StepRecord
    new_findings: tuple[Finding, ...] = ()
    findings: tuple[Finding, ...] = ()
    active_count: int = 0
    marks: tuple[SiteMark, ...] = ()
    skipped_steps: int = 0

    @property
    def step(self) -> int:
        return self.record.step


@dataclass(frozen=True, eq=False)
class RunSnapshot:
    """The end of a run, handed to reporters once, just before they are closed.

    Attributes:
        records: The kept records measured with the final layer layout, oldest first.
        layers: The final layer names in forward order.
        findings: Every finding, oldest first.
        summary: The per-layer summary table (see ``GradientMonitor.summary``).
        marks: Where the latest activation sites sit among ``layers``.
        last_step: The last step that was recorded (0 when none was).
        skipped_steps: Optimizer steps skipped on a ``"skip"`` action during the run.
    """

    records: tuple[StepRecord, ...]
    layers: tuple[str, ...]
    findings: tuple[Finding, ...]
    summary: pd.DataFrame
    marks: tuple[SiteMark, ...] = ()
    last_step: int = 0
    skipped_steps: int = 0
