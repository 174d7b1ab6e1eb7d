"""GradientDiagnostics: the Lightning adapter around :class:`~graddiag.GradientMonitor`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import torch

from graddiag.data.errors import GradientAlarm
from graddiag.data.findings import Finding
from graddiag.data.options import (
    OPTIONS,
    docstring_section,
    identity_settings,
    option_signature,
    split_options,
)
from graddiag.data.policy import ALARM_KINDS, StepReport
from graddiag.lightning.compat import (
    CALLBACK_BASES,
    RICH_PROGRESS_BARS,
    TENSORBOARD_LOGGERS,
    rank_zero_info,
)
from graddiag.lightning.replay import LightningStepReplay
from graddiag.lightning.strategy import StrategyReducer, agree_on_action
from graddiag.measure.activations import ActivationRegistry
from graddiag.pipeline.arguments import check_activation_registry, check_reporters
from graddiag.pipeline.history import History
from graddiag.pipeline.monitor import GradientMonitor
from graddiag.reporters import ConsoleReporter, Reporter
from graddiag.reporters.console import summary_screen
from graddiag.reporters.logger import LoggerReporter
from graddiag.reporters.summary import summarize
from graddiag.reporters.tables import save_table
from graddiag.reporters.tensorboard import TensorBoardReporter

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("graddiag")


class GradientDiagnostics(*CALLBACK_BASES):  # type: ignore[misc]
    """Records per-layer gradient statistics during ``Trainer.fit`` and reports findings.

    Works with ``pytorch_lightning`` and ``lightning.pytorch`` Trainers alike: the class derives
    from the ``Callback`` of each namespace that is installed.

    Measures in ``on_before_optimizer_step``: after gradient accumulation and AMP unscaling,
    before clipping, once per optimizer step. Layer names are relative to the LightningModule.
    Findings are logged once on global rank zero; per-layer scalars go to the trainer's loggers
    every ``log_every_n_steps`` steps. After fit, :attr:`findings` and :attr:`history` hold
    everything.

    Every option is checked here, at construction: a bad value raises ``ValueError`` naming the
    option, what is allowed and what was given; an unknown name raises ``TypeError``. The
    options and their documentation come from :mod:`graddiag.data.options` (``Args`` below is
    generated from it).
    """

    @option_signature
    def __init__(
        self,
        *,
        activation_registry: ActivationRegistry | None = None,
        reporters: Sequence[Reporter] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.config, self.adapter = split_options(options)
        self.log_every_n_steps = self.adapter.log_every_n_steps
        self.figure_every_n_steps = self.adapter.figure_every_n_steps
        self.prefix = self.adapter.prefix
        self.progress_bar = self.adapter.progress_bar
        self.print_summary = self.adapter.print_summary
        self.activation_registry = check_activation_registry(activation_registry)
        self.extra_reporters = check_reporters(reporters)
        self.monitor: GradientMonitor | None = None
        self._saved: dict[str, Any] | None = None
        self._shown_in_progress_bar: int | None = None
        self._state_key: tuple[Any, Any, str] | None = None
        self._replay = LightningStepReplay()  # the batches of the current optimizer step
        self._summary_printed = False

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        """Names this callback's state in checkpoints: the identity settings only (what is
        monitored and where it is logged), so that a resumed run with other thresholds or
        cadences keeps its history, while two callbacks watching different layers, norms or
        prefixes keep separate state. Lightning reads it around every hook call (its
        profiler's action names), so it is built once per settings object, not six times a
        step."""
        cached = self._state_key
        if cached is None or cached[0] is not self.config or cached[1] is not self.adapter:
            cached = self._state_key = (self.config, self.adapter, self._generate_state_key(
                **identity_settings(self.config, self.adapter)))
        return cached[2]

    # ------------------------------------------------------------------ results
    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, oldest first."""
        return list(self.monitor.findings) if self.monitor else []

    @property
    def history(self) -> pd.DataFrame:
        """One row per recorded step and layer (see :attr:`GradientMonitor.history`)."""
        if self.monitor is None:
            return History(1).frame()
        return self.monitor.history

    @property
    def activation_history(self) -> pd.DataFrame:
        """One row per activation step and activation site."""
        if self.monitor is None:
            return History(1).activation_frame()
        return self.monitor.activation_history

    def summary(self) -> pd.DataFrame:
        """Per-layer summary: median/min/max gradient norm, first and last finding."""
        if self.monitor is None:
            return summarize(History(1).frame(), [])
        return self.monitor.summary()

    def save_history(self, path: str | Path) -> Path:
        """Write :attr:`history` to ``.csv`` or ``.parquet`` (by the file's extension)."""
        return save_table(self.history, path)

    # ------------------------------------------------------------------ wiring
    def _reporters(self, trainer: pl.Trainer) -> list[Reporter]:
        if trainer.global_rank != 0:
            return []
        every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        reporters: list[Reporter] = [ConsoleReporter()]
        others = []
        for logger in trainer.loggers:
            if isinstance(logger, TENSORBOARD_LOGGERS):
                reporters.append(TensorBoardReporter(
                    cast(Any, logger).experiment, prefix=self.prefix, scalars_every_n_steps=every,
                    figure_every_n_steps=self.figure_every_n_steps,
                ))
            else:
                others.append(logger)
        if others:
            reporters.append(LoggerReporter(others, every, self.prefix))
            log.warning(
                "graddiag: %s get(s) graddiag's scalars only; the dashboard layout, findings "
                "text, gradient-flow figures and histograms need a TensorBoardLogger.",
                ", ".join(type(lg).__name__ for lg in others),
            )
        return reporters + self.extra_reporters

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.monitor is not None:
            if not self.monitor.closed:
                return
            self._saved = self._saved or self.monitor.state_dict()  # a second fit() continues
        self.monitor = GradientMonitor(
            pl_module,
            config=self.config,
            reporters=self._reporters(trainer),
            activation_registry=self.activation_registry,
            # activation statistics are summed over ranks on agreed sites, through the strategy
            process_group=StrategyReducer(trainer.strategy) if trainer.world_size > 1 else None,
            # watched: forward passes inside training_step only (not validation, not the
            # sanity check, not backward or the optimizer step)
            watch="training_step",
        )
        if self._saved is not None:
            self.monitor.load_state_dict(self._saved)
            self._saved = None
        self.monitor.expect_step(None)  # armed batch by batch, below

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is not None:
            self.monitor.expect_step(trainer.global_step)
            if self.config.replay_nonfinite:  # a reference and the random state (~3 us)
                self._replay.keep(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:  # nothing is watched outside a training batch
            self.monitor.expect_step(None)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.monitor is not None:  # manual_backward inside training_step: leave the watch
            self.monitor.pause_activations()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.resume_activations()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.monitor is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        amp_scale = getattr(scaler, "_scale", None) if scaler is not None else None
        inner = getattr(optimizer, "optimizer", optimizer)
        # Lightning clips by norm unless gradient_clip_algorithm="value" is given
        clip = (trainer.gradient_clip_val
                if (trainer.gradient_clip_algorithm or "norm") == "norm" else None)
        report = self.monitor.step(
            trainer.global_step,
            optimizer=_optimizer_index(trainer, optimizer),
            params=(p for group in inner.param_groups for p in group["params"]),
            amp_scale=amp_scale,  # a device tensor: no host sync
            grads_scaled=amp_scale is not None and _optimizer_unscales_itself(optimizer),
            clip_norm=float(clip) if clip else None,
            raise_on_alarm=False,
            replay=self._replay if self.config.replay_nonfinite else None,
        )
        self._replay.clear()
        self._apply(trainer, optimizer, report)
        # Under trainer.fit(torch.compile(module)) Lightning's log runs under dynamo, and a log
        # call from this hook would make it recompile: no progress-bar entry then.
        compiled = getattr(pl_module, "_compiler_ctx", None) is not None
        if self.progress_bar and report.recorded and not compiled:
            active = self.monitor.active_conditions()
            if active != self._shown_in_progress_bar:  # only on change
                _show_count(trainer, pl_module, "graddiag", active)
                self._shown_in_progress_bar = active

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._shown_in_progress_bar = None  # each fit starts with an empty progress bar
        self._summary_printed = False
        if self.monitor is not None:  # learning rates and not_in_optimizer on parameter steps
            self.monitor.watch_optimizers(list(trainer.optimizers))

    def _apply(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, report: StepReport) -> None:
        action = report.action
        # every rank takes the same decision; with only "warn" actions none ever skips or stops
        may_act = self.config.on_nonfinite != "warn" or self.config.on_exploding != "warn"
        if trainer.world_size > 1 and may_act:
            action = agree_on_action(trainer.strategy, action)
        if action == "continue":
            return
        if action == "skip" and report.action != "skip" and self.monitor is not None:
            self.monitor.note_skipped()  # another rank asked for it
        for group in optimizer.param_groups:  # nothing is applied: no gradient, no update
            for param in group["params"]:
                param.grad = None
        if action == "raise":
            raise GradientAlarm(
                [f for f in self.monitor.findings if f.kind in ALARM_KINDS][-1:]  # type: ignore[union-attr]
            )
        if not trainer.is_global_zero:
            trainer.should_stop = trainer.should_stop or action == "stop"
            return
        reason = "; ".join(sorted({f.kind for f in report.findings})) or _still_active(self.monitor)
        if action == "stop":
            trainer.should_stop = True
            log.warning("graddiag: stopping training at step %d (%s)", report.step, reason)
            return
        count = self.monitor.skipped_steps if self.monitor is not None else 0
        if count <= 3 or _is_power_of_ten(count):
            log.warning(
                "graddiag: skipped optimizer step %d (%s): the optimizer applied nothing; "
                "%d step(s) skipped so far%s.", report.step, reason, count,
                "" if count < 3 else " (further skips are counted in graddiag/skipped_steps "
                "and the end-of-fit summary, and reported here at 10, 100, 1000, ...)",
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()
        self._print_summary(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Ctrl-C (Lightning calls this for KeyboardInterrupt) or an error: close the logs and
        still print the summary of what was recorded."""
        self._finish()
        self._print_summary(trainer, interrupted_at=trainer.global_step)

    def _print_summary(self, trainer: pl.Trainer, interrupted_at: int | None = None) -> None:
        if (not self.print_summary or self._summary_printed or not trainer.is_global_zero
                or self.monitor is None):
            return
        self._summary_printed = True
        rank_zero_info(summary_screen(self.monitor.summary(), self.monitor.findings,
                                      skipped_steps=self.monitor.skipped_steps,
                                      interrupted_at=interrupted_at))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish()

    def _finish(self) -> None:
        self._replay.clear()
        if self.monitor is not None:
            self.monitor.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict() if self.monitor is not None else dict(self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._saved = dict(state_dict)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Say so when the checkpoint holds graddiag state, but none under this ``state_key``."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or not trainer.is_global_zero:
            return
        siblings = {getattr(cb, "state_key", None) for cb in getattr(trainer, "callbacks", [])}
        name = type(self).__qualname__
        others = [k for k in states
                  if isinstance(k, str) and k.startswith(name) and k not in siblings]
        if others:
            log.warning(
                "graddiag: the checkpoint holds %s state under other identity settings (%s) and "
                "none under this callback's (%s); its history starts afresh. Resume with the "
                "same norm_type, include, exclude and prefix to continue that history.",
                name, "; ".join(others), self.state_key,
            )


GradientDiagnostics.__doc__ = f"{GradientDiagnostics.__doc__}\n" + docstring_section(
    "Args", OPTIONS, extra={
        "activation_registry": "Activation types and functions to analyse; None uses the "
                               "built-in ones (extend graddiag.default_registry.copy()).",
        "reporters": "Further reporters, each with report(record, findings) and close().",
    })


def _still_active(monitor: GradientMonitor | None) -> str:
    kinds = [k for k in ALARM_KINDS if monitor is not None and monitor.rules.active(k)]
    return f"{' and '.join(kinds)} still active" if kinds else "another rank's alarm"


def _is_power_of_ten(n: int) -> bool:
    return n >= 10 and str(n).strip("0") == "1"


def _show_count(trainer: pl.Trainer, pl_module: pl.LightningModule, key: str, count: int) -> None:
    """Show an integer in the progress bar (``graddiag=2``, not ``self.log``'s ``2.000``).

    ``self.log`` turns every value into a float tensor, which progress bars print with three
    decimals, so the count goes straight into the trainer's progress-bar metrics (reset by
    Lightning at the start of each fit): as an ``int`` (the tqdm bar pads floats and numeric
    strings, not ints) or, for the Rich bar (which prints every number with three decimals), as
    a string. ``self.log`` is the fallback.
    """
    metrics = getattr(trainer, "progress_bar_metrics", None)
    if isinstance(metrics, dict):
        rich = isinstance(getattr(trainer, "progress_bar_callback", None), RICH_PROGRESS_BARS)
        metrics[key] = str(int(count)) if rich else int(count)
    else:
        pl_module.log(key, float(count), prog_bar=True, logger=False, on_step=True, on_epoch=False)


def _optimizer_unscales_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Fused optimizers unscale inside ``step()``: their gradients are still scaled before it."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the real one
    for i, candidate in enumerate(trainer.optimizers):
        if candidate is inner or candidate is optimizer:
            return i
    return 0

