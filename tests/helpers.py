"""Small deterministic training loops shared by the tests."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from graddiag import GradientMonitor


def train_plain(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    optimizer: str = "adam",
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    **options: Any,
) -> GradientMonitor:
    """Train ``model`` on ``data`` for ``steps`` steps with a monitor; returns the closed monitor."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr))
    options.setdefault("reporters", [])
    with GradientMonitor(model, optimizers=opt, **options) as monitor:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch_size,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if monitor.step().should_skip:
                continue
            opt.step()
    return monitor


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def installed() -> tuple[int, int]:
    """(TorchFunctionModes on the stack, global module forward hooks) installed right now."""
    hooks = nn.modules.module
    return (len(torch.overrides._get_current_function_mode_stack()),
            len(hooks._global_forward_hooks) + len(hooks._global_forward_pre_hooks))


class BackwardSpy(torch.autograd.Function):
    """Identity; its backward notes :func:`installed` in ``seen`` (clear it before a run)."""

    seen: list[tuple[int, int]] = []

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        BackwardSpy.seen.append(installed())
        return grad


class SyncCounter(TorchDispatchMode):
    """Counts host syncs (``.item()``, ``bool(t)``, ``float(t)``) while it is entered."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(t), float(t)
            self.syncs += 1
        return func(*args, **(kwargs or {}))
