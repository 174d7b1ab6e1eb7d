"""Replaying a Lightning step: the batches of the current optimizer step and ``training_step``.

The callback keeps a reference to each batch of the optimizer step being accumulated (no copy)
and the random state at its start (a 5 KB copy of torch's CPU generator state, about a
microsecond). Only when a ``nonfinite`` finding begins are they used: ``training_step`` runs
again on each batch, inside the precision plugin's context (autocast) and with
``self.log``/``self.log_dict`` silenced, straight on the LightningModule (not through the
DDP wrapper, whose gradient hooks must not fire).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

from graddiag.data.replay import ReplayOutcome, combine_rank_outcomes
from graddiag.lightning.strategy import StrategyReducer
from graddiag.measure.replay import (
    ReplayPlan,
    ReplayRun,
    ReplayUnavailable,
    RngState,
    communicating_module,
)

_SILENCED = ("log", "log_dict")


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """``module.log``/``module.log_dict`` do nothing inside (a replay logs no metrics)."""
    own = {name: module.__dict__[name] for name in _SILENCED if name in module.__dict__}
    for name in _SILENCED:
        object.__setattr__(module, name, _ignore)
    try:
        yield
    finally:
        for name in _SILENCED:
            if name in own:
                object.__setattr__(module, name, own[name])
            else:
                object.__delattr__(module, name)


def batch_tensor_names(batch: Any, prefix: str = "batch", depth: int = 0) -> dict[int, str]:
    """``id(tensor) -> "batch[0]"`` / ``"batch['x']"`` for the tensors of a batch."""
    if isinstance(batch, torch.Tensor):
        return {id(batch): prefix}
    names: dict[int, str] = {}
    if depth >= 3:
        return names
    if isinstance(batch, (list, tuple)):
        for i, item in enumerate(batch):
            names.update(batch_tensor_names(item, f"{prefix}[{i}]", depth + 1))
    elif isinstance(batch, dict):
        for key, item in batch.items():
            names.update(batch_tensor_names(item, f"{prefix}[{key!r}]", depth + 1))
    return names


class LightningStepReplay(ReplayPlan):
    """The batches of the current optimizer step, ready to be replayed through ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        self._kept: deque[tuple[Any, int, RngState]] = deque(maxlen=1)
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    def keep(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
             batch_idx: int) -> None:
        """Remember a batch about to be trained on (a reference) and the random state now."""
        window = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        if self._kept.maxlen != window:
            self._kept = deque(self._kept, maxlen=window)
        self._trainer, self._module = trainer, module
        self._kept.append((batch, batch_idx, RngState.capture()))

    def clear(self) -> None:
        """Forget the batches (after the optimizer step they belonged to)."""
        self._kept.clear()

    def runs(self) -> list[ReplayRun]:
        module, trainer = self._module, self._trainer
        if module is None or trainer is None or not self._kept:
            raise ReplayUnavailable("no_batch")
        if not module.automatic_optimization:
            raise ReplayUnavailable("manual_optimization")
        if is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True):
            raise ReplayUnavailable("dataloader_iter")
        if trainer.world_size > 1:
            talking = communicating_module(module)
            if talking is not None:
                raise ReplayUnavailable("communicating_model", talking)
        with_index = is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)
        return [
            ReplayRun(partial(self._training_step, module, batch, batch_idx, with_index), rng,
                      inputs=batch_tensor_names(batch))
            for batch, batch_idx, rng in self._kept
        ]

    @staticmethod
    def _training_step(module: pl.LightningModule, batch: Any, batch_idx: int,
                       with_index: bool) -> Any:
        with silenced_logging(module):
            if with_index:
                return module.training_step(batch, batch_idx)
            return module.training_step(batch)

    def forward_context(self) -> AbstractContextManager[Any]:
        assert self._trainer is not None
        return self._trainer.precision_plugin.train_step_context()

    def share(self, outcome: ReplayOutcome) -> ReplayOutcome:
        """Every rank's outcome to every rank, combined the same way on all of them.

        Called on every rank at the same onset (gradients are averaged across ranks, so every
        rank's rules see the same non-finite gradient on the same step): one object gather
        through ``trainer.strategy``, issued by all ranks together.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return outcome
        gathered = StrategyReducer(trainer.strategy).all_gather_object(outcome.to_dict())
        return combine_rank_outcomes([ReplayOutcome.from_dict(d) for d in gathered])
