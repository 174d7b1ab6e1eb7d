"""Two CPU ranks (gloo) whose forward passes run different activation sites, and a different
number of them, under plain ``GradientMonitor(process_group=...)``; then a monitor on rank 0 only,
without a process group, which must not communicate at all.

    python tests/distributed/run_sites.py OUT_DIR

Each rank writes ``sites{R}.json``: its activation history. Used by tests/test_distributed.py,
which recomputes the expected statistics from both ranks' batches itself.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from graddiag import GradientMonitor

STEPS = 3


class Branchy(nn.Module):
    """Rank 0 runs sites shared_act, only0.1, varying; rank 1 runs shared_act, only1.1,
    Branchy:relu, varying (``varying`` sees 2 units on rank 0, 3 on rank 1); both run
    ``reused`` three times on 2 units each: units that fire, units dead on rank 0 only (alive
    once pooled), and one unit dead on both ranks next to one that fires (its worst position:
    0.5)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 6)
        self.shared_act = nn.Sigmoid()
        self.only0 = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.only1 = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 2)
        self.varying = nn.ReLU()
        self.reused = nn.ReLU()
        self.rank = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared_act(self.shared(x))
        h = self.only0(h) if self.rank == 0 else torch.relu(self.only1(h))
        v = self.varying(x[:, : 2 + self.rank])
        return self.head(h).sum() + v.sum() + sum(self.reused(z).sum() for z in reused_inputs(
            x, self.rank))


def reused_inputs(x: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """The inputs of ``Branchy.reused``'s three calls on ``rank``."""
    dead_on_rank0 = x[:, 2:4] if rank == 1 else -x[:, 2:4].abs() - 1.0
    half = torch.stack([-x[:, 0].abs() - 1.0, x[:, 1].abs() + 1.0], 1)
    return [x[:, :2], dead_on_rank0, half]


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * step + rank)) * 3


def table(monitor: GradientMonitor) -> list[list[object]]:
    """The activation history's rows, each with the record's dead fraction of every call
    position of the site (``None`` for a position without units)."""
    acts = monitor.activation_history
    columns = ["step", "site", "kind", "saturated_fraction", "dead_fraction", "gain", "calls"]
    calls = {}
    for r in monitor.records:
        if r.activations is None:
            continue
        a = r.activations
        ends = a.call_positions.cumsum()
        for i, site in enumerate(a.sites):
            own = a.dead_by_call[ends[i] - a.call_positions[i]:ends[i]].tolist()
            calls[r.step, site] = [[None if v != v else v for v in own]]
    return [[None if isinstance(v, float) and v != v else v for v in row]
            + calls[int(row[0]), row[1]] for row in acts[columns].values.tolist()]


def worker(rank: int, out: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    model = Branchy()
    model.rank = rank
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1,
                         process_group=dist.group.WORLD) as monitor:
        for step in range(STEPS):
            model(batch(rank, step)).backward()
            monitor.step()
            model.zero_grad()
    result = {"agreed": table(monitor)}
    if rank == 0:  # a monitor on one rank only, without a process group: it never communicates
        alone = Branchy()
        with GradientMonitor(alone, reporters=[], activation_every_n_steps=1) as lonely:
            for step in range(STEPS):
                alone(batch(0, step)).backward()
                lonely.step()
        result["alone"] = table(lonely)
    Path(out, f"sites{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
