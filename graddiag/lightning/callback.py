"""GradientDiagnostics: the Lightning adapter around :class:`~graddiag.GradientMonitor`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from graddiag.data.findings import Finding
from graddiag.data.options import (
    OPTIONS,
    docstring_section,
    identity_settings,
    option_signature,
    split_options,
)
from graddiag.data.policy import StepReport
from graddiag.lightning.actions import apply_action
from graddiag.lightning.checkpoint import warn_if_state_elsewhere
from graddiag.lightning.compat import (
    CALLBACK_BASES,
)
from graddiag.lightning.progress import ProgressBarCount
from graddiag.lightning.replay import LightningStepReplay
from graddiag.lightning.step_inputs import step_inputs
from graddiag.lightning.strategy import StrategyReducer
from graddiag.lightning.summary import SummaryPrinter
from graddiag.lightning.wiring import trainer_reporters
from graddiag.measure.activations import ActivationRegistry
from graddiag.pipeline.arguments import check_activation_registry, check_reporters
from graddiag.pipeline.history import History
from graddiag.pipeline.monitor import GradientMonitor
from graddiag.reporters import Reporter
from graddiag.reporters.summary import summarize
from graddiag.reporters.tables import save_table

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
        self._progress = ProgressBarCount()
        self._state_key: tuple[Any, Any, str] | None = None
        self._replay = LightningStepReplay()  # the batches of the current optimizer step
        self._summary = SummaryPrinter()

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
            reporters=trainer_reporters(
                trainer, log_every_n_steps=self.log_every_n_steps, prefix=self.prefix,
                figure_every_n_steps=self.figure_every_n_steps, extra=self.extra_reporters),
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
            step = trainer.global_step
            self.monitor.expect_step(step)
            # a reference and the random state, on the steps that can find a NaN to replay
            if self.config.replay_nonfinite and self.monitor.measures(step):
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
        step = trainer.global_step
        # what Lightning knows about the optimizer step matters only to a measured step
        inputs = step_inputs(trainer, optimizer) if self.monitor.measures(step) else {}
        report = self.monitor.step(
            step, **inputs, raise_on_alarm=False,
            replay=self._replay if self.config.replay_nonfinite else None,
        )
        self._replay.clear()
        self._apply(trainer, optimizer, report)
        # Under trainer.fit(torch.compile(module)) Lightning's log runs under dynamo, and a log
        # call from this hook would make it recompile: no progress-bar entry then.
        if (self.progress_bar and report.recorded
                and getattr(pl_module, "_compiler_ctx", None) is None):
            self._progress.update(trainer, pl_module, self.monitor.active_conditions())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:  # steps kept for their block are judged before validation
            self.monitor.flush()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:  # and at the end of every epoch
            self.monitor.flush()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._progress.reset()  # each fit starts with an empty progress bar
        self._summary.reset()
        if self.monitor is not None:  # learning rates and not_in_optimizer on parameter steps
            self.monitor.watch_optimizers(list(trainer.optimizers))
            _warn_if_steps_restart(self.monitor, trainer.global_step)

    def _apply(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, report: StepReport) -> None:
        apply_action(trainer, optimizer, report, self.monitor, self.config)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()
        self._summary.print(trainer, self.monitor, self.print_summary)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Ctrl-C (Lightning calls this for KeyboardInterrupt) or an error: close the logs and
        still print the summary of what was recorded."""
        self._finish()
        self._summary.print(trainer, self.monitor, self.print_summary,
                            interrupted_at=trainer.global_step)

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
        warn_if_state_elsewhere(trainer, checkpoint, type(self).__qualname__, self.state_key)


def _warn_if_steps_restart(monitor: GradientMonitor, first_step: int) -> None:
    """A fit that starts at or below a step an earlier fit with this callback recorded (a new
    Trainer restarts ``global_step`` at 0) would repeat step numbers in the history: say so."""
    records = monitor.records
    if records and first_step <= records[-1].step:
        log.warning(
            "graddiag: this fit starts at step %d, at or before step %d that an earlier fit with "
            "this callback recorded (a new Trainer starts counting at 0); the history will hold "
            "both fits' records under repeated step numbers. Use a new GradientDiagnostics per "
            "Trainer, or continue the same Trainer (or ckpt_path=) to keep one step count.",
            first_step, records[-1].step)


GradientDiagnostics.__doc__ = f"{GradientDiagnostics.__doc__}\n" + docstring_section(
    "Args", OPTIONS, extra={
        "activation_registry": "Activation types and functions to analyse; None uses the "
                               "built-in ones (extend graddiag.default_registry.copy()).",
        "reporters": "Further reporters, each with report(record, findings) and close().",
    })
