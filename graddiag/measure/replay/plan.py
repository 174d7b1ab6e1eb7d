"""What a replay needs: closures that recompute a step's loss, and what may forbid running them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graddiag.data.replay import ReplayOutcome
from graddiag.measure.replay.state import RngState


class ReplayUnavailable(Exception):
    """Raised by :meth:`ReplayPlan.runs` when the step cannot be replayed, with a reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ReplayRun:
    """One forward pass to re-run.

    Attributes:
        closure: Recomputes the loss of the step (or of one micro-batch) with the current
            weights, e.g. ``lambda: loss_fn(model(x), y)``; returns a tensor, or a dict with a
            ``"loss"`` tensor. It must not call ``backward()`` or step an optimizer.
        rng: The random state the real forward began with (``RngState.capture()`` taken just
            before it); ``None`` runs it with the current state (dropout masks then differ).
        inputs: ``id(tensor) -> name`` of the step's input tensors, to name them in findings.
    """

    closure: Callable[[], Any]
    rng: RngState | None = None
    inputs: dict[int, str] = field(default_factory=dict)


class ReplayPlan:
    """How to replay one optimizer step. The base plan replays the given runs, in order."""

    def __init__(self, runs: list[ReplayRun] | None = None) -> None:
        self._runs = list(runs or [])

    def runs(self) -> list[ReplayRun]:
        """The forward passes of the step; raises :class:`ReplayUnavailable` if there are none."""
        if distributed_world() > 1:
            raise ReplayUnavailable("distributed_closure", str(distributed_world()))
        if not self._runs:
            raise ReplayUnavailable("no_batch")
        return list(self._runs)

    def forward_context(self) -> AbstractContextManager[Any]:
        """The context the real forward ran in (autocast under mixed precision)."""
        return contextlib.nullcontext()

    def share(self, outcome: ReplayOutcome) -> ReplayOutcome:
        """Combine outcomes across ranks (an adapter that owns the process group overrides it)."""
        return outcome


ReplayArgument = Callable[[], Any] | ReplayRun | ReplayPlan | None


def check_replay(replay: ReplayArgument) -> None:
    """Raise ``ValueError`` unless ``replay`` is ``None``, a callable, a ReplayRun or a ReplayPlan."""
    if replay is None or isinstance(replay, (ReplayPlan, ReplayRun)) or callable(replay):
        return
    raise ValueError(
        "replay must be a callable returning the loss (e.g. lambda: loss_fn(model(x), y)), "
        f"a ReplayRun or a ReplayPlan, got {replay!r}"
    )


def as_plan(replay: ReplayArgument) -> ReplayPlan | None:
    """A plan from what a user passed to ``monitor.step(replay=...)``."""
    check_replay(replay)
    if replay is None or isinstance(replay, ReplayPlan):
        return replay
    if isinstance(replay, ReplayRun):
        return ReplayPlan([replay])
    return ReplayPlan([ReplayRun(replay)])


def distributed_world() -> int:
    """The default process group's size (1 when torch.distributed is not in use)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


_COMMUNICATING_CLASSES = ("FullyShardedDataParallel", "FSDPModule", "DistributedDataParallel")


def communicating_module(model: nn.Module) -> str | None:
    """A module whose forward or backward talks to other ranks, described; ``None`` if none.

    A replay runs on every rank that saw the step, but its checks may stop one rank's backward
    early; with such modules that would leave the other ranks waiting in a collective.
    """
    for name, module in model.named_modules():
        label = f"{type(module).__name__} '{name or type(model).__name__}'"
        if isinstance(module, nn.SyncBatchNorm):
            return label
        classes = {c.__name__ for c in type(module).__mro__}
        if classes & set(_COMMUNICATING_CLASSES) or type(module).__module__.startswith("deepspeed"):
            return label
    for name, param in model.named_parameters():
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            return f"sharded parameter '{name}' (DTensor)"
    return None
