"""History checkpoint state: column-wise, exact round trip of every field, older format still read."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from graddiag import GradientMonitor
from graddiag.data.records import ActivationRecord, StepRecord
from graddiag.pipeline.history import History


def _records(count: int) -> list[StepRecord]:
    """Records with every field in every shape it takes: None, NaN, inf, dicts, two layouts."""
    layouts = (["a", "b", "c"], ["a", "b", "c", "d"])
    records = []
    for i in range(count):
        layers = layouts[i % 5 == 4]
        n = len(layers)
        grad = np.linspace(1e-9, 3.0, n) * (i + 1)
        grad[i % n] = np.nan if i % 3 == 0 else grad[i % n]
        if i % 7 == 0:
            grad[-1] = np.inf
        acts = None
        if i % 4 == 0:
            acts = ActivationRecord(
                sites=["s1", "s2"], kinds=["sigmoid", "relu"], families=["saturating", "rectifier"],
                saturated=np.array([0.25, np.nan]), dead=np.array([0.0, 0.75 + i]),
                gain=np.array([0.1, 1e-30]), calls=np.array([1.0, 2.0 + i]),
                cut_ops={"s1": ["argmax"], "router": ["argmax", "round"]} if i % 8 == 0 else {},
                position=None if i % 8 == 4 else np.array([0.5, np.nan if i % 3 else n - 0.5]),
                call_positions=None if i % 8 == 4 else np.array([1, 3], dtype=np.int64),
                dead_by_call=None if i % 8 == 4 else np.array([0.0, 0.25, np.nan, 1.0 + i]),
            )
        records.append(StepRecord(
            step=3 * i + 1,
            layers=layers,
            grad_norm=grad,
            has_grad=np.arange(n) != (i % n),
            missing={i % n: ["weight", "bias"]} if i % 2 else {},
            nonfinite={n - 1: {"weight": 7 + i, "bias": 1}} if i % 7 == 0 else {},
            param_norm=np.arange(n, dtype=float) + i if i % 2 == 0 else None,
            update_ratio=np.full(n, np.nan) if i % 6 == 0 else None,
            activations=acts,
            grad_histograms=np.arange(n * 5, dtype=float).reshape(n, 5) + i if i % 3 == 1 else None,
            optimizer=i % 2,
            measured=(np.arange(n) % 2 == 0) if i % 5 == 2 else None,
            amp_overflow=i % 9 == 0,
            amp_scale=None if i % 2 else 2.0 ** (16 - i),
            # clipping by norm known to act or not (2-norms), or unknown (another norm_type)
            clipped=None if i % 3 == 0 or i % 4 == 1 else bool(i % 2),
            clip_value=0.25 * i if i % 3 == 0 else None,
            clip_norm=None if i % 3 == 0 else 0.5 + i,
            along_gradient=np.arange(n) % 2 == 1 if i % 2 == 0 else None,
        ))
    return records


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)  # NaN equals NaN here
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def _round_trip(history: History) -> tuple[History, dict[str, Any]]:
    buffer = io.BytesIO()
    torch.save({"history": history.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["history"]
    loaded = History(history.max_rows)
    loaded.load_state_dict(state)
    return loaded, state


def _tensors(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return 1
    if isinstance(state, dict):
        return sum(_tensors(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensors(v) for v in state)
    return 0


def test_every_field_of_every_record_round_trips_exactly() -> None:
    history = History(10**9)
    originals = _records(41)
    for record in originals:
        history.append(record)
    history.pin(4)
    history.thinned = 3
    loaded, _ = _round_trip(history)
    assert len(loaded.records) == len(originals)
    for i, (want, got) in enumerate(zip(originals, loaded.records)):
        _assert_same(want, got, f"record {i}")
    assert loaded.pinned == {4} and loaded.thinned == 3 and loaded.rows == history.rows
    pd.testing.assert_frame_equal(loaded.frame(), history.frame())
    pd.testing.assert_frame_equal(loaded.activation_frame(), history.activation_frame())


def test_a_state_saved_before_the_along_gradient_column_loads_without_it() -> None:
    from graddiag.pipeline.history_state import decode, encode

    originals = _records(6)
    state = encode(originals)
    del state["along_gradient"]
    assert any(r.along_gradient is not None for r in originals)
    for i, (want, got) in enumerate(zip(originals, decode(state), strict=True)):
        _assert_same(dataclasses.replace(want, along_gradient=None), got, f"record {i}")


def test_a_state_saved_before_the_call_position_columns_loads_without_them() -> None:
    from graddiag.pipeline.history_state import decode, encode

    originals = _records(9)
    state = encode(originals)
    del state["activation_call_positions"], state["activation_dead_by_call"]
    for i, (want, got) in enumerate(zip(originals, decode(state), strict=True)):
        _assert_same(_without_calls(want), got, f"record {i}")
    assert any(r.activations is not None and r.activations.dead_by_call is not None
               for r in originals)


def _without_calls(record: StepRecord) -> StepRecord:
    """``record`` as a state saved before the dead-call columns gives it back."""
    if record.activations is None:
        return record
    return dataclasses.replace(record, activations=dataclasses.replace(
        record.activations, call_positions=None, dead_by_call=None))


@pytest.mark.parametrize("column", ["clip_value", "clip_norm"])
def test_a_column_state_saved_before_a_clipping_column_loads_without_it(column: str) -> None:
    from graddiag.pipeline.history_state import decode, encode

    originals = _records(7)
    state = encode(originals)
    del state[column]  # as saved by the version before the column
    loaded = decode(state)
    for i, (want, got) in enumerate(zip(originals, loaded, strict=True)):
        _assert_same(dataclasses.replace(want, **{column: None}), got, f"record {i}")
        # without clip_value, a step clipped by value reads as unclipped; without clip_norm, a
        # step clipped by a norm whose action is unknown (clipped None) too
        if column == "clip_value":
            expected = None if want.clip_value is not None else want.clipping
        elif want.clip_value is not None:
            expected = "value"
        else:  # clipping by norm is then known only where clipped says whether it acts
            expected = None if want.clipped is None else "norm"
        assert got.clipping == expected, f"record {i}"
    # the fixture holds both kinds of step the clip_norm column is there for
    assert any(r.clip_norm is not None and r.clipped is None for r in originals)
    assert any(r.clip_norm is not None and r.clipped is not None for r in originals)


def test_state_is_a_few_tensors_whatever_the_number_of_records() -> None:
    small, large = History(10**9), History(10**9)
    for record in _records(10):
        small.append(record)
    for record in _records(1_000):
        large.append(record)
    _, small_state = _round_trip(small)
    _, large_state = _round_trip(large)
    assert _tensors(large_state) == _tensors(small_state) < 60


def test_empty_history_round_trips() -> None:
    loaded, _ = _round_trip(History(100))
    assert loaded.records == [] and len(loaded.frame()) == 0


def test_loaded_arrays_own_their_memory() -> None:
    history = History(10**9)
    for record in _records(5):
        history.append(record)
    loaded, _ = _round_trip(history)
    for array in (loaded.records[2].grad_norm, loaded.records[0].activations.gain):  # type: ignore[union-attr]
        assert array.base is None and array.flags.owndata


def _legacy_state(records: list[StepRecord]) -> dict[str, Any]:
    """The state the previous version saved: one dict of small tensors per record."""
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.array(a, copy=True))

    layer_lists: list[list[str]] = []
    out = []
    for r in records:
        if r.layers not in layer_lists:
            layer_lists.append(list(r.layers))
        acts = None
        if r.activations is not None:
            a = r.activations
            acts = {"sites": a.sites, "kinds": a.kinds, "families": a.families,
                    "saturated": t(a.saturated), "dead": t(a.dead), "gain": t(a.gain),
                    "calls": t(a.calls), "cut_ops": a.cut_ops, "position": t(a.position)}
        out.append({
            "step": r.step, "layers": layer_lists.index(r.layers), "grad_norm": t(r.grad_norm),
            "has_grad": t(r.has_grad), "missing": r.missing, "nonfinite": r.nonfinite,
            "param_norm": t(r.param_norm), "update_ratio": t(r.update_ratio), "activations": acts,
            "grad_histograms": t(r.grad_histograms), "optimizer": r.optimizer,
            "measured": t(r.measured), "amp_overflow": r.amp_overflow, "amp_scale": r.amp_scale,
            "clipped": r.clipped,
        })
    return {"layer_lists": layer_lists, "records": out, "pinned": [1], "thinned": 0}


def test_the_previous_record_list_state_still_loads() -> None:
    originals = [_without_calls(dataclasses.replace(r, clip_value=None, clip_norm=None,
                                                    along_gradient=None))
                 for r in _records(12)]  # not saved then
    buffer = io.BytesIO()
    torch.save(_legacy_state(originals), buffer)
    buffer.seek(0)
    history = History(10**9)
    history.load_state_dict(torch.load(buffer, weights_only=True))
    for i, (want, got) in enumerate(zip(originals, history.records, strict=True)):
        _assert_same(want, got, f"record {i}")


def test_an_unknown_state_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="neither 'columns' nor 'records'"):
        History(10).load_state_dict({"pinned": [], "thinned": 0})
    state = History(10).state_dict()
    state["columns"]["format"] = "something else"
    with pytest.raises(ValueError, match="unknown history state format 'something else'"):
        History(10).load_state_dict(state)


def test_a_real_monitor_state_round_trips_through_weights_only_load() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 6), nn.ReLU(),
                                      nn.Linear(6, 2))
            self.unused = nn.Linear(3, 3)  # never gets a gradient

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(8, 4)
    options: dict[str, Any] = {"reporters": [], "param_every_n_steps": 2,
                               "activation_every_n_steps": 3, "histogram_every_n_steps": 2,
                               # learning rates, and 'unused' in no optimizer
                               "optimizers": torch.optim.SGD(model.body.parameters(), lr=0.1)}
    with GradientMonitor(model, **options) as monitor:
        for step in range(7):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
            if step == 5:
                model.body[2].weight.grad[0, 0] = float("nan")
            monitor.step()
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    fresh = GradientMonitor(model, **options)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.close()
    assert any(r.missing for r in monitor.records) and any(r.nonfinite for r in monitor.records)
    assert any(r.activations is not None for r in monitor.records)
    assert any(r.orphaned for r in monitor.records) and any(r.param_count is not None
                                                            for r in monitor.records)
    for i, (want, got) in enumerate(zip(monitor.records, fresh.records, strict=True)):
        _assert_same(want, got, f"record {i}")
    assert [repr(f) for f in fresh.findings] == [repr(f) for f in monitor.findings]  # NaN values


def test_the_state_format_covers_every_record_field() -> None:
    """A tripwire: a new StepRecord/ActivationRecord field must be added to the saved columns."""
    assert [f.name for f in dataclasses.fields(StepRecord)] == [
        "step", "layers", "grad_norm", "has_grad", "missing", "nonfinite", "param_norm",
        "update_ratio", "activations", "grad_histograms", "optimizer", "measured", "amp_overflow",
        "amp_scale", "clipped", "param_count", "learning_rate", "orphaned", "base_learning_rate",
        "clip_value", "clip_norm", "along_gradient"]
    assert [f.name for f in dataclasses.fields(ActivationRecord)] == [
        "sites", "kinds", "families", "saturated", "dead", "gain", "calls", "cut_ops", "position",
        "call_positions", "dead_by_call"]
