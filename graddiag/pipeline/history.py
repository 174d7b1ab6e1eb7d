"""Bounded in-memory history of recorded steps, served as long-format pandas tables."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch

from graddiag.data.records import ActivationRecord, StepRecord

HISTORY_COLUMNS = ["step", "optimizer", "layer", "position", "grad_norm", "param_norm",
                   "update_ratio", "has_grad", "nonfinite", "amp_overflow", "clipped"]
ACTIVATION_COLUMNS = ["step", "site", "kind", "saturated_fraction", "dead_fraction", "gain",
                      "calls", "position"]


class History:
    """Keeps step records within ``max_rows`` (steps x layers).

    When the bound is passed, every second record of the older half is dropped, except the
    records of steps where a finding began (``pin``), so the whole run stays covered at a
    coarser resolution. Memory is therefore at most about ``max_rows x 40`` bytes.
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.records: list[StepRecord] = []
        self.pinned: set[int] = set()
        self._rows = 0
        self.thinned = 0

    def append(self, record: StepRecord) -> None:
        self.records.append(record)
        self._rows += len(record.layers)
        if self._rows > self.max_rows and len(self.records) > 2:
            self._thin()

    def pin(self, step: int) -> None:
        """Never drop the record of ``step`` (a finding began there)."""
        self.pinned.add(step)

    def _thin(self) -> None:
        half = len(self.records) // 2
        old, recent = self.records[:half], self.records[half:]
        kept = [r for i, r in enumerate(old) if i % 2 == 0 or r.step in self.pinned]
        self.thinned += len(old) - len(kept)
        self.records = kept + recent
        self._rows = sum(len(r.layers) for r in self.records)

    @property
    def rows(self) -> int:
        return self._rows

    def state_dict(self) -> dict[str, Any]:
        """Records as tensors and plain containers (loadable with ``weights_only=True``)."""
        layer_lists: list[list[str]] = []
        ids: dict[tuple[str, ...], int] = {}
        records = []
        for r in self.records:
            key = tuple(r.layers)
            if key not in ids:
                ids[key] = len(layer_lists)
                layer_lists.append(list(r.layers))
            records.append(_record_state(r, ids[key]))
        return {"layer_lists": layer_lists, "records": records, "pinned": sorted(self.pinned),
                "thinned": self.thinned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layer_lists = [list(names) for names in state["layer_lists"]]
        self.records = [_record_from_state(r, layer_lists) for r in state["records"]]
        self.pinned = set(state["pinned"])
        self.thinned = int(state["thinned"])
        self._rows = sum(len(r.layers) for r in self.records)

    def frame(self) -> pd.DataFrame:
        """One row per recorded step and layer (see :data:`HISTORY_COLUMNS`)."""
        if not self.records:
            return pd.DataFrame({c: [] for c in HISTORY_COLUMNS})
        parts: dict[str, list[Any]] = {c: [] for c in HISTORY_COLUMNS}
        for r in self.records:
            positions = np.arange(len(r.layers))
            if r.measured is not None:  # another optimizer's layers: not measured here
                positions = np.flatnonzero(r.measured)
                r = _only_measured(r)
            n = len(r.layers)
            nan = np.full(n, np.nan)
            nonfinite = np.zeros(n, dtype=bool)
            nonfinite[list(r.nonfinite)] = True
            parts["step"].append(np.full(n, r.step))
            parts["optimizer"].append(np.full(n, r.optimizer))
            parts["layer"].append(np.asarray(r.layers, dtype=object))
            parts["position"].append(positions)
            parts["grad_norm"].append(r.grad_norm)
            parts["param_norm"].append(nan if r.param_norm is None else r.param_norm)
            parts["update_ratio"].append(nan if r.update_ratio is None else r.update_ratio)
            parts["has_grad"].append(r.has_grad)
            parts["nonfinite"].append(nonfinite)
            parts["amp_overflow"].append(np.full(n, r.amp_overflow))
            parts["clipped"].append(np.full(n, r.clipped, dtype=object))
        return pd.DataFrame({c: np.concatenate(v) for c, v in parts.items()})

    def activation_frame(self) -> pd.DataFrame:
        """One row per activation step and activation site (see :data:`ACTIVATION_COLUMNS`)."""
        rows: dict[str, list[Any]] = {c: [] for c in ACTIVATION_COLUMNS}
        for r in self.records:
            a = r.activations
            if a is None:
                continue
            n = len(a.sites)
            rows["step"].append(np.full(n, r.step))
            rows["site"].append(np.asarray(a.sites, dtype=object))
            rows["kind"].append(np.asarray(a.kinds, dtype=object))
            rows["saturated_fraction"].append(a.saturated)
            rows["dead_fraction"].append(a.dead)
            rows["gain"].append(a.gain)
            rows["calls"].append(a.calls)
            rows["position"].append(np.full(n, np.nan) if a.position is None else a.position)
        if not rows["step"]:
            return pd.DataFrame({c: [] for c in ACTIVATION_COLUMNS})
        return pd.DataFrame({c: np.concatenate(v) for c, v in rows.items()})


def _only_measured(record: StepRecord) -> StepRecord:
    keep = np.flatnonzero(record.measured)
    remap = {int(old): new for new, old in enumerate(keep)}
    return dataclasses.replace(
        record,
        layers=[record.layers[i] for i in keep],
        grad_norm=record.grad_norm[keep],
        has_grad=record.has_grad[keep],
        nonfinite={remap[i]: v for i, v in record.nonfinite.items() if i in remap},
        param_norm=None if record.param_norm is None else record.param_norm[keep],
        update_ratio=None if record.update_ratio is None else record.update_ratio[keep],
        measured=None,
    )


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.array(array, copy=True))


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy().copy()


def _record_state(r: StepRecord, layers_id: int) -> dict[str, Any]:
    acts = None
    if r.activations is not None:
        a = r.activations
        acts = {"sites": list(a.sites), "kinds": list(a.kinds), "families": list(a.families),
                "saturated": _tensor(a.saturated), "dead": _tensor(a.dead),
                "gain": _tensor(a.gain), "calls": _tensor(a.calls),
                "cut_ops": {k: list(v) for k, v in a.cut_ops.items()},
                "position": _tensor(a.position)}
    return {
        "step": r.step, "layers": layers_id, "grad_norm": _tensor(r.grad_norm),
        "has_grad": _tensor(r.has_grad), "missing": {int(k): list(v) for k, v in r.missing.items()},
        "nonfinite": {int(k): dict(v) for k, v in r.nonfinite.items()},
        "param_norm": _tensor(r.param_norm), "update_ratio": _tensor(r.update_ratio),
        "activations": acts, "grad_histograms": _tensor(r.grad_histograms),
        "optimizer": r.optimizer, "measured": _tensor(r.measured),
        "amp_overflow": r.amp_overflow, "amp_scale": r.amp_scale, "clipped": r.clipped,
    }


def _record_from_state(d: dict[str, Any], layer_lists: list[list[str]]) -> StepRecord:
    acts = None
    if d["activations"] is not None:
        a = d["activations"]
        acts = ActivationRecord(
            sites=list(a["sites"]), kinds=list(a["kinds"]), families=list(a["families"]),
            saturated=_array(a["saturated"]), dead=_array(a["dead"]), gain=_array(a["gain"]),
            calls=_array(a["calls"]), cut_ops={k: list(v) for k, v in a["cut_ops"].items()},
            position=_array(a.get("position")),
        )
    return StepRecord(
        step=int(d["step"]), layers=layer_lists[d["layers"]], grad_norm=_array(d["grad_norm"]),
        has_grad=_array(d["has_grad"]), missing={int(k): list(v) for k, v in d["missing"].items()},
        nonfinite={int(k): dict(v) for k, v in d["nonfinite"].items()},
        param_norm=_array(d["param_norm"]), update_ratio=_array(d["update_ratio"]),
        activations=acts, grad_histograms=_array(d["grad_histograms"]),
        optimizer=int(d["optimizer"]), measured=_array(d["measured"]),
        amp_overflow=bool(d["amp_overflow"]), amp_scale=d.get("amp_scale"), clipped=d["clipped"],
    )
