"""The progress-bar entry ``graddiag=N``: how many reported conditions still hold."""

from __future__ import annotations

from typing import TYPE_CHECKING

from graddiag.lightning.compat import RICH_PROGRESS_BARS

if TYPE_CHECKING:
    import pytorch_lightning as pl


class ProgressBarCount:
    """Shows the count of active conditions in the progress bar, only when it changes."""

    def __init__(self, key: str = "graddiag") -> None:
        self.key = key
        self.shown: int | None = None  # the count on screen (None: nothing yet this fit)

    def reset(self) -> None:
        """Each fit starts with an empty progress bar."""
        self.shown = None

    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> None:
        """Show ``count`` unless it is already on screen."""
        if count != self.shown:
            show_count(trainer, pl_module, self.key, count)
            self.shown = count


def show_count(trainer: pl.Trainer, pl_module: pl.LightningModule, key: str, count: int) -> None:
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
