"""Cross-rank communication, only when it is handed in: a process group or an adapter's reducer."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class RankReducer(Protocol):
    """What graddiag needs from a group of ranks; every rank must call each method together.

    Attributes:
        device: Where tensors handed to :meth:`all_reduce_sum` must live.
    """

    device: torch.device

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON-like data), in rank order, on every rank."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks, on every rank."""
        ...


class ProcessGroupReducer:
    """A :class:`RankReducer` over a ``torch.distributed`` process group.

    Args:
        group: The process group (``None``: the default group).
    """

    def __init__(self, group: Any = None) -> None:
        dist = torch.distributed
        self.group = group
        if dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def all_gather_object(self, obj: Any) -> list[Any]:
        dist = torch.distributed
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return tensor


def as_reducer(process_group: Any) -> RankReducer | None:
    """``None`` stays ``None``; a :class:`RankReducer` is used as is; anything else is taken to be
    a ``torch.distributed`` process group."""
    if process_group is None:
        return None
    if isinstance(process_group, RankReducer):
        return process_group
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()
            and isinstance(process_group, dist.ProcessGroup)):
        raise ValueError(
            "process_group must be None, a RankReducer or a process group of an initialised "
            f"torch.distributed (e.g. torch.distributed.group.WORLD), got {process_group!r}"
        )
    return ProcessGroupReducer(process_group)
