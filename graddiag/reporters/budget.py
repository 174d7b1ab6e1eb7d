"""When an expensive, periodic artefact (the gradient-flow figure) may be drawn."""

from __future__ import annotations

import time
from collections.abc import Callable

from graddiag.reporters.figures import MAX_LABELLED_ROWS

#: Default interval of the gradient-flow figure, in steps, when none is given.
DEFAULT_FIGURE_EVERY = 500
#: Without an explicit interval, figures take at most this share of the wall time (0.25 %).
FIGURE_TIME_SHARE = 0.0025
#: The cost assumed for the first figure, before one was drawn: a fixed part and a part per
#: labelled row (at most ``MAX_LABELLED_ROWS`` of them). Drawn on an idle 2-core x86-64 CPU:
#: 21 layers 0.08 s, 98 layers 0.36 s, both under the guess; a busier or slower machine can
#: take longer, and then the first figure overshoots the share once.
FIRST_FIGURE_SECONDS = 0.05
FIRST_FIGURE_SECONDS_PER_ROW = 0.004


def first_figure_seconds(layers: int) -> float:
    """The cost assumed for the first gradient-flow figure of ``layers`` layers (at most
    0.05 s + 120 labelled rows x 4 ms = 0.53 s)."""
    return FIRST_FIGURE_SECONDS + FIRST_FIGURE_SECONDS_PER_ROW * min(layers, MAX_LABELLED_ROWS)


class TimeBudget:
    """Lets a periodic task run on multiples of ``every_n_steps`` while the time it has taken,
    the run about to start included, stays within ``share`` of the wall time since the first
    step; otherwise the task waits for a later multiple.

    The run about to start is assumed to cost what the last one did (before the first one, what
    the caller guesses). A figure costs tenths of a second to seconds of Matplotlib: every 500
    steps that is under 1 % of a 100 ms step, but several percent of a 5 ms one. The default
    share keeps figures within 0.25 % of the wall time throughout a run, on any hardware, as
    long as each costs about what the one before did (the first about what was guessed); one
    costlier than that overshoots once and delays the next (the graddiag tab in TensorBoard
    shows the gradient flow live; the image is a record).

    Args:
        every_n_steps: The interval in steps (0: never).
        share: Largest fraction of wall time the task may take (``None``: no limit, run on every
            multiple of the interval).
        clock: Seconds, monotonic (injectable for tests).
    """

    def __init__(self, every_n_steps: int, share: float | None = FIGURE_TIME_SHARE,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.every_n_steps = every_n_steps
        self.share = share
        self.clock = clock
        self._started: float | None = None  # the first step's time
        self._spent = 0.0  # seconds the task has taken
        self._last: float | None = None  # seconds its last run took

    def due(self, step: int, first_cost: float = 0.0) -> bool:
        """Whether the task should run at ``step`` (call on every step: the first call starts
        the clock). ``first_cost``: the seconds assumed for the task before it ran once."""
        if self._started is None:
            self._started = self.clock()
        if not self.every_n_steps or step % self.every_n_steps:
            return False
        if self.share is None:
            return True
        cost = first_cost if self._last is None else self._last
        return self._spent + cost <= self.share * (self.clock() - self._started)

    def spent(self, started: float) -> None:
        """Note that the task ran from ``started`` (a :attr:`clock` time) until now."""
        self._last = self.clock() - started
        self._spent += self._last
