"""Activation statistics of one model across its activation steps: when to watch, and the
hand-over of one step's statistics to that step's measurement."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

from torch import nn

from graddiag.measure.activations.packing import ActivationPack, pack_activations
from graddiag.measure.activations.registry import ActivationRegistry
from graddiag.measure.activations.watch import ActivationWatch
from graddiag.measure.ranks import RankReducer

log = logging.getLogger("graddiag")


class ActivationSteps:
    """The watch of one model, opened only for forward passes that belong to activation steps.

    Statistics are tagged with the step whose forward passes produced them; a step's measurement
    takes them once (a second optimizer on the same step finds nothing), and statistics of a step
    that is never measured are dropped.

    Args:
        root: The monitored module.
        registry: Activation types and functions to analyse.
        due: Whether a step is an activation step.
        derivative_floor: Local derivative below which a unit passes almost no gradient.
        functional: Also intercept functional activations and graph-cutting operations.
        reducer: Ranks to agree with; then every rank must measure the same activation steps.
        compiled: The model's parts compiled with ``torch.compile`` (see
            :func:`~graddiag.measure.compiled.compiled_parts`); any turns the statistics off,
            with one warning.
    """

    def __init__(self, root: nn.Module, registry: ActivationRegistry, due: Callable[[int], bool],
                 *, derivative_floor: float, functional: bool,
                 reducer: RankReducer | None = None, compiled: Sequence[str] = ()) -> None:
        self.due = due
        self.reducer = reducer
        self.enabled = not compiled
        if compiled:
            log.warning(
                "graddiag: activation statistics are off because %s is compiled with "
                "torch.compile: watching its activations would force recompilation. Gradient "
                "norms and every gradient finding stay on; to get saturated/dead_relu findings, "
                "run a few steps uncompiled.", ", ".join(repr(c) for c in compiled),
            )
        self.watch = ActivationWatch(root, registry, derivative_floor=derivative_floor,
                                     functional=functional)
        self._watched: int | None = None  # the step the collected statistics belong to
        self._taken: int | None = None

    def watching(self, step: int, running: nn.Module | None = None
                 ) -> AbstractContextManager[None]:
        """The context for a forward pass of ``step`` (a no-op one off activation steps);
        ``running``: the module whose ``forward`` it sits in, if any."""
        if not self.enabled or not self.due(step):
            return nullcontext()
        if self._watched != step:
            self.watch.discard()
            self._watched = step
        return self.watch.watching(running)

    def take(self, step: int) -> ActivationPack | None:
        """The statistics of ``step`` laid out for its host copy, once per step."""
        if not self.enabled or not self.due(step) or self._taken == step:
            return None
        self._taken = step
        if self._watched == step:
            sites, cut_ops = self.watch.take()
        else:
            self.watch.discard()
            sites, cut_ops = [], {}
        self._watched = None
        return pack_activations(sites, cut_ops, self.reducer)

    def pause(self) -> None:
        self.watch.pause()

    def resume(self) -> None:
        self.watch.resume()

    def close(self) -> None:
        self.watch.discard()
        self.enabled = False
