"""When a monitor watches activations: the forward passes of its model's entry point (``forward``,
or ``training_step`` in Lightning) that belong to an activation step, and nothing else."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch import nn

from graddiag.data.options import MonitorConfig
from graddiag.data.schedule import Schedule
from graddiag.measure.activations import ActivationRegistry
from graddiag.measure.activations.entry import WatchedEntry, watch_entry
from graddiag.measure.activations.packing import ActivationPack
from graddiag.measure.activations.steps import ActivationSteps
from graddiag.measure.ranks import RankReducer


class ActivationScope:
    """The activation statistics of one monitor, and the wrapper that scopes their watch.

    Args:
        model: The monitored module.
        config: The monitor's settings.
        schedule: Which steps are activation steps.
        registry: Activation types and functions to analyse.
        reducer: Ranks to agree with, if any.
        compiled: The model's compiled parts (any turns the statistics off).
        watch: The method of ``model`` whose calls are watched, or ``None``.
    """

    def __init__(self, model: nn.Module, config: MonitorConfig, schedule: Schedule,
                 registry: ActivationRegistry, reducer: RankReducer | None,
                 compiled: Sequence[str], watch: str | None) -> None:
        self.upcoming: int | None = 0  # the step forward passes belong to (None: watch nothing)
        self.steps: ActivationSteps | None = None
        if config.activation_every_n_steps:
            self.steps = ActivationSteps(
                model, registry, schedule.records_activations,
                derivative_floor=config.derivative_floor,
                functional=config.functional_activations, reducer=reducer, compiled=compiled)
        self._running = model if watch == "forward" else None
        self.entry: WatchedEntry | None = None
        if watch is not None and self.steps is not None and self.steps.enabled:
            self.entry = watch_entry(model, watch, self._open)

    def _open(self) -> AbstractContextManager[None] | None:
        steps, step = self.steps, self.upcoming
        if steps is None or step is None or not steps.enabled or not steps.due(step):
            return None  # not an activation step: the call runs unwrapped
        return steps.watching(step, self._running)

    def watching(self, step: int | None = None) -> AbstractContextManager[None]:
        """The watch for forward passes of ``step`` (default: the upcoming one)."""
        step = self.upcoming if step is None else int(step)
        if self.steps is None or step is None:
            return nullcontext()
        return self.steps.watching(step)

    def take(self, step: int) -> ActivationPack | None:
        return self.steps.take(step) if self.steps is not None else None

    @contextmanager
    def unwatched(self) -> Iterator[None]:
        """Forward passes inside count for no step (a replay adds nothing to the statistics)."""
        upcoming, self.upcoming = self.upcoming, None
        try:
            yield
        finally:
            self.upcoming = upcoming

    def pause(self) -> None:
        if self.steps is not None:
            self.steps.pause()

    def resume(self) -> None:
        if self.steps is not None:
            self.steps.resume()

    def close(self) -> None:
        if self.entry is not None:
            self.entry.remove()
        if self.steps is not None:
            self.steps.close()
        self.steps = None
