"""Evidence early: front-loaded activation statistics, and vanishing confirmed early when overwhelming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from graddiag import GradientDiagnostics, GradientMonitor
from graddiag.data.records import StepRecord
from graddiag.data.schedule import Schedule
from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import DeepMLP, build_mlp
from graddiag.rules.gradient import VanishingRule

PATHOLOGIES = {
    "dead_relu": dict(depth=4, width=32, activation="relu", init="kaiming", bias_init=-3.0),
    "saturated": dict(depth=4, width=64, activation="sigmoid", init="normal", init_std=8.0),
}


def _fraction(kind: str, output: torch.Tensor) -> float:
    """The statistic recomputed from the activation's output, in float64."""
    out = output.detach().double()
    if kind == "dead_relu":  # units silent (derivative 0) for every sample of the batch
        return (out <= 0).all(dim=0).double().mean().item()
    return (out * (1 - out) < 0.01).double().mean().item()  # sigmoid derivative below the floor


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(PATHOLOGIES))
@pytest.mark.parametrize("early_steps", [5, 0])
def test_a_thirty_step_lightning_run_with_defaults_is_flagged(
    kind: str, early_steps: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = DeepMLP(**PATHOLOGIES[kind])  # type: ignore[arg-type]
    site = model.net[1]
    seen: list[float] = []  # our own reading of every training forward, in step order
    site.register_forward_hook(
        lambda m, a, out: seen.append(_fraction(kind, out)) if m.training else None)
    cb = GradientDiagnostics(early_steps=early_steps, print_summary=False)
    trainer = pl.Trainer(max_steps=30, callbacks=[cb], default_root_dir=tmp_path,
                         accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False)  # sanity check and validation stay on
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert trainer.num_sanity_val_steps > 0 and trainer.num_val_batches[0] > 0  # they ran
    assert trainer.global_step == 30 and len(seen) == 30
    acts = cb.activation_history
    found = [f for f in cb.findings if f.kind == kind]
    if early_steps == 0:  # the old schedule: one activation step (0) in 30 steps, no finding
        assert sorted(acts.step.unique()) == [0] and found == []
        return
    assert sorted(acts.step.unique()) == [0, 1, 2, 3, 4]  # validation never recorded
    column = "dead_fraction" if kind == "dead_relu" else "saturated_fraction"
    mine = acts[acts.site == "net.1"].sort_values("step")[column].to_numpy()
    np.testing.assert_allclose(mine, seen[:5], rtol=1e-6)
    assert found and found[0].layer == "net.1" and found[0].step == 1
    threshold = 0.7 if kind == "dead_relu" else 0.5
    assert min(seen[:2]) > threshold


def _layer_grad_norms(model: nn.Sequential) -> dict[str, float]:
    norms = {}
    for name, module in model.named_children():
        params = [p for p in module.parameters(recurse=False)]
        if params:
            norms[name] = torch.cat([p.grad.double().flatten() for p in params]).norm().item()
    return norms


def test_deep_sigmoid_vanishing_is_reported_at_step_one_where_overwhelming(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=12, width=32, activation="sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits
    ratios = []  # per step: each layer's gradient norm over the largest, recomputed in float64
    with GradientMonitor(model, reporters=[], optimizers=opt) as monitor:
        for step in range(12):
            batch = slice(32 * step, 32 * step + 32)
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            norms = _layer_grad_norms(model)
            top = max(norms.values())
            ratios.append({k: v / top for k, v in norms.items()})
            monitor.step()
            opt.step()
    early = {k for k in ratios[0] if ratios[0][k] < 1e-8 and ratios[1][k] < 1e-8}
    assert "0" in early
    vanishing = [f for f in monitor.findings if f.kind == "vanishing"]
    at_one = {f.layer for f in vanishing if f.step == 1}
    assert at_one == early  # the overwhelming ones at step 1, after two recorded steps
    assert all(f.details["early"] for f in vanishing if f.step == 1)
    assert "Reported early" in vanishing[0].message
    patient = {k for k in ratios[0] if k not in early and all(r[k] < 1e-4 for r in ratios[:10])}
    assert patient  # the rest: far below, but not overwhelmingly; after the full patience
    assert {f.layer for f in vanishing if f.step == 9} == patient
    assert len({f.layer for f in vanishing}) == len(vanishing)  # each reported once


def _norms(step: int, values: list[float]) -> StepRecord:
    n = len(values)
    return StepRecord(step=step, layers=[f"l{i}" for i in range(n)], grad_norm=np.array(values),
                      has_grad=np.ones(n, dtype=bool))


def test_early_report_is_made_once_and_again_only_after_the_condition_ended() -> None:
    rule = VanishingRule(1e-12, 1e-4, patience=10, early_rel=1e-8, early_patience=2)
    sequence = [[1e-10, 1.0]] * 2 + [[1e-6, 1.0]] * 12 + [[1e-10, 1.0]] * 3 + [[1.0, 1.0]] \
        + [[1e-10, 1.0]] * 2 + [[1.0, 1.0]] * 10 + [[1e-10, 1.0]] * 2
    reported = []
    for step, values in enumerate(sequence):
        if step == 8:  # a resume in the middle keeps what was said
            state = rule.state_dict()
            rule = VanishingRule(1e-12, 1e-4, patience=10, early_rel=1e-8, early_patience=2)
            rule.load_state_dict(state)
        reported += [(f.step, f.details["early"]) for f in rule.update(_norms(step, values))]
    # early at step 1; the condition lasts (1e-6 < 1e-4) to step 16, so no second report at
    # step 9; gone at step 17 alone (fewer steps than the patience), it is the same condition
    # at steps 18-19; gone for 10 steps (20-29), it begins anew, overwhelming at step 31
    assert reported == [(1, True), (31, True)]


def test_zero_gradient_on_the_first_step_alone_is_not_an_early_report() -> None:
    """Zero-initialised next layers (LoRA B, zero-init residual branches) give 0 on step 0 only."""
    rule = VanishingRule(1e-12, 1e-4, patience=10, early_rel=1e-8, early_patience=2)
    found = [f for step, values in enumerate([[0.0, 1.0], [1e-3, 1.0], [1e-2, 1.0]])
             for f in rule.update(_norms(step, values))]
    assert found == []


def test_schedule_front_loads_parameters_and_activations_then_keeps_the_cadence() -> None:
    schedule = Schedule(gradients=5, parameters=50, activations=50, histograms=0, early=3)
    steps = range(0, 151)
    assert [s for s in steps if schedule.records_activations(s)] == [0, 1, 2, 50, 100, 150]
    assert [s for s in steps if schedule.records_parameters(s)] == [0, 1, 2, 50, 100, 150]
    # the weights are copied on the step before each parameter step (two optimizers: two before)
    assert [s for s in steps if schedule.copies_parameters(s)] == [0, 1, 49, 99, 149]
    assert [s for s in steps if schedule.copies_parameters(s, lookahead=2)] == \
        [0, 1, 48, 49, 98, 99, 148, 149]
    recorded = [s for s in steps if schedule.records(s)]
    assert recorded == sorted({*range(0, 151, 5), 1, 2, 49, 99, 149})
    assert [s for s in steps if Schedule(1, 0, 0, 0, early=3).records_parameters(s)] == []  # off


class NaiveSchedule:
    """The schedule's definitions, step by step (the oracle for :class:`Schedule`)."""

    def __init__(self, gradients: int, parameters: int, activations: int, histograms: int,
                 early: int, lookahead: int, start: int = 0) -> None:
        self.gradients, self.parameters, self.activations = gradients, parameters, activations
        self.histograms, self.early, self.lookahead = histograms, early, lookahead
        self.start = start

    def front(self, step: int) -> bool:
        """One of the first ``early`` steps from the monitor's first step."""
        return self.start <= step < self.start + self.early

    def window_starts(self, step: int) -> bool:
        """Every front-loaded step, then every multiple of the cadence."""
        return bool(self.parameters) and (self.front(step) or step % self.parameters == 0)

    def parameter_step(self, step: int) -> bool:
        """Some optimizer may read its parameters: front-loaded, or within ``lookahead``
        steps from a multiple of the cadence (each optimizer taking turns reads on its first
        step there)."""
        return bool(self.parameters) and (self.front(step) or any(
            s % self.parameters == 0 for s in range(max(0, step - self.lookahead + 1), step + 1)))

    def reads_more(self, step: int) -> bool:
        """Parameter statistics, activations or histograms read on the host."""
        return (self.parameter_step(step)
                or bool(self.activations and (self.front(step) or step % self.activations == 0))
                or bool(self.histograms and step % self.histograms == 0))

    def copies(self, step: int) -> bool:
        """A parameter step among the next ``lookahead`` needs the weights of this one."""
        return any(self.window_starts(s) for s in range(step + 1, step + self.lookahead + 1))

    def records(self, step: int) -> bool:
        return step % self.gradients == 0 or self.reads_more(step) or self.copies(step)

    def keeps(self, step: int) -> bool:
        # never the monitor's first step; steps before it (a rollback) are kept as any other
        return (step % self.gradients == 0 and step != self.start and not self.front(step)
                and not self.reads_more(step))

    def copies_only(self, step: int) -> bool:
        return step % self.gradients != 0 and not self.reads_more(step) and self.copies(step)


CADENCES = [(1, 50, 50, 0, 5, 1), (10, 50, 50, 0, 5, 1), (10, 50, 0, 0, 0, 3), (7, 0, 3, 4, 2, 1),
            (10, 0, 0, 0, 0, 1), (4, 6, 0, 9, 0, 2), (2, 7, 3, 4, 0, 2), (3, 10, 0, 6, 12, 3)]


@pytest.mark.parametrize("start", [0, 137])  # a run from scratch; a monitor joining at 137
@pytest.mark.parametrize("cadences", CADENCES)
def test_measured_steps_follow_the_cadences(cadences: tuple[int, ...], start: int) -> None:
    schedule, naive = Schedule(*cadences[:5], start=start), NaiveSchedule(*cadences, start)
    lookahead, steps = cadences[5], range(start + 400)  # steps before the start follow cadence
    assert [schedule.records(s, lookahead) for s in steps] == [naive.records(s) for s in steps]
    assert [schedule.copies_parameters(s, lookahead) for s in steps] == \
        [naive.copies(s) for s in steps]


@pytest.mark.parametrize("start", [0, 137])
@pytest.mark.parametrize("cadences", CADENCES)
def test_kept_and_copy_only_steps_follow_the_cadences(cadences: tuple[int, ...],
                                                      start: int) -> None:
    schedule, naive = Schedule(*cadences[:5], start=start), NaiveSchedule(*cadences, start)
    lookahead, steps = cadences[5], range(start + 400)
    assert [schedule.keeps(s, lookahead) for s in steps] == [naive.keeps(s) for s in steps]
    assert [schedule.copies_only(s, lookahead) for s in steps] == \
        [naive.copies_only(s) for s in steps]
    # where parameters are on, some copy step is kept or copies only (not measured in full)
    if cadences[1]:
        assert any(naive.copies(s) and (naive.keeps(s) or naive.copies_only(s)) for s in steps)


def _resume_with_diagnostics(tmp_path: Path, with_state: bool) -> tuple[list[float], Any]:
    """A saturated-sigmoid DeepMLP trained 40 steps (with or without graddiag), checkpointed,
    then resumed with graddiag's defaults to step 50. Returns our own reading of the site's
    saturated fraction on every resumed training forward, and the resumed callback."""
    torch.manual_seed(0)
    model = DeepMLP(**PATHOLOGIES["saturated"])  # type: ignore[arg-type]
    first = [GradientDiagnostics(print_summary=False)] if with_state else []
    trainer = pl.Trainer(max_steps=40, callbacks=first, default_root_dir=tmp_path / "a",
                         accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, logger=False)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    checkpoint = tmp_path / "step40.ckpt"
    trainer.save_checkpoint(checkpoint)
    seen: list[float] = []
    model.net[1].register_forward_hook(
        lambda m, a, out: seen.append(_fraction("saturated", out)) if m.training else None)
    cb = GradientDiagnostics(print_summary=False)
    resumed = pl.Trainer(max_steps=50, callbacks=[cb], default_root_dir=tmp_path / "b",
                         accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, logger=False)
    resumed.fit(model, DigitsDataModule(batch_size=64), ckpt_path=checkpoint)
    assert resumed.global_step == 50 and len(seen) == 10
    return seen, cb


def test_a_run_resumed_without_graddiag_state_front_loads_from_its_first_step(
        tmp_path: Path) -> None:
    """Attached to a run resumed from a checkpoint made without it, graddiag's first five
    steps (40-44) carry activation and parameter statistics, so the saturated sigmoid is found
    at step 41 instead of at the next multiple of 50."""
    seen, cb = _resume_with_diagnostics(tmp_path, with_state=False)
    acts = cb.activation_history
    assert sorted(acts.step.unique()) == [40, 41, 42, 43, 44]
    mine = acts[acts.site == "net.1"].sort_values("step")["saturated_fraction"].to_numpy()
    np.testing.assert_allclose(mine, seen[:5], rtol=1e-6)
    assert min(seen[:2]) > 0.5
    found = [(f.kind, f.layer, f.step) for f in cb.findings if f.kind == "saturated"]
    assert ("saturated", "net.1", 41) in found and {step for _, _, step in found} == {41}
    params = cb.history.dropna(subset=["param_norm"])
    assert sorted(params.step.unique()) == [40, 41, 42, 43, 44]


def test_a_run_resumed_with_graddiag_state_does_not_front_load_again(tmp_path: Path) -> None:
    """Resumed with its own state, the run's front-loaded steps were at its start: steps 40-49
    read no activation statistics (the next activation step is 50)."""
    _, cb = _resume_with_diagnostics(tmp_path, with_state=True)
    acts = cb.activation_history
    assert sorted(acts.step.unique()) == [0, 1, 2, 3, 4]  # the first run's, restored
    assert cb.monitor is not None and cb.monitor.state_dict()["first_step"] == 0


def test_a_loop_monitor_front_loads_from_the_first_step_it_is_given() -> None:
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=3, width=16, activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, reporters=[], optimizers=opt, watch=None) as monitor:
        for step in range(1000, 1012):
            with monitor.watch_activations(step):
                loss = model(torch.randn(32, 64)).square().mean()
            opt.zero_grad()
            loss.backward()
            monitor.step(step)
            opt.step()
        state = monitor.state_dict()
    records = {r.step: r for r in monitor.records}
    assert sorted(records) == list(range(1000, 1012))
    assert [s for s, r in records.items() if r.activations is not None] == list(range(1000, 1005))
    assert [s for s, r in records.items() if r.param_norm is not None] == list(range(1000, 1005))
    # the update ratio spans one optimizer step: from the copy taken on the step before
    assert [s for s, r in records.items() if r.update_ratio is not None] == \
        list(range(1001, 1005))
    assert state["first_step"] == 1000
    restored = GradientMonitor(build_mlp(64, 10, depth=3, width=16, activation="tanh"),
                               reporters=[], every_n_steps=10)
    assert restored.measures(1013)  # asked before the state is loaded: 1013 would be its first
    restored.load_state_dict(state)
    assert restored.schedule.start == 1000 and not restored.schedule.records_activations(1012)
    assert not restored.measures(1013)  # the restored start: 1013 is an ordinary step now
    # steps before the start (a run rolled back past it) follow the cadence only
    assert [s for s in range(20) if restored.schedule.records_activations(s)] == [0]
    assert [s for s in range(20) if restored.measures(s)] == [0, 10]
    restored.close()
    fresh = GradientMonitor(build_mlp(64, 10, depth=3, width=16, activation="tanh"),
                            reporters=[])
    fresh.load_state_dict(fresh.state_dict())  # a state saved before any step: start to come
    assert fresh.state_dict()["first_step"] is None and fresh.measures(70)
    assert fresh.schedule.start == 70 and fresh.schedule.records_activations(74)
    fresh.close()
    # a monitor that has begun, given the state of one that saw no step: starts anew
    unstarted = GradientMonitor(build_mlp(64, 10, depth=3, width=16, activation="tanh"),
                                reporters=[]).state_dict()
    begun = GradientMonitor(build_mlp(64, 10, depth=3, width=16, activation="tanh"),
                            reporters=[])
    assert begun.measures(5) and begun.first_step == 5
    begun.load_state_dict(unstarted)
    assert begun.first_step is None
    assert begun.measures(300) and begun.first_step == 300 and begun.schedule.records_activations(304)
    begun.close()
