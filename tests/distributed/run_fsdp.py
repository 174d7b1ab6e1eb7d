"""FSDP2 (``fully_shard``) on CPU with gloo, 2 processes: per-layer gradient and parameter norms
from GradientMonitor against an unsharded reference.

    python tests/distributed/run_fsdp.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from graddiag import GradientMonitor


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 5))


def layer_norms(model: nn.Module, x: torch.Tensor, norm_type: float) -> dict[str, list[float]]:
    monitor = GradientMonitor(model, reporters=[], norm_type=norm_type, param_every_n_steps=1,
                              activation_every_n_steps=0, histogram_every_n_steps=1)
    model(x).pow(2).sum().backward()
    monitor.step()
    monitor.close()
    h = monitor.history
    counts = monitor.records[0].grad_histograms
    return {"layers": h.layer.tolist(), "grad_norm": h.grad_norm.tolist(),
            "param_norm": h.param_norm.tolist(), "histogram": counts.tolist()}


def worker(rank: int, out: str) -> None:
    # rendezvous through a file, not a TCP store that rank 0 hosts: no port to race for, and
    # rank 0 leaving first takes no store from under rank 1's teardown
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank,
                            world_size=2)
    from torch.distributed.fsdp import fully_shard

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    reference = build()
    sharded = copy.deepcopy(reference)
    for i in (0, 2, 4):
        fully_shard(sharded[i])
    fully_shard(sharded)
    results = {}
    for p in (2.0, 1.0, float("inf")):
        for model in (reference, sharded):
            model.zero_grad(set_to_none=True)
        results[str(p)] = {"reference": layer_norms(reference, x, p),
                           "sharded": layer_norms(sharded, x, p)}
    results["grad_is_dtensor"] = type(sharded[0].weight.grad).__name__ == "DTensor"
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()  # both ranks finish their collectives before the group is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
