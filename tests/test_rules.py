"""Rules fed with sequences of numbers (table-driven), including 0, NaN and inf."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graddiag.data.options import MonitorConfig
from graddiag.data.records import ActivationRecord, StepRecord
from graddiag.rules.activation import DeadReluRule, SaturatedRule
from graddiag.rules.gradient import (
    ExplodingRule,
    NoGradientRule,
    NonfiniteRule,
    VanishingRule,
)
from graddiag.rules.onsets import Onsets
from graddiag.rules.ruleset import RuleSet

NAN, INF = math.nan, math.inf


def record(step: int, norms: list[float], *, missing: dict[int, list[str]] | None = None,
           amp_overflow: bool = False, amp_scale: float | None = None) -> StepRecord:
    values = np.array(norms, dtype=float)
    has_grad = np.ones(len(norms), dtype=bool)
    for i in missing or {}:
        has_grad[i] = False
        values[i] = NAN
    nonfinite = {i: {"weight": 1} for i, v in enumerate(values) if has_grad[i] and not math.isfinite(v)}
    return StepRecord(step, [f"l{i}" for i in range(len(norms))], values, has_grad,
                      missing=missing or {}, nonfinite=nonfinite, amp_overflow=amp_overflow,
                      amp_scale=amp_scale)


def run(rule, sequence):  # noqa: ANN001, ANN201
    out = []
    for step, norms in enumerate(sequence):
        found = rule.update(norms if isinstance(norms, StepRecord) else record(step, norms))
        out.extend((f.kind, f.layer, f.step) for f in found)
    return out


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        # relative: layer 0 at 1e-6 of layer 1 for 3 steps -> reported once, at step 2
        ([[1e-6, 1.0]] * 5, [("vanishing", "l0", 2)]),
        # a dip shorter than the patience is not reported
        ([[1e-6, 1.0], [1e-6, 1.0], [0.5, 1.0], [1e-6, 1.0]], []),
        # gone for fewer steps than the patience, then back: the same condition, said once
        ([[1e-6, 1.0]] * 3 + [[0.5, 1.0]] * 2 + [[1e-6, 1.0]] * 3,
         [("vanishing", "l0", 2)]),
        # gone for the whole patience (3 steps), then back: reported anew
        ([[1e-6, 1.0]] * 3 + [[0.5, 1.0]] * 3 + [[1e-6, 1.0]] * 3,
         [("vanishing", "l0", 2), ("vanishing", "l0", 8)]),
        # exactly zero gradient counts as vanishing
        ([[0.0, 1.0]] * 3, [("vanishing", "l0", 2)]),
        # absolute floor: everything tiny
        ([[1e-14, 1e-14]] * 3, [("vanishing", "l0", 2), ("vanishing", "l1", 2)]),
        # NaN/inf layers are not vanishing, and do not make others vanish
        ([[NAN, 1.0, INF]] * 4, []),
        # healthy ratios
        ([[0.01, 1.0]] * 10, []),
    ],
)
def test_vanishing(sequence: list[list[float]], expected: list[tuple[str, str, int]]) -> None:
    assert run(VanishingRule(1e-12, 1e-4, patience=3), sequence) == expected


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        ([[1.0]] * 6 + [[500.0]], [("exploding", "l0", 6)]),  # 500x its median
        ([[1.0]] * 6 + [[50.0]], []),  # 50x is below the factor
        ([[2e4]], [("exploding", "l0", 0)]),  # absolute ceiling, no history needed
        ([[1.0]] * 3 + [[500.0]], []),  # too little history for a median
        ([[0.0]] * 6 + [[1.0]], []),  # a zero median never makes a jump
        ([[1.0]] * 6 + [[INF]], []),  # non-finite belongs to the nonfinite rule
        ([[1.0]] * 6 + [[500.0], [600.0], [1.0], [700.0]],
         [("exploding", "l0", 6), ("exploding", "l0", 9)]),
    ],
)
def test_exploding(sequence: list[list[float]], expected: list[tuple[str, str, int]]) -> None:
    assert run(ExplodingRule(1e4, 100.0, window=20, patience=1), sequence) == expected


def test_exploding_patience_needs_consecutive_steps() -> None:
    rule = ExplodingRule(10.0, 100.0, window=20, patience=2)
    assert run(rule, [[20.0], [1.0], [20.0], [30.0]]) == [("exploding", "l0", 3)]


def test_nonfinite_names_the_layer_nearest_the_loss_once_per_onset() -> None:
    rule = NonfiniteRule()
    steps = [[NAN, INF, 1.0], [NAN, NAN, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, NAN]]
    found = []
    for s, norms in enumerate(steps):
        found.extend(rule.update(record(s, norms)))
    assert [(f.layer, f.step) for f in found] == [("l1", 0), ("l2", 3)]
    assert found[0].details["upstream_affected"] == 1
    assert found[1].details["upstream_affected"] == 0


def test_nonfinite_active_flag_follows_every_bad_step() -> None:
    rule = NonfiniteRule()
    actives = []
    for s, norms in enumerate([[NAN], [NAN], [1.0]]):
        rule.update(record(s, norms))
        actives.append(rule.active)
    assert actives == [True, True, False]


def test_amp_overflow_is_not_an_alarm_until_the_scale_is_below_one() -> None:
    rule = NonfiniteRule()
    found = []
    scales = [2.0**16 / 2**s for s in range(20)]  # the scaler halves its scale each overflow
    for s, scale in enumerate(scales):
        found.extend(rule.update(record(s, [INF], amp_overflow=True, amp_scale=scale)))
    assert [f.step for f in found] == [17]  # 2**16 / 2**17 = 0.5 < 1
    assert "18 consecutive AMP steps" in found[0].message


def test_no_gradient_with_patience() -> None:
    rule = NoGradientRule(patience=2)
    first = rule.update(record(0, [1.0, 1.0], missing={1: ["weight"]}))
    second = rule.update(record(1, [1.0, 1.0], missing={1: ["weight"]}))
    third = rule.update(record(2, [1.0, 1.0], missing={1: ["weight"]}))
    assert first == [] and third == []
    assert [(f.layer, f.step) for f in second] == [("l1", 1)]
    assert "['weight']" in second[0].message and "straight-through" in second[0].remedy


def test_onsets_state_round_trip() -> None:
    a = Onsets(2)
    a.observe("x", True)
    b = Onsets(2)
    b.load_state_dict(a.state_dict())
    assert b.observe("x", True) is True


def _acts(step: int, saturated: float, dead: float) -> StepRecord:
    r = record(step, [1.0])
    r.activations = ActivationRecord(
        sites=["s", "r"], kinds=["sigmoid", "relu"], families=["saturating", "rectifier"],
        saturated=np.array([saturated, 0.4]), dead=np.array([0.0, dead]),
        gain=np.array([0.01, 0.3]), calls=np.array([1.0, 1.0]),
    )
    return r


def test_activation_rules_count_only_activation_records() -> None:
    sat, dead = SaturatedRule(0.5, patience=2), DeadReluRule(0.5, patience=2)
    seq = [_acts(0, 0.9, 0.8), record(1, [1.0]), _acts(2, 0.95, 0.7), _acts(4, 0.1, 0.1)]
    assert run(sat, seq) == [("saturated", "s", 2)]
    assert run(dead, seq) == [("dead_relu", "r", 2)]


@pytest.mark.parametrize(("by_call", "calls", "said"), [
    ([0.8, 0.1, 0.9], [1, 3], "the dead units are those of its calls 1 and 3 "),
    ([0.1, 0.75, 0.2], [2], "the dead units are those of its call 2 "),
    ([0.9, 0.8, 1.0], [1, 2, 3], "the units of every call are over 70% dead"),
    ([float("nan"), 0.9, 0.1], [2], "the dead units are those of its call 2 "),
])
def test_a_dead_relu_called_at_several_places_names_the_calls_over_the_fraction(
        by_call: list[float], calls: list[int], said: str) -> None:
    """Site ``r`` (a shared ReLU, three call positions) after a sigmoid site ``s`` with one;
    its dead fraction is the worst position's."""
    rule = DeadReluRule(0.7, patience=1)
    r = _acts(0, 0.0, float(np.nanmax(by_call)))
    assert r.activations is not None
    r.activations.call_positions = np.array([1, 3])
    r.activations.dead_by_call = np.array([0.0, *by_call])
    found = rule.update(r)
    assert [(f.kind, f.layer) for f in found] == [("dead_relu", "r")]
    assert found[0].value == float(np.nanmax(by_call))
    assert (found[0].details["calls"], found[0].details["call_positions"]) == (calls, 3)
    assert "called at 3 places in each forward pass, each on units of its own" in found[0].message
    assert said in found[0].message
    assert found[0].message.endswith(
        "(the fraction above is the worst call's, the mean derivative all calls').")


def test_a_dead_relu_called_at_one_place_names_no_call() -> None:
    rule = DeadReluRule(0.7, patience=1)
    r = _acts(0, 0.0, 0.9)
    assert r.activations is not None
    r.activations.call_positions = np.array([1, 1])
    r.activations.dead_by_call = np.array([0.0, 0.9])
    found = rule.update(r)
    assert len(found) == 1 and "calls" not in found[0].details
    assert "places" not in found[0].message


def test_activation_steps_with_nonfinite_gradients_are_not_judged_nor_explained() -> None:
    """A poisoned step (NaN/Inf gradients, or an fp16 overflow) leaves the activation streaks
    as they were, and the explainer keeps the activation statistics of the last sound step."""
    from graddiag.data.tree import ModuleTree
    from graddiag.rules.explain import Explainer

    def poisoned(step: int, how: str) -> StepRecord:
        r = _acts(step, 0.99, 1.0)
        if how == "nan":
            r.nonfinite = {0: {"weight": 3}}
        else:
            r.amp_overflow = True
        return r

    for how in ("nan", "amp"):
        sat, dead = SaturatedRule(0.5, patience=2), DeadReluRule(0.5, patience=2)
        seq = [_acts(0, 0.1, 0.1), poisoned(1, how), poisoned(2, how), _acts(3, 0.1, 0.1)]
        assert run(sat, seq) == [] and run(dead, seq) == []
        explainer = Explainer(ModuleTree((), "Model"))
        for r in seq[:3]:
            explainer.observe(r)
        assert explainer.activations is not None
        assert explainer.activations.dead.tolist() == [0.0, 0.1]  # step 0's, not step 2's


def test_ruleset_ignores_kinds() -> None:
    rules = RuleSet(MonitorConfig(ignore=("vanishing",), vanishing_patience=1))
    assert rules.update(record(0, [0.0, 1.0])) == []
    rules = RuleSet(MonitorConfig(vanishing_patience=1))
    assert [f.kind for f in rules.update(record(0, [0.0, 1.0]))] == ["vanishing"]


def test_constant_healthy_sequence_never_flags() -> None:
    rules = RuleSet(MonitorConfig())
    for s in range(200):
        assert rules.update(record(s, [0.3, 0.5, 1.2])) == []


def _two_layers(step: int, norms: list[float]) -> StepRecord:
    return StepRecord(step, ["l0", "l1"], np.array(norms, dtype=float), np.ones(2, dtype=bool),
                      missing={}, nonfinite={})


def test_an_explosion_that_ended_is_not_named_as_the_cause_of_a_later_vanishing() -> None:
    from graddiag.data.tree import ModuleTree
    from graddiag.rules.explain import Explainer

    rules = RuleSet(MonitorConfig(exploding_patience=3, vanishing_patience=2,
                                  vanishing_early_rel=0.0))
    explainer = Explainer(ModuleTree(("", "l0", "l1"), "Net"))
    said = []
    for step, norms in enumerate([[100.0, 1e5]] * 3 + [[1e-6, 1.0]] * 3):
        record = _two_layers(step, norms)
        explainer.observe(record)
        found = rules.update(record)  # then the exploding layers, as the monitor reads them
        exploding = rules.holding("exploding")
        said += [explainer.explain(f, record, exploding) for f in found if f.kind == "vanishing"]
        if step == 2:  # l1 exploding for 3 steps: reported, and it holds
            assert rules.holding("exploding") == {"l1"}
        if step >= 3:  # l1 back at 1.0: its report stands through the gap, but it no longer holds
            assert rules.holding("exploding") == frozenset()
    (vanishing,) = said
    assert vanishing.layer == "l0" and vanishing.details.get("largest_exploding") is not True
    assert "itself exploding" not in vanishing.message


def test_the_monitor_names_only_an_explosion_that_still_holds() -> None:
    """The same through the monitor: ``fc`` explodes for three steps, then is ordinary while
    ``a`` vanishes; the vanishing finding does not call ``fc`` exploding."""
    from graddiag import GradientMonitor
    from tests.test_updates import _set_grads, _TwoLayers

    model = _TwoLayers()
    with GradientMonitor(model, reporters=[], exploding_patience=3, vanishing_patience=2,
                         vanishing_early_rel=0.0) as monitor:
        for a, fc in [(1e3, 1e5)] * 3 + [(1e-7, 0.1)] * 3:
            _set_grads(model, a, fc)
            monitor.step()
    found = {(f.kind, f.layer): f for f in monitor.findings}
    assert set(found) == {("exploding", "fc"), ("vanishing", "a")}
    assert "itself exploding" not in found[("vanishing", "a")].message


def test_a_gap_saved_under_a_longer_patience_re_arms_under_a_shorter_one() -> None:
    old = VanishingRule(1e-12, 1e-4, patience=10, early_rel=0.0)
    found = [f for s in range(10) for f in old.update(_two_layers(s, [1e-6, 1.0]))]
    assert [(f.layer, f.step) for f in found] == [("l0", 9)]
    for s in range(10, 17):  # gone 7 steps: fewer than 10, the report stands
        assert old.update(_two_layers(s, [0.5, 1.0])) == []
    resumed = VanishingRule(1e-12, 1e-4, patience=5, early_rel=0.0)
    resumed.load_state_dict(old.state_dict())  # 7 >= 5: by the new patience it was gone long enough
    later = [f for s in range(17, 25) for f in resumed.update(_two_layers(s, [1e-6, 1.0]))]
    assert [(f.layer, f.step) for f in later] == [("l0", 21)]
