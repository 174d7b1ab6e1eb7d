"""Per-layer norms against hand-computed values, layer discovery and the one-transfer promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import graddiag.measure.transfer as transfer
from graddiag import GradientMonitor
from graddiag.measure.layers import clean_name, discover_layers
from graddiag.measure.norms import GradientProbe, LayerNormAggregator
from graddiag.measure.parameters import ParameterProbe
from tests.helpers import SyncCounter


def _two_layer_with_grads() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    grads = {
        "0.weight": [[1.0, -2.0], [3.0, 0.0]],
        "0.bias": [-4.0, 0.5],
        "2.weight": [[0.0, -6.0]],
        "2.bias": [8.0],
    }
    for name, p in model.named_parameters():
        p.grad = torch.tensor(grads[name])
    return model


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (1.0, [1 + 2 + 3 + 0 + 4 + 0.5, 6 + 8]),
        (2.0, [math.sqrt(1 + 4 + 9 + 16 + 0.25), math.sqrt(36 + 64)]),
        (math.inf, [4.0, 8.0]),
        (3.0, [(1 + 8 + 27 + 64 + 0.125) ** (1 / 3), (216 + 512) ** (1 / 3)]),
    ],
)
def test_layer_norms_match_hand_computed(p: float, expected: list[float]) -> None:
    model = _two_layer_with_grads()
    probe = GradientProbe(discover_layers(model), p)
    reading = probe.read()
    np.testing.assert_allclose(reading.layer_norms.numpy(), expected, rtol=1e-6)


def test_monitor_history_holds_the_same_norms() -> None:
    model = _two_layer_with_grads()
    with GradientMonitor(model, reporters=[], norm_type="inf") as monitor:
        monitor.step()
    h = monitor.history
    assert list(h["layer"]) == ["0", "2"]
    np.testing.assert_allclose(h["grad_norm"], [4.0, 8.0])


def test_fp16_gradients_above_fp16_max_do_not_read_as_inf() -> None:
    layer = nn.Linear(2, 1, bias=False).half()
    layer.weight.grad = torch.tensor([[6.0e4, 6.0e4]], dtype=torch.float16)
    norms = GradientProbe(discover_layers(layer), 2.0).read().layer_norms
    assert norms.dtype == torch.float32
    assert norms.item() == pytest.approx(math.sqrt(2) * 6.0e4, rel=1e-3)


def _float64_pair(small: float, large: float) -> nn.Sequential:
    """Two float64 layers whose every gradient element is ``small`` and ``large``: norms beyond
    float32's range (below 1.2e-38, above 3.4e38) on either side."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    for module, value in ((model[0], small), (model[1], large)):
        for param in module.parameters():
            param.grad = torch.full_like(param, value)
    return model


def test_float64_norms_keep_float64_range() -> None:
    model = _float64_pair(1e-60, 1e100)
    norms = GradientProbe(discover_layers(model), 2.0).read().layer_norms
    # 12 + 4 elements of 1e-60, and 8 + 2 of 1e100
    assert norms.tolist() == pytest.approx([4e-60, math.sqrt(10) * 1e100], rel=1e-12, abs=0)


@pytest.mark.parametrize("every", [1, 3])  # kept rows judged in blocks, and steps read in full
def test_float64_gradients_beyond_float32_range_are_recorded_as_they_are(every: int) -> None:
    """A deep float64 network's first layers can sit at 1e-60: they must not read as 0, nor a
    finite 1e100 as inf (a false ``nonfinite``)."""
    model = _float64_pair(1e-60, 1e100)
    with GradientMonitor(model, reporters=[], every_n_steps=every, early_steps=0) as monitor:
        for step in range(12):
            monitor.step(step)
    history = monitor.history
    assert sorted(history.step.unique()) == list(range(0, 12, every))
    norms = history.pivot(index="step", columns="layer", values="grad_norm")
    assert len(norms) == 12 // every
    assert norms["0"].tolist() == pytest.approx([4e-60] * len(norms), rel=1e-12, abs=0)
    assert norms["1"].tolist() == pytest.approx([math.sqrt(10) * 1e100] * len(norms), rel=1e-12, abs=0)
    assert "nonfinite" not in {f.kind for f in monitor.findings}


@pytest.mark.parametrize("every", [1, 3])
def test_finite_float32_gradients_whose_norm_overflows_float32_are_recorded_finite(
        every: int) -> None:
    """Elements of 1e20 are finite in float32, but their squares are not: the fused norm reads
    inf. The record holds the float64 norm, and no ``nonfinite``; a real inf still is one."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with GradientMonitor(model, reporters=[], every_n_steps=every, early_steps=0) as monitor:
        for step in range(6):
            for i, value in enumerate((1e20, 0.5, 0.5)):
                for param in model[i].parameters():
                    param.grad = torch.full_like(param, value)
            if step == 5:
                model[2].bias.grad[0] = math.inf
            monitor.step(step)
    history = monitor.history
    norms = history.pivot(index="step", columns="layer", values="grad_norm")
    assert len(norms) == 6 // every
    # 12 + 4 elements of 1e20: 4e20, from float64 arithmetic, not from graddiag
    assert norms["0"].tolist() == pytest.approx([math.sqrt(16 * 1e40)] * len(norms), rel=1e-6)
    assert np.isfinite(norms["0"]).all()
    assert not history[history.layer == "0"].nonfinite.any()
    found = [(f.kind, f.layer, f.step) for f in monitor.findings]
    assert ("exploding", "0", 0) in found
    exploding = next(f for f in monitor.findings if f.kind == "exploding" and f.layer == "0")
    assert exploding.value == pytest.approx(4e20, rel=1e-6) and "inf" not in exploding.message
    assert [k for k in found if k[0] == "nonfinite"] == ([("nonfinite", "2", 5)] if every == 1
                                                         else [])


def test_float64_histograms_bin_finite_values_beyond_float32_range_as_finite() -> None:
    """1e100 lands in the last finite bin (above the top edge), not the NaN/Inf bin, with its
    sum and sum of squares; 1e-60 in the first."""
    from graddiag.data.bins import HISTOGRAM_BINS

    model = _float64_pair(1e-60, 1e100)
    with GradientMonitor(model, reporters=[], histogram_every_n_steps=1) as monitor:
        monitor.step()
    rows = monitor.records[0].grad_histograms
    assert rows is not None
    counts, sums, squares = rows[:, :HISTOGRAM_BINS], rows[:, -2], rows[:, -1]
    tiny, huge = np.zeros(HISTOGRAM_BINS), np.zeros(HISTOGRAM_BINS)
    tiny[0], huge[HISTOGRAM_BINS - 2] = 16, 10  # 12 + 4 and 8 + 2 elements
    np.testing.assert_array_equal(counts, [tiny, huge])
    assert sums.tolist() == pytest.approx([16e-60, 10e100], rel=1e-12, abs=0)
    assert squares.tolist() == pytest.approx([16e-120, 10e200], rel=1e-12, abs=0)


def test_float64_parameter_norms_keep_float64_range() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(1e-60)
    norms = ParameterProbe(discover_layers(model)).norms()
    assert norms.tolist() == pytest.approx([math.sqrt(12) * 1e-60], rel=1e-12, abs=0)


def test_grad_scale_divides_on_device() -> None:
    model = _two_layer_with_grads()
    probe = GradientProbe(discover_layers(model), 2.0)
    plain = probe.read().layer_norms
    scaled = probe.read(grad_scale=torch.tensor(4.0)).layer_norms
    torch.testing.assert_close(scaled, plain / 4)


def test_aggregator_combines_dtype_groups() -> None:
    a = torch.tensor([3.0, 4.0])
    b = torch.tensor([12.0], dtype=torch.float16)
    agg = LayerNormAggregator(1, 2.0)
    assert agg([a, b], [0, 0]).item() == pytest.approx(13.0)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.act = nn.ReLU()


def test_layers_are_modules_owning_trainable_parameters_and_tied_count_once() -> None:
    index = discover_layers(Tied())
    assert index.names == ["embed"]
    assert [len(layer.params) for layer in index.layers] == [1]


def test_include_exclude_and_unmatched_patterns() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 1))
    assert discover_layers(model, include=("0", "2")).names == ["0", "2"]
    assert discover_layers(model, exclude=("[02]",)).names == ["3"]
    with pytest.raises(ValueError, match="include pattern 'decoder.*' matches no layer"):
        discover_layers(model, include=("decoder.*",))
    with pytest.raises(ValueError, match="exclude pattern 'x' matches no layer"):
        discover_layers(model, exclude=("x",))


def test_compiled_names_lose_orig_mod() -> None:
    assert clean_name("_orig_mod.net.0") == "net.0"
    assert clean_name("encoder._orig_mod.layers.1") == "encoder.layers.1"


def test_layers_follow_forward_order_not_registration_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 1)
            self.early = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.relu(self.early(x)))

    model = Reversed()
    with GradientMonitor(model, reporters=[]) as monitor:
        model(torch.randn(2, 3)).sum().backward()
        monitor.step()
    assert monitor.records[0].layers == ["early", "late"]


def _deep_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.Tanh())])


@pytest.mark.parametrize("with_params_and_activations", [False, True])
def test_one_host_transfer_per_recorded_step_and_none_per_parameter(
    monkeypatch: pytest.MonkeyPatch, with_params_and_activations: bool
) -> None:
    copies = []
    real = transfer._copy_to_host
    monkeypatch.setattr(transfer, "_copy_to_host", lambda t: copies.append(t.numel()) or real(t))
    model = _deep_model()
    cadence = 1 if with_params_and_activations else 0
    monitor = GradientMonitor(model, reporters=[], param_every_n_steps=cadence,
                              activation_every_n_steps=cadence, evaluate_every_n_records=1)
    counter = SyncCounter()
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        with counter:
            monitor.step()
    monitor.close()
    assert len(copies) == 3  # one copy per recorded step, carrying every statistic
    assert counter.syncs == 0  # no .item()/bool()/float() on any tensor
    if with_params_and_activations:
        assert copies[-1] > copies[0] > 6  # later copies also carry updates and activations


def test_nothing_happens_on_steps_that_are_not_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    copies = []
    monkeypatch.setattr(transfer, "_copy_to_host", lambda t: copies.append(1) or t.numpy())
    model = _deep_model()
    read_calls = []
    monitor = GradientMonitor(model, reporters=[], every_n_steps=5, param_every_n_steps=0,
                              activation_every_n_steps=0, evaluate_every_n_records=1)
    for _ in range(10):
        model(torch.randn(4, 8)).sum().backward()
        report = monitor.step()
        read_calls.append(report.recorded)
    assert read_calls == [s % 5 == 0 for s in range(10)]
    assert len(copies) == 2


def test_parameter_norms_and_update_ratio_match_naive() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    with GradientMonitor(model, reporters=[], param_every_n_steps=2, early_steps=0,
                         activation_every_n_steps=0) as monitor:
        for _ in range(3):
            snapshots.append([p.detach().clone() for p in model.parameters()])
            model(torch.randn(5, 3)).pow(2).sum().backward()
            monitor.step()
            opt.step()
            opt.zero_grad()
    h = monitor.history
    step2 = h[h.step == 2]
    w1, w2 = snapshots[1], snapshots[2]  # one optimizer step apart: the ratio spans one update
    first = torch.cat([w2[0].flatten(), w2[1].flatten()])
    delta = torch.cat([(w2[0] - w1[0]).flatten(), (w2[1] - w1[1]).flatten()])
    assert step2.param_norm.iloc[0] == pytest.approx(first.norm().item(), rel=1e-5)
    assert step2.update_ratio.iloc[0] == pytest.approx((delta.norm() / first.norm()).item(), rel=1e-4)
    assert h[h.step == 1].param_norm.isna().all()
    assert h[h.step == 0].update_ratio.isna().all()


def test_history_arrays_own_their_memory() -> None:
    """A record's arrays must not keep device/torch buffers alive (a view pinned ~24 KB each)."""
    model = _deep_model()
    with GradientMonitor(model, reporters=[], param_every_n_steps=1) as monitor:
        model(torch.randn(4, 8)).sum().backward()
        monitor.step()
    record = monitor.records[0]
    for array in (record.grad_norm, record.param_norm):
        root = array
        while root.base is not None:
            root = root.base
        assert isinstance(root, np.ndarray) and root.flags.owndata
