"""Onsets: a condition is reported once when it begins, after its patience; the rule base class."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord


class Rule(Protocol):
    kind: str

    def update(self, record: StepRecord) -> list[Finding]: ...

    @property
    def active(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Onsets:
    """Counts consecutive steps a condition holds per key; says when it has just begun."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.streak: dict[str, int] = {}
        self.reported: set[str] = set()

    def observe(self, key: str, condition: bool) -> bool:
        """Record one step; True exactly when ``key`` has held for ``patience`` steps anew."""
        if not condition:
            self.streak.pop(key, None)
            self.reported.discard(key)
            return False
        count = self.streak[key] = self.streak.get(key, 0) + 1
        if count >= self.patience and key not in self.reported:
            self.reported.add(key)
            return True
        return False

    def observe_all(self, keys: list[str], condition: np.ndarray,
                    evaluated: np.ndarray | None = None) -> np.ndarray:
        """Vectorised :meth:`observe` for many keys; keys not ``evaluated`` keep their state.

        Returns the positions whose condition has just begun.
        """
        positions = np.flatnonzero(condition)
        if not self.streak and not len(positions):
            return positions  # the common, healthy case: nothing to do
        onset = []
        if self.streak:  # conditions that held before and may have ended now
            held = set(positions.tolist())
            index = {k: i for i, k in enumerate(keys)}
            for key in list(self.streak):
                i = index.get(key)
                if i is None or i in held or (evaluated is not None and not evaluated[i]):
                    continue
                self.observe(key, False)
        for i in positions.tolist():
            if self.observe(keys[i], True):
                onset.append(i)
        return np.asarray(onset, dtype=int)

    def confirmed(self, key: str) -> bool:
        """Whether ``key`` holds now and has held for at least ``patience`` steps."""
        return self.streak.get(key, 0) >= self.patience

    def any_confirmed(self) -> bool:
        return any(v >= self.patience for v in self.streak.values())

    def state_dict(self) -> dict[str, Any]:
        return {"streak": dict(self.streak), "reported": sorted(self.reported)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = dict(state["streak"])
        self.reported = set(state["reported"])


def _fmt(x: float) -> str:
    return f"{x:.3g}"


class OnsetRule:
    """Base of the rules: an :class:`Onsets` tracker and the ``active`` flag of the last record."""

    kind = ""

    def __init__(self, patience: int) -> None:
        self.onsets = Onsets(patience)
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def state_dict(self) -> dict[str, Any]:
        return {"onsets": self.onsets.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.onsets.load_state_dict(state["onsets"])
