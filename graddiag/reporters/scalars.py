"""The scalar metrics of a record, under hierarchical keys that TensorBoard's tag filter groups
(:mod:`graddiag.reporters.events` writes them, all of a step's in one event)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from graddiag.data.records import StepRecord


@lru_cache(maxsize=256)
def _tags(prefix: str, statistic: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """``{prefix}{statistic}/{name}`` for every name (built once per layer or site list)."""
    return tuple(f"{prefix}{statistic}/{name}" for name in names)


def _add(metrics: dict[str, float], tags: tuple[str, ...], values: np.ndarray,
         keep: np.ndarray) -> None:
    """Add ``values[keep]`` under their tags (one vectorised selection, no per-layer tests)."""
    if keep.all():
        metrics.update(zip(tags, values.tolist()))
    else:
        positions = np.flatnonzero(keep)
        metrics.update(zip([tags[i] for i in positions], values[positions].tolist()))


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
    layers = tuple(record.layers)
    _add(metrics, _tags(prefix, "grad_norm", layers), record.grad_norm, record.has_grad)
    for name, values in (("param_norm", record.param_norm), ("update_ratio", record.update_ratio)):
        if values is not None:
            _add(metrics, _tags(prefix, name, layers), values, np.isfinite(values))
    acts = record.activations
    if acts is not None:
        sites = tuple(acts.sites)
        metrics.update(zip(_tags(prefix, "gain", sites), np.asarray(acts.gain).tolist()))
        saturating = np.array([f == "saturating" for f in acts.families], dtype=bool)
        for key, values, family in (("saturated", acts.saturated, saturating),
                                    ("dead", acts.dead, ~saturating)):
            values = np.asarray(values, dtype=float)
            _add(metrics, _tags(prefix, key, sites), values, family & np.isfinite(values))
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


def event_metrics(record: StepRecord, prefix: str, active_findings: int,
                  skipped_steps: int = 0) -> dict[str, float]:
    """What graddiag's TensorBoard event of a logging step carries: :func:`scalar_metrics`, the
    layer-norm margin chart's three (``{prefix}layer_norm/median``, ``/min``, ``/max`` over the
    layers with a finite gradient) and :func:`log10_metrics` of them all."""
    metrics = scalar_metrics(record, prefix, active_findings, skipped_steps)
    finite = record.grad_norm[record.has_grad & np.isfinite(record.grad_norm)]
    if finite.size:
        metrics[f"{prefix}layer_norm/median"] = _median(finite)
        metrics[f"{prefix}layer_norm/min"] = float(finite.min())
        metrics[f"{prefix}layer_norm/max"] = float(finite.max())
    metrics.update(log10_metrics(metrics, prefix))
    return metrics


def _median(values: np.ndarray) -> float:
    """The median of a non-empty array, from one sort (``np.median`` partitions instead, and on
    the cold caches a training step leaves that costs about 0.1 ms more per logging step)."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (float(ordered[middle - 1]) + float(ordered[middle])) / 2
