"""The gradient-flow figure's default schedule keeps its cost under 0.25 % of the wall time."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from graddiag import GradientMonitor
from graddiag.data.records import StepRecord
from graddiag.data.snapshots import StepSnapshot
from graddiag.reporters.budget import TimeBudget
from graddiag.reporters.figures import FlowProfile, first_figure_seconds
from graddiag.reporters.tensorboard import TensorBoardReporter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_runs_on_a_multiple_only_while_the_share_holds_with_the_next_run() -> None:
    clock = Clock()
    budget = TimeBudget(10, share=0.25, clock=clock)
    budget.first_cost = 1.0
    assert not budget.due(0)  # the clock starts: 1 s would be all of 0 s
    clock.now = 3.9
    assert not budget.due(10)  # 1 s > 25 % of 3.9 s
    clock.now = 4.0
    assert not budget.due(11)  # never off the interval
    assert budget.due(20)  # 1 s = 25 % of 4 s
    clock.now = 6.0
    budget.spent(started=4.0)  # it took 2 s: the next is assumed to take 2 s too
    clock.now = 15.9
    assert not budget.due(30)  # 2 + 2 s > 25 % of 15.9 s
    clock.now = 16.0
    assert budget.due(40)


def test_explicit_interval_is_exact_and_zero_never_runs() -> None:
    clock = Clock()
    exact = TimeBudget(5, share=None, clock=clock)
    exact.spent(started=-100.0)
    assert [s for s in range(16) if exact.due(s)] == [0, 5, 10, 15]
    assert not any(TimeBudget(0, clock=clock).due(s) for s in range(10))


def test_reporter_default_keeps_figures_within_a_quarter_percent_of_wall_time() -> None:
    images: list[tuple[int, float]] = []
    clock = Clock()

    class Writer:
        def add_image(self, tag: str, image: np.ndarray, step: int, **kwargs: object) -> None:
            images.append((step, clock.now))

        def __getattr__(self, name: str):  # noqa: ANN204 - every other writer call is a no-op
            return lambda *a, **k: None

    reporter = TensorBoardReporter(Writer(), save_png=False)  # figure_every_n_steps=None
    reporter._figure_budget.clock = clock
    real_figure = reporter._figure

    def slow_figure(*args: object) -> None:
        real_figure(*args)
        clock.now += 2.0  # each figure "takes" 2 s

    reporter._figure = slow_figure  # type: ignore[method-assign]
    layers = ["a", "b"]
    for step in range(70001):
        clock.now += 0.05  # 50 ms steps: a figure every 500 steps would be 8 % of the time
        reporter.report(StepSnapshot(StepRecord(step, layers, np.array([1.0, 2.0]),
                                                np.array([True, True]))))
    steps = [step for step, _ in images]
    # the first figure is assumed to take 0.05 s + 4 ms per layer = 0.058 s: 0.25 % of the
    # 25 s up to step 500 admits it. It took 2 s, so figure k (0-based) waits until
    # 2 s x (k + 1) fits into 0.25 % of the time since the first step.
    assert steps[0] == 500 and all(s % 500 == 0 for s in steps)
    start = 0.05
    for k, (_, now) in enumerate(images[1:], start=1):
        assert 2.0 * (k + 1) <= 0.0025 * (now - start)
        assert 2.0 * (k + 1) > 0.0025 * (now - 500 * 0.05 - start)  # not one multiple later
    # a fourth (8 s in all) fits at step 64,000 (3,206 s, the figures' own 6 s included); a fifth
    # would need 4,000 s, and the run ends at 3,508 s
    assert steps == [500, 32000, 48000, 64000]
    explicit = TensorBoardReporter(Writer(), save_png=False, figure_every_n_steps=500)
    assert explicit._figure_budget.share is None


def test_a_costly_first_figure_waits_until_its_guessed_cost_fits() -> None:
    layers = [f"l{i}" for i in range(100)]  # guessed at 0.05 s + 100 x 4 ms = 0.45 s
    clock = Clock()
    budget = TimeBudget(500, clock=clock)
    budget.first_cost = first_figure_seconds(len(layers))
    first = None
    for step in range(200000):
        clock.now += 0.0021  # 2.1 ms steps
        if budget.due(step):
            first = step
            break
    # 0.45 s is 0.25 % of 180 s, 85,715 steps of 2.1 ms after the first: the next multiple
    assert first == 86000
    # a very wide model is guessed as its 120 labelled rows: 0.05 s + 120 x 4 ms
    assert first_figure_seconds(5000) == first_figure_seconds(120) == 0.05 + 120 * 0.004


class Images:
    """A writer that keeps the steps of its images and ignores every other call."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def add_image(self, tag: str, image: np.ndarray, step: int, **kwargs: object) -> None:
        self.steps.append(step)

    def __getattr__(self, name: str):  # noqa: ANN204
        return lambda *a, **k: None


def _snapshot(step: int) -> StepSnapshot:
    return StepSnapshot(StepRecord(step, ["a", "b"], np.array([1.0, 2.0]), np.array([True, True])))


@pytest.mark.parametrize(("every", "steps", "drawn"), [
    (1, range(6), [1, 2, 3, 4, 5]),  # every step but the first, alone
    (10, range(0, 50, 10), [10, 20, 30, 40]),  # one recorded step between two figures
])
def test_an_explicit_interval_draws_on_every_recorded_multiple(every: int, steps: range,
                                                               drawn: list[int]) -> None:
    writer = Images()
    reporter = TensorBoardReporter(writer, save_png=False, figure_every_n_steps=every)
    for step in steps:
        reporter.report(_snapshot(step))
    assert writer.steps == drawn


def test_the_whole_run_figure_spans_every_step_not_the_thinned_history() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    reporter = TensorBoardReporter(Images(), save_png=False, figure_every_n_steps=0)
    profiles: dict[str, FlowProfile] = {}
    real_figure = reporter._figure

    def keep(profile: FlowProfile, layers, step: int, title: str):  # noqa: ANN001, ANN202
        profiles[title] = profile
        return real_figure(profile, layers, step, title)

    reporter._figure = keep  # type: ignore[method-assign]
    norms: list[float] = []
    monitor = GradientMonitor(model, reporters=[reporter], max_history_rows=40)
    for step in range(300):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        if step in (17, 23):  # a rise and a dip too mild for a finding, thinned out later
            for p in model[0].parameters():
                p.grad.mul_(3.0 if step == 17 else 0.3)
        norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                   for p in model[0].parameters())))
        monitor.step()
        model.zero_grad()
    assert not {17, 23} & set(monitor.history["step"])  # the history no longer holds them
    assert monitor.findings == []
    monitor.close()
    whole = profiles["whole run"]
    assert max(norms) == norms[17] and min(norms) == norms[23]
    assert whole.high[0] == pytest.approx(norms[17], rel=1e-5)
    assert whole.low[0] == pytest.approx(norms[23], rel=1e-5)


def test_the_whole_run_figure_adds_the_history_from_before_a_resume() -> None:
    """After a resume the reporter has seen only the steps since; the kept records from before
    (restored history) still count towards the whole-run figure's extremes."""
    from graddiag.data.snapshots import RunSnapshot

    reporter = TensorBoardReporter(Images(), save_png=False, figure_every_n_steps=0)
    profiles: list[FlowProfile] = []
    real_figure = reporter._figure
    reporter._figure = lambda profile, *a: profiles.append(profile) or real_figure(profile, *a)  # type: ignore[method-assign]
    for step in range(10, 20):
        reporter.report(_snapshot(step))  # norms 1 and 2 on every step it saw
    before = StepRecord(3, ["a", "b"], np.array([100.0, 0.01]), np.array([True, True]))
    seen = [_snapshot(step).record for step in range(10, 20)]
    reporter.finish(RunSnapshot(records=(before, *seen), layers=("a", "b"), findings=(),
                                summary=pd.DataFrame(), last_step=19))
    whole = profiles[-1]
    assert (whole.high.tolist(), whole.low.tolist()) == ([100.0, 2.0], [1.0, 0.01])
