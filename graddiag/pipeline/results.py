"""The monitor's result tables: history, activation history, records and the per-layer summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord
from graddiag.pipeline.history import History
from graddiag.reporters.summary import summarize
from graddiag.reporters.tables import save_table
from graddiag.rules.ruleset import RuleSet


class MonitorResults:
    """What a monitor has found so far, as findings and tables; each read first judges the
    steps still waiting (kept plain steps, a deferred read: :meth:`flush`), so results always
    include the latest recorded step."""

    _history: History
    _findings: list[Finding]
    rules: RuleSet

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, oldest first."""
        self.flush()
        return self._findings

    @findings.setter
    def findings(self, findings: list[Finding]) -> None:
        self._findings = list(findings)

    def flush(self) -> object:  # pragma: no cover - the monitor's flush replaces it
        raise NotImplementedError

    @property
    def history(self) -> pd.DataFrame:
        """Long-format table: one row per recorded step and layer (columns in the README)."""
        self.flush()
        return self._history.frame()

    @property
    def activation_history(self) -> pd.DataFrame:
        """Long-format table: one row per activation step and activation site."""
        self.flush()
        return self._history.activation_frame()

    @property
    def records(self) -> list[StepRecord]:
        """The kept step records (bounded by ``max_history_rows``)."""
        self.flush()
        return list(self._history.records)

    def summary(self) -> pd.DataFrame:
        """Per-layer summary: median/min/max gradient norm, first and last finding."""
        return summarize(self.history, self.findings)

    def save_history(self, path: str | Path) -> Path:
        """Write :attr:`history` to ``.csv`` or ``.parquet`` (by the file's extension)."""
        return save_table(self.history, path)

    def active_conditions(self) -> int:
        """How many reported conditions still hold (a layer still vanishing counts once)."""
        return self.rules.active_count()
