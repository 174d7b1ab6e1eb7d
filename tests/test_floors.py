"""The lower floors stand on their own: plain data and rules load no torch; the schedule, the
step policy and the module tree are plain data; the test fixture catches leaked global state."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graddiag.data.findings import Finding
from graddiag.data.policy import decide
from graddiag.data.records import ActivationRecord, StepRecord
from graddiag.data.schedule import Schedule
from graddiag.data.tree import ModuleTree
from graddiag.rules.explain import Explainer
from tests.conftest import _left_behind

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("modules", [
    "graddiag.rules, graddiag.rules.explain, graddiag.rules.ruleset, graddiag.rules.gradient, "
    "graddiag.rules.activation, graddiag.rules.onsets, graddiag.rules.wording",
    "graddiag.data, graddiag.data.options, graddiag.data.records, graddiag.data.policy, "
    "graddiag.data.schedule, graddiag.data.snapshots, graddiag.data.tree, graddiag.data.names",
    "graddiag",
])
def test_importing_loads_no_torch(modules: str) -> None:
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("every", "params", "acts", "hist", "recorded"), [
    (1, 0, 0, 0, [True] * 6),
    (5, 0, 0, 0, [True, False, False, False, False, True]),
    (5, 2, 0, 0, [True] * 6),  # parameters on 0, 2, 4; the weights copied on 1, 3, 5 before them
    (5, 0, 3, 4, [True, False, False, True, True, True]),
])
def test_schedule_records_the_steps_any_cadence_asks_for(every: int, params: int, acts: int,
                                                         hist: int, recorded: list[bool]) -> None:
    schedule = Schedule(every, params, acts, hist)
    assert [schedule.records(s) for s in range(6)] == recorded
    assert [schedule.records_activations(s) for s in range(4)] == \
        [bool(acts) and s % acts == 0 for s in range(4)]


@pytest.mark.parametrize(("active", "on_nonfinite", "on_exploding", "action"), [
    (set(), "raise", "raise", "continue"),
    ({"nonfinite"}, "warn", "stop", "continue"),
    ({"nonfinite"}, "skip", "warn", "skip"),
    ({"nonfinite", "exploding"}, "skip", "stop", "stop"),
    ({"exploding"}, "skip", "raise", "raise"),
    ({"vanishing"}, "raise", "raise", "continue"),
])
def test_the_most_severe_requested_action_wins(active: set[str], on_nonfinite: str,
                                               on_exploding: str, action: str) -> None:
    assert decide(active.__contains__, on_nonfinite, on_exploding) == action


def test_the_explainer_works_from_module_names_alone() -> None:
    tree = ModuleTree(("", "0", "1", "2", "3", "4"), "Sequential")
    acts = ActivationRecord(sites=["1", "3"], kinds=["sigmoid", "sigmoid"],
                            families=["saturating"] * 2, saturated=np.zeros(2),
                            dead=np.full(2, np.nan), gain=np.array([0.2, 0.25]),
                            calls=np.ones(2))
    record = StepRecord(step=3, layers=["0", "2", "4"], grad_norm=np.array([1e-9, 1e-3, 1.0]),
                        has_grad=np.ones(3, bool), activations=acts)
    explainer = Explainer(tree)
    explainer.observe(record)
    finding = Finding("vanishing", "0", 3, 1e-9, 1e-4, "Vanishing gradient.")
    message = explainer.explain(finding, record).message
    assert "2 sigmoid site(s)" in message and "~0.05" in message  # 0.2 * 0.25 by hand
    assert [(m.site, m.x) for m in tree.site_marks(record.layers, acts)] == [("1", 0.5),
                                                                          ("3", 1.5)]


def test_the_fixture_catches_and_clears_leaked_global_state() -> None:
    before = {name: set(getattr(nn.modules.module, name))
              for name in ("_global_forward_pre_hooks", "_global_forward_hooks",
                           "_global_backward_pre_hooks", "_global_backward_hooks")}
    nn.modules.module.register_module_forward_hook(lambda *_: None)
    torch.overrides.TorchFunctionMode().__enter__()
    problems = _left_behind(before)
    assert len(problems) == 2
    assert "TorchFunctionMode" in problems[0] and "_global_forward_hooks" in problems[1]
    assert _left_behind(before) == []  # and cleared


def _explained_remedy(kinds: list[str], families: list[str], dead: list[float],
                      sites: list[str], position: list[float] | None = None,
                      gain: float | list[float] = 0.5, ratio: float | None = None) -> str:
    """The remedy of a vanishing finding on layer "0" of a Sequential of five, with these
    activation sites ("1" and "3" lie between layer "0" and the loss in module order;
    ``position``: where they ran among the layers, measured; ``ratio``: the layer's norm over
    the largest layer's, as the vanishing rule reports it)."""
    tree = ModuleTree(("", "0", "1", "2", "3", "4"), "Sequential")
    n = len(sites)
    acts = ActivationRecord(sites=sites, kinds=kinds, families=families, saturated=np.zeros(n),
                            dead=np.array(dead, dtype=float),
                            gain=np.broadcast_to(np.asarray(gain, dtype=float), (n,)).copy(),
                            calls=np.ones(n),
                            position=None if position is None else np.array(position))
    record = StepRecord(step=3, layers=["0", "2", "4"], grad_norm=np.array([1e-9, 1e-3, 1.0]),
                        has_grad=np.ones(3, bool), activations=acts)
    explainer = Explainer(tree)
    explainer.observe(record)
    details = {} if ratio is None else {"ratio_to_largest": ratio}
    finding = Finding("vanishing", "0", 3, 1e-9, 1e-4, "Vanishing gradient.", details=details)
    return explainer.explain(finding, record).remedy


def test_a_vanishing_layer_whose_weights_still_move_is_not_said_to_stall() -> None:
    """Adam moves a layer with tiny gradients: at an update ratio of 0.012 against a median of
    (0.012 + 0.015) / 2 = 0.0135, above 0.1 x the median, the finding does not claim the layer
    barely learns; at 1e-7 against (1e-7 + 0.015) / 2, below 0.1 x it, the claim stays."""
    from graddiag.rules import wording

    explainer = Explainer(ModuleTree(("", "0", "1", "2"), "Sequential"))
    norms = dict(grad_norm=np.array([1e-9, 1.0]), has_grad=np.ones(2, bool))
    finding = Finding("vanishing", "0", 9, 1e-9, 1e-4,
                      "Vanishing gradient: 10 recorded steps" + wording.BARELY_LEARNS)
    record = StepRecord(step=9, layers=["0", "2"], **norms)
    assert "barely learns" in explainer.explain(finding, record).message  # nothing known yet
    explainer.observe(StepRecord(step=4, layers=["0", "2"], update_ratio=np.array([0.012, 0.015]),
                                 **norms))
    moving = explainer.explain(finding, record)
    assert "barely learns" not in moving.message
    assert "Its weights still move, though: at step 4" in moving.message
    assert moving.details["update_ratio"] == 0.012
    assert moving.details["median_update_ratio"] == pytest.approx(0.0135)
    explainer.observe(StepRecord(step=14, layers=["0", "2"], update_ratio=np.array([1e-7, 0.015]),
                                 **norms))
    still = explainer.explain(finding, record)
    assert "barely learns" in still.message and "still move" not in still.message
    # a ratio measured while the gradient was 1e-3 (above 10 x 1e-9: before it vanished), or an
    # exactly zero gradient (momentum alone moves the weights), says nothing of the weights now
    for before, value in ((1e-3, 1e-9), (1e-9, 0.0)):
        fresh = Explainer(ModuleTree(("", "0", "1", "2"), "Sequential"))
        fresh.observe(StepRecord(step=4, layers=["0", "2"], update_ratio=np.array([0.012, 0.015]),
                                 grad_norm=np.array([before, 1.0]), has_grad=np.ones(2, bool)))
        zero = dataclasses.replace(finding, value=value)
        assert "barely learns" in fresh.explain(zero, record).message
    # several optimizers read in turns: each layer keeps its own last ratio
    turns = Explainer(ModuleTree(("", "0", "1", "2"), "Sequential"))
    turns.observe(StepRecord(step=20, layers=["0", "2"], update_ratio=np.array([0.012, np.nan]),
                             **norms))
    turns.observe(StepRecord(step=21, layers=["0", "2"], update_ratio=np.array([np.nan, 0.015]),
                             **norms))
    assert turns.explain(finding, record).details["median_update_ratio"] == pytest.approx(0.0135)


def test_vanishing_remedies_fit_the_activations_between_layer_and_loss() -> None:
    relu = _explained_remedy(["relu"] * 2, ["rectifier"] * 2, [0.1, 0.2], ["1", "3"])
    assert relu.startswith("initialise the weights with Kaiming init")
    dead = _explained_remedy(["relu"] * 2, ["rectifier"] * 2, [0.9, 0.2], ["1", "3"])
    assert dead.startswith("lower the learning rate; initialise biases")
    tanh = _explained_remedy(["tanh", "relu"], ["saturating", "rectifier"], [np.nan, 0.0],
                             ["1", "3"])
    assert tanh.startswith("replace the 1 sigmoid/tanh site(s) with ReLU-family activations")
    # a site measured on the input side of layer "0" (position -0.5): none between it and the loss
    none = _explained_remedy(["relu"], ["rectifier"], [0.0], ["1"], position=[-0.5])
    assert none.startswith("check the initialisation scale")
    # advice to swap sigmoid/tanh for ReLU only where a sigmoid/tanh site is in the way
    assert all("sigmoid/tanh" not in r for r in (relu, dead, none))
    # one tanh of gain 0.9 in front of a 1e-6 shrink: log 0.9 / log 1e-6 = 0.8 % of it
    pooler = _explained_remedy(["tanh"], ["saturating"], [np.nan], ["3"], gain=0.9, ratio=1e-6)
    assert pooler.startswith("check the weights' initialisation scale")
    # two sites of gain 0.1 in front of a 1e-3 shrink: log 0.01 / log 1e-3 = 2/3 of it
    deep = _explained_remedy(["tanh"] * 2, ["saturating"] * 2, [np.nan] * 2, ["1", "3"],
                             gain=0.1, ratio=1e-3)
    assert deep.startswith("replace the 2 sigmoid/tanh site(s)")
    # a tanh of gain 0.9 behind two ReLUs of gain 0.1, in front of a 1e-3 shrink: the ReLUs
    # explain 2/3 of it, the tanh log 0.9 / log 1e-3 = 1.5 %: not the tanh to replace
    mixed = _explained_remedy(["relu", "relu", "tanh"], ["rectifier", "rectifier", "saturating"],
                              [0.1, 0.1, np.nan], ["1", "3", "3:tanh"], gain=[0.1, 0.1, 0.9],
                              ratio=1e-3)
    assert mixed.startswith("check the weights' initialisation scale")
