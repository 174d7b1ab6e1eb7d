"""Checkpoints that hold graddiag state under another callback identity (``state_key``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("graddiag")


def warn_if_state_elsewhere(trainer: pl.Trainer, checkpoint: dict[str, Any], name: str,
                            state_key: str) -> None:
    """On global rank zero, warn when ``checkpoint`` holds state of callbacks of class ``name``
    under other identity settings and none under ``state_key`` (whose history then starts
    afresh); state of the trainer's other such callbacks does not count."""
    states = checkpoint.get("callbacks") or {}
    if state_key in states or not trainer.is_global_zero:
        return
    siblings = {getattr(cb, "state_key", None) for cb in getattr(trainer, "callbacks", [])}
    others = [k for k in states
              if isinstance(k, str) and k.startswith(name) and k not in siblings]
    if others:
        log.warning(
            "graddiag: the checkpoint holds %s state under other identity settings (%s) and "
            "none under this callback's (%s); its history starts afresh. Resume with the "
            "same norm_type, include, exclude and prefix to continue that history.",
            name, "; ".join(others), state_key,
        )
