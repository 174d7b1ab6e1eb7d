"""The main Lightning paths under both namespaces, ``pytorch_lightning`` and ``lightning.pytorch``,
with Lightning's defaults (sanity check, validation and progress bar on)."""

from __future__ import annotations

import importlib
import logging
import math
import re
import signal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graddiag import GradientDiagnostics
from graddiag.demos.data import digits_tensors
from graddiag.reporters.tensorboard import FIGURE_FILE

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


@pytest.fixture(params=NAMESPACES)
def lightning(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


def _loaders() -> tuple[DataLoader, DataLoader]:
    x, y = digits_tensors()
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:320], y[:320]), batch_size=32, shuffle=True, generator=g)
    return train, DataLoader(TensorDataset(x[320:448], y[320:448]), batch_size=64)


def _net_class(lightning: ModuleType) -> type:
    class Net(lightning.LightningModule):  # type: ignore[name-defined,misc]
        """A small MLP, plus a layer the forward pass never uses (one ``no_gradient``) and a
        loss that turns NaN on the steps in ``nan_steps``."""

        def __init__(self, nan_steps: tuple[int, ...] = (), interrupt_at: int | None = None) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            self.unused = nn.Linear(4, 4)
            self.nan_steps = nan_steps
            self.interrupt_at = interrupt_at

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == self.interrupt_at:
                raise KeyboardInterrupt  # what Ctrl-C raises
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            if self.global_step in self.nan_steps:
                loss = loss * float("nan")
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Net


class _ReferenceNorms:
    """Per-layer gradient 2-norms in float64, recomputed from ``.grad`` before each optimizer
    step (after graddiag's callback, which runs first)."""

    def __init__(self, lightning: ModuleType) -> None:
        outer = self

        class Recorder(lightning.Callback):  # type: ignore[name-defined,misc]
            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
                norms = {}
                for name, module in pl_module.named_modules():
                    grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
                    if grads:
                        norms[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
                outer.steps[trainer.global_step] = norms

        self.steps: dict[int, dict[str, float]] = {}
        self.callback = Recorder()


def _trainer(lightning: ModuleType, callbacks: list[Any], **kwargs: Any) -> Any:
    kwargs.setdefault("max_steps", 12)
    return lightning.Trainer(accelerator="cpu", devices=1, callbacks=callbacks,
                             enable_checkpointing=False, enable_model_summary=False,
                             log_every_n_steps=1, **kwargs)


def test_tensorboard_logger_gets_the_full_dashboard(
    lightning: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger = importlib.import_module(f"{lightning.__name__}.loggers").TensorBoardLogger(
        str(tmp_path), name="run")
    cb = GradientDiagnostics(activation_every_n_steps=4, figure_every_n_steps=0)
    reference = _ReferenceNorms(lightning)
    train, val = _loaders()
    with caplog.at_level(logging.INFO, logger="graddiag"):
        trainer = _trainer(lightning, [cb, reference.callback], logger=logger)
        trainer.fit(_net_class(lightning)(), train, val)
    # every notice says nothing about a missing TensorBoardLogger: this one is recognised
    assert not [r for r in caplog.records if "TensorBoardLogger" in r.getMessage()]
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.TENSORS: 0, ea.IMAGES: 0,
                                                            ea.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    assert "custom_scalars__config__" in tags["tensors"]
    assert {"graddiag/findings/text_summary", "graddiag/summary/text_summary"} <= set(tags["tensors"])
    assert tags["images"] == ["graddiag/gradient_flow"]
    assert (Path(logger.log_dir) / FIGURE_FILE).stat().st_size > 10_000
    # the gradient norms and their log10 equal the float64 recomputation, step for step
    assert sorted(reference.steps) == list(range(12))
    for layer in ("net.0", "net.2"):
        linear = {e.step: e.value for e in acc.Scalars(f"graddiag/grad_norm/{layer}")}
        logs = {e.step: e.value for e in acc.Scalars(f"graddiag/log10_grad_norm/{layer}")}
        assert sorted(linear) == sorted(logs) == list(range(12))
        for step, value in linear.items():
            expected = reference.steps[step][layer]
            assert value == pytest.approx(expected, rel=1e-5)
            assert logs[step] == pytest.approx(math.log10(expected), abs=1e-5)
    # the log10 chart of the layout selects exactly the log10 tags
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    pattern = re.compile(charts["log10 gradient norm per layer"].multiline.tag[0])
    scalar_tags = tags["scalars"]
    assert {t for t in scalar_tags if pattern.search(t)} == {
        "graddiag/log10_grad_norm/net.0", "graddiag/log10_grad_norm/net.2"}
    # the one finding by construction: the unused layer, active to the end
    assert [(f.kind, f.layer) for f in cb.findings] == [("no_gradient", "unused")]
    findings = acc.Tensors("graddiag/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "#### 1. no_gradient: `unused`" in findings
    # the (default, Rich) progress bar shows the count as an integer
    printed = capsys.readouterr()
    assert "graddiag: 1 " in printed.out and "graddiag: 1.0" not in printed.out


def test_tqdm_progress_bar_shows_an_integer_count(
    lightning: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    bar = importlib.import_module(f"{lightning.__name__}.callbacks").TQDMProgressBar()
    train, val = _loaders()
    trainer = _trainer(lightning, [GradientDiagnostics(), bar], logger=False, max_steps=6)
    trainer.fit(_net_class(lightning)(), train, val)
    assert trainer.progress_bar_metrics["graddiag"] == 1  # the unused layer, by construction
    printed = capsys.readouterr()
    shown = printed.out + printed.err
    assert "graddiag=1]" in shown and "graddiag=1." not in shown
    assert "graddiag=0]" in shown  # before the finding began at step 2


def test_other_loggers_get_scalars_and_a_warning(
    lightning: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = importlib.import_module(f"{lightning.__name__}.loggers").CSVLogger(
        str(tmp_path), name="csv")
    train, val = _loaders()
    with caplog.at_level(logging.INFO, logger="graddiag"):
        _trainer(lightning, [GradientDiagnostics()], logger=logger, max_steps=3,
                 enable_progress_bar=False).fit(_net_class(lightning)(), train, val)
    notices = [r for r in caplog.records if "need a TensorBoardLogger" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING
    assert "CSVLogger" in notices[0].getMessage()


def test_skipped_steps_are_counted_in_summary_scalar_and_console(
    lightning: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = importlib.import_module(f"{lightning.__name__}.loggers").TensorBoardLogger(
        str(tmp_path), name="run")
    cb = GradientDiagnostics(on_nonfinite="skip", activation_every_n_steps=0)
    train, val = _loaders()
    model = _net_class(lightning)(nan_steps=(3, 4))
    with caplog.at_level(logging.INFO):
        _trainer(lightning, [cb], logger=logger, max_steps=8, enable_progress_bar=False).fit(
            model, train, val)
    skips = [r for r in caplog.records if "skipped optimizer step" in r.getMessage()]
    assert [r.levelno for r in skips] == [logging.WARNING] * 2
    assert "skipped optimizer step 3 (nonfinite)" in skips[0].getMessage()
    assert "skipped optimizer step 4 (nonfinite still active)" in skips[1].getMessage()
    assert cb.monitor.skipped_steps == 2
    summary = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("graddiag summary:")]
    assert len(summary) == 1 and "2 optimizer step(s) skipped" in summary[0].splitlines()[0]
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    counted = {e.step: e.value for e in acc.Scalars("graddiag/skipped_steps")}
    assert counted == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}
    text = acc.Tensors("graddiag/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "**2 optimizer step(s) skipped**" in text
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()


def test_stop_is_a_warning(lightning: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    train, val = _loaders()
    with caplog.at_level(logging.INFO, logger="graddiag"):
        trainer = _trainer(lightning, [GradientDiagnostics(on_nonfinite="stop")], logger=False,
                           max_steps=20, enable_progress_bar=False)
        trainer.fit(_net_class(lightning)(nan_steps=(2,)), train, val)
    stops = [r for r in caplog.records if "stopping training at step 2" in r.getMessage()]
    assert len(stops) == 1 and stops[0].levelno == logging.WARNING
    assert trainer.global_step <= 3


def test_ctrl_c_leaves_complete_logs_and_prints_the_summary(
    lightning: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = importlib.import_module(f"{lightning.__name__}.loggers").TensorBoardLogger(
        str(tmp_path), name="run")
    cb = GradientDiagnostics(activation_every_n_steps=0)
    train, val = _loaders()
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT while shutting down
    try:
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
            _trainer(lightning, [cb], logger=logger, max_steps=20,
                     enable_progress_bar=False).fit(_net_class(lightning)(interrupt_at=6),
                                                    train, val)
    finally:
        signal.signal(signal.SIGINT, sigint)
    summary = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("graddiag summary:")]
    assert len(summary) == 1
    assert summary[0].splitlines()[0] == (
        "graddiag summary: 1 no_gradient (training interrupted at step 6)")
    assert "net.0" in summary[0] and "unused" in summary[0]
    assert sorted(cb.history.step.unique()) == list(range(6))
    assert (Path(logger.log_dir) / FIGURE_FILE).exists()
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert "graddiag/summary/text_summary" in acc.Tags()["tensors"]
