"""The end-of-fit summary screen, printed once per fit on global rank zero."""

from __future__ import annotations

from typing import TYPE_CHECKING

from graddiag.lightning.compat import rank_zero_info
from graddiag.pipeline.monitor import GradientMonitor
from graddiag.reporters.console import summary_screen

if TYPE_CHECKING:
    import pytorch_lightning as pl


class SummaryPrinter:
    """Prints the per-layer summary and findings at the end of a fit (or when it is
    interrupted), once per fit."""

    def __init__(self) -> None:
        self.printed = False

    def reset(self) -> None:
        """A new fit: its summary is still to be printed."""
        self.printed = False

    def print(self, trainer: pl.Trainer, monitor: GradientMonitor | None, enabled: bool,
              interrupted_at: int | None = None) -> None:
        """Print ``monitor``'s summary unless not ``enabled``, printed already this fit, off rank
        zero, or there is no monitor; ``interrupted_at``: the step a Ctrl-C or error stopped at."""
        if not enabled or self.printed or not trainer.is_global_zero or monitor is None:
            return
        self.printed = True
        rank_zero_info(summary_screen(monitor.summary(), monitor.findings,
                                      skipped_steps=monitor.skipped_steps,
                                      interrupted_at=interrupted_at))
