"""What Lightning knows about an optimizer step that the monitor's ``step()`` needs: which
optimizer, its parameters, the AMP scale and the clipping threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pytorch_lightning as pl


def step_inputs(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Keyword arguments of :meth:`GradientMonitor.step` for ``optimizer``'s step in
    ``trainer`` (``optimizer``, ``params``, ``amp_scale``, ``grads_scaled``, ``clip_norm``,
    ``clip_value``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    amp_scale = getattr(scaler, "_scale", None) if scaler is not None else None
    inner = getattr(optimizer, "optimizer", optimizer)
    # Lightning clips by norm unless gradient_clip_algorithm="value" is given
    clip = trainer.gradient_clip_val
    by_value = trainer.gradient_clip_algorithm == "value"
    return {
        "optimizer": optimizer_index(trainer, optimizer),
        "params": (p for group in inner.param_groups for p in group["params"]),
        "amp_scale": amp_scale,  # a device tensor: no host sync
        "grads_scaled": amp_scale is not None and _optimizer_unscales_itself(optimizer),
        "clip_norm": float(clip) if clip and not by_value else None,
        "clip_value": float(clip) if clip and by_value else None,
    }


def _optimizer_unscales_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Fused optimizers unscale inside ``step()``: their gradients are still scaled before it."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    """The position of ``optimizer`` (or the one a ``LightningOptimizer`` wraps) in
    ``trainer.optimizers``; 0 when it is not there."""
    inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the real one
    for i, candidate in enumerate(trainer.optimizers):
        if candidate is inner or candidate is optimizer:
            return i
    return 0
