"""Plain recorded steps judged in blocks (``evaluate_every_n_records``): the same numbers and
findings as judging every step on itself, later; anything that decides on its own step still
does; nothing is copied or synchronised on a kept step."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graddiag import GradientMonitor
from graddiag.measure import transfer
from graddiag.pipeline import monitor as monitor_module
from tests.helpers import SyncCounter


class Mixed(nn.Module):
    """float32 layers, one float64 layer (a second kernel group) and a top-level parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.inp = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16).double()
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x * self.scale))
        h = torch.tanh(self.mid(h.double())).float()
        return self.out(h)


def _reference(model: nn.Module, p: float) -> dict[str, float]:
    """Each module's p-norm over the gradient elements it owns directly, in float64."""
    norms = {}
    for name, module in model.named_modules():
        grads = [q.grad.detach().double().flatten() for q in module.parameters(recurse=False)
                 if q.grad is not None]
        if grads:
            norms[name or type(model).__name__] = float(
                torch.linalg.vector_norm(torch.cat(grads), ord=p))
    return norms


def _run(steps: int, *, seed: int = 0, before: Callable[[nn.Module, int], None] | None = None,
         after: Callable[[nn.Module, int], None] | None = None, optimizer_step: bool = True,
         deferred: bool | None = None,
         **options: object) -> tuple[GradientMonitor, list, list[dict[str, float]]]:
    """Train ``Mixed`` for ``steps`` steps; returns the closed monitor, each step's report and
    the float64 reference norms taken right before ``monitor.step()``. ``deferred=True``: the
    host read is deferred, as on a GPU (kept steps are then sent to the host a block at a
    time)."""
    torch.manual_seed(seed)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"reporters": [], "activation_every_n_steps": 0, "param_every_n_steps": 0,
               "early_steps": 0, **options}
    p = float(options.get("norm_type", 2.0))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    reports, references = [], []
    with GradientMonitor(model, **options) as monitor:  # type: ignore[arg-type]
        monitor.deferred_host_read = deferred
        for step in range(steps):
            if before is not None:
                before(model, step)
            opt.zero_grad(set_to_none=True)
            x = torch.randn(32, 6, generator=g)
            torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
            if after is not None:
                after(model, step)
            references.append(_reference(model, p))
            report = monitor.step()
            reports.append(report)
            if optimizer_step and not report.should_skip:
                opt.step()
    return monitor, reports, references


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_kept_steps_hold_each_layers_norm(norm_type: float) -> None:
    monitor, reports, references = _run(13, norm_type=norm_type, evaluate_every_n_records=4)
    # step 0 (learning rates and coverage are read there) is measured in full; the kept steps
    # report no record, and every fourth one is judged with the three before it
    assert [r.record is not None for r in reports] == [s % 4 == 0 for s in range(13)]
    assert all(r.recorded for r in reports)
    records = monitor.records
    assert [r.step for r in records] == list(range(13))  # closing judged the last one
    layers = records[0].layers
    assert set(layers) == {"Mixed", "inp", "mid", "out"}
    for record in records:
        for name, value in zip(record.layers, record.grad_norm):
            assert value == pytest.approx(references[record.step][name], rel=1e-5)
        assert record.has_grad.all() and not record.missing and not record.nonfinite


def _vanish_then_explode(model: nn.Module, step: int) -> None:
    """Shrink the middle layer's gradient on steps 12-29, blow up the first's on 40-44."""
    if 12 <= step < 30:
        for q in model.mid.parameters():  # type: ignore[union-attr]
            q.grad.mul_(1e-9)
    if 40 <= step < 45:
        for q in model.inp.parameters():  # type: ignore[union-attr]
            q.grad.mul_(1e5)


@pytest.mark.parametrize("deferred", [None, True])
def test_blocks_find_what_judging_every_step_finds(deferred: bool | None) -> None:
    every, _, _ = _run(60, after=_vanish_then_explode, optimizer_step=False,
                       evaluate_every_n_records=1)
    blocks, reports, _ = _run(60, after=_vanish_then_explode, optimizer_step=False,
                              evaluate_every_n_records=8, deferred=deferred)
    found = [(f.kind, f.layer, f.step) for f in every.findings]
    # 1e-9 of the others: reported after vanishing_early_patience (2) steps; exploding at once
    assert ("vanishing", "mid", 13) in found and ("exploding", "inp", 40) in found
    assert [(f.kind, f.layer, f.step, f.message) for f in blocks.findings] == \
        [(f.kind, f.layer, f.step, f.message) for f in every.findings]
    a, b = every.history, blocks.history
    assert len(a) == len(b) == 60 * 4
    np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-5)
    # a finding arrives in the report of the step that judges its block (steps 9-16): its
    # last step, or the step after it when the block travels to the host in one copy
    judged = 17 if deferred else 16
    vanishing = next(f for f in blocks.findings if f.kind == "vanishing")
    assert vanishing in reports[judged].findings
    assert not any(r.findings for r in reports[9:judged])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_sent_blocks_travel_in_one_copy_each_and_hold_each_layers_norm(
        norm_type: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred host read (a GPU's default) keeps plain steps without reading anything on
    the step; a full block is copied to the host at once and judged on the next step."""
    from graddiag.measure import rows

    copies: list[int] = []
    real = rows.HostCopy

    def counted(chunks: list[torch.Tensor], deferred: bool = False) -> object:
        copies.append(len(chunks[0]))
        return real(chunks, deferred)

    monkeypatch.setattr(rows, "HostCopy", counted)
    monitor, reports, references = _run(13, norm_type=norm_type, evaluate_every_n_records=4,
                                         deferred=True)
    assert copies == [4, 4, 4]  # steps 1-4, 5-8, 9-12, each sent when full (read on close)
    # step 0 is measured in full, read on step 1; a block sent on step 4 is judged on step 5
    judged = {s: r.record.step for s, r in enumerate(reports) if r.record is not None}
    assert judged == {1: 0, 5: 4, 9: 8}
    records = monitor.records
    assert [r.step for r in records] == list(range(13))
    for record in records:
        for name, value in zip(record.layers, record.grad_norm):
            assert value == pytest.approx(references[record.step][name], rel=1e-5)
        assert record.has_grad.all() and not record.missing and not record.nonfinite


def test_a_nonfinite_gradient_in_a_sent_block_is_named_a_step_after_the_block() -> None:
    monitor, reports, references = _run(12, after=_nan_at(5), evaluate_every_n_records=8,
                                        deferred=True, optimizer_step=False)
    assert [(f.kind, f.layer, f.step) for f in reports[9].findings] == [("nonfinite", "out", 5)]
    assert not any(r.findings for r in reports[:9])
    record = next(r for r in monitor.records if r.step == 5)
    out = record.layers.index("out")
    assert math.isnan(record.grad_norm[out])
    assert record.nonfinite == {out: {"weight": -1}}  # named; the elements are gone by then
    for other in monitor.records:  # every other step as measured
        if other.step != 5:
            assert not other.nonfinite
            for name, value in zip(other.layers, other.grad_norm):
                assert value == pytest.approx(references[other.step][name], rel=1e-5)


def test_reading_results_judges_the_kept_steps() -> None:
    torch.manual_seed(0)
    model = Mixed()
    monitor = GradientMonitor(model, reporters=[], evaluate_every_n_records=8, early_steps=0,
                              activation_every_n_steps=0, param_every_n_steps=0,
                              vanishing_patience=1)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 6)).sum().backward()
        if step == 2:
            model.mid.weight.grad.zero_()  # type: ignore[union-attr]
            model.mid.bias.grad.zero_()  # type: ignore[union-attr]
        assert (monitor.step().record is None) == (step > 0)  # kept after step 0
    assert monitor._measurement.kept == 2
    assert [(f.kind, f.layer, f.step) for f in monitor.findings] == [("vanishing", "mid", 2)]
    assert monitor._measurement.kept == 0
    assert len(monitor.history) == 3 * 4
    monitor.close()


def test_a_checkpoint_holds_the_kept_steps() -> None:
    torch.manual_seed(0)
    model = Mixed()
    monitor = GradientMonitor(model, reporters=[], evaluate_every_n_records=8, early_steps=0)
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 6)).sum().backward()
        monitor.step()
    restored = GradientMonitor(Mixed(), reporters=[])
    restored.load_state_dict(monitor.state_dict())
    assert sorted(set(restored.history.step)) == [0, 1, 2, 3, 4]
    monitor.close()
    restored.close()


def _nan_at(step_with_nan: int) -> Callable[[nn.Module, int], None]:
    def inject(model: nn.Module, step: int) -> None:
        if step == step_with_nan:
            model.out.weight.grad[0, 0] = float("nan")  # type: ignore[union-attr,index]
    return inject


@pytest.mark.parametrize("action", ["warn", "skip"])
def test_a_nonfinite_gradient_is_decided_on_its_own_step(action: str) -> None:
    monitor, reports, _ = _run(10, after=_nan_at(5), on_nonfinite=action,
                               evaluate_every_n_records=8)
    nan_report = reports[5]
    assert nan_report.record is not None and nan_report.record.step == 5
    assert nan_report.action == ("skip" if action == "skip" else "continue")
    assert [(f.kind, f.layer, f.step) for f in nan_report.findings] == [("nonfinite", "out", 5)]
    # measured in full on the step: the NaN elements are counted, not just named
    assert nan_report.record.nonfinite == {nan_report.record.layers.index("out"): {"weight": 1}}
    assert [r.step for r in monitor.records] == list(range(10))  # kept ones judged first
    assert [r.record is None for r in reports[:5]] == [False] + [True] * 4


@pytest.mark.parametrize("deferred", [None, True])
def test_missing_gradients_in_kept_steps_read_as_on_steps_measured_in_full(
        deferred: bool | None) -> None:
    def drop(model: nn.Module, step: int) -> None:
        if 3 <= step < 7:
            model.out.bias.grad = None  # type: ignore[union-attr]
        if step == 5:
            model.out.weight.grad = None  # type: ignore[union-attr]

    single, _, references = _run(10, after=drop, evaluate_every_n_records=1,
                                 no_gradient_patience=2)
    blocks, reports, _ = _run(10, after=drop, evaluate_every_n_records=8, no_gradient_patience=2,
                              deferred=deferred)
    judged = (1, 9) if deferred else (0, 8)  # step 0 in full (deferred: read on step 1)
    assert [r.record is not None for r in reports] == [s in judged for s in range(10)]
    found = [(f.kind, f.layer, f.step) for f in blocks.findings]
    assert found == [(f.kind, f.layer, f.step) for f in single.findings]
    assert found == [("no_gradient", "out", 4)]
    for a, b in zip(single.records, blocks.records):
        assert b.missing == a.missing
        np.testing.assert_array_equal(b.has_grad, a.has_grad)
        np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-5)  # NaN where no gradient
    out = blocks.records[0].layers.index("out")
    assert blocks.records[3].missing == {out: ["bias"]}
    assert blocks.records[3].grad_norm[out] == pytest.approx(references[3]["out"], rel=1e-5)
    assert blocks.records[5].missing == {out: ["weight", "bias"]}
    assert not blocks.records[5].has_grad[out] and math.isnan(blocks.records[5].grad_norm[out])
    assert blocks.records[7].missing == {} and blocks.records[7].has_grad.all()


def test_steps_that_decide_or_measure_more_are_never_kept() -> None:
    _, reports, _ = _run(6, on_exploding="skip", evaluate_every_n_records=8)
    assert all(r.record is not None for r in reports)  # exploding must be decided each step
    monitor, reports, _ = _run(12, activation_every_n_steps=5, param_every_n_steps=5,
                               early_steps=2, evaluate_every_n_records=8)
    full = [r.step for r in reports if r.record is not None]
    # early steps 0-1, parameter and activation steps 5 and 10; the weight copies before them
    # (steps 4 and 9) are kept: the copy is made on the device, nothing else is read
    assert full == [0, 1, 5, 10]
    records = {r.step: r for r in monitor.records}
    assert records[5].activations is not None and records[5].param_norm is not None
    assert records[7].activations is None and records[7].param_norm is None
    assert [r.step for r in monitor.records] == list(range(12))


def test_a_layout_change_judges_the_kept_steps_of_the_old_layout_first() -> None:
    def unfreeze(model: nn.Module, step: int) -> None:
        if step == 0:
            model.inp.requires_grad_(False)  # type: ignore[union-attr]
        if step == 5:
            model.inp.requires_grad_(True)  # type: ignore[union-attr]

    monitor, reports, references = _run(9, before=unfreeze, evaluate_every_n_records=8)
    records = monitor.records
    assert [r.step for r in records] == list(range(9))
    assert all("inp" not in r.layers for r in records[:5])
    assert all("inp" in r.layers for r in records[5:])
    assert reports[5].record is not None  # the first step of the new layout, in full
    for record in records:
        assert len(record.grad_norm) == len(record.layers)
        for name, value in zip(record.layers, record.grad_norm):
            assert value == pytest.approx(references[record.step][name], rel=1e-5)


@pytest.mark.parametrize("zeroing", ["set_to_none", "zeros", "never"])
def test_a_layer_frozen_between_kept_steps_leaves_the_layers(zeroing: str) -> None:
    """Kept steps read no trainable parameter's flag: a layer frozen at step 6 shows itself by
    its gradient, missing (``set_to_none=True``) or all zero (``set_to_none=False``), and that
    step is measured in full without it; a stale gradient never zeroed is noticed by the
    periodic full check, within ``full_check_every`` (50) recorded steps."""
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=0,
                              param_every_n_steps=0, early_steps=0, evaluate_every_n_records=8)
    reports = []
    for step in range(60):
        if step == 6:
            model.inp.requires_grad_(False)
        if zeroing != "never" or step < 6:
            opt.zero_grad(set_to_none=zeroing != "zeros")
        x = torch.randn(32, 6)
        torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        reports.append(monitor.step())
        opt.step()
    monitor.close()
    with_inp = [r.step for r in monitor.records if "inp" in r.layers]
    if zeroing == "never":  # the stale gradient: noticed by the periodic check at the latest
        assert with_inp == list(range(len(with_inp))) and 6 <= len(with_inp) <= 6 + 50
    else:
        assert with_inp == list(range(6))
        assert reports[6].record is not None  # the first step without it, measured in full
    assert monitor.findings == []  # neither "no_gradient" nor "vanishing" for a frozen layer


def _freeze_run(deferred: bool | None, zeroing: str, frozen: range,
                drop_from: int | None = None) -> GradientMonitor:
    """Mixed trained 16 steps with ``inp`` frozen on the steps in ``frozen``; from step
    ``drop_from`` on, ``out`` gets no gradient while it is trainable."""
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=0,
                              param_every_n_steps=0, early_steps=0, evaluate_every_n_records=8,
                              vanishing_early_patience=1, vanishing_patience=1,
                              no_gradient_patience=1)
    monitor.deferred_host_read = deferred
    g = torch.Generator().manual_seed(0)
    for step in range(16):
        model.inp.requires_grad_(step not in frozen)
        opt.zero_grad(set_to_none=zeroing != "zeros")
        x = torch.randn(32, 6, generator=g)
        torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        if drop_from is not None and step >= drop_from:
            model.out.weight.grad = model.out.bias.grad = None  # type: ignore[union-attr]
        monitor.step()
        opt.step()
    monitor.close()
    return monitor


@pytest.mark.parametrize("zeroing", ["set_to_none", "zeros"])
@pytest.mark.parametrize("frozen", [range(6, 16), range(3, 5)], ids=["frozen", "frozen-unfrozen"])
def test_sent_blocks_follow_freezing_as_steps_read_on_the_step_do(zeroing: str,
                                                                  frozen: range) -> None:
    """Sent rows show nothing on the step, so every flag is compared there: a layer frozen
    (and unfrozen again inside one block, as GAN loops do) leaves the layers on the step it is
    frozen, with no finding, exactly as when every row is read on its step."""
    on_step = _freeze_run(None, zeroing, frozen)
    sent = _freeze_run(True, zeroing, frozen)
    assert [r.step for r in sent.records] == list(range(16))
    for a, b in zip(on_step.records, sent.records, strict=True):
        assert a.layers == b.layers and a.missing == b.missing
        np.testing.assert_array_equal(a.has_grad, b.has_grad)
        np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-6)
    assert [r.step for r in sent.records if "inp" in r.layers] == \
        [s for s in range(16) if s not in frozen]
    assert sent.findings == on_step.findings == []  # no "vanishing" for a frozen layer


def test_a_sent_block_keeps_a_missing_gradient_of_a_layer_frozen_later() -> None:
    """A trainable module without a gradient is ``no_gradient`` even when another layer is
    frozen before its block is read."""
    on_step = _freeze_run(None, "zeros", range(4, 16), drop_from=1)
    sent = _freeze_run(True, "zeros", range(4, 16), drop_from=1)
    found = [(f.kind, f.layer, f.step) for f in sent.findings]
    assert found == [(f.kind, f.layer, f.step) for f in on_step.findings]
    assert found == [("no_gradient", "out", 1)]
    assert all(r.missing for r in sent.records[1:])


def test_the_layout_check_without_every_flag_reads_the_frozen_ones_and_the_periodic_check() -> None:
    from graddiag.measure.layout import LayoutWatcher

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].requires_grad_(False)
    watcher = LayoutWatcher(model, full_check_every=5)
    assert not watcher.changed(all_flags=False)  # call 1
    model[0].requires_grad_(False)  # a trainable parameter frozen: its flag is not read ...
    assert not watcher.changed(all_flags=False)  # call 2
    assert watcher.flags_changed()  # ... unless asked for (and that is no call)
    assert not watcher.changed(all_flags=False) and not watcher.changed(all_flags=False)  # 3, 4
    assert watcher.changed(all_flags=False)  # call 5: the periodic check reads every flag
    watcher.reset()
    model[1].requires_grad_(True)  # a frozen parameter unfrozen: read on every call
    assert watcher.changed(all_flags=False)


def test_a_gradient_missing_every_step_leaves_the_module_walk_to_its_cadence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that never gets a gradient has the flags compared when the set of missing or
    zero gradients changes, not on every kept step, and without counting as a layout check: the
    module walk keeps its cadence (every 50 checks) and a module added at step 26 is found by
    the next walk."""
    from graddiag.measure import layout

    walks: list[int] = []
    real = layout._same
    step_now = [0]
    monkeypatch.setattr(layout, "_same", lambda a, b: walks.append(step_now[0]) or real(a, b))
    compared: list[int] = []
    flags = layout.LayoutWatcher.flags_changed
    monkeypatch.setattr(layout.LayoutWatcher, "flags_changed",
                        lambda self: compared.append(step_now[0]) or flags(self))

    class WithUnused(Mixed):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(3, 3)

    torch.manual_seed(0)
    model = WithUnused()
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=0,
                              param_every_n_steps=0, early_steps=0, evaluate_every_n_records=8,
                              no_gradient_patience=1000)
    for step in range(100):
        step_now[0] = step
        if step == 26:
            model.extra = nn.Linear(6, 6)  # added; it gets gradients from the next forward
        x = torch.randn(32, 6)
        out = model(x) + (model.extra(x).sum() * 0 if step >= 26 else 0)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(out, (x[:, 0] > 0).long()).backward()
        monitor.step()
    monitor.close()
    # step 1: the walk asked for after step 0 found a module without gradient; then the 50th
    # and 100th checks (one per step: a kept step's flag comparisons do not count)
    assert sorted(set(walks)) == [1, 49, 99]
    with_extra = [r.step for r in monitor.records if "extra" in r.layers]
    assert with_extra == list(range(49, 100))  # found by the walk at step 49
    # every flag is compared on step 0 (measured in full), step 1 (the first kept step sees the
    # unused module's gradient missing), step 49 (the 50th check, and the added layer's
    # all-zero gradient) and step 99 (the 100th check): not on the ~95 kept steps whose missing
    # and zero gradients are those of the step before
    assert sorted(set(compared)) == [0, 1, 49, 99]


def test_kept_steps_copy_nothing_and_never_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[int] = []
    real = transfer._copy_to_host
    monkeypatch.setattr(transfer, "_copy_to_host", lambda t: copies.append(1) or real(t))
    torch.manual_seed(0)
    model = Mixed()
    counter = SyncCounter()
    monitor = GradientMonitor(model, reporters=[], early_steps=0, activation_every_n_steps=0,
                              param_every_n_steps=0, evaluate_every_n_records=16)
    kept = 0
    for step in range(13):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 6)).sum().backward()
        if step == 1:
            copies.clear()  # step 0 is measured in full, with its one copy
        with counter:
            kept += monitor.step().record is None
    assert kept == 12
    assert copies == [] and counter.syncs == 0
    monitor.close()
    assert len(monitor.records) == 13


def test_a_slow_step_is_judged_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor_module, "MAX_BLOCK_SECONDS", -1.0)  # every block is "old"
    _, reports, _ = _run(5, evaluate_every_n_records=8)
    assert all(r.record is not None and r.record.step == r.step for r in reports)


def test_the_block_size_is_checked() -> None:
    with pytest.raises(ValueError, match="evaluate_every_n_records"):
        GradientMonitor(Mixed(), evaluate_every_n_records=0)


def test_nothing_to_keep_when_nothing_is_trainable() -> None:
    torch.manual_seed(0)
    backbone, head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 2)
    with GradientMonitor(backbone, reporters=[], early_steps=0) as frozen:
        for _ in range(4):
            head(backbone(torch.randn(3, 4))).sum().backward()
            assert frozen.step().record is not None  # measured (empty), never kept
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with GradientMonitor(model[0], reporters=[], early_steps=0) as monitor:
        for step in range(8):
            if step == 4:
                model[0].requires_grad_(False)  # everything monitored is frozen part-way
            model.zero_grad(set_to_none=True)
            model(torch.randn(3, 4)).sum().backward()
            monitor.step()
    assert [r.step for r in monitor.records] == list(range(8))
    assert [len(r.layers) for r in monitor.records] == [1] * 4 + [0] * 4


def test_a_deferred_read_and_kept_steps_stay_in_step_order() -> None:
    torch.manual_seed(0)
    model = Mixed()
    with GradientMonitor(model, reporters=[], early_steps=0) as monitor:
        for step in range(12):
            monitor.deferred_host_read = True if step == 5 else None
            model.zero_grad(set_to_none=True)
            model(torch.randn(4, 6)).sum().backward()
            monitor.step()
    assert [r.step for r in monitor.records] == list(range(12))


def test_loading_a_state_drops_the_steps_kept_after_it() -> None:
    torch.manual_seed(0)
    model = Mixed()

    def steps(monitor: GradientMonitor, n: int) -> None:
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            model(torch.randn(4, 6)).sum().backward()
            monitor.step()

    with GradientMonitor(model, reporters=[], early_steps=0) as monitor:
        steps(monitor, 3)
        saved = monitor.state_dict()
        steps(monitor, 3)  # steps 3-5, kept
        monitor.load_state_dict(saved)
        steps(monitor, 3)  # steps 3-5 again
    assert [r.step for r in monitor.records] == list(range(6))


def test_an_alarm_names_only_its_own_steps_findings() -> None:
    from graddiag import GradientAlarm

    torch.manual_seed(0)
    model = Mixed()
    monitor = GradientMonitor(model, reporters=[], early_steps=0, on_nonfinite="raise")
    with pytest.raises(GradientAlarm) as raised:
        for step in range(8):
            model.zero_grad(set_to_none=True)
            model(torch.randn(4, 6)).sum().backward()
            if step == 5:
                model.inp.weight.grad.mul_(1e9)  # exploding (warn), on a kept step
            if step == 7:
                model.out.weight.grad[0, 0] = float("nan")
            monitor.step()
    assert [(f.kind, f.step) for f in raised.value.findings] == [("nonfinite", 7)]
    assert [(f.kind, f.layer, f.step) for f in monitor.findings][-2:] == \
        [("exploding", "inp", 5), ("nonfinite", "out", 7)]
    monitor.close()


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[str, ...]]] = []

    def report(self, snapshot: object) -> None:
        self.seen.append((snapshot.record.step,  # type: ignore[attr-defined]
                          tuple(f.kind for f in snapshot.new_findings)))  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def test_reporters_receive_every_kept_step_in_order() -> None:
    recorder = _Recorder()
    _run(20, after=_vanish_then_explode, optimizer_step=False, reporters=[recorder])
    assert [step for step, _ in recorder.seen] == list(range(20))
    assert [(step, kinds) for step, kinds in recorder.seen if kinds] == [(13, ("vanishing",))]


def test_a_block_is_judged_a_second_after_its_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = [0.0, 0.0, 0.4, 0.9, 1.3, 5.0, 5.2, 5.5, 5.9, 6.01]  # the time at each step
    now = [0.0]

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

    def tick(model: nn.Module, step: int) -> None:
        now[0] = seconds[step]

    monkeypatch.setattr(monitor_module, "time", Clock)
    _, reports, _ = _run(10, before=tick, evaluate_every_n_records=8)
    # step 1 starts a block at 0.0; step 4 (1.3 s) judges it; step 5 starts the next at 5.0,
    # step 9 (6.01 s) judges it
    assert [r.step for r in reports if r.record is not None] == [0, 4, 9]


def test_a_module_that_never_gets_a_gradient_does_not_stop_the_blocks() -> None:
    class WithUnused(Mixed):  # e.g. a pooler the head does not use
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(3, 3)

    torch.manual_seed(0)
    model = WithUnused()
    with GradientMonitor(model, reporters=[], early_steps=0) as monitor:
        kept = 0
        for _ in range(20):
            model.zero_grad(set_to_none=True)
            model(torch.randn(4, 6)).sum().backward()
            kept += monitor.step().record is None
    assert kept == 17  # all but step 0 and the two steps that judged full blocks
    found = [(f.kind, f.layer, f.step) for f in monitor.findings]
    assert found == [("no_gradient", "unused", 2)]  # patience 3: steps 0, 1, 2
    unused = monitor.records[0].layers.index("unused")
    assert all(not r.has_grad[unused] and math.isnan(r.grad_norm[unused])
               for r in monitor.records)


def test_a_step_that_cannot_be_kept_is_not_retried_every_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from graddiag.measure.norms import GradientProbe

    tried: list[int] = []
    real = GradientProbe.read_row
    step_now = [0]
    monkeypatch.setattr(GradientProbe, "read_row",
                        lambda self, views: tried.append(step_now[0]) or real(self, views))

    class WithSparse(Mixed):  # a sparse gradient goes the careful way, measured in full
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6, sparse=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x + self.embed(torch.tensor([1, 2, 3, 4])))

    torch.manual_seed(0)
    model = WithSparse()
    with GradientMonitor(model, reporters=[], early_steps=0) as monitor:
        for step in range(40):
            step_now[0] = step
            model.zero_grad(set_to_none=True)
            model(torch.randn(4, 6)).sum().backward()
            assert monitor.step().record is not None  # never kept, measured in full
    assert tried == [1, 3, 7, 15, 31]  # tries after 2, 4, 8, 16 steps
    embed = monitor.records[0].layers.index("embed")
    assert all(r.has_grad[embed] and r.grad_norm[embed] > 0 for r in monitor.records)


class Zoo(nn.Module):
    """float32, bfloat16 and float64 layers, for comparing blocks with single steps."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 12).to(torch.bfloat16)
        self.c = nn.Linear(12, 12).double()
        self.d = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h.bfloat16())).double()
        return self.d(torch.tanh(self.c(h)).float())


@pytest.mark.parametrize("options", [
    {"every_n_steps": 3},
    {"norm_type": 1.0, "clip": 1.0},
    {"two_optimizers": True},
    {"all_params": True},
    {"param_every_n_steps": 7, "activation_every_n_steps": 5, "early_steps": 3},
])
def test_blocks_and_single_steps_agree_on_mixed_dtypes(options: dict) -> None:
    def run(block: int) -> tuple[list, list, int]:
        torch.manual_seed(0)
        model = Zoo()
        first = torch.optim.SGD([*model.a.parameters(), *model.b.parameters()], lr=0.05)
        second = torch.optim.SGD([*model.c.parameters(), *model.d.parameters()], lr=0.05)
        both = torch.optim.SGD(model.parameters(), lr=0.05)
        settings = {k: v for k, v in options.items()
                    if k not in ("clip", "two_optimizers", "all_params")}
        kept = 0
        g = torch.Generator().manual_seed(1)
        with GradientMonitor(model, reporters=[], evaluate_every_n_records=block,
                             **{"activation_every_n_steps": 0, "param_every_n_steps": 0,
                                **settings}) as monitor:
            for step in range(40):
                x = torch.randn(16, 6, generator=g)
                model.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
                if 10 <= step < 20:
                    for q in model.c.parameters():
                        q.grad.mul_(1e-9)
                if options.get("two_optimizers"):
                    for i, opt in enumerate((first, second)):
                        params = [q for group in opt.param_groups for q in group["params"]]
                        monitor.step(2 * step + i, optimizer=i, params=params)
                        opt.step()
                    continue
                every = list(model.parameters()) if options.get("all_params") else None
                kept += monitor.step(clip_norm=options.get("clip"), params=every).record is None
                both.step()
        return monitor.records, [(f.kind, f.layer, f.step) for f in monitor.findings], kept

    (single, found, _), (blocks, found_in_blocks, kept) = run(1), run(8)
    # one optimizer's half of the layers is never kept; otherwise most steps are
    assert kept == 0 if options.get("two_optimizers") else kept > 10
    assert found_in_blocks == found and found  # the vanishing layer at least
    assert [r.step for r in blocks] == [r.step for r in single]
    for a, b in zip(single, blocks):
        assert a.layers == b.layers and a.optimizer == b.optimizer and a.clipped == b.clipped
        np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-5)
        np.testing.assert_array_equal(b.has_grad, a.has_grad)


def test_lightning_judges_kept_steps_before_validation_and_at_epoch_end() -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from graddiag import GradientDiagnostics
    from tests.helpers import quiet_trainer

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))

        def training_step(self, batch: tuple[torch.Tensor, ...], _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: tuple[torch.Tensor, ...], _: int) -> None:
            pass

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    judged_at: list[tuple[str, list[int]]] = []

    class Probe(pl.Callback):  # runs after graddiag's hooks (callbacks run in order)
        def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            records = diagnostics.monitor._history.records  # type: ignore[union-attr]
            judged_at.append(("validation", [r.step for r in records]))

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            records = diagnostics.monitor._history.records  # type: ignore[union-attr]
            judged_at.append(("epoch end", [r.step for r in records]))

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 2, (40,)))
    diagnostics = GradientDiagnostics(print_summary=False, progress_bar=False,
                                      activation_every_n_steps=0, param_every_n_steps=0,
                                      early_steps=0)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=1, callbacks=[diagnostics, Probe()])
    trainer.fit(Module(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    # five steps per epoch (0-4, 5-9): never a full block of 8, all judged at those points
    assert judged_at == [("validation", list(range(5))), ("epoch end", list(range(5))),
                         ("validation", list(range(10))), ("epoch end", list(range(10)))]


def test_a_monitor_dropped_without_close_still_reports_its_waiting_steps() -> None:
    import gc

    from tests.helpers import installed

    recorder = _Recorder()
    torch.manual_seed(0)
    model = Mixed()
    before = installed()

    def train_and_forget() -> None:
        monitor = GradientMonitor(model, reporters=[recorder], early_steps=0)
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            model(torch.randn(4, 6)).sum().backward()
            monitor.step()
        assert [step for step, _ in recorder.seen] == [0]  # steps 1-4 wait for their block

    train_and_forget()
    gc.collect()
    assert [step for step, _ in recorder.seen] == [0, 1, 2, 3, 4]
    assert installed() == before


def _run_script(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter with this checkout on the path; it must exit 0."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_a_script_that_never_closes_its_monitor_still_prints_the_last_findings() -> None:
    script = """
import torch
from torch import nn
from graddiag import GradientMonitor

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
monitor = GradientMonitor(model, early_steps=0, activation_every_n_steps=0)
for step in range(6):
    model.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    if step >= 3:
        model[0].weight.grad.mul_(1e-12)
        model[0].bias.grad.mul_(1e-12)
    monitor.step()
print("trained")
"""
    result = _run_script(script)
    assert "trained" in result.stdout
    # steps 3 and 4 vanish (below 1e-8 of the largest: 2 steps); step 4 waits in its block
    assert "graddiag [vanishing] step 4, layer '0'" in result.stderr


def test_a_script_that_never_closes_its_monitor_or_writer_still_logs_every_step(
        tmp_path: Path) -> None:
    """Neither the monitor nor the ``SummaryWriter`` closed: at exit the waiting steps are
    judged and the reporter flushes them, so every step's scalars reach the event file (the
    writer's own thread would otherwise drop what is still queued). The run is not finished
    for the user: no whole-run figure or summary, which only ``close()`` writes."""
    script = f"""
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from graddiag import GradientMonitor
from graddiag.reporters.tensorboard import TensorBoardReporter

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
writer = SummaryWriter({str(tmp_path)!r}, flush_secs=600)
monitor = GradientMonitor(model, reporters=[TensorBoardReporter(writer, scalars_every_n_steps=1)],
                          early_steps=0, activation_every_n_steps=0)
for step in range(6):
    model.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    monitor.step()
print("trained")
"""
    result = _run_script(script)
    assert "trained" in result.stdout
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0,
                                                              ea.IMAGES: 0})
    acc.Reload()
    steps = [event.step for event in acc.Scalars("graddiag/grad_norm/0")]
    assert steps == list(range(6))  # steps 1-5 waited for their block until the exit
    assert "graddiag/summary/text_summary" not in acc.Tags()["tensors"]
    assert acc.Tags()["images"] == []
    assert not (tmp_path / "gradient_flow.png").exists()


def test_a_monitor_dropped_after_its_writer_was_closed_does_not_reopen_it(tmp_path: Path) -> None:
    """The writer closed first, the monitor never: dropping the monitor judges its waiting
    steps but writes nothing to the closed writer (torch would silently open a second event
    file)."""
    import gc

    from torch.utils.tensorboard import SummaryWriter

    from graddiag.reporters.tensorboard import TensorBoardReporter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    writer = SummaryWriter(str(tmp_path))
    recorder = _Recorder()
    reporter = TensorBoardReporter(writer, scalars_every_n_steps=1)  # every judged step writes
    monitor = GradientMonitor(model, reporters=[reporter, recorder],
                              early_steps=0, activation_every_n_steps=0)
    for _ in range(6):
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        monitor.step()
    writer.close()
    del monitor
    gc.collect()
    assert [step for step, _ in recorder.seen] == list(range(6))  # judged all the same
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert writer.file_writer is None  # still closed


def test_a_forked_child_does_not_judge_its_parents_waiting_steps() -> None:
    script = """
import os, sys
import torch
from torch import nn
from graddiag import GradientMonitor

class Print:
    def report(self, snapshot):
        print(os.getpid(), snapshot.record.step, flush=True)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
monitor = GradientMonitor(model, reporters=[Print()], early_steps=0)
for _ in range(4):
    model.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    monitor.step()
child = os.fork()
if child == 0:
    sys.exit(0)  # a normal exit: exit handlers run in the child
os.waitpid(child, 0)
print("parent", os.getpid(), flush=True)
"""
    result = _run_script(script)
    lines = result.stdout.split()
    parent = lines[lines.index("parent") + 1]
    reported = [(pid, int(step)) for pid, step in zip(lines[::2], lines[1::2])
                if pid != "parent" and step != parent]
    # step 0 on the step, 1-3 at the parent's exit; the child reports nothing
    assert reported == [(parent, 0), (parent, 1), (parent, 2), (parent, 3)]


def test_a_monitor_that_failed_to_start_is_dropped_quietly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    def fail(*args: object) -> None:
        raise RuntimeError("no")

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(monitor_module, "HostReadDeferral", fail)
    with pytest.raises(RuntimeError):
        GradientMonitor(Mixed(), reporters=[])
    gc.collect()
    assert unraisable == []
