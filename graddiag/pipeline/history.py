"""Bounded in-memory history of recorded steps, served as long-format pandas tables."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from graddiag.data.records import StepRecord
from graddiag.pipeline import history_state

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
        """Records column by column (a few tensors, loadable with ``weights_only=True``)."""
        return {"columns": history_state.encode(self.records), "pinned": sorted(self.pinned),
                "thinned": self.thinned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s records; also reads the older list-of-records state."""
        if "columns" in state:
            records = history_state.decode(state["columns"])
        elif "records" in state:
            records = history_state.decode_record_list(state)
        else:
            raise ValueError(
                "graddiag: the history state has neither 'columns' nor 'records' (keys: "
                f"{sorted(state)}); it was not saved by GradientMonitor.state_dict()"
            )
        self.records = records
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
    assert record.measured is not None  # called for records of one optimizer's layers only
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
