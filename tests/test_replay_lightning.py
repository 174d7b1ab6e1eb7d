"""Replay on first onset inside Lightning: the callback keeps the batch and replays by itself."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from graddiag import GradientAlarm, GradientDiagnostics
from tests import replay_cases as cases
from tests.helpers import quiet_trainer
from tests.replay_cases import line_of


class ExpOverflow(pl.LightningModule):
    """A hand-written softmax head whose logits overflow exp from ``overflow_step`` on."""

    def __init__(self, overflow_step: int = 2) -> None:
        super().__init__()
        self.head = cases.SoftmaxHead()
        self.overflow_step = overflow_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.overflow_step:
            x = x * 1e3
        probs = self.head(x)
        loss = F.nll_loss(probs.clamp_min(1e-6).log(), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(x: torch.Tensor | None = None, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g) if x is None else x
    y = torch.randint(0, 3, (len(x),), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _diagnostics(**options: Any) -> GradientDiagnostics:
    return GradientDiagnostics(print_summary=False, progress_bar=False, **options)


def test_lightning_names_the_op_and_line_by_itself() -> None:
    pl.seed_everything(0, verbose=False)
    diagnostics = _diagnostics(on_nonfinite="skip")
    quiet_trainer(max_steps=4, callbacks=[diagnostics]).fit(ExpOverflow(), _loader())
    finding = [f for f in diagnostics.findings if f.kind == "nonfinite"][0]
    d = finding.details
    assert finding.step == 2 and d["replay"] == "located"
    assert (d["file"], d["line"]) == line_of(cases.softmax_by_hand, "torch.exp(")
    assert (d["op"], d["phase"], d["module"]) == ("torch.exp", "forward", "head")
    assert d["random_state"] is True
    assert "called in `softmax_by_hand` (inside `head.forward`)" in finding.message


def test_lightning_raise_carries_the_replay_in_the_alarm() -> None:
    pl.seed_everything(0, verbose=False)
    diagnostics = _diagnostics(on_nonfinite="raise")
    with pytest.raises(GradientAlarm) as alarm:
        quiet_trainer(max_steps=4, callbacks=[diagnostics]).fit(ExpOverflow(), _loader())
    assert alarm.value.findings[0].details["op"] == "torch.exp"
    assert "torch.exp" in str(alarm.value)


def test_lightning_replays_every_micro_batch_of_an_accumulated_step() -> None:
    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = cases.MLP()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    pl.seed_everything(0, verbose=False)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    x[11, 2] = math.nan  # in the second batch of 8: the second micro-batch of step 0
    diagnostics = _diagnostics(on_nonfinite="skip")
    trainer = quiet_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[diagnostics])
    trainer.fit(Classifier(), _loader(x))
    d = [f for f in diagnostics.findings if f.kind == "nonfinite"][0].details
    assert (d["replay"], d["phase"], d["tensor"]) == ("located", "data", "batch[0]")
    assert (d["micro_batch"], d["micro_batches"]) == (1, 2)
    assert (d["file"], d["line"]) == line_of(cases.MLP.forward, "self.fc1(x)")


def test_lightning_manual_optimization_is_not_replayed_and_says_why() -> None:
    class Manual(ExpOverflow):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.calls = 0

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:  # type: ignore[override]
            self.calls += 1
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(super().training_step(batch))
            optimizer.step()

    pl.seed_everything(0, verbose=False)
    diagnostics = _diagnostics()
    model = Manual()
    quiet_trainer(max_steps=4, callbacks=[diagnostics]).fit(model, _loader())
    d = [f for f in diagnostics.findings if f.kind == "nonfinite"][0].details
    assert (d["replay"], d["replay_reason"]) == ("not_replayed", "manual_optimization")
    assert model.calls == 4  # training_step ran once per batch, never again


class _Wrapped(pl.LightningModule):
    """Any model and loss of ``replay_cases.SOURCES`` as a LightningModule."""

    def __init__(self, source: cases.Source) -> None:
        super().__init__()
        self.model = source.model
        self.loss = source.loss

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(self.model, tuple(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("name", list(cases.SOURCES))
def test_lightning_names_each_real_source_at_its_line(name: str) -> None:
    torch.manual_seed(0)
    source = cases.SOURCES[name]()
    loader = DataLoader(TensorDataset(*source.batch), batch_size=len(source.batch[0]))
    diagnostics = _diagnostics()
    quiet_trainer(max_steps=1, callbacks=[diagnostics]).fit(_Wrapped(source), loader)
    d = [f for f in diagnostics.findings if f.kind == "nonfinite"][0].details
    assert d["replay"] == "located"
    assert (d["file"], d["line"]) == line_of(source.culprit, source.text)
    assert (d["op"], d["phase"]) == (source.op, source.phase)


def test_lightning_fp16_mixed_replays_under_the_precision_plugin_s_autocast() -> None:
    """Under 16-mixed a scaler's overflow step is amp_overflow; once the scale is below 1 the
    NaN is the model's: the replay runs training_step under autocast and names the matmul."""
    from pytorch_lightning.plugins import MixedPrecision

    torch.manual_seed(0)
    source = cases.SOURCES["fp16 attention logits"]()
    model = source.model

    class Plain(pl.LightningModule):  # no autocast of its own: the plugin provides it
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(batch[0]).float().pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    diagnostics = _diagnostics()
    loader = DataLoader(TensorDataset(source.batch[0].repeat(2, 1, 1)), batch_size=2)
    trainer = quiet_trainer(max_steps=3, callbacks=[diagnostics],
                            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(Plain(), loader)
    assert diagnostics.history.groupby("step").amp_overflow.all().iloc[0]  # step 0: the scaler's
    finding = [f for f in diagnostics.findings if f.kind == "nonfinite"][0]
    d = finding.details
    assert finding.step >= 1 and d["replay"] == "located"
    assert (d["file"], d["line"]) == line_of(cases.Attention.forward, "logits = q @ k")
    assert d["output"]["dtype"] == "float16" and d["nonfinite"] == "inf"
