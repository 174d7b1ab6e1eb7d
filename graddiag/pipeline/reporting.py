"""Handing reporters immutable snapshots: one per recorded step, one for the whole run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord
from graddiag.data.snapshots import RunSnapshot, StepSnapshot
from graddiag.data.tree import ModuleTree, SiteMark
from graddiag.reporters import SafeReporter


class Reporting:
    """The monitor's reporters, each behind a :class:`~graddiag.reporters.SafeReporter`.

    Args:
        reporters: The reporters (objects with ``report``; see :mod:`graddiag.reporters.base`).
        tree: The monitored model's module tree (where activation sites sit, for figures).
    """

    def __init__(self, reporters: Sequence[Any], tree: ModuleTree) -> None:
        self.reporters = [SafeReporter(r) for r in reporters]
        self.tree = tree
        self.marks: tuple[SiteMark, ...] = ()
        self._findings: tuple[Finding, ...] = ()

    def report(self, record: StepRecord, new: list[Finding], findings: list[Finding],
               active_count: int, skipped_steps: int = 0) -> None:
        """Hand every reporter a snapshot of ``record``."""
        if record.activations is not None:
            self.marks = self.tree.site_marks(record.layers, record.activations)
        if not self.reporters:
            return
        known = self._findings
        if len(known) != len(findings) or (known and known[-1] is not findings[-1]):
            self._findings = tuple(findings)  # copied only when findings change
        snapshot = StepSnapshot(record, tuple(new), self._findings, active_count, self.marks,
                                skipped_steps)
        for reporter in self.reporters:
            reporter.report(snapshot)

    def flush(self) -> None:
        """Have every reporter write out what it buffers (those with ``flush``)."""
        for reporter in self.reporters:
            reporter.flush()

    def unattended(self) -> None:
        """The monitor was never closed and judges its last steps (dropped, or at exit)."""
        for reporter in self.reporters:
            reporter.unattended()

    def close(self, records: list[StepRecord], layers: list[str], findings: list[Finding],
              summary: Callable[[], pd.DataFrame], skipped_steps: int = 0) -> None:
        """Hand the run to the reporters that want it (``finish``), then close them all."""
        if any(r.wants_finish for r in self.reporters):
            kept = tuple(r for r in records if r.layers == layers)
            run = RunSnapshot(kept, tuple(layers), tuple(findings), summary(), self.marks,
                              kept[-1].step if kept else 0, skipped_steps)
            for reporter in self.reporters:
                reporter.finish(run)
        for reporter in self.reporters:
            reporter.close()
