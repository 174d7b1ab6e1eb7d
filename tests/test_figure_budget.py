"""The gradient-flow figure's default schedule keeps its cost under 0.25 % of the wall time."""

from __future__ import annotations

import numpy as np

from graddiag.data.records import StepRecord
from graddiag.data.snapshots import StepSnapshot
from graddiag.reporters.budget import TimeBudget
from graddiag.reporters.tensorboard import TensorBoardReporter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_postpones_to_a_later_multiple_until_the_share_is_met() -> None:
    clock = Clock()
    budget = TimeBudget(10, share=0.01, clock=clock)
    assert [s for s in range(25) if budget.due(s)] == [0, 10, 20]  # nothing spent yet
    assert budget.due(10)
    budget.spent(started=clock.now - 0.5)  # a figure that took 0.5 s, ending now (t = 0)
    # 0.5 s may be 1 % of at most 50 s: the next one waits until 49.5 s after it ended
    clock.now = 49.0
    assert not budget.due(20) and not budget.due(30)
    assert not budget.due(31)  # never off the interval
    clock.now = 49.5
    assert budget.due(40)


def test_explicit_interval_is_exact_and_zero_never_runs() -> None:
    clock = Clock()
    exact = TimeBudget(5, share=None, clock=clock)
    exact.spent(started=-100.0)
    assert [s for s in range(16) if exact.due(s)] == [0, 5, 10, 15]
    assert not any(TimeBudget(0, clock=clock).due(s) for s in range(10))


def test_reporter_default_draws_within_one_percent_of_wall_time() -> None:
    images: list[int] = []

    class Writer:
        def add_image(self, tag: str, image: np.ndarray, step: int, **kwargs: object) -> None:
            images.append(step)

        def __getattr__(self, name: str):  # noqa: ANN204 - every other writer call is a no-op
            return lambda *a, **k: None

    clock = Clock()
    reporter = TensorBoardReporter(Writer(), save_png=False)  # figure_every_n_steps=None
    reporter._figure_budget.clock = clock
    real_figure = reporter._figure

    def slow_figure(*args: object) -> None:
        real_figure(*args)
        clock.now += 2.0  # each figure "takes" 2 s

    reporter._figure = slow_figure  # type: ignore[method-assign]
    layers = ["a", "b"]
    for step in range(30001):
        clock.now += 0.05  # 50 ms steps: a figure every 500 steps would be 8 % of the time
        reporter.report(StepSnapshot(StepRecord(step, layers, np.array([1.0, 2.0]),
                                                np.array([True, True]))))
    assert images[0] == 500
    assert all(s % 500 == 0 for s in images)
    # after the first figure, figures take at most 0.25 % of the time: 1,500 s of steps allow
    # 1.9 more (the second waits 2 s x (1 / 0.0025 - 1) = 798 s after the first ends)
    assert 2 <= len(images) <= 1 + 0.0025 * clock.now / 2.0
    explicit = TensorBoardReporter(Writer(), save_png=False, figure_every_n_steps=500)
    assert explicit._figure_budget.share is None
