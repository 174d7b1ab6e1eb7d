"""The scalar metrics of a record, under hierarchical keys that TensorBoard's tag filter groups."""

from __future__ import annotations

import math

import numpy as np

from graddiag.data.records import StepRecord


def scalar_metrics(
    record: StepRecord, prefix: str, active_findings: int, skipped_steps: int = 0
) -> dict[str, float]:
    """``{key: value}`` for one record.

    Keys: ``{prefix}grad_norm/{layer}``, ``{prefix}param_norm/{layer}``,
    ``{prefix}update_ratio/{layer}``, ``{prefix}saturated/{site}``, ``{prefix}dead/{site}``,
    ``{prefix}gain/{site}``, ``{prefix}global_grad_norm``, ``{prefix}active_findings`` and
    ``{prefix}skipped_steps`` (optimizer steps skipped so far on graddiag's request).
    Layers without a gradient are left out, so every value is meaningful.
    """
    metrics: dict[str, float] = {}
    for i, layer in enumerate(record.layers):
        if record.has_grad[i]:
            metrics[f"{prefix}grad_norm/{layer}"] = float(record.grad_norm[i])
    for name, values in (("param_norm", record.param_norm), ("update_ratio", record.update_ratio)):
        if values is not None:
            for layer, value in zip(record.layers, values):
                if np.isfinite(value):
                    metrics[f"{prefix}{name}/{layer}"] = float(value)
    acts = record.activations
    if acts is not None:
        for i, site in enumerate(acts.sites):
            metrics[f"{prefix}gain/{site}"] = float(acts.gain[i])
            key = "saturated" if acts.families[i] == "saturating" else "dead"
            value = acts.saturated[i] if key == "saturated" else acts.dead[i]
            if np.isfinite(value):
                metrics[f"{prefix}{key}/{site}"] = float(value)
    metrics[f"{prefix}global_grad_norm"] = record.global_norm
    metrics[f"{prefix}active_findings"] = float(active_findings)
    metrics[f"{prefix}skipped_steps"] = float(skipped_steps)
    return metrics


LOG10_STATISTICS = ("grad_norm/", "global_grad_norm", "layer_norm/", "update_ratio/")


def log10_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``{prefix}log10_<statistic>...: log10(value)`` for the gradient-norm and update-ratio keys.

    Gradient norms span many decades (a vanishing layer at 1e-9 next to one at 1): on a linear
    axis the small ones sit on zero. Zero, negative and non-finite values have no logarithm and
    are left out (their linear series shows them).
    """
    logs: dict[str, float] = {}
    for key, value in metrics.items():
        name = key[len(prefix):]
        if name.startswith(LOG10_STATISTICS) and value > 0 and math.isfinite(value):
            logs[f"{prefix}log10_{name}"] = math.log10(value)
    return logs
