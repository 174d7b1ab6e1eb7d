"""Precision, training shapes, resume, faults and long runs: nothing lost, nothing crashes."""

from __future__ import annotations

import gc
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graddiag import GradientDiagnostics, GradientMonitor, MonitorConfig
from graddiag.data.records import StepRecord
from graddiag.demos.data import DigitsDataModule, digits_tensors
from graddiag.demos.models import DeepMLP
from graddiag.reporters.tensorboard import TensorBoardReporter
from graddiag.rules.ruleset import RuleSet
from tests.helpers import quiet_trainer


class NaiveNorms(pl.Callback):
    """Placed after GradientDiagnostics: the per-layer 2-norm of ``.grad`` at the same moment."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        rows = []
        for m in module.modules():
            grads = [p.grad for p in m.parameters(recurse=False) if p.grad is not None]
            if grads:
                rows.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
        self.norms.append(rows)


def _fit(model: pl.LightningModule, steps: int, *callbacks: pl.Callback, data: Any = None,
         **trainer: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    t = quiet_trainer(max_steps=steps, callbacks=list(callbacks), **trainer)
    t.fit(model, data if data is not None else DigitsDataModule(batch_size=32))
    return t


def _first_step_norms(model: pl.LightningModule, **trainer: Any) -> np.ndarray:
    cb = GradientDiagnostics(print_summary=False)
    _fit(model, 1, cb, **trainer)
    return cb.history.grad_norm.to_numpy()


def _model(**kwargs: Any) -> DeepMLP:
    pl.seed_everything(0, verbose=False)  # the same initial weights for every precision
    return DeepMLP(**kwargs)


# --------------------------------------------------------------------------- precision
def _fp16_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_fp16_amp_records_unscaled_norms_equal_to_fp32() -> None:
    fp32 = _first_step_norms(_model(depth=3, width=32))
    fp16 = _first_step_norms(_model(depth=3, width=32), plugins=[_fp16_plugin()])
    np.testing.assert_allclose(fp16, fp32, rtol=2e-2)


def test_fused_adam_keeps_scaled_grads_and_graddiag_unscales_them() -> None:
    class Fused(DeepMLP):
        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    seen = NaiveNorms()
    cb = GradientDiagnostics(print_summary=False)
    pl.seed_everything(0, verbose=False)
    _fit(Fused(depth=3, width=32), 1, cb, seen, plugins=[_fp16_plugin()])
    fp32 = _first_step_norms(_model(depth=3, width=32))
    np.testing.assert_allclose(cb.history.grad_norm, fp32, rtol=2e-2)
    # the gradients really were still scaled at this point
    assert seen.norms[0][0] / fp32[0] == pytest.approx(2.0**16, rel=2e-2)


def test_amp_overflow_is_reported_as_such_not_as_an_alarm(caplog: pytest.LogCaptureFixture) -> None:
    cb = GradientDiagnostics(print_summary=False)
    with caplog.at_level(logging.INFO, logger="graddiag"):
        _fit(DeepMLP(depth=3, width=32), 30, cb, plugins=[_fp16_plugin(init_scale=2.0**40)])
    h = cb.history
    overflow_steps = sorted(h[h.amp_overflow].step.unique())
    assert overflow_steps and overflow_steps[0] == 0
    assert not {f.kind for f in cb.findings} & {"nonfinite", "exploding"}
    assert sum("AMP overflow" in r.getMessage() for r in caplog.records) == len(overflow_steps)
    assert h[~h.amp_overflow].grad_norm.notna().all()


def test_bf16_mixed_works() -> None:
    fp32 = _first_step_norms(_model(depth=3, width=32))
    bf16 = _first_step_norms(_model(depth=3, width=32), precision="bf16-mixed")
    np.testing.assert_allclose(bf16, fp32, rtol=5e-2)


# --------------------------------------------------------------------------- training shapes
def test_accumulation_gives_one_record_per_optimizer_step_equal_to_the_accumulated_grad() -> None:
    cb, seen = GradientDiagnostics(print_summary=False), NaiveNorms()
    _fit(DeepMLP(depth=2, width=16), 4, cb, seen, accumulate_grad_batches=3)
    h = cb.history
    assert sorted(h.step.unique()) == [0, 1, 2, 3]
    np.testing.assert_allclose(h.grad_norm.to_numpy(), np.ravel(seen.norms), rtol=1e-5)


@pytest.mark.parametrize("algorithm", [None, "norm"])
def test_clipping_measures_pre_clip_norms_and_marks_clip_events(algorithm: str | None) -> None:
    # Lightning clips by norm by default: Trainer(gradient_clip_val=...) alone must fill `clipped`
    cb, seen = GradientDiagnostics(print_summary=False), NaiveNorms()
    clip = 0.3
    _fit(_model(depth=2, width=16), 8, cb, seen, gradient_clip_val=clip,
         gradient_clip_algorithm=algorithm)
    h = cb.history
    np.testing.assert_allclose(h.grad_norm.to_numpy(), np.ravel(seen.norms), rtol=1e-5)
    totals = [math.sqrt(sum(n * n for n in row)) for row in seen.norms]  # independent, float64
    clipped = h.groupby("step").clipped.first().tolist()
    assert all(type(c) is bool for c in clipped)  # real booleans, never None
    assert clipped == [t > clip for t in totals]
    assert True in clipped and False in clipped  # both outcomes occur in this run


def test_clipping_by_value_leaves_clipped_empty() -> None:
    cb = GradientDiagnostics(print_summary=False)
    _fit(DeepMLP(depth=2, width=16), 2, cb, gradient_clip_val=0.3, gradient_clip_algorithm="value")
    assert cb.history.clipped.isna().all()


class _ScaledLoss(DeepMLP):
    """The loss times 1e7: every gradient 1e7 x an ordinary one, far above exploding_abs."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 1e7


@pytest.mark.parametrize(("algorithm", "norm_type"),
                         [("value", 2.0), ("norm", 2.0), (None, 2.0), ("norm", 1.0)])
def test_the_exploding_remedy_knows_which_clipping_is_on(algorithm: str | None,
                                                        norm_type: float) -> None:
    """Also when graddiag's norms are 1-norms (it then cannot say whether the 2-norm clipping
    acts, but still knows that clipping is on)."""
    from graddiag.rules import wording

    cb, seen = GradientDiagnostics(print_summary=False, norm_type=norm_type), NaiveNorms()
    clipping = {} if algorithm is None else {"gradient_clip_val": 0.3,
                                             "gradient_clip_algorithm": algorithm}
    pl.seed_everything(0, verbose=False)
    _fit(_ScaledLoss(depth=2, width=16), 2, cb, seen, **clipping)
    assert min(min(row) for row in seen.norms) > 1e4  # every layer above exploding_abs
    found = [f for f in cb.findings if f.kind == "exploding"]
    assert found and {f.step for f in found} == {0}
    expected = {"value": wording.EXPLODING_WHILE_CLIPPING_BY_VALUE,
                "norm": wording.EXPLODING_WHILE_CLIPPING, None: wording.EXPLODING}[algorithm]
    assert {f.remedy for f in found} == {expected}
    if algorithm is not None:  # clipping is on: not suggested again as such
        assert "gradient_clip_val" not in expected


class TwoOptimizers(pl.LightningModule):
    """Manual optimization, GAN-style: each optimizer owns one sub-network."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Linear(64, 64)
        self.critic = nn.Linear(64, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_c = self.optimizers()
        loss_c = self.critic(x).mean() - self.critic(self.generator(x).detach()).mean()
        opt_c.zero_grad()
        self.manual_backward(loss_c)
        opt_c.step()
        loss_g = -self.critic(self.generator(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self):  # noqa: ANN201
        return (torch.optim.Adam(self.generator.parameters(), 1e-3),
                torch.optim.Adam(self.critic.parameters(), 1e-3))


def test_manual_optimization_with_two_optimizers_tags_records() -> None:
    cb = GradientDiagnostics(print_summary=False, progress_bar=False)
    model = TwoOptimizers()
    model.generator.zero_grad(set_to_none=True)
    _fit(model, 6, cb)
    h = cb.history
    assert set(h.optimizer) == {0, 1}
    assert set(h[h.optimizer == 1].layer) == {"critic"}
    assert set(h[h.optimizer == 0].layer) == {"generator"}
    assert [f.kind for f in cb.findings if f.kind == "no_gradient"] == []


def test_compiled_modules_keep_their_names() -> None:
    class Compiled(DeepMLP):
        def __init__(self) -> None:
            super().__init__(depth=2, width=16)
            self.net = torch.compile(self.net, backend="eager")

    cb = GradientDiagnostics(print_summary=False)
    _fit(Compiled(), 2, cb)
    assert list(cb.history.layer.unique()) == ["net.0", "net.2", "net.4"]


def test_modules_without_parameters_and_no_trainable_parameters(caplog) -> None:  # noqa: ANN001
    model = nn.Sequential(nn.ReLU(), nn.Linear(2, 2).requires_grad_(False))
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        monitor = GradientMonitor(model, reporters=[])
    assert sum("has no trainable parameters" in r.getMessage() for r in caplog.records) == 1
    model(torch.randn(3, 2))
    assert monitor.step().findings == []
    monitor.close()


# --------------------------------------------------------------------------- resume
def _fixed_data() -> DataLoader:
    x, y = digits_tensors()
    return DataLoader(TensorDataset(x[:320], y[:320]), batch_size=32, shuffle=False)


def _checkpointed_fit(tmp_path: Path, callbacks: list[pl.Callback], ckpt: str | None,
                      epochs: int) -> pl.Trainer:
    """Deep sigmoid net, 10 batches per epoch, a checkpoint (``last.ckpt``) after every epoch."""
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*callbacks, ckpt_cb],
                            enable_checkpointing=True)
    trainer.fit(DeepMLP(depth=8, width=32, activation="sigmoid", optimizer="sgd", lr=0.1),
                _fixed_data(), ckpt_path=ckpt)
    return trainer


def _resume_run(tmp_path: Path, ckpt: str | None, epochs: int) -> tuple[GradientDiagnostics, Any]:
    cbs = [GradientDiagnostics(activation_every_n_steps=3, print_summary=False),
           GradientDiagnostics(every_n_steps=2, activation_every_n_steps=0, vanishing_patience=3,
                               prefix="sparse/", print_summary=False)]
    trainer = _checkpointed_fit(tmp_path, cbs, ckpt, epochs)
    return cbs, trainer


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    whole, _ = _resume_run(tmp_path / "whole", None, epochs=4)
    _resume_run(tmp_path / "part", None, epochs=2)
    resumed, _ = _resume_run(tmp_path / "part2", str(tmp_path / "part" / "last.ckpt"), epochs=4)
    for a, b in zip(whole, resumed):  # two callbacks with different settings, both restored
        assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]
        ha, hb = a.history, b.history
        assert list(ha.step) == list(hb.step)  # no duplicated or missing rows
        np.testing.assert_allclose(ha.grad_norm, hb.grad_norm, rtol=1e-5)
    assert whole[0].state_key != whole[1].state_key
    assert whole[0].findings  # the comparison compared something
    checkpoint = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert {whole[0].state_key, whole[1].state_key} <= set(checkpoint["callbacks"])


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def test_resume_with_changed_thresholds_keeps_history_and_findings_and_says_what_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    first = GradientDiagnostics(activation_every_n_steps=3, vanishing_patience=3,
                                print_summary=False)
    _checkpointed_fit(tmp_path / "a", [first], None, epochs=2)
    resumed = GradientDiagnostics(activation_every_n_steps=3, vanishing_patience=5,
                                  vanishing_rel=1e-3, print_summary=False)
    assert resumed.state_key == first.state_key
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        _checkpointed_fit(tmp_path / "b", [resumed], str(tmp_path / "a" / "last.ckpt"), epochs=4)
    (warning,) = _messages(caplog, "changed settings")
    assert "vanishing_patience 3 -> 5" in warning and "vanishing_rel 0.0001 -> 0.001" in warning
    assert "activation_every_n_steps" not in warning  # only what changed
    before, after = first.history, resumed.history
    assert sorted(before.step.unique()) == list(range(20))  # 2 epochs of 10 batches
    assert sorted(after.step.unique()) == list(range(40))
    pd.testing.assert_frame_equal(after[after.step < 20].reset_index(drop=True),
                                  before.reset_index(drop=True))
    assert first.findings  # the saved findings are kept, oldest first
    assert [repr(f) for f in resumed.findings[:len(first.findings)]] == [
        repr(f) for f in first.findings]
    acts_before = first.activation_history
    acts_after = resumed.activation_history
    assert len(acts_before)
    pd.testing.assert_frame_equal(acts_after[acts_after.step < 20].reset_index(drop=True),
                                  acts_before.reset_index(drop=True))


def test_resume_with_other_identity_settings_starts_afresh_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    first = GradientDiagnostics(print_summary=False)
    _checkpointed_fit(tmp_path / "a", [first], None, epochs=1)
    other = GradientDiagnostics(prefix="other/", print_summary=False)
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        _checkpointed_fit(tmp_path / "b", [other], str(tmp_path / "a" / "last.ckpt"), epochs=2)
    (warning,) = _messages(caplog, "under other identity settings")
    assert first.state_key in warning and other.state_key in warning
    assert sorted(other.history.step.unique()) == list(range(10, 20))
    assert not _messages(caplog, "changed settings")


# --------------------------------------------------------------------------- faults
class BrokenWriter:
    """A SummaryWriter whose disk is full."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        return fail


class BrokenLogger(pl.loggers.Logger):
    name, version, experiment = "broken", 0, None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(key.startswith("graddiag/") for key in metrics):
            raise RuntimeError("logging backend is down")

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_failing_writer_and_logger_warn_once_and_training_continues(caplog) -> None:  # noqa: ANN001
    reporter = TensorBoardReporter(BrokenWriter(), scalars_every_n_steps=1)
    cb = GradientDiagnostics(reporters=[reporter], print_summary=False)
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        trainer = _fit(DeepMLP(depth=2, width=16), 10, cb, logger=BrokenLogger(),
                       log_every_n_steps=1)
    failures = [r.getMessage() for r in caplog.records if "turned off" in r.getMessage()]
    assert len(failures) == 2
    assert any("No space left" in m for m in failures) and any("backend is down" in m for m in failures)
    assert trainer.global_step == 10
    assert sorted(cb.history.step.unique()) == list(range(10))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_vanished_log_directory_does_not_stop_training(tmp_path: Path) -> None:
    # TensorBoard's own writer thread dies with FileNotFoundError; training must not.
    class Vanish(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:
                shutil.rmtree(tmp_path / "logs", ignore_errors=True)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs"))
    reporter = TensorBoardReporter(writer, scalars_every_n_steps=1, figure_every_n_steps=2)
    cb = GradientDiagnostics(print_summary=False, reporters=[reporter])
    trainer = _fit(DeepMLP(depth=2, width=16), 8, cb, Vanish(), logger=False)
    assert trainer.global_step == 8
    assert len(cb.history) == 8 * 3


def test_all_nan_histogram_warns_once_and_continues(caplog) -> None:  # noqa: ANN001
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    writer_calls: list[str] = []

    class Writer:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: writer_calls.append(name)

    monitor = GradientMonitor(model, reporters=[TensorBoardReporter(Writer(), save_png=False)],
                              histogram_every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            model[0].weight.grad.fill_(float("nan"))
            model[0].bias.grad.fill_(float("nan"))
            monitor.step()
    monitor.close()
    assert sum("no finite gradient values" in r.getMessage() for r in caplog.records) == 1
    assert writer_calls.count("add_histogram_raw") == 3  # the healthy layer, every step
    assert len(monitor.history) == 6


def test_include_pattern_matching_no_layer_is_rejected_at_setup() -> None:
    cb = GradientDiagnostics(include=["decoder.*"])
    with pytest.raises(ValueError, match="include pattern 'decoder.\\*' matches no layer"):
        _fit(DeepMLP(depth=1, width=8), 1, cb)


# --------------------------------------------------------------------------- property tests
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 5e-324, 1e-310, -0.0, math.inf, -math.inf, math.nan]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(values, min_size=3, max_size=3), min_size=1, max_size=40))
def test_rules_never_crash_on_random_sequences(sequence: list[list[float]]) -> None:
    rules = RuleSet(MonitorConfig(vanishing_patience=2))
    layers = ["a", "b", "c"]
    for step, norms in enumerate(sequence):
        arr = np.abs(np.array(norms, dtype=float))
        nonfinite = {i: {"weight": 1} for i, v in enumerate(arr) if not math.isfinite(v)}
        record = StepRecord(step, layers, arr, np.ones(3, dtype=bool), nonfinite=nonfinite)
        for finding in rules.update(record):
            assert finding.layer in layers and finding.step == step


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=2, max_size=6),
       st.integers(min_value=1, max_value=300))
def test_constant_healthy_sequences_never_flag(levels: list[float], steps: int) -> None:
    top = max(levels)
    levels = [max(v, top * 1e-3) for v in levels]  # within three decades of the largest
    rules = RuleSet(MonitorConfig())
    layers = [f"l{i}" for i in range(len(levels))]
    arr = np.array(levels)
    for step in range(steps):
        assert rules.update(StepRecord(step, layers, arr.copy(), np.ones(len(arr), bool))) == []


# --------------------------------------------------------------------------- long runs
@pytest.mark.slow
def test_twenty_thousand_recorded_steps_stay_within_bounds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    bound = 6_000
    process = psutil.Process()
    monitor = GradientMonitor(model, reporters=[], max_history_rows=bound)
    rss = []
    for step in range(20_000):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        monitor.step()
        if step in (2_000, 19_999):
            gc.collect()
            rss.append(process.memory_info().rss)
    monitor.close()
    assert monitor._history.rows <= bound
    steps = monitor.history.step.unique()
    assert steps.min() == 0 and steps.max() == 19_999  # the whole run stays covered
    assert rss[1] - rss[0] < 20 * 2**20  # less than 20 MiB growth over 18,000 steps
