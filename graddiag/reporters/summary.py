"""Per-layer summary table built from the history and the findings."""

from __future__ import annotations

import math

import pandas as pd

from graddiag.data.findings import Finding

SUMMARY_COLUMNS = ["layer", "position", "records", "grad_norm_median", "grad_norm_min",
                   "grad_norm_max", "last_grad_norm", "nan_steps", "findings", "first_finding",
                   "first_finding_step", "last_finding", "last_finding_step", "activation_site"]


def summarize(history: pd.DataFrame, findings: list[Finding]) -> pd.DataFrame:
    """One row per layer (forward order), then one per activation site named by a finding.

    ``grad_norm_*`` ignore NaN norms (steps without a gradient, or with NaN in it) and keep inf
    (an Inf element): a layer that was inf on every step reads inf, not NaN;
    ``nan_steps`` counts the recorded steps where the layer had a gradient whose norm is NaN
    (so a layer whose statistics are NaN got NaN gradients if it is above 0, and no gradient
    otherwise); ``findings`` counts the onsets in that layer; ``first_finding_step`` and
    ``last_finding_step`` are integers (pandas ``Int64``), ``<NA>`` for a layer without one.
    ``activation_site`` is True for the rows of activation sites (they have no gradient norms).
    """
    rows = []
    if len(history):
        for layer, group in history.groupby("layer", sort=False):
            measured = group["grad_norm"].dropna()  # inf stays: it is a measurement
            rows.append({
                "layer": layer,
                "position": int(group["position"].iloc[-1]),
                "records": int(len(group)),
                "grad_norm_median": float(measured.median()) if len(measured) else float("nan"),
                "grad_norm_min": float(measured.min()) if len(measured) else float("nan"),
                "grad_norm_max": float(measured.max()) if len(measured) else float("nan"),
                "last_grad_norm": float(group["grad_norm"].iloc[-1]),
                "nan_steps": (int((group["has_grad"].astype(bool)
                                   & group["grad_norm"].isna()).sum())
                              if "has_grad" in group else 0),
            })
    layers = {r["layer"] for r in rows}
    known = set(layers)
    for f in findings:
        if f.layer not in known:
            known.add(f.layer)
            rows.append({"layer": f.layer, "position": len(rows), "records": 0, "nan_steps": 0})
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:8])
    by_layer: dict[str, list[Finding]] = {}
    for f in findings:
        by_layer.setdefault(f.layer, []).append(f)
    table["findings"] = [len(by_layer.get(layer, [])) for layer in table["layer"]]
    table["first_finding"] = [by_layer[name][0].kind if name in by_layer else None for name in table["layer"]]
    # steps stay integers: <NA> where a layer has no finding (not NaN in a float column)
    table["first_finding_step"] = pd.array(
        [by_layer[name][0].step if name in by_layer else None for name in table["layer"]],
        dtype="Int64")
    table["last_finding"] = [by_layer[name][-1].kind if name in by_layer else None for name in table["layer"]]
    table["last_finding_step"] = pd.array(
        [by_layer[name][-1].step if name in by_layer else None for name in table["layer"]],
        dtype="Int64")
    table["activation_site"] = [layer not in layers for layer in table["layer"]]
    return table.sort_values("position", kind="stable").reset_index(drop=True)


def norm_cell(value: object, nan_steps: float = 0) -> str:
    """A summary statistic as the console and the text tab show it: NaN reads ``NaN`` for a
    layer whose gradients held NaN, ``no grad`` for one that never got a gradient."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN" if nan_steps > 0 else "no grad"  # NaN (an activation site's): False
    return f"{float(value):.3g}"  # type: ignore[arg-type]
