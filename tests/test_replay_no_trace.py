"""A replay leaves no trace: everything is exactly as in the same run without it.

Gradients of the real step, BatchNorm running statistics, random states, optimizer state, step
counters and the final weights are compared bit for bit against a run with
``replay_nonfinite=False``; no anomaly mode, function mode, hook or warning filter remains.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from graddiag import GradientDiagnostics, GradientMonitor
from tests.helpers import quiet_trainer
from tests.replay_cases import MLP

NAN_STEP = 2


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, so NaN compares equal to the same NaN."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8) if t.is_floating_point() else t.detach()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype \
            and torch.equal(_bits(a), _bits(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _global_state() -> dict[str, Any]:
    hooks = nn.modules.module
    return {
        "anomaly": torch.is_anomaly_enabled(),
        "function_modes": torch._C._len_torch_function_stack(),
        "module_hooks": (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks),
                         len(hooks._global_backward_hooks)),
        "warning_filters": list(warnings.filters),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()[1]}


def _nan_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    if step == NAN_STEP:  # the distance of the loss to itself: sqrt(0), inf derivative
        loss = loss + torch.sqrt(loss - loss)
    return loss


def _plain_run(replay: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = MLP(dropout=0.3, batchnorm=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    seen: dict[str, Any] = {}
    with GradientMonitor(model, reporters=[], on_nonfinite="skip", replay_nonfinite=replay,
                         activation_every_n_steps=1, param_every_n_steps=1) as monitor:
        for step in range(5):
            x, y = torch.randn(8, 4, generator=data), torch.randint(0, 3, (8,), generator=data)
            closure = lambda: _nan_loss(model, x, y, step)  # noqa: E731, B023 - this step
            optimizer.zero_grad()
            closure().backward()
            before = _global_state()
            report = monitor.step(replay=closure)
            if step == NAN_STEP:
                seen["findings"] = report.findings
                seen["at_nan"] = {
                    "grads": [p.grad.clone() for p in model.parameters()],
                    "buffers": {k: v.clone() for k, v in model.named_buffers()},
                    "rng": _rng(),
                    "optimizer": optimizer.state_dict(),
                }
                seen["global_unchanged"] = _global_state() == before
            if not report.should_skip:
                optimizer.step()
        seen["next_step"] = monitor._next_step
        seen["history"] = monitor.history.to_dict("list")
        seen["activations"] = monitor.activation_history
    seen["final"] = {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "rng": _rng(),
        "optimizer": optimizer.state_dict(),
    }
    return seen


def test_plain_replay_leaves_no_trace() -> None:
    with_replay, without = _plain_run(True), _plain_run(False)
    finding = [f for f in with_replay["findings"] if f.kind == "nonfinite"][0]
    assert finding.details["replay"] == "located"  # the replay did run
    assert finding.details["op"] == "torch.sqrt"
    assert "replay" not in [f for f in without["findings"] if f.kind == "nonfinite"][0].details
    for key in ("grads", "buffers", "rng", "optimizer"):
        assert _same(with_replay["at_nan"][key], without["at_nan"][key]), key
    for key in ("params", "buffers", "rng", "optimizer"):
        assert _same(with_replay["final"][key], without["final"][key]), key
    assert with_replay["next_step"] == without["next_step"] == 5
    np.testing.assert_array_equal(with_replay["history"]["grad_norm"],
                                  without["history"]["grad_norm"])
    acts, acts_without = with_replay["activations"], without["activations"]
    assert len(acts) > 0 and acts.step.max() > NAN_STEP  # watched after the replay too
    pd.testing.assert_frame_equal(acts, acts_without)  # the replay's forward counted nowhere
    assert with_replay["global_unchanged"]


class _LitNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(dropout=0.3, batchnorm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = _nan_loss(self, x, y, self.global_step)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class _Snapshot(pl.Callback):
    """Runs after graddiag's hook: the real step's gradients, buffers and RNG at the NaN step."""

    def __init__(self) -> None:
        self.at_nan: dict[str, Any] = {}
        self.global_states: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # noqa: ANN001
        self.global_states.append(_global_state())
        if trainer.global_step == NAN_STEP:
            self.at_nan = {
                "grads": [p.grad.clone() for p in module.parameters()],
                "buffers": {k: v.clone() for k, v in module.named_buffers()},
                "rng": _rng(),
                "optimizer": optimizer.state_dict(),
            }


def _lightning_run(replay: bool) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model = _LitNet()
    diagnostics = GradientDiagnostics(replay_nonfinite=replay,  # "warn": the grads stay
                                      print_summary=False, progress_bar=False,
                                      activation_every_n_steps=1)
    snapshot = _Snapshot()
    trainer = quiet_trainer(max_steps=5, callbacks=[diagnostics, snapshot])
    trainer.fit(model, loader)
    return {
        "findings": diagnostics.findings,
        "activations": diagnostics.activation_history,
        "at_nan": snapshot.at_nan,
        "global_states": snapshot.global_states,
        "final": {
            "params": [p.detach().clone() for p in model.parameters()],
            "buffers": {k: v.clone() for k, v in model.named_buffers()},
            "rng": _rng(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "global_step": trainer.global_step,
            "logged": {k: v.clone() for k, v in trainer.callback_metrics.items()},
        },
    }


def test_lightning_replay_leaves_no_trace() -> None:
    with_replay, without = _lightning_run(True), _lightning_run(False)
    finding = [f for f in with_replay["findings"] if f.kind == "nonfinite"][0]
    assert finding.details["replay"] == "located"
    assert finding.details["op"] == "torch.sqrt" and finding.details["random_state"] is True
    for key in ("grads", "buffers", "rng", "optimizer"):
        assert _same(with_replay["at_nan"][key], without["at_nan"][key]), key
    for key in ("params", "buffers", "rng", "optimizer", "global_step", "logged"):
        assert _same(with_replay["final"][key], without["final"][key]), key
    assert with_replay["final"]["global_step"] == 5
    acts = with_replay["activations"]
    assert len(acts) > 0 and acts.step.max() > NAN_STEP
    pd.testing.assert_frame_equal(acts, without["activations"])
    states = with_replay["global_states"]
    assert len(states) == 5 and states == without["global_states"]
    assert states[NAN_STEP]["anomaly"] is False and states[NAN_STEP]["function_modes"] == 0
    assert states[NAN_STEP]["module_hooks"] == (0, 0, 0)
