"""What a training loop tells a monitor between steps: which forward passes to watch for
activation statistics, and which optimizers train the model."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from graddiag.data.schedule import Schedule
from graddiag.measure.updates import UpdateTracker, as_optimizers
from graddiag.pipeline.activation_scope import ActivationScope


class WatchControls:
    """The monitor's watch controls (its :class:`ActivationScope` and :class:`UpdateTracker`)."""

    _activations: ActivationScope
    _updates: UpdateTracker
    _closed: bool
    _begun: bool
    schedule: Schedule

    def _begin(self, step: int) -> None:
        """Take ``step`` as this monitor's first (unless it has seen one, or restored a state):
        its front-loaded steps (``early_steps``) count from there."""
        if not self._begun:
            self._begun = True
            self.schedule.start = step

    @property
    def first_step(self) -> int | None:
        """The first step this monitor saw (its front-loaded steps count from there), or
        ``None`` before it has seen one."""
        return self.schedule.start if self._begun else None

    def _restore_start(self, first: int | None) -> None:
        """The first step of the run a saved state belongs to (its front-loaded steps are
        behind it); ``None``: that monitor saw no step, so the next one seen is the first."""
        self._begun = first is not None
        if first is not None:
            self.schedule.start = first

    def watch_activations(self, step: int | None = None) -> AbstractContextManager[None]:
        """A context in which forward passes count for ``step``'s activation statistics (default:
        the upcoming step); a no-op context off activation steps. For loops that scope it
        themselves (``watch=None``)."""
        if step is not None:
            self._begin(int(step))
        return nullcontext() if self._closed else self._activations.watching(step)

    def expect_step(self, step: int | None) -> None:
        """Forward passes from now on belong to optimizer step ``step`` (``None``: to no step, so
        none is watched until the next :meth:`step` or call of this)."""
        if step is not None:
            self._begin(int(step))
        self._activations.upcoming = None if step is None else int(step)

    def pause_activations(self) -> None:
        """Leave the watch during a backward pass inside the watched call (manual optimization)."""
        self._activations.pause()

    def resume_activations(self) -> None:
        """Watch again after :meth:`pause_activations`."""
        self._activations.resume()

    def watch_optimizers(
        self, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
    ) -> None:
        """The optimizer(s) training the model, for learning rates and ``not_in_optimizer``."""
        self._updates.watch(as_optimizers(optimizers))
