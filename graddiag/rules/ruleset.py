"""The rules selected by the settings, applied in order."""

from __future__ import annotations

from typing import Any

from graddiag.data.findings import Finding
from graddiag.data.options import MonitorConfig
from graddiag.data.records import StepRecord
from graddiag.rules.gradient import (
    ExplodingRule,
    NoGradientRule,
    NonfiniteRule,
    VanishingRule,
)
from graddiag.rules.onsets import Rule


class RuleSet:
    """The rules selected by a :class:`~graddiag.data.options.MonitorConfig`, applied in order."""

    def __init__(self, config: MonitorConfig, extra: list[Rule] | None = None) -> None:
        rules: list[Rule] = [
            NonfiniteRule(),
            ExplodingRule(
                config.exploding_abs,
                config.exploding_factor,
                config.exploding_window,
                config.exploding_patience,
            ),
            VanishingRule(config.vanishing_abs, config.vanishing_rel, config.vanishing_patience,
                          config.vanishing_early_rel, config.vanishing_early_patience),
            NoGradientRule(config.no_gradient_patience),
            *(extra or []),
        ]
        self.rules = [r for r in rules if r.kind not in config.ignore]
        self._active_count: int | None = None  # of the latest update (None: not counted yet)

    def update(self, record: StepRecord) -> list[Finding]:
        """Findings that begin at this record."""
        self._active_count = None
        return [finding for rule in self.rules for finding in rule.update(record)]

    def active(self, kind: str) -> bool:
        """Whether a condition of ``kind`` holds on the latest record (after its patience)."""
        return any(rule.active for rule in self.rules if rule.kind == kind)

    def holding(self, kind: str) -> frozenset[str]:
        """The keys (layers) whose condition of ``kind`` was reported and holds on the latest
        record (a report standing through a short gap is not counted)."""
        return frozenset(key for rule in self.rules if rule.kind == kind
                         for key in rule.onsets.holding)  # type: ignore[attr-defined]

    def active_count(self) -> int:
        """Reported conditions that still hold, over all rules."""
        if self._active_count is None:
            self._active_count = sum(rule.onsets.reported_count()  # type: ignore[attr-defined]
                                     for rule in self.rules)
        return self._active_count

    def state_dict(self) -> dict[str, Any]:
        return {rule.kind: rule.state_dict() for rule in self.rules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._active_count = None
        for rule in self.rules:
            if rule.kind in state:
                rule.load_state_dict(state[rule.kind])
