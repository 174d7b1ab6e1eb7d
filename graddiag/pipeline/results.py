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
    """What a monitor has found so far, as tables; each read evaluates a pending deferred read
    first (:meth:`flush`), so tables always include the latest recorded step."""

    _history: History
    rules: RuleSet

    @property
    def findings(self) -> list[Finding]:  # pragma: no cover - the monitor's property replaces it
        raise NotImplementedError

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
