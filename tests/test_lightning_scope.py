"""Inside Lightning, with its defaults (sanity check and validation on), activation statistics
come from the forward passes of training_step only; ranks agree through trainer.strategy."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from graddiag import GradientDiagnostics
from graddiag.data.policy import StepReport
from graddiag.lightning.strategy import agree_on_action
from tests.helpers import BackwardSpy, installed

FLOOR = 0.01


def _saturation_by_hand(layer: nn.Linear, xs: list[torch.Tensor]) -> float:
    below = total = 0
    for x in xs:
        s = torch.sigmoid(F.linear(x.double(), layer.weight.double(), layer.bias.double()))
        below += int((s * (1 - s) < FLOOR).sum())
        total += s.numel()
    return below / total


class SigmoidNet(pl.LightningModule):
    """Training batches are small (no saturation), validation batches huge (all saturated)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
        self.expected: dict[int, list[torch.Tensor]] = {}
        self.in_validation: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](BackwardSpy.apply(self.net[0](x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.expected.setdefault(self.global_step, []).append(x)
        self._weights = self.net[0]
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.in_validation.append(installed())
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x * 1000), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights fixed: hand values stay valid


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 4, generator=g) * 0.5, torch.randint(0, 2, (n,), generator=g))
    return DataLoader(data, batch_size=4)


class _Spy(pl.Callback):
    """Notes what is installed at moments when nothing of graddiag's may be."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, int]]] = {}

    def _note(self, moment: str) -> None:
        self.seen.setdefault(moment, []).append(installed())

    def on_sanity_check_start(self, *args: Any) -> None:
        self._note("sanity check")

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._note("optimizer step")

    def on_train_batch_end(self, *args: Any) -> None:
        self._note("between steps")

    def on_validation_batch_start(self, *args: Any) -> None:
        self._note("validation")


def _trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """Lightning's defaults (sanity check, validation), without files or progress output."""
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, **kwargs)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_statistics_come_from_training_forwards_only(accumulate: int) -> None:
    model = SigmoidNet()
    # early_steps=0: steps 1 and 3 are not activation steps (their forwards must not count)
    cb = GradientDiagnostics(activation_every_n_steps=2, early_steps=0, print_summary=False,
                             progress_bar=False)
    spy = _Spy()
    BackwardSpy.seen = []
    trainer = _trainer([cb, spy], max_steps=5, val_check_interval=2,
                       accumulate_grad_batches=accumulate)
    trainer.fit(model, _loader(64, 0), _loader(16, 1))
    assert trainer.sanity_checking is False and len(model.in_validation) > 2  # validation ran
    acts = cb.activation_history
    assert list(acts.step) == [0, 2, 4]
    assert list(acts.calls) == [accumulate] * 3  # the training forwards of each step
    for step, value in zip(acts.step, acts.saturated_fraction):
        assert value == pytest.approx(_saturation_by_hand(model.net[0], model.expected[step]),
                                      abs=1e-9)
    assert max(_saturation_by_hand(model.net[0], xs) for xs in model.expected.values()) < 0.5
    for moment in ("sanity check", "optimizer step", "between steps", "validation"):
        assert spy.seen[moment] and set(spy.seen[moment]) == {(0, 0)}, moment
    assert set(model.in_validation) == {(0, 0)}
    assert set(BackwardSpy.seen) == {(0, 0)}  # nothing during backward
    assert "training_step" not in vars(model)  # the wrapper is gone after fit


class ManualTwoPasses(pl.LightningModule):
    """Manual optimization: two checkpointed forward/backward passes inside one training_step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
        self.expected: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        for part in (x * 3, x * 6):
            self.expected.setdefault(self.global_step, []).append(part)
            out = checkpoint(self._body, part, use_reentrant=False)
            self.manual_backward(F.cross_entropy(out, y))  # recompute runs net.forward again
        opt.step()
        opt.zero_grad()

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](BackwardSpy.apply(self.net[0](x))))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.net(batch[0] * 1000)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_manual_backward_and_checkpoint_recompute_are_not_watched() -> None:
    model = ManualTwoPasses()
    cb = GradientDiagnostics(activation_every_n_steps=1, print_summary=False, progress_bar=False)
    BackwardSpy.seen = []
    _trainer([cb], max_steps=3, val_check_interval=1).fit(model, _loader(32, 0), _loader(8, 1))
    acts = cb.activation_history
    assert list(acts.step) == [0, 1, 2]
    assert list(acts.calls) == [2, 2, 2]  # both forwards, neither recompute
    for step, value in zip(acts.step, acts.saturated_fraction):
        assert value == pytest.approx(_saturation_by_hand(model.net[0], model.expected[step]),
                                      abs=1e-9)
    assert 0 < acts.saturated_fraction.max() < 1
    assert len(BackwardSpy.seen) == 6 and set(BackwardSpy.seen) == {(0, 0)}


class _FakeStrategy:
    root_device = torch.device("cpu")

    def __init__(self, others: str) -> None:
        self.others = others
        self.calls: list[tuple[float, str]] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        self.calls.append((float(tensor.item()), reduce_op))
        other = float(["continue", "skip", "stop", "raise"].index(self.others))
        return torch.maximum(tensor, torch.tensor([other]))


def test_ranks_agree_through_the_strategy_not_raw_torch_distributed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("graddiag called torch.distributed directly")

    monkeypatch.setattr(torch.distributed, "all_reduce", forbidden)
    strategy = _FakeStrategy(others="stop")
    assert agree_on_action(strategy, "skip") == "stop"  # type: ignore[arg-type]
    assert strategy.calls == [(1.0, "max")]
    cb = GradientDiagnostics(on_nonfinite="skip")
    trainer = SimpleNamespace(world_size=2, strategy=_FakeStrategy(others="skip"),
                              is_global_zero=False, should_stop=False)
    param = nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    optimizer = torch.optim.SGD([param], lr=0.1)
    cb._apply(trainer, optimizer, StepReport(3, True, [], "continue"))  # type: ignore[arg-type]
    assert trainer.strategy.calls == [(0.0, "max")]
    assert param.grad is None  # another rank saw a NaN: this rank skips too
