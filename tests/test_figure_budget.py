"""The gradient-flow figure's default schedule keeps its cost under 0.25 % of the wall time."""

from __future__ import annotations

import numpy as np

from graddiag.data.records import StepRecord
from graddiag.data.snapshots import StepSnapshot
from graddiag.reporters.budget import TimeBudget, first_figure_seconds
from graddiag.reporters.tensorboard import TensorBoardReporter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_runs_on_a_multiple_only_while_the_share_holds_with_the_next_run() -> None:
    clock = Clock()
    budget = TimeBudget(10, share=0.25, clock=clock)
    assert not budget.due(0, first_cost=1.0)  # the clock starts: 1 s would be all of 0 s
    clock.now = 3.9
    assert not budget.due(10, first_cost=1.0)  # 1 s > 25 % of 3.9 s
    clock.now = 4.0
    assert not budget.due(11, first_cost=1.0)  # never off the interval
    assert budget.due(20, first_cost=1.0)  # 1 s = 25 % of 4 s
    clock.now = 6.0
    budget.spent(started=4.0)  # it took 2 s: the next is assumed to take 2 s too
    clock.now = 15.9
    assert not budget.due(30, first_cost=1.0)  # 2 + 2 s > 25 % of 15.9 s
    clock.now = 16.0
    assert budget.due(40, first_cost=1.0)


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
    first = None
    for step in range(200000):
        clock.now += 0.0021  # 2.1 ms steps
        if budget.due(step, first_figure_seconds(len(layers))):
            first = step
            break
    # 0.45 s is 0.25 % of 180 s, 85,715 steps of 2.1 ms after the first: the next multiple
    assert first == 86000
    # a very wide model is guessed as its 120 labelled rows: 0.05 s + 120 x 4 ms
    assert first_figure_seconds(5000) == first_figure_seconds(120) == 0.05 + 120 * 0.004
