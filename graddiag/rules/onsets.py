"""Onsets: a condition is reported once when it begins, after its patience, and again only after it
has been gone as long; the rule base class."""

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
    """Counts consecutive steps a condition holds per key; says when it has just begun.

    A reported condition stays reported through gaps shorter than the patience: a layer whose
    ratio hovers around its threshold (below it for 30 steps, above it for one, below again) is
    one finding, not one per crossing. It is re-armed, and can be reported anew, once it has
    been absent for ``patience`` evaluated steps in a row.

    State is kept in arrays aligned with the last key list given to :meth:`observe_all` (the
    layer names of the records, one list shared by every record), so a step costs a handful of
    vectorised operations however many layers there are; keys outside that list (e.g. the
    model-wide key of the non-finite rule) live in small dictionaries.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self._keys: list[str] = []
        self._position: dict[str, int] = {}
        self._streak = np.zeros(0, dtype=np.int64)
        self._reported = np.zeros(0, dtype=bool)
        self._gap = np.zeros(0, dtype=np.int64)  # absent steps in a row since a report
        # any aligned streak > 0 or report standing (the healthy fast path skips everything)
        self._any = False
        self._confirmed: bool | None = False  # any aligned streak >= patience (None: unknown)
        self._other_streak: dict[str, int] = {}
        self._other_reported: set[str] = set()
        self._other_gap: dict[str, int] = {}
        # A steady run: the same conditions held step after step, all of them reported already.
        # Such steps only lengthen the streaks, which is counted here and applied when read.
        self._steady: bytes | None = None  # the held mask of the run (its bytes)
        self._steady_mask = np.zeros(0, dtype=bool)
        self._pending = 0  # steady steps not yet added to the streaks

    def _apply_pending(self) -> None:
        """Add the steps of a steady run to the streaks (before they are read or changed)."""
        if self._pending:
            self._streak = self._streak + self._pending * self._steady_mask
            self._pending = 0

    # -- the state as plain containers (also what checkpoints hold)
    @property
    def streak(self) -> dict[str, int]:
        """``{key: consecutive steps the condition has held}`` for keys where it holds."""
        self._apply_pending()
        aligned = {self._keys[i]: int(self._streak[i]) for i in np.flatnonzero(self._streak)}
        return {**self._other_streak, **aligned}

    @property
    def reported(self) -> set[str]:
        """Keys whose report stands: the condition holds, or has been gone for fewer than
        ``patience`` steps (it is not reported again if it returns within them)."""
        return self._other_reported | {self._keys[i] for i in np.flatnonzero(self._reported)}

    @property
    def holding(self) -> set[str]:
        """Keys whose reported condition holds now (a standing report in its gap excluded)."""
        self._apply_pending()
        aligned = {self._keys[i] for i in np.flatnonzero(self._reported & (self._streak > 0))}
        return {k for k in self._other_reported if k in self._other_streak} | aligned

    @property
    def gaps(self) -> dict[str, int]:
        """``{key: steps in a row its reported condition has been absent}``, where above 0."""
        aligned = {self._keys[i]: int(self._gap[i]) for i in np.flatnonzero(self._gap)}
        return {**self._other_gap, **aligned}

    def reported_count(self) -> int:
        """How many reported conditions hold now (no set is built)."""
        other = (sum(1 for key in self._other_reported if key in self._other_streak)
                 if self._other_reported else 0)
        if not self._any:  # nothing holds or stands on the aligned keys
            return other
        self._apply_pending()
        return int(np.count_nonzero(self._reported & (self._streak > 0))) + other

    @property
    def idle(self) -> bool:
        """No condition holds and no report stands for any key: a step where none holds changes
        nothing (rules use this to skip their vectorised bookkeeping on healthy steps)."""
        return not self._any and not self._other_streak and not self._other_reported

    def _align(self, keys: list[str]) -> None:
        """Re-key the arrays to ``keys`` (only when the key list actually changes)."""
        if keys is self._keys:
            return
        if keys == self._keys:
            self._keys = keys
            return
        streak, reported, gaps = self.streak, self.reported, self.gaps
        self._steady = None
        self._keys = keys
        self._position = {k: i for i, k in enumerate(keys)}
        self._streak = np.array([streak.pop(k, 0) for k in keys], dtype=np.int64)
        self._reported = np.array([k in reported for k in keys], dtype=bool)
        self._gap = np.array([gaps.pop(k, 0) for k in keys], dtype=np.int64)
        self._other_streak = streak
        self._other_reported = {k for k in reported if k not in self._position}
        self._other_gap = gaps
        self._any = bool(self._streak.any() or self._reported.any())
        self._confirmed = None

    def observe(self, key: str, condition: bool) -> bool:
        """Record one step; True exactly when ``key`` has held for ``patience`` steps anew."""
        i = self._position.get(key)
        if i is not None:
            self._apply_pending()
            self._steady = None
            self._confirmed = None
            if not condition:
                self._streak[i] = 0
                if self._reported[i]:
                    self._gap[i] += 1
                    if self._gap[i] >= self.patience:
                        self._reported[i], self._gap[i] = False, 0
                return False
            self._streak[i] += 1
            self._gap[i] = 0
            self._any = True
            if self._streak[i] >= self.patience and not self._reported[i]:
                self._reported[i] = True
                return True
            return False
        if not condition:
            self._other_streak.pop(key, None)
            if key in self._other_reported:
                gap = self._other_gap[key] = self._other_gap.get(key, 0) + 1
                if gap >= self.patience:
                    self._other_reported.discard(key)
                    del self._other_gap[key]
            return False
        self._other_gap.pop(key, None)
        count = self._other_streak[key] = self._other_streak.get(key, 0) + 1
        if count >= self.patience and key not in self._other_reported:
            self._other_reported.add(key)
            return True
        return False

    def observe_all(self, keys: list[str], condition: np.ndarray,
                    evaluated: np.ndarray | None = None) -> np.ndarray:
        """Vectorised :meth:`observe` for many keys; keys not ``evaluated`` keep their state.

        Returns the positions whose condition has just begun.
        """
        self._align(keys)
        held = np.asarray(condition, dtype=bool)
        if not self._any and not held.any():
            return _NO_ONSETS  # the common, healthy case: nothing to do
        if evaluated is None and self._steady is not None and held.tobytes() == self._steady:
            self._pending += 1  # the same conditions again, all reported: streaks grow
            return _NO_ONSETS
        self._apply_pending()
        self._steady = None
        if evaluated is None:  # every key judged: a streak goes on where held, else ends
            streak = self._streak + 1
            streak *= held
            gap = (self._gap + 1) * (self._reported & ~held)
        else:  # keys not evaluated keep their streak, their report and its gap
            ended = ~held & evaluated
            streak = np.where(held, self._streak + 1, self._streak)
            streak[ended] = 0
            gap = np.where(ended & self._reported, self._gap + 1, self._gap)
            gap[held] = 0
        rearmed = gap >= self.patience  # absent for a whole patience: may be reported anew
        self._reported &= ~rearmed
        gap[rearmed] = 0
        self._streak, self._gap = streak, gap
        confirmed = streak >= self.patience
        self._any = bool(streak.any() or self._reported.any())
        self._confirmed = bool(confirmed.any())
        onset = (confirmed & held) > self._reported  # held, confirmed, not yet reported
        if onset.any():
            self._reported |= onset
            return np.flatnonzero(onset)
        # a steady run begins when every held key is confirmed and reported and every standing
        # report is held: repeating this mask then changes nothing but the streaks (so
        # ``_confirmed`` stays right too)
        if (evaluated is None and not (held > (self._reported & confirmed)).any()
                and not (self._reported > held).any()):
            self._steady, self._steady_mask = held.tobytes(), held.copy()
        return _NO_ONSETS

    def mark_reported(self, key: str) -> None:
        """Count ``key``'s condition as reported while it holds (e.g. confirmed early by a
        stricter test), so that its patience running out does not report it again. ``key``
        must hold now (its streak is above 0), which keeps :meth:`reported_count` and
        :attr:`idle` exact."""
        i = self._position.get(key)
        if i is not None:
            self._apply_pending()
            self._steady = None
            self._reported[i], self._gap[i] = True, 0
            self._any = True
        else:
            self._other_reported.add(key)
            self._other_gap.pop(key, None)

    def confirmed(self, key: str) -> bool:
        """Whether ``key`` holds now and has held for at least ``patience`` steps."""
        return self.streak.get(key, 0) >= self.patience

    def any_confirmed(self) -> bool:
        if self._any:
            if self._confirmed is None:
                self._apply_pending()
                self._confirmed = bool((self._streak >= self.patience).any())
            if self._confirmed:
                return True
        return any(v >= self.patience for v in self._other_streak.values())

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "reported": sorted(self.reported), "gap": self.gaps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._keys, self._position = [], {}
        self._streak = np.zeros(0, dtype=np.int64)
        self._reported = np.zeros(0, dtype=bool)
        self._gap = np.zeros(0, dtype=np.int64)
        self._any = False
        self._confirmed = False
        self._steady, self._pending = None, 0
        self._other_streak = dict(state["streak"])
        self._other_reported = set(state["reported"])
        # states saved before gaps were kept: a standing report that no longer holds is re-armed
        if "gap" not in state:
            self._other_reported &= set(self._other_streak)
        # a gap that already reaches this patience (saved under a longer one) is re-armed
        gaps = state.get("gap", {})
        self._other_gap = {k: gap for k, gap in gaps.items() if gap < self.patience}
        self._other_reported -= {k for k, gap in gaps.items() if gap >= self.patience}


_NO_ONSETS = np.zeros(0, dtype=np.int64)
_NO_ONSETS.flags.writeable = False


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
