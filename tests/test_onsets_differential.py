"""Onsets against the definition, one key at a time, through every way the rules drive it:
whole-list and single-key observations, partial evaluation, key lists that change,
early confirmation marking keys reported, and checkpoints in the middle of a run."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from graddiag.rules.onsets import Onsets


class Definition:
    """A streak per key; reported when it reaches the patience; a report stands until the
    condition has been absent for ``patience`` observed steps in a row."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.streak: dict[str, int] = {}
        self.reported: set[str] = set()
        self.gap: dict[str, int] = {}

    def observe(self, key: str, condition: bool) -> bool:
        if condition:
            self.streak[key] = self.streak.get(key, 0) + 1
            self.gap.pop(key, None)
            if self.streak[key] >= self.patience and key not in self.reported:
                self.reported.add(key)
                return True
            return False
        self.streak.pop(key, None)
        if key in self.reported:
            self.gap[key] = self.gap.get(key, 0) + 1
            if self.gap[key] >= self.patience:
                self.reported.discard(key)
                del self.gap[key]
        return False

    def observe_all(self, keys: list[str], held: np.ndarray,
                    evaluated: np.ndarray | None) -> list[int]:
        return [i for i, key in enumerate(keys)
                if (evaluated is None or evaluated[i]) and self.observe(key, bool(held[i]))]

    def holding(self) -> set[str]:
        return {k for k in self.reported if self.streak.get(k, 0) > 0}


def _same(fast: Onsets, exact: Definition, where: object) -> None:
    assert fast.streak == exact.streak, where
    assert fast.reported == exact.reported, where
    assert fast.gaps == exact.gap, where
    assert fast.holding == exact.holding(), where
    assert fast.reported_count() == len(exact.holding()), where
    assert fast.any_confirmed() == any(v >= exact.patience for v in exact.streak.values()), where
    if fast.idle:  # idle may be conservative (False), never wrong
        assert not exact.streak and not exact.reported, where


@pytest.mark.parametrize("seed", range(40))
def test_onsets_decide_as_the_definition(seed: int) -> None:
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    patience = rng.choice([1, 2, 3, 4, 6])
    fast, exact = Onsets(patience), Definition(patience)
    universe = [f"k{i}" for i in range(8)] + ["model"]
    lists = [universe[:5], universe[2:7], universe[:8], [universe[3], universe[1], universe[0]]]
    keys, previous = rng.choice(lists), None
    for step in range(300):
        where, r = (seed, step), rng.random()
        if r < 0.06:  # the layers change (an equal copy or another list)
            base = rng.choice(lists)
            keys, previous = (list(base) if rng.random() < 0.5 else base), None
        elif r < 0.14:  # one key at a time, in the list or not
            key, condition = rng.choice(universe), rng.random() < 0.5
            assert fast.observe(key, condition) == exact.observe(key, condition), where
        elif r < 0.18:  # confirmed early by a stricter test: the key holds now
            holding = sorted(k for k, v in exact.streak.items() if v > 0)
            if holding:
                key = rng.choice(holding)
                fast.mark_reported(key)
                exact.reported.add(key)
                exact.gap.pop(key, None)
        elif r < 0.21:  # a checkpoint
            state = pickle.loads(pickle.dumps(fast.state_dict()))
            fast = Onsets(patience)
            fast.load_state_dict(state)
            previous = None
        else:
            n = len(keys)
            if previous is not None and rng.random() < 0.5:  # steady runs of one mask
                held, evaluated = previous.copy(), None
            else:
                held = np_rng.random(n) < rng.choice([0.0, 0.1, 0.5, 0.9, 1.0])
                evaluated = np_rng.random(n) < 0.6 if rng.random() < 0.3 else None
                if evaluated is not None:
                    held &= evaluated  # what is not evaluated does not hold
            previous = held
            got = fast.observe_all(keys, held.copy(),
                                   None if evaluated is None else evaluated.copy()).tolist()
            assert got == exact.observe_all(keys, held, evaluated), where
        if rng.random() < 0.3:
            _same(fast, exact, where)
    _same(fast, exact, (seed, "end"))
