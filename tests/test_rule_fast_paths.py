"""The rules' whole-array shortcuts for usual steps (healthy records, steady conditions) decide
exactly what the step-by-step definitions decide."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graddiag.data.records import StepRecord
from graddiag.rules.gradient import ExplodingRule, VanishingRule
from graddiag.rules.onsets import Onsets


class NaiveOnsets:
    """The definition, one key at a time: a streak per key, reported once when it reaches
    the patience; a report stands until the condition has been absent for ``patience`` steps
    in a row."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.streak: dict[str, int] = {}
        self.reported: set[str] = set()
        self.absent: dict[str, int] = {}

    def observe_all(self, keys: list[str], held: np.ndarray) -> list[int]:
        onsets = []
        for i, key in enumerate(keys):
            if not held[i]:
                self.streak.pop(key, None)
                if key in self.reported:
                    self.absent[key] = self.absent.get(key, 0) + 1
                    if self.absent[key] == self.patience:
                        self.reported.discard(key)
                        del self.absent[key]
                continue
            self.absent.pop(key, None)
            self.streak[key] = self.streak.get(key, 0) + 1
            if self.streak[key] >= self.patience and key not in self.reported:
                self.reported.add(key)
                onsets.append(i)
        return onsets


@pytest.mark.parametrize("seed", range(6))
def test_onsets_match_the_definition_through_steady_runs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = [f"l{i}" for i in range(7)]
    fast, naive = Onsets(3), NaiveOnsets(3)
    held = rng.random(len(keys)) < 0.4
    for step in range(400):
        if rng.random() < 0.1:  # mostly steady runs of one mask, sometimes a new one
            held = rng.random(len(keys)) < 0.4
        got = fast.observe_all(keys, held.copy()).tolist()
        assert got == naive.observe_all(keys, held), step
        if rng.random() < 0.2:  # reading the state in the middle of a run
            assert fast.streak == naive.streak, step
            assert fast.reported == naive.reported, step
            assert fast.reported_count() == len(naive.reported & set(naive.streak)), step
            assert fast.any_confirmed() == any(v >= 3 for v in naive.streak.values())
    assert fast.streak == naive.streak and fast.reported == naive.reported
    restored = Onsets(3)
    restored.load_state_dict(fast.state_dict())
    assert restored.streak == naive.streak and restored.reported == naive.reported
    assert restored.gaps == naive.absent
    for _ in range(30):  # the restored tracker goes on deciding as the definition does
        held = rng.random(len(keys)) < 0.4
        assert restored.observe_all(keys, held.copy()).tolist() == naive.observe_all(keys, held)


def test_steady_run_then_single_key_observation() -> None:
    fast = Onsets(2)
    keys = ["a", "b"]
    held = np.array([True, False])
    assert fast.observe_all(keys, held).tolist() == []
    assert fast.observe_all(keys, held).tolist() == [0]
    for _ in range(5):  # steady: "a" reported and still holding
        assert fast.observe_all(keys, held).tolist() == []
    assert fast.streak == {"a": 7}
    assert fast.observe("b", True) is False
    assert fast.observe("b", True) is True
    assert fast.streak == {"a": 7, "b": 2}


def _record(step: int, norms: np.ndarray, measured: bool) -> StepRecord:
    """A record; ``measured=False`` marks every layer measured explicitly, which sends the rules
    down their general path (healthy_range is None) with the same meaning."""
    layers = [f"l{i}" for i in range(len(norms))]
    mask = None if measured else np.ones(len(norms), dtype=bool)
    return StepRecord(step, layers, norms.copy(), np.ones(len(norms), dtype=bool), measured=mask)


@pytest.mark.parametrize("seed", range(4))
def test_gradient_rules_decide_alike_on_both_paths(seed: int) -> None:
    rng = np.random.default_rng(seed)
    def make() -> list[object]:
        return [VanishingRule(1e-6, 1e-3, 3, early_rel=1e-5, early_patience=2),
                ExplodingRule(1e3, 10.0, 20, 2)]
    shortcut, general = make(), make()
    scale = np.ones(6)
    for step in range(300):
        if rng.random() < 0.05:  # a layer changes regime: vanishing, recovering, exploding
            scale[rng.integers(6)] = float(10.0 ** rng.integers(-9, 3))
        norms = scale * np.exp(rng.normal(0.0, 0.1, 6))
        healthy, plain = _record(step, norms, True), _record(step, norms, False)
        assert healthy.healthy_range is not None and plain.healthy_range is None
        for a, b in zip(shortcut, general):
            got = [(f.kind, f.layer, f.value, f.threshold, f.message) for f in a.update(healthy)]
            want = [(f.kind, f.layer, f.value, f.threshold, f.message) for f in b.update(plain)]
            assert got == want, (step, type(a).__name__)
            assert a.active == b.active
    assert shortcut[1].log_level is not None and general[1].log_level is not None
    np.testing.assert_array_equal(shortcut[1].log_level, general[1].log_level)
    assert shortcut[0].state_dict() == general[0].state_dict()


def test_exploding_level_is_the_running_mean_of_log_norms() -> None:
    rule = ExplodingRule(1e9, 100.0, window=9, patience=1)  # alpha = 2 / (9 + 1) = 0.2
    level = None
    for step, value in enumerate([1.0, 2.0, 4.0, 1.0, 0.5, 3.0, 2.0, 8.0, 1.0]):
        rule.update(_record(step, np.array([value, 1.0]), True))
        level = math.log(value) if level is None else level + 0.2 * (math.log(value) - level)
    assert rule.log_level is not None
    assert rule.log_level[0] == pytest.approx(level, rel=1e-12)
    assert rule.count is not None and rule.count.tolist() == [9, 9]


@pytest.mark.parametrize(("norms", "expected"), [
    ([2.0, 1.0, 3.0], (1.0, 3.0)),
    ([1.0, math.nan, 3.0], None),  # a layer without gradient, wherever it sits
    ([math.nan, 1.0], None),
    ([1.0, math.nan], None),
    ([1.0, math.inf], None),
    ([0.0, 1.0], None),  # a zero norm: the general path judges it
])
def test_healthy_range(norms: list[float], expected: tuple[float, float] | None) -> None:
    record = StepRecord(0, [f"l{i}" for i in range(len(norms))], np.array(norms),
                        np.ones(len(norms), dtype=bool))
    assert record.healthy_range == expected
    amp = StepRecord(0, ["a"], np.array([1.0]), np.ones(1, dtype=bool), amp_overflow=True)
    assert amp.healthy_range is None


def test_a_condition_reported_early_stays_active_through_a_steady_run() -> None:
    """Reported early (2 steps far below), then merely vanishing: from its 10th step on the
    condition is confirmed, and ``active`` says so on both paths."""
    def make() -> VanishingRule:
        return VanishingRule(1e-12, 1e-4, 10, early_rel=1e-8, early_patience=2)
    shortcut, general = make(), make()
    active = []
    for step in range(30):
        ratio = 1e-9 if step < 2 else 1e-6
        norms = np.array([ratio, 1.0, 0.5])
        got = [f.step for f in shortcut.update(_record(step, norms, True))]
        want = [f.step for f in general.update(_record(step, norms, False))]
        assert got == want and shortcut.active == general.active, step
        active.append(shortcut.active)
    assert active == [False, True] + [False] * 7 + [True] * 21  # early confirmation, then patience


def test_relu_statistics_with_a_zero_floor_count_nothing_below_it() -> None:
    from graddiag.measure.activations.specs import RELU
    from graddiag.measure.activations.statistics import _Site

    site = _Site("r", RELU)
    import torch

    with torch.no_grad():
        site.add(None, torch.tensor([[1.0, -1.0], [0.0, -2.0]]), {}, 0.0)
    assert site.below is not None and site.below.item() == 0.0  # |f'| < 0 never holds
    assert site.alive is not None and site.alive.tolist() == [True, True]


def test_a_report_stands_through_a_short_gap_and_survives_a_checkpoint() -> None:
    fast = Onsets(3)
    keys = ["a"]
    on, off = np.array([True]), np.array([False])
    assert [fast.observe_all(keys, on).tolist() for _ in range(3)] == [[], [], [0]]
    fast.observe_all(keys, off)
    fast.observe_all(keys, off)  # gone 2 of 3 steps: the report stands, nothing holds now
    assert fast.reported == {"a"} and fast.reported_count() == 0 and not fast.idle
    restored = Onsets(3)
    restored.load_state_dict(fast.state_dict())
    assert restored.gaps == {"a": 2}
    assert [restored.observe_all(keys, on).tolist() for _ in range(4)] == [[], [], [], []]
    for _ in range(3):  # gone for the whole patience: re-armed
        restored.observe_all(keys, off)
    assert restored.reported == set() and restored.idle
    assert [restored.observe_all(keys, on).tolist() for _ in range(3)] == [[], [], [0]]


def test_a_state_saved_without_gaps_keeps_only_the_reports_that_still_hold() -> None:
    fast = Onsets(3)
    fast.load_state_dict({"streak": {"a": 4}, "reported": ["a", "b"]})
    assert fast.reported == {"a"}
