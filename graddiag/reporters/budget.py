"""When an expensive, periodic artefact (the gradient-flow figure) may be drawn."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Default interval of the gradient-flow figure, in steps, when none is given.
DEFAULT_FIGURE_EVERY = 500
#: Without an explicit interval, figures take at most this share of the wall time (0.25 %).
FIGURE_TIME_SHARE = 0.0025
class TimeBudget:
    """Lets a periodic task run on multiples of ``every_n_steps`` while the time it has taken,
    the run about to start included, stays within ``share`` of the wall time since the first
    step; otherwise the task waits for a later multiple.

    The run about to start is assumed to cost what the last one did (before the first one,
    :attr:`first_cost`, which the caller sets). A figure costs tenths of a second to seconds of Matplotlib: every 500
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
        #: Seconds assumed for the task before it ran once.
        self.first_cost = 0.0

    def due(self, step: int) -> bool:
        """Whether the task should run at ``step`` (call on every step: the first call starts
        the clock)."""
        if self._started is None:
            self._started = self.clock()
        if not self.every_n_steps or step % self.every_n_steps:
            return False
        if self.share is None:
            return True
        cost = self.first_cost if self._last is None else self._last
        return self._spent + cost <= self.share * (self.clock() - self._started)

    def spent(self, started: float) -> None:
        """Note that the task ran from ``started`` (a :attr:`clock` time) until now."""
        self._last = self.clock() - started
        self._spent += self._last
