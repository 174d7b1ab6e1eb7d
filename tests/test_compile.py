"""A model compiled by any route is detected: activation statistics off with one warning, and
graddiag causes no recompilation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graddiag import GradientDiagnostics, GradientMonitor
from graddiag.measure.activations.entry import WatchedEntry

OFF = "activation statistics are off"


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "graddiag" and r.levelno == logging.WARNING]


def _compile_wrapped(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")


def _compile_in_place(model: nn.Module) -> nn.Module:
    model.compile(backend="eager")
    return model


@pytest.mark.parametrize("route", [_compile_wrapped, _compile_in_place],
                         ids=["torch.compile(model)", "model.compile()"])
def test_plain_compiled_model_is_detected_and_never_recompiled(
    route: Callable[[nn.Module], nn.Module], caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    model = route(_net())
    with caplog.at_level(logging.WARNING, logger="graddiag"), \
            torch._dynamo.config.patch(error_on_recompile=True), \
            GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        for _ in range(4):  # four activation steps
            model(torch.randn(3, 4)).sum().backward()
            monitor.step()
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and OFF in warnings[0] and "torch.compile" in warnings[0]
    assert monitor.activation_history.empty
    assert len(monitor.history) == 4 * 2  # gradient norms stay on
    assert not any(isinstance(m.__dict__.get("forward"), WatchedEntry) for m in model.modules())


class Lit(pl.LightningModule):
    def __init__(self, compile_inner: bool = False) -> None:
        super().__init__()
        self.net: nn.Module = _net()
        if compile_inner:
            self.net = torch.compile(self.net, backend="eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g),
                                    torch.randint(0, 2, (n,), generator=g)), batch_size=4)


def _graphs_compiled(route: str, callbacks: list[pl.Callback]) -> int:
    """Graphs dynamo compiled during a fit with Lightning's defaults (sanity check, validation)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module = Lit(compile_inner=route == "inner")
    model: Any = torch.compile(module, backend="eager") if route == "outer" else module
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, _loader(32), _loader(8))
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.slow
@pytest.mark.parametrize("route", ["inner", "outer"],
                         ids=["self.net = torch.compile(...)", "trainer.fit(torch.compile(lit))"])
def test_compiled_lightning_module_is_detected_and_never_recompiled(
    route: str, caplog: pytest.LogCaptureFixture
) -> None:
    baseline = _graphs_compiled(route, [])
    cb = GradientDiagnostics(activation_every_n_steps=1, print_summary=False)
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        with_graddiag = _graphs_compiled(route, [cb])
    assert with_graddiag == baseline > 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and OFF in warnings[0], warnings
    assert cb.activation_history.empty
    assert sorted(cb.history.step.unique()) == [0, 1, 2, 3]
