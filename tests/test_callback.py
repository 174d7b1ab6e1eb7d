"""GradientDiagnostics inside a real Lightning Trainer."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger

from graddiag import GradientAlarm, GradientDiagnostics
from graddiag.demos.data import DigitsDataModule
from graddiag.demos.models import DeepMLP
from tests.helpers import quiet_trainer


class NaNAt(DeepMLP):
    """A DeepMLP whose loss turns NaN on one optimizer step."""

    def __init__(self, bad_step: int, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_step == self.bad_step:
            loss = loss * torch.tensor(float("nan"))
        return loss


def _fit(model: pl.LightningModule, cb: GradientDiagnostics, steps: int, **trainer) -> pl.Trainer:  # noqa: ANN003
    pl.seed_everything(0, verbose=False)
    t = quiet_trainer(max_steps=steps, callbacks=[cb], **trainer)
    t.fit(model, DigitsDataModule(batch_size=32))
    return t


def test_callback_finds_vanishing_and_names_layers_relative_to_the_module() -> None:
    cb = GradientDiagnostics(activation_every_n_steps=5)
    model = DeepMLP(depth=10, width=32, activation="sigmoid", optimizer="sgd", lr=0.1)
    _fit(model, cb, 30)
    h = cb.history
    assert sorted(h.step.unique()) == list(range(30))  # one record per optimizer step
    assert h.layer.iloc[0] == "net.0"
    assert {"step", "layer", "grad_norm"} <= set(h.columns)
    assert any(f.kind == "vanishing" and f.layer == "net.0" for f in cb.findings)
    assert cb.activation_history.site.iloc[0] == "net.1"
    summary = cb.summary()
    assert summary.layer.iloc[0] == "net.0" and summary.first_finding.iloc[0] == "vanishing"


def test_findings_are_logged_once_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    cb = GradientDiagnostics(activation_every_n_steps=0)
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        _fit(DeepMLP(depth=10, width=32, activation="sigmoid", optimizer="sgd", lr=0.1), cb, 30)
    lines = [r.getMessage() for r in caplog.records if "[vanishing]" in r.getMessage()]
    vanishing = [f for f in cb.findings if f.kind == "vanishing"]
    steps = sorted({f.step for f in vanishing})
    assert len(lines) == len(steps)  # one warning per step and kind, naming every layer
    for step, line in zip(steps, lines):
        layers = [f.layer for f in vanishing if f.step == step]
        assert f"step {step}," in line and all(f"'{layer}'" in line for layer in layers)
    assert any("'net.0'" in line and "Try:" in line for line in lines)


def test_scalars_go_through_the_trainer_logger_at_its_interval(tmp_path: Path) -> None:
    cb = GradientDiagnostics(activation_every_n_steps=0, param_every_n_steps=0)
    logger = CSVLogger(tmp_path, name="run")
    _fit(DeepMLP(depth=2, width=16), cb, 12, logger=logger, log_every_n_steps=4)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): float(r["graddiag/grad_norm/net.0"])
              for r in rows if r.get("graddiag/grad_norm/net.0")}
    assert sorted(logged) == [0, 4, 8]
    h = cb.history
    for step, value in logged.items():
        expected = h[(h.step == step) & (h.layer == "net.0")].grad_norm.item()
        assert value == pytest.approx(expected, rel=1e-6)


def test_works_without_logger() -> None:
    cb = GradientDiagnostics()
    _fit(DeepMLP(depth=2, width=16), cb, 5, logger=False)
    assert len(cb.history) == 5 * 3


def _first_layer_weight(model: DeepMLP) -> torch.Tensor:
    return model.net[0].weight.detach().clone()


def test_skip_applies_nothing_on_a_nonfinite_step() -> None:
    model = NaNAt(bad_step=3, depth=2, width=16)
    cb = GradientDiagnostics(on_nonfinite="skip")
    _fit(model, cb, 6)
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()
    assert [f.kind for f in cb.findings] == ["nonfinite"]
    assert cb.findings[0].step == 3


def test_warn_lets_the_nan_through() -> None:
    model = NaNAt(bad_step=3, depth=2, width=16, optimizer="sgd")
    _fit(model, GradientDiagnostics(), 6)
    assert not torch.isfinite(model.net[0].weight).all()


def test_stop_ends_training_cleanly_at_the_bad_step() -> None:
    model = NaNAt(bad_step=3, depth=2, width=16)
    trainer = _fit(model, GradientDiagnostics(on_nonfinite="stop"), 50)
    assert trainer.global_step <= 4
    assert torch.isfinite(model.net[0].weight).all()


def test_raise_raises_gradient_alarm() -> None:
    with pytest.raises(GradientAlarm, match="nonfinite"):
        _fit(NaNAt(bad_step=2, depth=2, width=16), GradientDiagnostics(on_nonfinite="raise"), 10)


def test_nonfinite_origin_is_the_layer_nearest_the_loss() -> None:
    class BadMiddle(DeepMLP):
        def forward(self, x):  # noqa: ANN001, ANN201
            h = self.net[1](self.net[0](x))
            h = _InfGrad.apply(h) if self.global_step == 1 else h
            for m in list(self.net)[2:]:
                h = m(h)
            return h

    model = BadMiddle(depth=3, width=8)
    cb = GradientDiagnostics(on_nonfinite="skip", activation_every_n_steps=0)
    _fit(model, cb, 3)
    found = [f for f in cb.findings if f.kind == "nonfinite"]
    assert [f.layer for f in found] == ["net.0"]
    assert found[0].details["upstream_affected"] == 0


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * float("inf")


def test_frozen_parameters_are_never_flagged_and_unused_ones_are() -> None:
    class Partial(DeepMLP):
        def __init__(self) -> None:
            super().__init__(depth=2, width=16)
            self.unused = torch.nn.Linear(4, 4)
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    cb = GradientDiagnostics(activation_every_n_steps=0)
    _fit(Partial(), cb, 5)
    flagged = [(f.kind, f.layer) for f in cb.findings]
    assert flagged == [("no_gradient", "unused")]
    assert "frozen" not in set(cb.history.layer)


def test_activation_statistics_are_logged_and_hooks_are_gone_after_fit(tmp_path: Path) -> None:
    cb = GradientDiagnostics(activation_every_n_steps=2, early_steps=0)
    logger = CSVLogger(tmp_path, name="acts")
    model = DeepMLP(depth=2, width=16, activation="tanh")
    _fit(model, cb, 5, logger=logger, log_every_n_steps=2)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    saturated = {int(r["step"]): float(r["graddiag/saturated/net.1"])
                 for r in rows if r.get("graddiag/saturated/net.1")}
    acts = cb.activation_history
    assert sorted(saturated) == [0, 2, 4] == sorted(acts.step.unique())
    for step, value in saturated.items():
        expected = acts[(acts.step == step) & (acts.site == "net.1")].saturated_fraction.item()
        assert value == pytest.approx(expected)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert torch.overrides._get_current_function_mode_stack() == []


def test_dead_relu_vanishing_is_explained_with_dead_relu_remedies_first() -> None:
    cb = GradientDiagnostics(activation_every_n_steps=2)
    _fit(DeepMLP(depth=4, width=32, activation="relu", init="kaiming", bias_init=-3.0), cb, 24)
    kinds = {f.kind for f in cb.findings}
    assert "dead_relu" in kinds
    vanishing = [f for f in cb.findings if f.kind == "vanishing"]
    assert vanishing  # upstream layers starve behind the dead units, which are named the cause
    assert vanishing[0].remedy.startswith("lower the learning rate; initialise biases")


def test_progress_bar_shows_active_findings_and_a_summary_prints_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # stalled (the same layers' weights barely move) is tested in tests/test_updates.py
    cb = GradientDiagnostics(activation_every_n_steps=0, ignore=["stalled"])
    with caplog.at_level(logging.INFO):
        trainer = _fit(DeepMLP(depth=10, width=32, activation="sigmoid", optimizer="sgd", lr=0.1),
                       cb, 20)
    shown = trainer.progress_bar_metrics["graddiag"]
    assert shown == cb.monitor.active_conditions() == 6  # six layers still vanishing
    summaries = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("graddiag summary:")]
    assert len(summaries) == 1
    assert summaries[0].splitlines()[0] == "graddiag summary: 6 vanishing"
    assert "net.0" in summaries[0] and "vanishing" in summaries[0].splitlines()[3]


def test_unmeasured_steps_gather_no_step_inputs_and_keep_no_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With every_n_steps=5 (no early steps, no activation or parameter statistics) only steps 0
    and 5 of 10 are measured: only they read Lightning's step inputs and keep the batch and the
    random state for a replay; a NaN on a measured step is still replayed to its operation."""
    from graddiag.lightning import callback as callback_module
    from graddiag.lightning import replay as replay_module

    gathered: list[int] = []
    real_inputs = callback_module.step_inputs

    def counting_inputs(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> dict:
        gathered.append(trainer.global_step)
        return real_inputs(trainer, optimizer)

    kept: list[int] = []
    real_keep = replay_module.LightningStepReplay.keep

    def counting_keep(self: object, trainer: pl.Trainer, *args: object) -> None:
        kept.append(trainer.global_step)
        real_keep(self, trainer, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(callback_module, "step_inputs", counting_inputs)
    monkeypatch.setattr(replay_module.LightningStepReplay, "keep", counting_keep)
    model = NaNAt(bad_step=5, depth=2, width=16)
    cb = GradientDiagnostics(every_n_steps=5, early_steps=0, activation_every_n_steps=0,
                             param_every_n_steps=0, print_summary=False)
    _fit(model, cb, 10)
    assert gathered == [0, 5]
    assert kept == [0, 5]
    assert [(f.kind, f.step) for f in cb.findings] == [("nonfinite", 5)]
    assert "replay of step 5" in cb.findings[0].message  # the replay named the operation
    assert "torch.tensor" in cb.findings[0].message


def test_a_second_fit_with_a_new_trainer_says_its_steps_repeat(
    caplog: pytest.LogCaptureFixture
) -> None:
    """The same callback in two Trainers: the second counts from 0 again, below the first
    fit's last recorded step 4, and a warning says so; continuing one Trainer does not warn."""
    cb = GradientDiagnostics(activation_every_n_steps=0, print_summary=False)
    model = DeepMLP(depth=2, width=16)
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        _fit(model, cb, 5)
        assert not [r for r in caplog.records if "starts at step" in r.getMessage()]
        _fit(model, cb, 3)
    warned = [r.getMessage() for r in caplog.records if "starts at step" in r.getMessage()]
    assert len(warned) == 1 and "starts at step 0, at or before step 4" in warned[0]
    assert sorted(cb.history.step.unique()) == list(range(5))  # steps 0-2 twice, 3-4 once
    caplog.clear()
    continued = GradientDiagnostics(activation_every_n_steps=0, print_summary=False)
    trainer = quiet_trainer(max_steps=3, callbacks=[continued])
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        trainer.fit(model, DigitsDataModule(batch_size=32))
        trainer.fit_loop.epoch_loop.max_steps = 6
        trainer.fit(model, DigitsDataModule(batch_size=32))
    assert not [r for r in caplog.records if "starts at step" in r.getMessage()]
    assert sorted(continued.history.step.unique()) == list(range(6))


def test_a_tensorboard_logger_reused_for_a_second_fit_gets_its_diagnostics(
        tmp_path: Path) -> None:
    """Lightning closes the logger's writer at the end of a fit; the second fit's diagnostics
    are still written (the writer reopens, as for Lightning's own metrics), also before
    Lightning itself logs anything (``log_every_n_steps`` beyond the run)."""
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator as ea

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = torch.nn.Linear(4, 16), torch.nn.Linear(16, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.mse_loss(self.fc(torch.relu(self.a(x))), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
    logger = TensorBoardLogger(str(tmp_path))
    model = Regressor()
    for steps in (12, 24):
        trainer = quiet_trainer(max_steps=steps, logger=logger, log_every_n_steps=50,
                                callbacks=[GradientDiagnostics(print_summary=False)])
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    summaries = []
    for events in sorted(tmp_path.glob("**/events.out.tfevents.*")):
        acc = ea.EventAccumulator(str(events), size_guidance={ea.TENSORS: 0})
        acc.Reload()
        if "graddiag/summary/text_summary" in acc.Tags()["tensors"]:
            summaries += [e.step for e in acc.Tensors("graddiag/summary/text_summary")]
    assert summaries == [11, 23]  # each fit's summary at its last step
