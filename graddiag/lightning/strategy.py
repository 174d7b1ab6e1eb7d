"""Talking to the other ranks only through ``trainer.strategy``."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import Strategy

from graddiag.data.policy import ACTIONS_BY_SEVERITY, StepAction, severity


def agree_on_action(strategy: Strategy, action: str) -> StepAction:
    """The most severe action any rank wants (ranks may see different data), in one reduction."""
    rank = torch.tensor([float(severity(action))], device=strategy.root_device)
    agreed = strategy.reduce(rank, reduce_op="max")
    return ACTIONS_BY_SEVERITY[int(agreed.item())]


class StrategyReducer:
    """A :class:`~graddiag.measure.ranks.RankReducer` over a Lightning strategy's ranks.

    Objects travel as JSON bytes through ``strategy.all_gather`` (lengths first, then the bytes
    padded to the longest); sums through ``strategy.reduce(..., reduce_op="sum")``.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.device = strategy.root_device

    def all_gather_object(self, obj: Any) -> list[Any]:
        payload = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8,
                               device=self.device)
        sizes = self.strategy.all_gather(torch.tensor([payload.numel()], device=self.device))
        lengths: list[int] = sizes.reshape(-1).tolist()
        padded = F.pad(payload, (0, max(lengths) - payload.numel()))
        gathered = self.strategy.all_gather(padded).reshape(len(lengths), -1).cpu()
        return [json.loads(bytes(row[:n].tolist()).decode("utf-8"))
                for row, n in zip(gathered, lengths)]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.reduce(tensor.clone(), reduce_op="sum")
