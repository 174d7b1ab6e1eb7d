"""Update ratios per optimizer step, and the stalled / unstable_update / not_in_optimizer findings.

Every expected value is recomputed here from copies of the weights in float64.
"""

from __future__ import annotations

import logging
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from graddiag import GradientMonitor
from graddiag.data.records import StepRecord
from graddiag.demos.models import build_mlp
from graddiag.lightning import actions
from graddiag.pipeline import monitor as monitor_module
from graddiag.rules import wording
from graddiag.rules.updates import NotInOptimizerRule, StalledRule, UnstableUpdateRule


def _layer_ratios(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """||w_after - w_before|| / ||w_after|| over a layer's tensors, in float64."""
    delta = torch.cat([(a.double() - b.double()).flatten() for a, b in zip(after, before)])
    norm = torch.cat([a.double().flatten() for a in after]).norm()
    return (delta.norm() / norm).item()


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor],
           steps: int, *, seed: int = 0, clip: float | None = None,
           **options: object) -> tuple[GradientMonitor, list]:
    """Train with a monitor (clipping by the global norm to ``clip`` when given); returns it and
    each step's weights as seen by ``monitor.step()``."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    weights = []
    options.setdefault("reporters", [])
    with GradientMonitor(model, **options) as monitor:  # type: ignore[arg-type]
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            if monitor.step(clip_norm=clip).should_skip:
                continue
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return monitor, weights


def _expected_ratio(weights: list, step: int, layer: str) -> float:
    names = [n for n in weights[step] if n.rsplit(".", 1)[0] == layer]
    return _layer_ratios([weights[step - 1][n] for n in names], [weights[step][n] for n in names])


# ----------------------------------------------------------------------------- the ratio itself
def test_update_ratio_spans_exactly_one_optimizer_step_on_a_front_loaded_schedule(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=32, init="kaiming")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor, weights = _train(model, opt, digits, 13, every_n_steps=5, param_every_n_steps=4,
                              early_steps=3, activation_every_n_steps=0)
    h = monitor.history
    # gradient steps 0, 5, 10; parameter steps 0, 1, 2 (early) and 4, 8, 12; weight copies on
    # the steps before parameter steps: 0, 1, 3, 7, 11, where 3, 7 and 11 copy and record nothing
    assert sorted(h.step.unique()) == [0, 1, 2, 4, 5, 8, 10, 12]
    with_ratio = sorted(h[h.update_ratio.notna()].step.unique())
    assert with_ratio == [1, 2, 4, 8, 12]  # step 0 has nothing before it
    assert sorted(h[h.param_norm.notna()].step.unique()) == [0, 1, 2, 4, 8, 12]
    for step in with_ratio:
        for layer in ("0", "2", "4"):
            row = h[(h.step == step) & (h.layer == layer)].iloc[0]
            assert row.update_ratio == pytest.approx(_expected_ratio(weights, step, layer), rel=1e-4)


@pytest.mark.parametrize("every", [1, 3])
def test_update_ratio_is_exact_when_the_copy_step_is_kept_or_copies_only(
    digits, every: int, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """Every step: the copy step before a parameter step is kept for its block. Every third
    step: step 3 is kept, steps 7 and 11 copy the weights and record nothing."""
    monkeypatch.setattr(monitor_module, "MAX_BLOCK_SECONDS", 1e9)  # blocks judged when full only
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=32, init="kaiming")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = digits
    weights, reports = [], []
    with GradientMonitor(model, reporters=[], every_n_steps=every, param_every_n_steps=4,
                         early_steps=0, activation_every_n_steps=0,
                         evaluate_every_n_records=16) as monitor:
        for step in range(13):
            opt.zero_grad()
            F.cross_entropy(model(x[32 * step:32 * step + 32]), y[32 * step:32 * step + 32]).backward()
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            reports.append(monitor.step())
            opt.step()
    h = monitor.history
    copy_steps = [3, 7, 11]
    if every == 1:  # kept: no record on the step itself, every step in the history
        assert [r.step for r in reports if r.record is not None] == [0, 4, 8, 12]
        assert sorted(h.step.unique()) == list(range(13))
    else:  # gradient steps 0, 3, 6, 9, 12 and parameter steps 4, 8: step 3 both
        assert reports[3].recorded and reports[3].record is None  # kept, with its copy
        assert not any(reports[s].recorded for s in (7, 11))
        assert sorted(h.step.unique()) == [0, 3, 4, 6, 8, 9, 12]
    assert sorted(h[h.update_ratio.notna()].step.unique()) == [s + 1 for s in copy_steps]
    for step in (4, 8, 12):
        for layer in ("0", "2", "4"):
            row = h[(h.step == step) & (h.layer == layer)].iloc[0]
            assert row.update_ratio == pytest.approx(_expected_ratio(weights, step, layer), rel=1e-4)


def test_a_skip_another_rank_asked_for_voids_this_ranks_kept_copy(
    digits, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """Several processes: this rank's copy step is finite and kept, another rank asks to skip
    it; the agreed skip applies nothing here either, so the next parameter step has no ratio
    rather than a false 0."""
    step_now = [0]
    monkeypatch.setattr(actions, "agree_on_action",
                        lambda strategy, action: "skip" if step_now[0] == 3 else action)
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(world_size=2, strategy=None, optimizers=[opt], is_global_zero=True,
                              should_stop=False)
    x, y = digits
    reports = []
    with GradientMonitor(model, reporters=[], param_every_n_steps=4, early_steps=0,
                         activation_every_n_steps=0, on_nonfinite="skip") as monitor:
        for step in range(9):
            step_now[0] = step
            opt.zero_grad()
            F.cross_entropy(model(x[:32]), y[:32]).backward()
            reports.append(monitor.step())
            actions.apply_action(trainer, opt, reports[-1], monitor, monitor.config)
            opt.step()  # after the agreed skip every gradient is None: SGD applies nothing
    h = monitor.history
    assert reports[3].recorded and reports[3].record is None  # kept here: finite
    assert monitor.skipped_steps == 1
    assert len(h[h.step == 4]) and h[h.step == 4].update_ratio.isna().all()
    assert (h[h.step == 8].update_ratio > 0).all()


def test_forgetting_the_waiting_steps_drops_the_weight_copy(digits) -> None:  # noqa: ANN001
    """Loading a state forgets the steps after it, and the copy taken on one of them: the
    weights are about to be replaced, so the next parameter step has no ratio."""
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits
    with GradientMonitor(model, reporters=[], param_every_n_steps=4, early_steps=0,
                         activation_every_n_steps=0) as monitor:
        for step in range(9):
            opt.zero_grad()
            F.cross_entropy(model(x[:32]), y[:32]).backward()
            monitor.step()
            if step == 3:
                monitor.forget_waiting()
            opt.step()
    h = monitor.history
    assert len(h[h.step == 4]) and h[h.step == 4].update_ratio.isna().all()
    assert (h[h.step == 8].update_ratio > 0).all()


def test_a_skipped_optimizer_step_gives_no_ratio_rather_than_zero(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def poison(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return output * float("nan") if monitor_step[0] == 3 else output

    monitor_step = [0]
    model[0].register_forward_hook(poison)
    x, y = digits
    with GradientMonitor(model, reporters=[], param_every_n_steps=4, early_steps=0,
                         activation_every_n_steps=0, on_nonfinite="skip") as monitor:
        for step in range(9):
            monitor_step[0] = step
            opt.zero_grad()
            F.cross_entropy(model(x[:32]), y[:32]).backward()
            if not monitor.step().should_skip:
                opt.step()
    h = monitor.history
    # step 3 (the copy before parameter step 4) was skipped: w_4 == w_3, no update happened
    assert h[h.step == 4].update_ratio.isna().all()
    assert (h[h.step == 8].update_ratio > 0).all()


# ----------------------------------------------------------------------------- stalled
def _groups_with_tiny_lr(model: nn.Sequential, slow: int, lr: float = 1e-3) -> torch.optim.Adam:
    slow_params = list(model[slow].parameters())
    others = [p for i, m in enumerate(model) if i != slow for p in m.parameters()]
    return torch.optim.Adam([{"params": others}, {"params": slow_params, "lr": 1e-9}], lr=lr)


@pytest.mark.parametrize("tell_optimizer", [True, False])
def test_a_layer_with_a_tiny_learning_rate_is_stalled_there_and_nowhere_else(
    digits, tell_optimizer: bool  # noqa: ANN001
) -> None:
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=3, width=32, init="kaiming")
    opt = _groups_with_tiny_lr(model, slow=2)
    extra = {"optimizers": opt} if tell_optimizer else {}
    monitor, weights = _train(model, opt, digits, 8, **extra)
    stalled = [f for f in monitor.findings if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["2"]
    finding = stalled[0]
    assert finding.step == 3  # ratios on steps 1, 2, 3 (front-loaded), patience 3
    for step in (1, 2, 3):  # the evidence, recomputed: ~1e-8 there, >1e-4 everywhere else
        assert _expected_ratio(weights, step, "2") < 1e-6
        for layer in ("0", "4", "6"):
            assert _expected_ratio(weights, step, layer) > 1e-4
    assert finding.value == pytest.approx(_expected_ratio(weights, 3, "2"), rel=1e-3)
    if tell_optimizer:
        assert "learning rate is 1e-09" in finding.message
        assert finding.details["largest_learning_rate"] == 1e-3
        assert finding.remedy.startswith("raise this param group's learning rate")
    else:
        assert "pass optimizers=" in finding.message
    assert not [f for f in monitor.findings if f.kind != "stalled"]


def test_deep_sigmoid_net_first_layers_are_stalled_by_their_vanished_gradient(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=10, width=32, activation="sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor, weights = _train(model, opt, digits, 6, optimizers=opt)
    stalled = {f.layer: f for f in monitor.findings if f.kind == "stalled"}
    assert "0" in stalled
    expected = {layer for layer in [str(2 * i) for i in range(11)]
                if all(_expected_ratio(weights, s, layer) < 1e-6 for s in (1, 2, 3))}
    assert set(stalled) == expected
    assert "gradient has vanished" in stalled["0"].message


@pytest.mark.parametrize("tell_optimizer", [True, False])
def test_frozen_layers_zero_lr_groups_and_warm_up_from_zero_are_not_stalled(
    digits, caplog: pytest.LogCaptureFixture, tell_optimizer: bool  # noqa: ANN001
) -> None:
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=3, width=32, init="kaiming")
    model[0].requires_grad_(False)  # frozen before the monitor starts: not a layer at all
    zero = list(model[2].parameters())
    rest = [p for m in (model[4], model[6]) for p in m.parameters()]
    opt = torch.optim.Adam([{"params": rest}, {"params": zero, "lr": 0.0}], lr=1e-3)
    warm_up = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 1000)  # lr 0 at step 0
    x, y = digits
    extra = {"optimizers": opt} if tell_optimizer else {}
    with caplog.at_level(logging.INFO, logger="graddiag"), \
            GradientMonitor(model, reporters=[], **extra) as monitor:
        for step in range(8):
            batch = slice(32 * step, 32 * step + 32)
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            monitor.step()
            opt.step()
            warm_up.step()
    h = monitor.history
    assert (h[(h.layer == "2") & h.update_ratio.notna()].update_ratio == 0).all()  # it did not move
    assert "0" not in set(h.layer)
    stalled = [f.layer for f in monitor.findings if f.kind in ("stalled", "unstable_update")]
    if tell_optimizer:  # lr 0 says the layer is meant to stay put; warm-up slows all alike
        assert stalled == []
        assert any("'2'" in r.getMessage() and "learning rate 0" in r.getMessage()
                   for r in caplog.records)
    else:  # without the optimizer, a layer that never moves while the others do is flagged
        assert stalled == ["2"]


class _Recommender(nn.Module):
    """A large embedding table (one row per item) and a small head."""

    def __init__(self, items: int, sparse: bool) -> None:
        super().__init__()
        self.items = nn.Embedding(items, 4, sparse=sparse)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.items(ids)).squeeze(-1)


@pytest.mark.parametrize("sparse", [True, False])
def test_an_embedding_table_is_judged_on_the_rows_a_step_moves(sparse: bool) -> None:
    """A step trains 16 rows of a 1M-row table: they move by ~1e-4 of their norm (Adam at lr
    1e-4, weights of RMS 1), the whole table by ~4e-7, below stalled_ratio. Not stalled: the
    ratio is taken over the rows the step changed."""
    torch.manual_seed(0)
    model = _Recommender(1_000_000, sparse)
    table = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(
        list(model.items.parameters()), lr=1e-4)
    head = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    weights = []
    with GradientMonitor(model, reporters=[], optimizers=[table, head],
                         param_every_n_steps=1) as monitor:
        for _ in range(6):
            ids = torch.randint(0, 1_000_000, (16,), generator=g)
            loss = (model(ids) - 1.0).pow(2).mean()
            table.zero_grad()
            head.zero_grad()
            loss.backward()
            weights.append(model.items.weight.detach().clone())
            monitor.step()
            table.step()
            head.step()
    assert not [f for f in monitor.findings if f.layer == "items"]
    got = monitor.history.set_index(["layer", "step"]).update_ratio
    for step in range(2, 6):
        before, now = weights[step - 1].double(), weights[step].double()
        moved = (now - before).abs().amax(dim=1) > 0
        if sparse:
            assert int(moved.sum()) <= 16  # SparseAdam moves only the rows it was given
        expected = float((now - before).norm() / now[moved].norm())
        assert got[("items", step)] == pytest.approx(expected, rel=1e-4)
        assert 3e-5 < expected < 3e-4
        assert float((now - before).norm() / now.norm()) < 1e-6  # the whole table's ratio


# ----------------------------------------------------------------------------- unstable_update
def test_a_huge_learning_rate_is_an_unstable_update(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=32, init="kaiming")
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    monitor, weights = _train(model, opt, digits, 5, optimizers=opt)
    unstable = [f for f in monitor.findings if f.kind == "unstable_update"]
    assert unstable
    for f in unstable:
        assert f.step == 3
        for step in (1, 2, 3):
            assert _expected_ratio(weights, step, f.layer) > 0.1
        assert f.value == pytest.approx(_expected_ratio(weights, 3, f.layer), rel=1e-3)
        assert "learning rate is 1" in f.message
        assert f.remedy == wording.UNSTABLE_UPDATE and "clip_grad_norm_" in f.remedy


def test_under_clipping_the_unstable_update_remedy_does_not_suggest_it(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=32, init="kaiming")
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    monitor, weights = _train(model, opt, digits, 5, clip=0.1, optimizers=opt)
    unstable = [f for f in monitor.findings if f.kind == "unstable_update"]
    assert unstable  # Adam moves each weight by ~lr, clipped gradient or not
    for f in unstable:
        assert all(_expected_ratio(weights, step, f.layer) > 0.1 for step in (1, 2, 3))
        assert f.remedy == wording.UNSTABLE_UPDATE_WHILE_CLIPPING
        assert "clip_grad_norm_" not in f.remedy and "already on" in f.remedy


def test_a_zero_initialised_layer_is_not_an_unstable_update(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=32, init="kaiming")
    nn.init.zeros_(model[4].weight)  # a zero-initialised head: ratio ~1/t on its first steps
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor, weights = _train(model, opt, digits, 60, optimizers=opt)
    assert _expected_ratio(weights, 2, "4") > 0.3  # large by construction, and harmless
    assert monitor.findings == []


# ----------------------------------------------------------------------------- not_in_optimizer
class LateHead(nn.Module):
    """A model whose second head is created after the optimizer was built."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        self.head2: nn.Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        out = self.head(h)
        return out if self.head2 is None else out + self.head2(h)


def test_a_module_created_after_the_optimizer_is_not_in_optimizer(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = LateHead()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.head2 = nn.Linear(32, 10)  # the classic bug
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in held for p in model.head2.parameters())  # independent check
    monitor, weights = _train(model, opt, digits, 8, optimizers=opt)
    missing = [f for f in monitor.findings if f.kind == "not_in_optimizer"]
    assert [(f.layer, f.step, f.details["parameters"]) for f in missing] == [
        ("head2", 0, ["weight", "bias"])]
    assert torch.equal(weights[0]["head2.weight"], weights[-1]["head2.weight"])  # never moved
    assert not [f for f in monitor.findings if f.kind == "stalled"]  # said to be so instead


def test_optimizers_argument_is_checked() -> None:
    with pytest.raises(ValueError, match=r"optimizers must be a torch.optim.Optimizer \(or a "
                       r"wrapper holding one as .optimizer\) or a list of them, got str$"):
        GradientMonitor(nn.Linear(2, 2), optimizers="adam")  # type: ignore[arg-type]


class _DuckWrapper:
    """A wrapper that is no ``torch.optim.Optimizer`` but holds one as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


def test_a_wrapper_holding_an_optimizer_stands_for_it() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    sgd = torch.optim.SGD(model[0].parameters(), lr=0.1)
    adam = torch.optim.Adam(model[1].parameters(), lr=1e-3)
    for given in (_DuckWrapper(sgd), [_DuckWrapper(sgd), adam]):
        monitor = GradientMonitor(model, optimizers=given, reporters=[])  # type: ignore[arg-type]
        model(torch.randn(2, 3)).sum().backward()
        monitor.step(0)
        monitor.close()
        record = monitor.records[0]
        expected_lr = [0.1, 1e-3] if isinstance(given, list) else [0.1, float("nan")]
        np.testing.assert_array_equal(record.learning_rate, expected_lr)
        assert record.along_gradient.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"got _DuckWrapper at position 1$"):
        GradientMonitor(model, optimizers=[sgd, _DuckWrapper(None)])  # type: ignore[list-item]


# ----------------------------------------------------------------------------- the rules alone
def _record(step: int, ratio: list[float], *, lr: list[float] | None = None,
            orphaned: dict[str, list[str]] | None = None, param_norm: list[float] | None = None,
            grad: list[float] | None = None) -> StepRecord:
    n = len(ratio)
    return StepRecord(
        step=step, layers=[f"l{i}" for i in range(n)],
        grad_norm=np.array(grad or [1.0] * n), has_grad=np.ones(n, dtype=bool),
        param_norm=np.array(param_norm or [1.0] * n), update_ratio=np.array(ratio),
        learning_rate=None if lr is None else np.array(lr), orphaned=orphaned,
    )


@pytest.mark.parametrize(
    ("ratios", "lr", "orphaned", "expected"),
    [
        ([[1e-3, 1e-9, 1e-3]] * 3, None, None, {"l1"}),
        ([[1e-3, 1e-9, 1e-3]] * 2, None, None, set()),  # patience 3 not reached
        ([[1e-7, 1e-7, 1e-8]] * 3, None, None, set()),  # everything slow (warm-up): no outlier
        ([[1e-3, 1e-9, 1e-3]] * 3, [1e-3, 0.0, 1e-3], None, set()),  # lr 0: frozen on purpose
        ([[1e-3, 0.0, 1e-3]] * 3, None, {"l1": ["weight"]}, set()),  # not held: its own finding
        ([[1e-3, 1e-9, 1e-3], [1e-3, 1e-3, 1e-3], [1e-3, 1e-9, 1e-3]], None, None, set()),
        ([[1e-3, float("nan"), 1e-3]] * 3, None, None, set()),
    ],
    ids=["stalled", "short", "warm-up", "lr-zero", "orphan", "interrupted", "nan"],
)
def test_stalled_rule_table(ratios: list[list[float]], lr: list[float] | None,
                            orphaned: dict[str, list[str]] | None, expected: set[str]) -> None:
    rule = StalledRule(1e-6, 1e-3, 3, 1e-4)
    found = set()
    for step, ratio in enumerate(ratios):
        found |= {f.layer for f in rule.update(_record(step, ratio, lr=lr, orphaned=orphaned))}
    assert found == expected


@pytest.mark.parametrize(
    ("ratios", "lrs", "expected"),
    [
        ([1e-9] * 4, [1e-10] * 4, [("l0", 3), ("l1", 3)]),  # a typo: every layer alike
        ([1e-9] * 3, [1e-10] * 3, []),  # patience 3 from the second record on
        ([1e-9] * 4, [1e-10, 2e-10, 3e-10, 4e-10], []),  # rising: a warm-up under way
        ([1e-9] * 4, [1e-10, 1e-10, 2e-10, 2e-10], []),  # rose once: the streak restarts
        ([1e-3] + [1e-9] * 4, [1e-3] + [1e-10] * 4, []),  # fallen from 1e-3: a schedule's end
        ([1e-9] * 4, [1e-10, 1e-10, 0.9e-10, 0.8e-10], [("l0", 3), ("l1", 3)]),  # slow decay
        ([1e-9] * 4, [2e-10, 2e-10, 1e-10, 1e-10], []),  # a first halving (StepLR gamma 0.5)
        ([2e-6] * 4, [1e-10] * 4, []),  # the weights move anyway (SGD, huge gradients)
        ([1e-9] * 4, [1e-6] * 4, []),  # lr / RMS = 1e-5: not too small for the weights
        ([1e-9] * 4, None, []),  # learning rates unknown: slow alike says nothing
    ],
    ids=["typo", "short", "warm-up", "rose", "decayed", "slow-decay", "halved", "moving", "enough",
         "no-lr"],
)
def test_a_tiny_learning_rate_is_stalled_on_its_own(ratios: list[float], lrs: list[float] | None,
                                                    expected: list[tuple[str, int]]) -> None:
    """Both layers at the same learning rate and ratio, weights of RMS 0.1 (norm 1, 100
    elements): lr 1e-10 is 1e-9 of the RMS, below ``stalled_ratio`` 1e-6."""
    rule = StalledRule(1e-6, 1e-3, 3, 1e-4)
    found = []
    for step, ratio in enumerate(ratios):
        lr = None if lrs is None else [lrs[step]] * 2
        record = _record(step, [ratio] * 2, lr=lr, param_norm=[1.0, 1.0])
        record.param_count = np.array([100, 100])
        found += [(f.layer, f.step) for f in rule.update(record)]
    assert found == expected


def test_the_learning_rates_a_stalled_rule_has_seen_survive_a_restart() -> None:
    """A schedule's end stays one after ``state_dict``/``load_state_dict`` (resume)."""
    before = StalledRule(1e-6, 1e-3, 3, 1e-4)
    records = [_record(s, [r] * 2, lr=[lr] * 2, param_norm=[1.0, 1.0])
               for s, (r, lr) in enumerate([(1e-3, 1e-3)] + [(1e-9, 1e-10)] * 4)]
    for record in records:
        record.param_count = np.array([100, 100])
    before.update(records[0])
    after = StalledRule(1e-6, 1e-3, 3, 1e-4)
    after.load_state_dict(before.state_dict())
    assert [f for record in records[1:] for f in after.update(record)] == []
    fresh = StalledRule(1e-6, 1e-3, 3, 1e-4)  # without the state the decay is not known
    assert [f.step for record in records[1:] for f in fresh.update(record)] == [4, 4]


def test_adam_at_a_mistyped_learning_rate_everywhere_is_stalled(digits) -> None:  # noqa: ANN001
    """lr 1e-9 for every layer (1e-3 with the exponent mistyped): each layer is stalled, with
    the learning rate named against its weights' size; the evidence recomputed from the
    weights: lr / RMS and the one-step ratios below 1e-6 on steps 2, 3 and 4."""
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=3, width=32, init="kaiming")
    opt = torch.optim.Adam(model.parameters(), lr=1e-9)
    monitor, weights = _train(model, opt, digits, 8, optimizers=opt)
    stalled = {f.layer: f for f in monitor.findings if f.kind == "stalled"}
    layers = ["0", "2", "4", "6"]
    assert sorted(stalled) == layers
    for layer, finding in stalled.items():
        w = torch.cat([weights[4][n].flatten().double() for n in weights[4]
                       if n.rsplit(".", 1)[0] == layer])
        rms = float(w.pow(2).mean().sqrt())
        assert 1e-9 / rms < 1e-6
        assert all(_expected_ratio(weights, step, layer) < 1e-6 for step in (2, 3, 4))
        assert finding.step == 4  # ratios from step 1; lr not rising shown from step 2
        assert finding.value == pytest.approx(_expected_ratio(weights, 4, layer), rel=1e-3)
        assert "too small for weights of this size" in finding.message
        assert finding.remedy == wording.STALLED_TINY_LR


def test_unstable_rule_skips_layers_that_start_from_zero_until_they_settle() -> None:
    rule = UnstableUpdateRule(0.1, 2)
    rule.update(_record(0, [np.nan, np.nan], param_norm=[1.0, 0.0]))  # l1 starts at zero
    found = []
    for step, ratio in enumerate([[0.5, 1.0], [0.5, 0.5], [0.01, 0.05], [0.5, 0.5], [0.5, 0.5]], 1):
        found += [(f.layer, f.step) for f in rule.update(_record(step, ratio))]
    # l0 after two steps above 0.1, not again after one step below (shorter than the
    # patience); l1 only after it once came below (step 3), then two above
    assert found == [("l0", 2), ("l1", 5)]


def test_not_in_optimizer_is_reported_once_and_again_only_after_it_was_fixed() -> None:
    rule = NotInOptimizerRule()
    seen = []
    for step, orphaned in enumerate([{"h": ["weight"]}, {"h": ["weight"]}, None, {}, {"h": ["weight"]}]):
        seen += [(f.layer, f.step) for f in rule.update(_record(step, [1e-3], orphaned=orphaned))]
    assert seen == [("h", 0), ("h", 4)]


class LateHeadModule(pl.LightningModule):
    """Builds its optimizer, then a second head: the classic bug inside Lightning."""

    def __init__(self) -> None:
        super().__init__()
        self.model = LateHead()

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        self.model.head2 = nn.Linear(32, 10)
        return optimizer


def test_lightning_callback_reports_a_module_created_after_configure_optimizers() -> None:
    from graddiag import GradientDiagnostics
    from graddiag.demos.data import DigitsDataModule
    from tests.helpers import quiet_trainer

    pl.seed_everything(0, verbose=False)
    module = LateHeadModule()
    cb = GradientDiagnostics(print_summary=False)
    trainer = quiet_trainer(max_steps=6, callbacks=[cb])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    held = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
    assert [n for n, p in module.named_parameters() if id(p) not in held] == [
        "model.head2.weight", "model.head2.bias"]  # independent check of what is missing
    assert [(f.kind, f.layer, f.step) for f in cb.findings] == [
        ("not_in_optimizer", "model.head2", 0)]


def test_unstable_rule_waits_for_weights_that_start_near_zero_but_not_for_ordinary_ones() -> None:
    rule = UnstableUpdateRule(0.1, 2)
    first = _record(0, [np.nan, np.nan], param_norm=[1e-5, 1.0])
    first.param_count = np.array([100, 100])  # RMS 1e-6 (LayerScale's init) and 0.1 (Kaiming)
    rule.update(first)
    found = [(f.layer, f.step) for step in (1, 2) for f in rule.update(_record(step, [0.5, 0.5]))]
    assert found == [("l1", 2)]


@pytest.mark.parametrize(("deferred", "every"), [(False, 1), (True, 1), (False, 5)])
def test_an_amp_overflow_on_the_copy_step_gives_no_ratio_also_with_a_deferred_read(
    digits, deferred: bool, every: int  # noqa: ANN001
) -> None:
    """``every=5``: no gradient norms are due on the copy step 3, but under a GradScaler it is
    still measured, so that its overflow voids the copy."""
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits
    with GradientMonitor(model, reporters=[], param_every_n_steps=4, early_steps=0,
                         activation_every_n_steps=0, every_n_steps=every) as monitor:
        monitor.deferred_host_read = deferred  # the CUDA path: each record is read a step later
        for step in range(10):
            opt.zero_grad()
            F.cross_entropy(model(x[:32]), y[:32]).backward()
            if step == 3:  # the copy step before parameter step 4: the grad scaler overflows
                model[0].weight.grad[0, 0] = float("inf")
            monitor.step(amp_scale=1024.0)
            if step != 3:  # ... and skips this optimizer step, as GradScaler.step does
                opt.step()
        monitor.flush()
    h = monitor.history
    assert len(h[h.step == 3]) and bool(h[h.step == 3].amp_overflow.all())
    assert len(h[h.step == 4]) and h[h.step == 4].update_ratio.isna().all()  # w_4 == w_3
    assert (h[h.step == 8].update_ratio > 0).all()


@pytest.mark.parametrize("critic_steps", [1, 5])
def test_optimizers_taking_turns_each_get_exact_update_ratios(critic_steps: int) -> None:
    """A GAN in a plain loop numbering every optimizer step (as Lightning's manual optimization
    does): the critic steps ``critic_steps`` times, then the generator once. Each gets update
    ratios on its first step in every parameter window, equal to a float64 recomputation from
    its own previous step's weights."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    critic = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    model = nn.ModuleDict({"G": gen, "D": critic})
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(critic.parameters(), lr=2e-3)
    bce = nn.BCEWithLogitsLoss()
    weights: dict[int, dict[str, torch.Tensor]] = {}
    owner: dict[int, str] = {}
    with GradientMonitor(model, reporters=[], optimizers=[opt_d, opt_g], param_every_n_steps=20,
                         early_steps=0, activation_every_n_steps=0) as monitor:
        step = 0
        while step < 240:
            for who, opt, net in [("D", opt_d, critic)] * critic_steps + [("G", opt_g, gen)]:
                real, fake = torch.randn(32, 2) + 2, gen(torch.randn(32, 4))
                if who == "D":
                    loss = bce(critic(real), torch.ones(32, 1)) + bce(critic(fake.detach()),
                                                                    torch.zeros(32, 1))
                else:
                    loss = bce(critic(fake), torch.ones(32, 1))
                opt.zero_grad()
                loss.backward()
                weights[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
                owner[step] = who
                monitor.step(optimizer=0 if who == "D" else 1, params=net.parameters())
                opt.step()
                step += 1
    h = monitor.history.dropna(subset=["update_ratio"])
    h = h[h.step >= 20]
    for who in ("D", "G"):
        mine = h[h.layer.str.startswith(who)]
        assert sorted(set(mine.step // 20)) == list(range(1, 12))  # every window, both of them
        assert (mine.groupby(mine.step // 20).step.nunique() == 1).all()  # once per window
        for _, row in mine.iterrows():
            t = int(row.step)
            # its first step at or after the window's multiple of 20
            assert t == min(s for s in owner if s >= t // 20 * 20 and owner[s] == who)
            before = max(s for s in owner if s < t and owner[s] == who)  # its own last step
            names = [n for n in weights[t] if n.rsplit(".", 1)[0] == row.layer]
            expected = _layer_ratios([weights[before][n] for n in names],
                                     [weights[t][n] for n in names])
            assert row.update_ratio == pytest.approx(expected, rel=1e-4)


def test_turns_are_not_learned_from_the_gaps_of_a_sparser_cadence() -> None:
    """A generator and a critic one to one with ``every_n_steps=5``: the measured steps are five
    apart because of the cadence, not the turns. The window stays two steps wide: around the
    multiple 40, step 35 (gradients), 40 (gradients and the critic's parameters) and 41 (the
    generator's parameters) are recorded, 38 and 39 only copy, and 42-44 are not measured."""
    torch.manual_seed(0)
    gen, critic = nn.Linear(4, 4), nn.Linear(4, 1)
    model = nn.ModuleDict({"G": gen, "D": critic})
    opts = [torch.optim.SGD(critic.parameters(), lr=0.1), torch.optim.SGD(gen.parameters(), lr=0.1)]
    with GradientMonitor(model, reporters=[], optimizers=opts, every_n_steps=5,
                         param_every_n_steps=20, early_steps=0, activation_every_n_steps=0) as monitor:
        for step in range(60):
            which = step % 2
            opts[which].zero_grad()
            critic(gen(torch.randn(8, 4))).pow(2).mean().backward()
            monitor.step(optimizer=which, params=[critic, gen][which].parameters())
            opts[which].step()
    h = monitor.history
    assert sorted(s for s in h.step.unique() if 35 <= s < 45) == [35, 40, 41]
    ratios = h.dropna(subset=["update_ratio"])
    assert sorted(ratios[ratios.layer == "D"].step.unique()) == [20, 40]
    assert sorted(ratios[ratios.layer == "G"].step.unique()) == [21, 41]


def test_a_learning_rate_too_small_for_the_weights_is_named_when_every_layer_has_it() -> None:
    """Every layer at lr 1e-10 (a typo): both are stalled, the one that reads an exact 0 as
    lagging the other (from the first record), the other on its own learning rate (from the
    second: the first has no earlier one to show it is not rising), and the cause named is the
    learning rate against the weights' size, lr / RMS = 1e-10 / 0.1 = 1e-9 of their norm per
    step, not an optimizer scaling its update down."""
    rule = StalledRule(1e-6, 1e-3, 3, 1e-4)
    found = []
    for step in range(4):
        record = _record(step, [0.0, 1.8e-10], lr=[1e-10, 1e-10], param_norm=[1.0, 1.0])
        record.param_count = np.array([100, 100])  # RMS 1.0 / sqrt(100) = 0.1
        found += rule.update(record)
    assert [(f.layer, f.step) for f in found] == [("l0", 2), ("l1", 3)]
    assert "~1e-09 of their norm" in found[1].message
    assert "too small for weights of this size (RMS 0.1)" in found[0].message
    assert "~1e-09 of their norm" in found[0].message
    assert "scales its update down" not in found[0].message
    assert found[0].remedy.startswith("raise the learning rate (check its exponent")


# ----------------------------------------------------------------------------- next to an explosion
class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 2)


def _set_grads(model: _TwoLayers, a: float, fc: float) -> None:
    """Every gradient element of ``a`` set to ``a``, of ``fc`` to ``fc``."""
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, a if name.startswith("a.") else fc)


def _explode_a(model: _TwoLayers, clip: float | None, steps: int = 6, fc_lr: float = 0.1
               ) -> tuple[GradientMonitor, list[dict[str, torch.Tensor]]]:
    """SGD on hand-set gradients: ``a``'s elements 1e6 (norm ~8.5e6, above ``exploding_abs``
    1e4), ``fc``'s 0.5 (learning rate ``fc_lr``); clipped by the global norm to ``clip`` when
    given."""
    torch.manual_seed(0)
    opt = torch.optim.SGD([{"params": model.a.parameters()},
                           {"params": model.fc.parameters(), "lr": fc_lr}], lr=0.1)
    weights = []
    with GradientMonitor(model, reporters=[], optimizers=opt, param_every_n_steps=1) as monitor:
        for _ in range(steps):
            _set_grads(model, 1e6, 0.5)
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            monitor.step(clip_norm=clip)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return monitor, weights


def test_a_layer_small_or_stalled_only_next_to_an_explosion_under_clipping_says_so() -> None:
    monitor, weights = _explode_a(_TwoLayers(), clip=1.0)
    found = {(f.kind, f.layer): f for f in monitor.findings}
    exploding = found[("exploding", "a")]
    assert exploding.step == 0
    assert exploding.remedy == wording.EXPLODING_WHILE_CLIPPING
    assert "Trainer(gradient_clip_val" not in exploding.remedy  # clipping is already on
    # fc's gradient norm (2.12) is 2.5e-7 x a's: above vanishing_early_rel (1e-8), so vanishing
    # would take vanishing_patience (10) steps; within 6 steps fc is stalled
    total = math.sqrt(72 * 1e12 + 18 * 0.25)
    for step in (1, 2, 3):  # fc moves by lr x 0.5 x (1 / total) per element: ~1e-8 of its norm
        assert _expected_ratio(weights, step, "fc") < 1e-6
    stalled = found[("stalled", "fc")]
    assert stalled.step == 3
    assert f"total gradient norm is {total:.3g}" in stalled.message
    assert "exploding layer 'a'" in stalled.message
    assert "gradient has vanished" not in stalled.message
    assert stalled.remedy.startswith(wording.BEHIND_AN_EXPLOSION + " ('a')")


def test_clipping_by_value_gets_its_own_exploding_remedy() -> None:
    model = _TwoLayers()
    with GradientMonitor(model, reporters=[]) as monitor:
        for _ in range(8):  # early steps (measured in full), then kept ones (judged in a block)
            _set_grads(model, 1e6, 0.5)
            monitor.step(clip_value=0.5)
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)
    exploding = [f for f in monitor.findings if f.kind == "exploding"]
    assert [(f.layer, f.step) for f in exploding] == [("a", 0)]
    assert exploding[0].remedy == wording.EXPLODING_WHILE_CLIPPING_BY_VALUE
    assert "clipping by value is already on" in exploding[0].remedy
    assert "gradient_clip_val" not in exploding[0].remedy
    assert all(r.clip_value == 0.5 and r.clipped is None for r in monitor.records)


@pytest.mark.parametrize(("given", "message"), [
    ({"clip_norm": 0.0}, "clip_norm must be a number > 0.0, got 0.0"),
    ({"clip_value": "1"}, "clip_value must be a number > 0.0, got '1'"),
    ({"clip_value": True}, "clip_value must be a number > 0.0, got True"),
    ({"clip_norm": 1.0, "clip_value": 0.5}, "clip_norm and clip_value must be one of them"),
])
def test_a_bad_clipping_threshold_is_a_clear_error(given: dict[str, object],
                                                   message: str) -> None:
    model = _TwoLayers()
    with GradientMonitor(model, reporters=[]) as monitor:
        _set_grads(model, 0.5, 0.5)
        with pytest.raises(ValueError, match=re.escape(message)):
            monitor.step(**given)  # type: ignore[arg-type]


def test_without_clipping_the_exploding_remedy_suggests_it() -> None:
    monitor, _ = _explode_a(_TwoLayers(), clip=None, steps=2)
    exploding = [f for f in monitor.findings if f.kind == "exploding"]
    assert [(f.layer, f.step) for f in exploding] == [("a", 0)]
    assert exploding[0].remedy == wording.EXPLODING


def test_a_layer_vanishing_only_next_to_an_exploding_one_says_so() -> None:
    """``fc``'s gradient (elements 1e-3) is 5e-10 x the exploding ``a``'s: early vanishing, told
    to treat the explosion first rather than the usual vanishing remedies."""
    model = _TwoLayers()
    with GradientMonitor(model, reporters=[]) as monitor:
        for _ in range(3):
            _set_grads(model, 1e6, 1e-3)
            monitor.step()
    found = {(f.kind, f.layer): f for f in monitor.findings}
    assert set(found) == {("exploding", "a"), ("vanishing", "fc")}
    vanishing = found[("vanishing", "fc")]
    assert "The largest layer, 'a', is itself exploding" in vanishing.message
    assert vanishing.remedy == wording.BEHIND_AN_EXPLOSION + " ('a')"


def test_adam_on_an_exploded_gradient_stalls_and_the_finding_names_the_explosion() -> None:
    """Elements of 1e30: Adam's second moment (g^2 = 1e60) is inf in float32, so ``a``'s update
    is exactly 0 (checked on the weights); the stalled finding blames the explosion, not an
    optimizer scaling an ordinary gradient down."""
    torch.manual_seed(0)
    model = _TwoLayers()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = []
    with GradientMonitor(model, reporters=[], optimizers=opt) as monitor:
        for _ in range(5):
            _set_grads(model, 1e30, 0.5)
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            monitor.step()
            opt.step()
    assert all(_expected_ratio(weights, step, "a") == 0.0 for step in (2, 3))
    stalled = [f for f in monitor.findings if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["a"]
    assert "Its own gradient has exploded" in stalled[0].message
    assert "scales its update down" not in stalled[0].message
    assert stalled[0].remedy == wording.EXPLODING


def test_a_learning_rate_small_for_one_layers_weights_while_others_move_is_not_stalled() -> None:
    """A LayerNorm's weights of 1 at a fine-tuning rate of 5e-7 (lr / RMS = 5e-7, ratio 3e-7)
    next to layers that move by 3e-5: not a mistake, and not reported."""
    rule = StalledRule(1e-6, 1e-3, 3, 1e-4)
    found = []
    for step in range(6):
        record = _record(step, [3e-5, 3e-7, 3e-5], lr=[5e-7] * 3, param_norm=[1.0, 1.0, 1.0])
        record.param_count = np.array([10_000, 1, 10_000])  # RMS 0.01, 1, 0.01
        found += rule.update(record)
    assert found == []


def test_a_learning_rate_gap_stays_the_cause_next_to_an_explosion() -> None:
    """``fc`` at lr 1e-12 against 0.1 for ``a``: stalled for its learning rate, also while ``a``
    explodes under clipping."""
    monitor, _ = _explode_a(_TwoLayers(), clip=1.0, fc_lr=1e-12)
    stalled = [f for f in monitor.findings if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["fc"]
    assert "against 0.1 for other layers" in stalled[0].message
    assert "clipping by the global norm" not in stalled[0].message.lower()
    assert stalled[0].remedy == wording.STALLED_LR


def test_a_gradient_vanished_on_its_own_is_not_blamed_on_an_explosion_elsewhere() -> None:
    """``fc``'s elements at 1e-14 (norm 4.2e-14, below ``vanishing_abs`` 1e-12 on its own) next
    to an exploding ``a``: the usual vanishing explanation, no "treat that explosion first"."""
    model = _TwoLayers()
    with GradientMonitor(model, reporters=[]) as monitor:
        for _ in range(3):
            _set_grads(model, 1e6, 1e-14)
            monitor.step()
    vanishing = [f for f in monitor.findings if f.kind == "vanishing"]
    assert [f.layer for f in vanishing] == ["fc"]
    assert "is itself exploding" not in vanishing[0].message
    assert not vanishing[0].remedy.startswith(wording.BEHIND_AN_EXPLOSION)


def test_a_stalled_layer_whose_gradient_vanished_on_its_own_is_not_blamed_on_clipping() -> None:
    """``fc``'s gradient is exactly 0 next to an exploding ``a`` under clipping: it is stalled
    because its gradient vanished, not because clipping scaled an ordinary gradient down."""
    model = _TwoLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, reporters=[], optimizers=opt, param_every_n_steps=1) as monitor:
        for _ in range(6):
            _set_grads(model, 1e6, 0.0)
            monitor.step(clip_norm=1.0)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    stalled = [f for f in monitor.findings if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["fc"]
    assert "clipping by the global norm" not in stalled[0].message.lower()
    assert "gradient is exactly 0" in stalled[0].message


def test_a_stalled_layer_small_only_next_to_an_unclipped_explosion_says_so() -> None:
    """Without clipping, ``fc``'s gradient (4e-7) is 5e-14 x the exploding ``a``'s: stalled
    because of its small gradient, which is small only next to the explosion; the remedies are
    the explosion's, not a vanishing gradient's."""
    model = _TwoLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, reporters=[], optimizers=opt, param_every_n_steps=1) as monitor:
        for _ in range(6):
            _set_grads(model, 1e6, 1e-7)
            monitor.step()
            opt.step()
    stalled = [f for f in monitor.findings if f.kind == "stalled" and f.layer == "fc"]
    assert len(stalled) == 1
    assert "'a', is itself exploding" in stalled[0].message
    assert stalled[0].remedy.startswith(wording.BEHIND_AN_EXPLOSION + " ('a')")


def test_layers_behind_a_dead_relu_site_are_told_so_not_to_swap_sigmoid_for_relu() -> None:
    """A bias of -100 kills every unit of the second ReLU: the layers before it get a gradient
    of exactly 0. Their ``stalled`` and ``vanishing`` findings name that site and rank the dead
    ReLU remedies first (the net has no sigmoid/tanh to replace)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 2))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with GradientMonitor(model, reporters=[], optimizers=opt, param_every_n_steps=1,
                         activation_every_n_steps=1) as monitor:
        for _ in range(6):
            x = torch.randn(32, 8)
            assert float(model[:4](x).abs().max()) == 0.0  # every unit of site '3' is dead
            loss = F.cross_entropy(model(x), torch.randint(0, 2, (32,)))
            opt.zero_grad()
            loss.backward()
            assert float(model[2].weight.grad.abs().max()) == 0.0
            monitor.step()
            opt.step()
    found = {(f.kind, f.layer): f for f in monitor.findings}
    stalled, vanishing = found[("stalled", "2")], found[("vanishing", "2")]
    assert "has a .grad (all zeros)" in stalled.message
    assert "'3' (100% dead)" in stalled.message and "'3' (100% dead)" in vanishing.message
    assert stalled.remedy.startswith(wording.DEAD_RELU)
    assert vanishing.remedy.startswith(wording.DEAD_RELU)
    assert "instead of sigmoid/tanh" not in stalled.remedy
    assert "the rest comes from the weights' scale" not in vanishing.message


def test_a_stalled_layer_with_no_gradient_anywhere_names_the_site_that_passes_none() -> None:
    """Every gradient of the model is exactly 0 (so there is no largest one to compare with)
    while weight decay still moves the last layer: the stalled first layer's finding names the
    dead ReLU site between it and the loss."""
    from graddiag.data.records import ActivationRecord
    from graddiag.data.tree import ModuleTree
    from graddiag.rules.explain import Explainer

    acts = ActivationRecord(sites=["1"], kinds=["relu"], families=["rectifier"],
                            saturated=np.zeros(1), dead=np.ones(1), gain=np.zeros(1),
                            calls=np.ones(1), position=np.array([0.5]))
    record = StepRecord(3, ["0", "2"], np.zeros(2), np.ones(2, dtype=bool), missing={},
                        nonfinite={}, update_ratio=np.array([1e-9, 1e-3]), activations=acts)
    explainer = Explainer(ModuleTree(("", "0", "1", "2"), "Sequential"))
    explainer.observe(record)
    (found,) = StalledRule(1e-6, 1e-3, 1, 1e-4).update(record)
    stalled = explainer.explain(found, record)
    assert found.layer == "0" and "exactly 0" in found.message
    assert "Sites passing no gradient on the way: '1' (100% dead)" in stalled.message


@pytest.mark.parametrize(
    ("lrs", "base", "expected"),
    [
        ([3e-8] * 5, 3e-4, []),  # a warm-up stepped per epoch: far below its starting rate
        ([1e-8] * 5, 1e-6, []),  # decayed before the monitor started: below the starting rate
        ([0.6e-10, 0.8e-10, 1e-10, 1e-10, 1e-10, 1e-10], 1e-10, [("l0", 5), ("l1", 5)]),  # a
        # typo's warm-up: judged once the rate stops rising, on steps 3-5 (OneCycle starts at
        # its initial_lr, so above it alone says nothing)
        ([1e-10] * 5, float("nan"), [("l0", 3), ("l1", 3)]),  # no scheduler: as before
        ([4e-10, 5e-10, 6e-10, 7e-10, 8e-10], 4e-10, []),  # OneCycleLR rising from its start
    ],
    ids=["per-epoch-warm-up", "decayed-before", "typo-warming-up", "no-scheduler", "one-cycle"],
)
def test_a_schedulers_starting_rate_tells_a_warm_up_or_decay_from_a_mistake(
        lrs: list[float], base: float, expected: list[tuple[str, int]]) -> None:
    """Weights of RMS 0.1 (norm 1, 100 elements); ``base`` is the param groups' ``initial_lr``."""
    rule = StalledRule(1e-6, 1e-3, 3, 1e-4)
    found = []
    for step, lr in enumerate(lrs):
        record = _record(step, [1e-9] * 2, lr=[lr] * 2, param_norm=[1.0, 1.0])
        record.param_count = np.array([100, 100])
        record.base_learning_rate = np.array([base] * 2)
        found += [(f.layer, f.step) for f in rule.update(record)]
    assert found == expected


def test_adam_under_a_warm_up_stepped_per_epoch_is_not_stalled_within_the_epoch(
        digits) -> None:  # noqa: ANN001
    """Adam at 3e-4 with ``LinearLR(start_factor=1e-4)`` not stepped within the epoch: lr 3e-8
    on every step (lr / RMS < 1e-6, checked on the weights), and no finding: the scheduler's
    starting rate shows it is a warm-up. The same rate with no scheduler is a mistake."""
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=3, width=32, init="kaiming")
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-4, total_iters=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-8)
    monitor, weights = _train(model, opt, digits, 8, optimizers=opt)
    rms = min(float(w.double().pow(2).mean().sqrt()) for n, w in weights[4].items()
              if n.endswith("weight"))
    assert 3e-8 / rms < 1e-6
    assert [f for f in monitor.findings if f.kind == "stalled"] == []
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=3, width=32, init="kaiming")
    opt = torch.optim.Adam(model.parameters(), lr=3e-8)
    monitor, _ = _train(model, opt, digits, 8, optimizers=opt)
    assert {f.layer for f in monitor.findings if f.kind == "stalled"} == {"0", "2", "4", "6"}



@pytest.mark.parametrize(("ratio", "norm_type", "along", "cause_kind"), [
    (1e-7, 2.0, True, "gradient_step"),  # exactly lr x gradient / weights: plain SGD
    (5e-7, 2.0, True, "gradient_step"),  # five times that: SGD with momentum
    (0.51e-7, 2.0, True, "gradient_step"),  # at the band's lower edge
    (0.49e-7, 2.0, True, "optimizer"),  # just below it: the optimizer scaled the step down
    (1e-9, 2.0, True, "optimizer"),  # a hundredth of it
    (1e-7, 1.0, True, "optimizer"),  # gradient 1-norms: not comparable with the update's 2-norm
    (1e-7, 2.0, False, "optimizer"),  # an adaptive optimizer (Adam): the band says nothing
    (1e-7, 2.0, None, "optimizer"),  # not known whether the optimizer follows the gradient
])
def test_a_stalled_layer_moved_by_a_plain_gradient_step_is_told_apart(
        ratio: float, norm_type: float, along: bool | None, cause_kind: str) -> None:
    """Layer l1: learning rate 1e-3, gradient norm 0.01 (1e-2 x the largest: not vanished),
    weight norm 100 over 100 elements, so one plain gradient step moves it by 1e-3 x 0.01 / 100
    = 1e-7 of its norm."""
    rule = StalledRule(1e-6, 1e-3, 3, 1e-4, norm_type=norm_type)
    found = []
    for step in range(3):
        record = _record(step, [1e-3, ratio, 1e-3], lr=[1e-3] * 3,
                         param_norm=[1.0, 100.0, 1.0], grad=[1.0, 0.01, 1.0])
        record.param_count = np.array([100, 100, 100])
        record.along_gradient = None if along is None else np.array([along] * 3)
        found += rule.update(record)
    assert [f.layer for f in found] == ["l1"]
    assert found[0].details["cause_kind"] == cause_kind
    if cause_kind == "gradient_step":
        assert "weight norm = 1e-07)" in found[0].message
        assert found[0].remedy == wording.STALLED_GRADIENT_STEP
    else:
        assert "scales its update down" in found[0].message


def test_an_optimizers_list_with_a_bad_element_names_its_position() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"a list of them, got NoneType at position 1$"):
        GradientMonitor(model, optimizers=[optimizer, None])  # type: ignore[list-item]


@pytest.mark.parametrize(("optimizer", "cause_kind"), [
    (torch.optim.SGD, "gradient_step"), (torch.optim.Adam, "optimizer")])
def test_an_update_near_one_gradient_step_is_blamed_on_the_gradient_only_under_sgd(
        optimizer: type[torch.optim.Optimizer], cause_kind: str) -> None:
    """Layer 1's weights (RMS 200) get a gradient of +-0.02 per element whose sign flips every
    step; layer 0's (RMS 0.1) a steady 1. Under SGD (lr 1e-3) layer 1 moves by lr x gradient:
    1e-7 of its norm, exactly one plain gradient step. Adam divides each step by the gradient's
    running size, and its momentum cancels on a flipping sign: m/sqrt(v) -> 0.1 / 1.9 = 0.053,
    so it moves by about 0.06 x lr / RMS = 3e-7, three plain gradient steps, inside the band
    too, yet the gradient's size has nothing to do with it: the cause is the optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[1].weight.fill_(200.0)
    opt = optimizer(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, optimizers=opt, param_every_n_steps=1,
                              activation_every_n_steps=0, reporters=[])
    ratios = []
    for step in range(30):
        model[0].weight.grad = torch.ones(10, 10)
        model[1].weight.grad = torch.full((10, 10), 0.02 * (-1) ** step)
        before = model[1].weight.detach().clone()
        monitor.step(step)
        opt.step()
        # the update over one plain gradient step (lr x gradient norm / weight norm), by hand
        change = float((model[1].weight.detach() - before).norm() / before.norm())
        ratios.append(change / (1e-3 * 0.2 / float(before.norm())))
    monitor.close()
    assert all(0.5 <= r <= 20 for r in ratios[10:])  # inside the band under both optimizers
    stalled = [f for f in monitor.findings if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["1"]
    assert stalled[0].details["cause_kind"] == cause_kind
    assert ("as SGD takes" in stalled[0].message) == (optimizer is torch.optim.SGD)


class _Wrapper(torch.optim.Optimizer):
    """A wrapper that holds the optimizer doing the steps as ``.optimizer`` and forwards its
    param groups, as Hugging Face Accelerate's ``AcceleratedOptimizer`` does."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    def step(self, closure=None):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        return self.optimizer.step(closure)


class _ScaledSGD(torch.optim.SGD):
    """A subclass of SGD, which may rescale its steps (LARS-like): not known to follow the
    gradient."""


def test_a_layer_steps_along_its_gradient_only_where_every_optimizer_holding_it_is_sgd() -> None:
    model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(6)))
    sgd = torch.optim.SGD([*model[0].parameters(), model[1].weight, *model[2].parameters()],
                          lr=0.1, momentum=0.9)
    adam = torch.optim.Adam([model[1].bias, *model[2].parameters()], lr=1e-3)
    wrapped = _Wrapper(torch.optim.SGD(model[4].parameters(), lr=0.1))
    scaled = _ScaledSGD(model[5].parameters(), lr=0.1)
    monitor = GradientMonitor(model, optimizers=[sgd, adam, wrapped, scaled], reporters=[])
    model(torch.randn(2, 3)).sum().backward()
    monitor.step(0)
    monitor.close()
    # 0: SGD only; 1: split between SGD and Adam; 2: held by both; 3: by none; 4: SGD behind a
    # wrapper; 5: a subclass of SGD
    assert monitor.records[0].along_gradient.tolist() == [True, False, False, False, True, False]


class _ScaledMiddle(nn.Module):
    """Three linear layers, each followed by a LayerNorm, and a head; ``fc2``'s weights are
    multiplied by ``scale`` (a scale applied twice, a checkpoint in other units)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc1, self.n1 = nn.Linear(20, 64), nn.LayerNorm(64)
        self.fc2, self.n2 = nn.Linear(64, 64), nn.LayerNorm(64)
        self.fc3, self.n3 = nn.Linear(64, 64), nn.LayerNorm(64)
        self.head = nn.Linear(64, 5)
        with torch.no_grad():
            self.fc2.weight.mul_(scale)
            self.fc2.bias.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.n1(self.fc1(x)))
        x = F.relu(self.n2(self.fc2(x)))
        return self.head(F.relu(self.n3(self.fc3(x))))


@pytest.mark.parametrize(("optimizer", "lr", "scale"), [
    (torch.optim.SGD, 0.05, 1e4), (torch.optim.Adam, 1e-3, 1e5)])
def test_a_layer_stalled_by_weights_of_another_scale_is_told_so(
        optimizer: type[torch.optim.Optimizer], lr: float, scale: float) -> None:
    """``fc2``'s weights, thousands of times the other layers' (RMS from the weights here),
    stall under SGD and Adam alike: the cause named is their scale, not the learning rate or a
    vanished gradient, and the remedy points at how they were initialised or loaded."""
    torch.manual_seed(0)
    model = _ScaledMiddle(scale)
    opt = optimizer(model.parameters(), lr=lr)
    x_all = torch.randn(1024, 20)
    y_all = (x_all[:, :5] * torch.randn(5)).argmax(1)
    monitor = GradientMonitor(model, optimizers=opt, reporters=[])
    rms: dict[int, dict[str, float]] = {}
    for step in range(8):
        rms[step] = {name: float(torch.cat([p.detach().double().reshape(-1)
                                            for p in module.parameters()]).square().mean().sqrt())
                     for name, module in model.named_children()}
        idx = torch.randint(0, 1024, (64,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        monitor.step(step)
        opt.step()
    monitor.close()
    stalled = [f for f in monitor.findings if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["fc2"]
    finding = stalled[0]
    assert finding.details["cause_kind"] == "weight_scale"
    assert finding.remedy == wording.STALLED_WEIGHT_SCALE
    seen = rms[finding.step]
    others = sorted(v for k, v in seen.items() if k != "fc2")
    expected = seen["fc2"] / float(np.median(others))
    assert expected > 1000
    assert finding.details["weight_scale"] == pytest.approx(expected, rel=1e-3)
