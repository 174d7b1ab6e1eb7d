"""The scalar metrics of a record, under hierarchical keys that TensorBoard's tag filter groups."""

from __future__ import annotations

import numpy as np

from graddiag.data.records import StepRecord


def scalar_metrics(record: StepRecord, prefix: str, active_findings: int) -> dict[str, float]:
    """``{key: value}`` for one record.

    Keys: ``{prefix}grad_norm/{layer}``, ``{prefix}param_norm/{layer}``,
    ``{prefix}update_ratio/{layer}``, ``{prefix}saturated/{site}``, ``{prefix}dead/{site}``,
    ``{prefix}gain/{site}``, ``{prefix}global_grad_norm`` and ``{prefix}active_findings``.
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
    return metrics
