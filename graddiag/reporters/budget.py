"""When an expensive, periodic artefact (the gradient-flow figure) may be drawn."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Default interval of the gradient-flow figure, in steps, when none is given.
DEFAULT_FIGURE_EVERY = 500
#: Without an explicit interval, figures take at most this share of the wall time (0.25 %).
FIGURE_TIME_SHARE = 0.0025


class TimeBudget:
    """Lets a periodic task run every ``every_n_steps`` steps, postponed (to a later multiple
    of the interval) while it would take more than ``share`` of the wall time.

    A figure costs tenths of a second to seconds of Matplotlib. Every 500 steps that is under
    1 % of a 100 ms step, but several percent of a 5 ms one; the default share keeps figures
    under 0.25 % of the wall time after the first one, on any hardware (the graddiag tab in
    TensorBoard shows the gradient flow live; the image is a record).

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
        self._earliest = -float("inf")  # clock time before which the task waits

    def due(self, step: int) -> bool:
        """Whether the task should run at ``step``."""
        if not self.every_n_steps or step % self.every_n_steps:
            return False
        return self.share is None or self.clock() >= self._earliest

    def spent(self, started: float) -> None:
        """Note that the task ran from ``started`` (a :attr:`clock` time) until now."""
        now = self.clock()
        if self.share is not None:
            self._earliest = now + (now - started) * (1.0 / self.share - 1.0)
