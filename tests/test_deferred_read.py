"""Deferred host read (used on CUDA with warn-only actions): the same records and findings one
step later; same-step decisions (skip/stop/raise) never deferred; CPU default unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graddiag import GradientMonitor
from graddiag.measure import transfer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _backward(model: nn.Module, step: int) -> None:
    model.zero_grad()
    g = torch.Generator().manual_seed(step)
    model(torch.randn(16, 4, generator=g)).square().mean().backward()
    if step == 4:  # a NaN in the middle layer's weight gradient
        model[2].weight.grad[0, 0] = float("nan")


def test_deferred_records_and_findings_equal_immediate_ones_one_step_later() -> None:
    model_now, model_later = _model(), _model()  # identical weights, identical batches
    # every step judged on itself, so both read through the same device path
    now = GradientMonitor(model_now, reporters=[], early_steps=0, activation_every_n_steps=3,
                          evaluate_every_n_records=1)
    later = GradientMonitor(model_later, reporters=[], early_steps=0, activation_every_n_steps=3,
                            evaluate_every_n_records=1)
    later.deferred_host_read = True
    steps_reported = []
    for step in range(8):
        _backward(model_now, step)
        _backward(model_later, step)
        assert now.step().step == step
        report = later.step()
        steps_reported.append(report.step if report.recorded else None)
    # activation steps (0, 3, 6) are read on the step: where each site ran needs that step's
    # timing; the others a step later (what was pending is evaluated first)
    assert steps_reported == [0, None, 1, 3, None, 4, 6, None]
    assert len(later.records) == 8  # reading the history evaluates the pending step
    for a, b in zip(now.records, later.records):
        assert a.step == b.step
        np.testing.assert_array_equal(a.grad_norm, b.grad_norm)
        assert (a.activations is None) == (b.activations is None)
        if a.activations is not None:
            np.testing.assert_array_equal(a.activations.saturated, b.activations.saturated)
    assert sum(r.activations is not None for r in later.records) == 3  # steps 0, 3, 6
    # the records hold what torch computes for the layer, in float64
    expected = torch.linalg.vector_norm(torch.cat([model_now[4].weight.grad.flatten(),
                                                   model_now[4].bias.grad.flatten()]).double())
    assert later.records[-1].grad_norm[2] == pytest.approx(expected.item(), rel=1e-6)
    assert [(f.kind, f.layer, f.step) for f in now.findings] == \
        [(f.kind, f.layer, f.step) for f in later.findings] == [("nonfinite", "2", 4)]
    # the element count needs the gradients, which are gone a step later: named, not counted
    assert now.records[4].nonfinite == {1: {"weight": 1}}
    assert later.records[4].nonfinite == {1: {"weight": -1}}
    assert "weight: NaN/Inf" in later.findings[0].message
    now.close()
    later.close()


def test_close_evaluates_the_pending_step() -> None:
    model = _model()
    monitor = GradientMonitor(model, reporters=[], early_steps=0, evaluate_every_n_records=1)
    monitor.deferred_host_read = True
    for step in range(3):
        _backward(model, step)
        monitor.step()
    assert [r.step for r in monitor._history.records] == [0, 1]
    monitor.close()
    assert [r.step for r in monitor._history.records] == [0, 1, 2]


def test_same_step_actions_are_never_deferred() -> None:
    model = _model()
    monitor = GradientMonitor(model, reporters=[], early_steps=0, on_nonfinite="skip")
    monitor.deferred_host_read = True  # asked for, but skip must decide on the step itself
    actions = []
    for step in range(6):
        _backward(model, step)
        actions.append(monitor.step().action)
    assert actions == ["continue"] * 4 + ["skip", "continue"]
    monitor.close()


def test_cpu_default_reads_on_the_step_with_one_copy(monkeypatch) -> None:  # noqa: ANN001
    model = _model()
    monitor = GradientMonitor(model, reporters=[], early_steps=0)
    copies = []
    real = transfer._copy_to_host
    monkeypatch.setattr(transfer, "_copy_to_host", lambda t: copies.append(1) or real(t))
    _backward(model, 0)
    report = monitor.step()
    assert not monitor._deferring()
    assert report.recorded and report.step == 0 and len(monitor._history.records) == 1
    assert copies == [1]
    monitor.close()


def test_a_step_with_a_replay_closure_is_read_on_the_step() -> None:
    model = _model()
    monitor = GradientMonitor(model, reporters=[], early_steps=0)
    monitor.deferred_host_read = True  # asked for, but a replay needs this step's weights
    _backward(model, 0)
    report = monitor.step(replay=lambda: model(torch.randn(16, 4)).square().mean())
    assert report.recorded and report.step == 0
    _backward(model, 1)
    kept = monitor.step()  # without a closure: deferred (kept for its block)
    assert kept.recorded and kept.record is None
    monitor.close()
    assert [r.step for r in monitor._history.records] == [0, 1]
