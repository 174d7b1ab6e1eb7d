"""History records as checkpoint state, column by column: a few tensors instead of one per record.

Each record field becomes one column: a tensor with one entry per record (``step``,
``optimizer``, ...) or, for per-layer and per-site arrays, all records' arrays concatenated
plus an ``int32`` length per record (``-1`` for ``None``). Names (layer lists, activation site
layouts, parameter names) are stored once and referred to by index. Everything is a tensor or a
plain container, so checkpoints load with ``torch.load(weights_only=True)``; a history at the
default bound (200,000 rows) is a few MB and takes milliseconds, not seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graddiag.data.records import ActivationRecord, StepRecord

FORMAT = "graddiag.history.columns/1"
_ARRAYS = ("grad_norm", "has_grad", "param_norm", "update_ratio", "measured", "grad_histograms",
           "param_count", "learning_rate", "base_learning_rate", "along_gradient")
# absent from states saved before they existed
_OPTIONAL = ("param_count", "learning_rate", "base_learning_rate", "along_gradient")
_ACTIVATION_ARRAYS = ("saturated", "dead", "gain", "calls", "position", "call_positions",
                      "dead_by_call")


class _Names:
    """Interns hashable items; ``items`` lists each once, ``index`` gives its position."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._ids: dict[Any, int] = {}

    def index(self, item: Any) -> int:
        found = self._ids.get(item)
        if found is None:
            found = self._ids[item] = len(self.items)
            self.items.append(item)
        return found


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.int8: np.int8, torch.bool: np.bool_}


def _tensor(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=_NUMPY[dtype]))


def _ragged(arrays: list[np.ndarray | None]) -> dict[str, torch.Tensor]:
    """Concatenated values and per-record lengths (``-1``: ``None``) of optional arrays."""
    present: list[np.ndarray] = []
    lengths: list[int] = []
    for a in arrays:
        if a is None:
            lengths.append(-1)
            continue
        a = np.asarray(a)
        present.append(a if a.ndim == 1 else a.reshape(-1))
        lengths.append(a.size)
    values = np.concatenate(present) if present else np.zeros(0)
    return {"values": torch.from_numpy(values),
            "lengths": torch.from_numpy(np.array(lengths, dtype=np.int32))}


def _unragged(column: dict[str, torch.Tensor]) -> list[np.ndarray | None]:
    """Each record's own copy of its array (a view would keep the whole column alive)."""
    values = column["values"].numpy()
    out: list[np.ndarray | None] = []
    start = 0
    for n in column["lengths"].tolist():
        if n < 0:
            out.append(None)
        else:
            out.append(values[start:start + n].copy())
            start += n
    return out


def _given(array: np.ndarray | None) -> np.ndarray:
    """An array that every record has (saved with a length, never ``None``)."""
    if array is None:
        raise ValueError("graddiag: corrupt history state: a required array is missing")
    return array


def encode(records: list[StepRecord]) -> dict[str, Any]:
    """The records as columns (tensors and plain containers)."""
    layer_lists, layouts, names = _Names(), _Names(), _Names()
    state: dict[str, Any] = {"format": FORMAT}
    state["step"] = _tensor([r.step for r in records], torch.int64)
    state["optimizer"] = _tensor([r.optimizer for r in records], torch.int64)
    by_list: dict[int, int] = {}  # records share one layer list object: convert it once
    layer_ids = []
    for r in records:
        found = by_list.get(id(r.layers))
        if found is None:
            found = by_list[id(r.layers)] = layer_lists.index(tuple(r.layers))
        layer_ids.append(found)
    state["layers"] = _tensor(layer_ids, torch.int32)
    state["amp_overflow"] = _tensor([r.amp_overflow for r in records], torch.bool)
    state["amp_scale"] = _ragged([None if r.amp_scale is None else np.array([r.amp_scale])
                                  for r in records])
    state["clipped"] = _tensor([-1 if r.clipped is None else int(r.clipped) for r in records],
                               torch.int8)
    state["clip_value"] = _ragged([None if r.clip_value is None else np.array([r.clip_value])
                                   for r in records])
    state["clip_norm"] = _ragged([None if r.clip_norm is None else np.array([r.clip_norm])
                                  for r in records])
    state["grad_norm"] = _ragged([r.grad_norm for r in records])
    state["has_grad"] = _ragged([r.has_grad for r in records])
    state["param_norm"] = _ragged([r.param_norm for r in records])
    state["update_ratio"] = _ragged([r.update_ratio for r in records])
    state["measured"] = _ragged([r.measured for r in records])
    state["grad_histograms"] = _ragged([r.grad_histograms for r in records])
    state["param_count"] = _ragged([r.param_count for r in records])
    state["learning_rate"] = _ragged([r.learning_rate for r in records])
    state["base_learning_rate"] = _ragged([r.base_learning_rate for r in records])
    state["along_gradient"] = _ragged([r.along_gradient for r in records])
    state["orphaned"] = [[i, {k: list(v) for k, v in r.orphaned.items()}]
                         for i, r in enumerate(records) if r.orphaned is not None]
    state["histogram_width"] = _tensor(
        [0 if r.grad_histograms is None else int(np.asarray(r.grad_histograms).shape[-1])
         for r in records], torch.int32)
    missing: list[tuple[int, int, int]] = []  # (record, layer position, names)
    missing_names: list[int] = []
    nonfinite: list[tuple[int, int, int]] = []  # (record, layer position, entries)
    nonfinite_names: list[int] = []
    nonfinite_counts: list[int] = []
    for i, r in enumerate(records):
        if not (r.missing or r.nonfinite):
            continue
        for position, params in r.missing.items():
            missing.append((i, int(position), len(params)))
            missing_names += [names.index(p) for p in params]
        for position, counts in r.nonfinite.items():
            nonfinite.append((i, int(position), len(counts)))
            nonfinite_names += [names.index(p) for p in counts]
            nonfinite_counts += [int(c) for c in counts.values()]
    state["missing"] = {"rows": _tensor(missing, torch.int64).reshape(-1, 3),
                        "names": _tensor(missing_names, torch.int32)}
    state["nonfinite"] = {"rows": _tensor(nonfinite, torch.int64).reshape(-1, 3),
                          "names": _tensor(nonfinite_names, torch.int32),
                          "counts": _tensor(nonfinite_counts, torch.int64)}
    acts = [r.activations for r in records]
    state["activation_layout"] = _tensor(
        [-1 if a is None else layouts.index(_layout_key(a)) for a in acts], torch.int32)
    for name in _ACTIVATION_ARRAYS:
        state[f"activation_{name}"] = _ragged([None if a is None else getattr(a, name)
                                               for a in acts])
    state["layer_lists"] = [list(names_) for names_ in layer_lists.items]
    state["activation_layouts"] = [_layout_state(key) for key in layouts.items]
    state["names"] = list(names.items)
    return state


def decode(state: dict[str, Any]) -> list[StepRecord]:
    """Rebuild the records that :func:`encode` saved."""
    if state.get("format") != FORMAT:
        raise ValueError(f"graddiag: unknown history state format {state.get('format')!r}; "
                         f"this version reads {FORMAT!r} and the older list of records")
    layer_lists = [list(names) for names in state["layer_lists"]]
    names = list(state["names"])
    steps = state["step"].tolist()
    count = len(steps)
    arrays = {name: _unragged(state[name]) if name in state or name not in _OPTIONAL
              else [None] * count for name in _ARRAYS}
    orphaned: list[dict[str, list[str]] | None] = [None] * count
    for i, modules in state.get("orphaned", []):
        orphaned[int(i)] = {str(k): [str(p) for p in v] for k, v in modules.items()}
    widths = state["histogram_width"].tolist()
    amp_scale = _unragged(state["amp_scale"])
    clipped = state["clipped"].tolist()
    clip_value = _unragged(state["clip_value"]) if "clip_value" in state else [None] * count
    clip_norm = _unragged(state["clip_norm"]) if "clip_norm" in state else [None] * count
    missing: list[dict[int, list[str]]] = [{} for _ in range(count)]
    start = 0
    for record, position, n in state["missing"]["rows"].tolist():
        ids = state["missing"]["names"][start:start + n].tolist()
        missing[record][position] = [names[k] for k in ids]
        start += n
    nonfinite: list[dict[int, dict[str, int]]] = [{} for _ in range(count)]
    start = 0
    nf_names = state["nonfinite"]["names"].tolist()
    nf_counts = state["nonfinite"]["counts"].tolist()
    for record, position, n in state["nonfinite"]["rows"].tolist():
        nonfinite[record][position] = {names[k]: c for k, c in
                                       zip(nf_names[start:start + n], nf_counts[start:start + n])}
        start += n
    activations = _activations(state, count)
    records = []
    for i, (step, optimizer, layers_id, overflow) in enumerate(zip(
            steps, state["optimizer"].tolist(), state["layers"].tolist(),
            state["amp_overflow"].tolist())):
        histograms = arrays["grad_histograms"][i]
        scale, by_value, by_norm = amp_scale[i], clip_value[i], clip_norm[i]
        records.append(StepRecord(
            step=step, layers=layer_lists[layers_id], grad_norm=_given(arrays["grad_norm"][i]),
            has_grad=_given(arrays["has_grad"][i]), missing=missing[i], nonfinite=nonfinite[i],
            param_norm=arrays["param_norm"][i], update_ratio=arrays["update_ratio"][i],
            activations=activations[i],
            grad_histograms=None if histograms is None else histograms.reshape(-1, widths[i]),
            optimizer=optimizer, measured=arrays["measured"][i], amp_overflow=overflow,
            amp_scale=None if scale is None else float(scale[0]),
            clipped=None if clipped[i] < 0 else bool(clipped[i]),
            param_count=arrays["param_count"][i], learning_rate=arrays["learning_rate"][i],
            base_learning_rate=arrays["base_learning_rate"][i],
            orphaned=orphaned[i], along_gradient=arrays["along_gradient"][i],
            clip_value=None if by_value is None else float(by_value[0]),
            clip_norm=None if by_norm is None else float(by_norm[0]),
        ))
    return records


def _layout_key(a: ActivationRecord) -> tuple[Any, ...]:
    cut_ops = tuple((site, tuple(ops)) for site, ops in a.cut_ops.items())
    return tuple(a.sites), tuple(a.kinds), tuple(a.families), cut_ops


def _layout_state(key: tuple[Any, ...]) -> dict[str, Any]:
    sites, kinds, families, cut_ops = key
    return {"sites": list(sites), "kinds": list(kinds), "families": list(families),
            "cut_ops": [[site, list(ops)] for site, ops in cut_ops]}


def _activations(state: dict[str, Any], count: int) -> list[ActivationRecord | None]:
    layouts = state["activation_layouts"]
    # states saved before an array existed lack its column: None for every record
    columns = {name: (_unragged(state[f"activation_{name}"]) if f"activation_{name}" in state
                      else [None] * count) for name in _ACTIVATION_ARRAYS}
    out: list[ActivationRecord | None] = []
    for i, layout_id in enumerate(state["activation_layout"].tolist()):
        if layout_id < 0:
            out.append(None)
            continue
        layout = layouts[layout_id]
        out.append(ActivationRecord(
            sites=list(layout["sites"]), kinds=list(layout["kinds"]),
            families=list(layout["families"]), saturated=_given(columns["saturated"][i]),
            dead=_given(columns["dead"][i]), gain=_given(columns["gain"][i]),
            calls=_given(columns["calls"][i]),
            cut_ops={site: list(ops) for site, ops in layout["cut_ops"]},
            position=columns["position"][i], call_positions=columns["call_positions"][i],
            dead_by_call=columns["dead_by_call"][i],
        ))
    assert len(out) == count
    return out


def decode_record_list(state: dict[str, Any]) -> list[StepRecord]:
    """Rebuild the records of the older state format: one dict of small tensors per record."""
    layer_lists = [list(names) for names in state["layer_lists"]]
    return [_legacy_record(r, layer_lists) for r in state["records"]]


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy().copy()


def _legacy_record(d: dict[str, Any], layer_lists: list[list[str]]) -> StepRecord:
    """One record of the older state format (a list of per-record dicts of small tensors)."""
    acts = None
    if d["activations"] is not None:
        a = d["activations"]
        acts = ActivationRecord(
            sites=list(a["sites"]), kinds=list(a["kinds"]), families=list(a["families"]),
            saturated=_given(_array(a["saturated"])), dead=_given(_array(a["dead"])),
            gain=_given(_array(a["gain"])), calls=_given(_array(a["calls"])),
            cut_ops={k: list(v) for k, v in a["cut_ops"].items()},
            position=_array(a.get("position")),
        )
    return StepRecord(
        step=int(d["step"]), layers=layer_lists[d["layers"]],
        grad_norm=_given(_array(d["grad_norm"])), has_grad=_given(_array(d["has_grad"])),
        missing={int(k): list(v) for k, v in d["missing"].items()},
        nonfinite={int(k): dict(v) for k, v in d["nonfinite"].items()},
        param_norm=_array(d["param_norm"]), update_ratio=_array(d["update_ratio"]),
        activations=acts, grad_histograms=_array(d["grad_histograms"]),
        optimizer=int(d["optimizer"]), measured=_array(d["measured"]),
        amp_overflow=bool(d["amp_overflow"]), amp_scale=d.get("amp_scale"), clipped=d["clipped"],
    )
