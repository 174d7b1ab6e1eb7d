"""Activation statistics against naive references, functional == module, and hook hygiene."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graddiag import ActivationSpec, GradientMonitor, default_registry
from graddiag.measure.activations import ActivationWatch
from graddiag.measure.activations.packing import dead_by_site, pack_activations

FLOOR = 0.01

MODULES = [
    nn.Sigmoid(), nn.Tanh(), nn.ReLU(), nn.LeakyReLU(0.05), nn.ReLU6(), nn.Hardtanh(-2.0, 2.0),
    nn.Hardsigmoid(), nn.ELU(alpha=0.7), nn.GELU(), nn.SiLU(),
]


def _stats(module: nn.Module, x: torch.Tensor) -> dict[str, float]:
    root = nn.Sequential(module)
    watch = ActivationWatch(root, derivative_floor=FLOOR)
    with watch.watching():
        root(x)
    pack = pack_activations(*watch.take())
    assert pack is not None
    record = pack.finish([c.detach().double().numpy().reshape(-1) for c in pack.chunks])
    assert record.sites == ["0"]
    return {"saturated": float(record.saturated[0]), "dead": float(record.dead[0]),
            "gain": float(record.gain[0])}


def _autograd_derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double().requires_grad_(True)
    module.double()(x).sum().backward()
    module.float()
    return x.grad.abs()


@pytest.mark.parametrize("module", MODULES, ids=lambda m: type(m).__name__)
def test_statistics_match_autograd_derivatives(module: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 16) * 4
    x[:, :3] = -torch.rand(32, 3) * 5 - 8  # three units always very negative
    d = _autograd_derivative(module, x)
    stats = _stats(module, x)
    assert stats["gain"] == pytest.approx(d.mean().item(), rel=1e-4)
    assert stats["saturated"] == pytest.approx((d < FLOOR).double().mean().item(), abs=1e-6)
    dead_units = (d < FLOOR).all(dim=0).double().mean().item()
    assert stats["dead"] == pytest.approx(dead_units, abs=1e-6)


def test_hand_computed_sigmoid_saturation() -> None:
    # sigmoid'(x) = s(1-s): at |x| = 5 it is 0.0066 < 0.01, at 0 it is 0.25
    x = torch.tensor([[-10.0, -5.0, 0.0, 5.0, 10.0]])
    stats = _stats(nn.Sigmoid(), x)
    assert stats["saturated"] == pytest.approx(4 / 5)
    s = torch.sigmoid(x.double())
    assert stats["gain"] == pytest.approx((s * (1 - s)).mean().item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("module", [nn.Sigmoid(), nn.Tanh()], ids=["sigmoid", "tanh"])
def test_low_precision_outputs_use_exact_thresholds(dtype: torch.dtype, module: nn.Module) -> None:
    x = torch.linspace(-6, 6, 241).reshape(1, -1).to(dtype)
    y = module(x).double()  # the rounded low-precision outputs, in float64
    d = y * (1 - y) if isinstance(module, nn.Sigmoid) else 1 - y * y
    stats = _stats(module, x)
    assert stats["saturated"] == pytest.approx((d < FLOOR).double().mean().item(), abs=1e-9)
    assert stats["gain"] == pytest.approx(d.mean().item(), rel=1e-4)


def test_dead_units_are_channels_for_conv_outputs() -> None:
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = -1.0  # channel 1 never fires
    assert _stats(nn.ReLU(), x)["dead"] == pytest.approx(1 / 3)


class ModuleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.act1 = nn.Tanh()
        self.b = nn.Linear(8, 8)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.b(self.act1(self.a(x))))


class FunctionalNet(ModuleNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b(torch.tanh(self.a(x))))


def _activation_table(model: nn.Module) -> np.ndarray:
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        model(x).sum().backward()
        monitor.step()
    table = monitor.activation_history
    return table, table[["saturated_fraction", "dead_fraction", "gain"]].to_numpy()


def test_functional_and_module_activations_give_the_same_numbers() -> None:
    modules, m_values = _activation_table(ModuleNet())
    functional, f_values = _activation_table(FunctionalNet())
    np.testing.assert_allclose(m_values, f_values, rtol=1e-6)
    assert list(modules.site) == ["act1", "act2"]
    assert list(functional.site) == ["FunctionalNet:tanh", "FunctionalNet:relu"]
    assert list(functional.kind) == ["tanh", "relu"]


def test_functional_calls_are_attributed_to_the_calling_module() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.lin(x)) + torch.sigmoid(x)

    model = nn.Sequential(Block(), Block())
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        model(torch.randn(3, 4)).sum().backward()
        monitor.step()
    assert list(monitor.activation_history.site) == ["0:sigmoid", "0:sigmoid#2", "1:sigmoid",
                                                     "1:sigmoid#2"]


def _one_activation_step(model: nn.Module, x: torch.Tensor) -> pd.DataFrame:
    """The activation table of one monitored step of ``model`` on ``x`` (loss: the output's sum)."""
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        model(x).sum().backward()
        monitor.step()
    return monitor.activation_history


class UnrolledRNN(nn.Module):
    """A tanh RNN cell unrolled by hand over time steps: one ``torch.tanh`` call site, the same
    weights on every call."""

    def __init__(self, steps: int, activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh
                 ) -> None:
        super().__init__()
        self.steps = steps
        self.activation = activation
        self.ih = nn.Linear(4, 8)
        self.hh = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 8)
        self.states = []
        for t in range(self.steps):
            h = self.activation(self.ih(x[:, t]) + self.hh(h))
            self.states.append(h.detach())
        return self.head(h)


class LoopedMLP(nn.Module):
    """``for layer in self.layers: x = torch.tanh(layer(x))``: one call site, other weights on
    every call."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.states = []
        for layer in self.layers:
            x = torch.tanh(layer(x))
            self.states.append(x.detach())
        return x


def _saturation(outputs: list[torch.Tensor]) -> float:
    """The fraction of tanh outputs with 1 - y^2 below the floor, counted directly."""
    y = torch.cat([o.double().flatten() for o in outputs])
    return float(((1 - y * y) < FLOOR).double().mean())


def test_a_cell_unrolled_over_time_is_one_site_and_a_loop_over_layers_is_one_per_layer() -> None:
    torch.manual_seed(0)
    rnn = UnrolledRNN(steps=30)
    with torch.no_grad():
        rnn.hh.weight.mul_(6.0)  # saturates part of the units
    table = _one_activation_step(rnn, torch.randn(16, 30, 4))
    assert list(table.site) == ["UnrolledRNN:tanh"]  # not 30 sites, one per time step
    expected = _saturation(rnn.states)
    assert 0.05 < expected < 0.95
    assert float(table.saturated_fraction.iloc[0]) == pytest.approx(expected, rel=1e-6)

    relu = UnrolledRNN(steps=30, activation=torch.relu)
    with torch.no_grad():
        relu.ih.bias[:3] = -50.0  # units 0-2 never fire; the others fire on some step
    table = _one_activation_step(relu, torch.randn(16, 30, 4))
    assert list(table.site) == ["UnrolledRNN:relu"]
    fired = torch.stack(relu.states).gt(0).any(dim=0).any(dim=0)  # per unit, over steps and samples
    assert fired.tolist() == [False] * 3 + [True] * 5
    assert float(table.dead_fraction.iloc[0]) == pytest.approx(3 / 8)  # units, not unit-steps

    mlp = LoopedMLP()
    with torch.no_grad():
        mlp.layers[2].weight.mul_(40.0)  # saturates the third layer's units only
    table = _one_activation_step(mlp, torch.randn(16, 8))
    assert list(table.site) == ["LoopedMLP:tanh", "LoopedMLP:tanh#2", "LoopedMLP:tanh#3",
                                "LoopedMLP:tanh#4"]
    expected_per_layer = [_saturation([state]) for state in mlp.states]
    assert expected_per_layer[2] > 2 * max(expected_per_layer[:2])
    np.testing.assert_allclose(table.saturated_fraction.to_numpy(dtype=float),
                               expected_per_layer, rtol=1e-6)


class SharedScaleMLP(nn.Module):
    """A loop over layers with tensors every layer shares (a learnable scale, a LayerNorm), or
    with the layers after the first frozen and nothing shared: still one site per layer."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.scale = nn.Parameter(torch.ones(8), requires_grad=not frozen)
        self.norm = nn.LayerNorm(8)
        if frozen:
            self.norm.requires_grad_(False)
            for layer in self.layers[1:]:
                layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.states = []
        for layer in self.layers:
            x = torch.relu(self.norm(self.scale * layer(x)))
            self.states.append(x.detach())
        return x


class LearnedStateRNN(nn.Module):
    """A bias-free tanh cell unrolled over 10 steps from a learned initial state."""

    def __init__(self) -> None:
        super().__init__()
        self.h0 = nn.Parameter(torch.zeros(1, 8))
        self.ih = nn.Linear(4, 8, bias=False)
        self.hh = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.h0.expand(x.shape[0], -1)
        for t in range(x.shape[1]):
            h = torch.tanh(self.hh(h) + self.ih(x[:, t]))
        return h


@pytest.mark.parametrize("frozen", [False, True], ids=["shared-tensors", "frozen-middle"])
def test_layers_sharing_tensors_or_frozen_stay_one_site_each(frozen: bool) -> None:
    torch.manual_seed(3)
    model = SharedScaleMLP(frozen)
    table = _one_activation_step(model, torch.randn(16, 8))
    assert list(table.site) == ["SharedScaleMLP:relu"] + [f"SharedScaleMLP:relu#{i}"
                                                          for i in (2, 3, 4)]
    dead = [float((state <= 0).all(dim=0).double().mean()) for state in model.states]
    assert max(dead) > 0  # some layer has dead units, seen only if layers stay apart
    np.testing.assert_allclose(table.dead_fraction.to_numpy(dtype=float), dead)


def test_layers_whose_own_weights_are_out_of_reach_behind_a_shared_gain_stay_apart() -> None:
    """Eight element-wise operations between each layer and its activation put the layer's own
    weights beyond the graph search, and a gain every layer shares within it: the layer each
    call ran still keeps the sites apart."""

    class LongChain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.gain = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.states = []
            for layer in self.layers:
                h = layer(x)
                for _ in range(8):
                    h = h * 1.01 + 0.01
                x = torch.tanh(h * self.gain * 3.0)
                self.states.append(x.detach())
            return x

    torch.manual_seed(0)
    model = LongChain()
    table = _one_activation_step(model, torch.randn(16, 8))
    assert len(table) == 4
    np.testing.assert_allclose(table.saturated_fraction.to_numpy(dtype=float),
                               [_saturation([state]) for state in model.states], rtol=1e-6)


def test_a_learned_initial_state_does_not_split_the_first_time_step() -> None:
    torch.manual_seed(0)
    model = LearnedStateRNN()
    table = _one_activation_step(model, torch.randn(4, 10, 4))
    assert list(table.site) == ["LearnedStateRNN:tanh"]


def test_a_cell_under_reentrant_checkpointing_is_one_site() -> None:
    """``checkpoint(..., use_reentrant=True)`` runs each step without an autograd graph: the
    modules that ran still tell the time steps of one cell from layers."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(UnrolledRNN):
        def cell(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.ih(x_t) + self.hh(h))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[0], 8)
            for t in range(self.steps):
                h = checkpoint(self.cell, x[:, t], h, use_reentrant=True)
            return self.head(h)

    torch.manual_seed(0)
    model = Checkpointed(steps=12)
    table = _one_activation_step(model, torch.randn(4, 12, 4).requires_grad_())
    assert list(table.site) == ["Checkpointed:tanh"]


def test_a_decoder_loop_with_an_encoder_before_and_a_head_after_each_step_is_one_site() -> None:
    """Modules that run before the loop (an input projection) and after each step (a head)
    do not split the cell's time steps."""

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.ih, self.hh = nn.Linear(4, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.inp(x)
            h, outputs = torch.zeros(x.shape[0], 8), []
            for t in range(x.shape[1]):
                h = torch.tanh(self.ih(x[:, t]) + self.hh(h))
                outputs.append(self.head(h))
            return torch.stack(outputs, 1)

    torch.manual_seed(0)
    model = Decoder()
    assert list(_one_activation_step(model, torch.randn(4, 7, 4)).site) == ["Decoder:tanh"]


def test_calls_outside_any_module_forward_are_told_apart_too() -> None:
    """Functional activations called directly in the watched code (as in a ``training_step``),
    in a loop over layers: one site per layer, each equal to a direct count."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
    with torch.no_grad():
        layers[2].bias.fill_(-50.0)  # the third layer's units never fire
    monitor = GradientMonitor(layers, reporters=[], activation_every_n_steps=1, watch=None)
    outputs = []
    with monitor.watch_activations(0):
        x = torch.randn(16, 8)
        for layer in layers:
            x = torch.relu(layer(x))
            outputs.append(x.detach())
    x.sum().backward()
    monitor.step(0)
    monitor.close()
    table = monitor.activation_history
    assert list(table.site) == ["ModuleList:relu", "ModuleList:relu#2", "ModuleList:relu#3"]
    dead = [float((o <= 0).all(dim=0).double().mean()) for o in outputs]
    assert dead[2] == 1.0
    np.testing.assert_allclose(table.dead_fraction.to_numpy(dtype=float), dead)


def test_gates_of_a_hand_written_lstm_cell_stay_apart_over_time() -> None:
    """Three sigmoid gates cut from one linear layer's output, unrolled over 12 steps: three
    sites (one per place in the code), each over all 12 steps."""

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gates = nn.Linear(4 + 6, 4 * 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = c = torch.zeros(x.shape[0], 6)
            self.states: dict[str, list[torch.Tensor]] = {"i": [], "f": [], "o": []}
            for t in range(x.shape[1]):
                z = self.gates(torch.cat([x[:, t], h], dim=1))
                i = torch.sigmoid(z[:, :6])
                f = torch.sigmoid(z[:, 6:12])
                o = torch.sigmoid(z[:, 12:18])
                c = f * c + i * torch.tanh(z[:, 18:])
                h = o * torch.tanh(c)
                for key, value in (("i", i), ("f", f), ("o", o)):
                    self.states[key].append(value.detach())
            return h

    torch.manual_seed(0)
    cell = Cell()
    table = _one_activation_step(cell, torch.randn(8, 12, 4) * 3).set_index("site")
    assert list(table.index) == ["Cell:sigmoid", "Cell:sigmoid#2", "Cell:sigmoid#3",
                                 "Cell:tanh", "Cell:tanh#2"]
    for site, key in (("Cell:sigmoid", "i"), ("Cell:sigmoid#2", "f"), ("Cell:sigmoid#3", "o")):
        y = torch.cat([v.double().flatten() for v in cell.states[key]])
        expected = float((y * (1 - y) < FLOOR).double().mean())
        assert float(table.loc[site, "saturated_fraction"]) == pytest.approx(expected, rel=1e-6)


def test_functional_off_sees_only_modules() -> None:
    model = FunctionalNet()
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1,
                         functional_activations=False) as monitor:
        model(torch.randn(4, 8)).sum().backward()
        monitor.step()
    assert len(monitor.activation_history) == 0


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_exist_only_inside_the_forward_of_activation_steps_and_never_after_close() -> None:
    model = ModuleNet()
    inside: list[tuple[int, int]] = []
    model.act2.register_forward_hook(  # the user's own hook: it sees what is installed mid-forward
        lambda *_: inside.append((len(nn.modules.module._global_forward_hooks),
                                  len(torch.overrides._get_current_function_mode_stack()))))
    user_hooks = _hook_count(model)
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=3, early_steps=2)
    between = []
    for _ in range(8):
        model(torch.randn(2, 8)).sum().backward()
        monitor.step()
        between.append((_hook_count(model) - user_hooks,
                        len(nn.modules.module._global_forward_hooks),
                        len(torch.overrides._get_current_function_mode_stack())))
    monitor.close()
    # during the forward of steps 0 and 1 (front-loaded), then every third step (3, 6): the
    # stack-tracking global hook and the interceptor
    on, off = (1, 1), (0, 0)
    assert inside == [on, on, off, on, off, off, on, off]
    assert between == [(0, 0, 0)] * 8
    assert _hook_count(model) == user_hooks
    assert "forward" not in vars(model)  # the per-instance wrapper is gone


def test_user_registered_activation() -> None:
    class Swish2(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(2 * x)

    def swish2_grad(x, y, p):  # noqa: ANN001, ANN202
        s = torch.sigmoid(2 * x)
        return s + 2 * x * s * (1 - s)

    registry = default_registry.copy()
    registry.register_module(Swish2, ActivationSpec("swish2", "rectifier", swish2_grad,
                                                    needs_input=True))
    model = nn.Sequential(nn.Linear(4, 4), Swish2())
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1,
                         activation_registry=registry) as monitor:
        x = torch.randn(8, 4)
        model(x).sum().backward()
        monitor.step()
    table = monitor.activation_history
    assert list(table.kind) == ["swish2"]  # its inner torch.sigmoid is not counted separately
    with pytest.raises(ValueError, match="module_type must be an nn.Module subclass"):
        registry.register_module(int, ActivationSpec("x", "rectifier", swish2_grad))


class Router(nn.Module):
    """Routes through argmax: the gate's parameters get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 3)
        self.experts = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.gate(x).argmax(-1)
        return self.experts(x).gather(1, choice[:, None])


def test_no_gradient_names_the_graph_cutting_operation() -> None:
    model = Router()
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(torch.randn(5, 4)).sum().backward()
            monitor.step()
    found = [f for f in monitor.findings if f.kind == "no_gradient"]
    assert [f.layer for f in found] == ["gate"]
    assert "'Router' called argmax" in found[0].message


def test_relu_statistics_count_nan_outputs_as_passing_no_gradient() -> None:
    from graddiag.measure.activations.specs import RELU
    from graddiag.measure.activations.statistics import _Site

    y = torch.tensor([[1.0, -1.0, float("nan")], [2.0, 0.0, float("nan")], [0.5, -3.0, 4.0]])
    site = _Site("r", RELU)
    with torch.no_grad():
        site.add(None, y, {}, 0.01)
    # below the floor: -1, nan, 0, nan, -3 (ReLU's backward passes grad * (y > 0))
    assert site.below is not None and site.gain is not None
    assert site.below.item() == 5.0
    assert site.gain.item() == 4.0  # |f'| = 1 on the four positive elements
    assert site.alive is not None
    assert site.alive.tolist() == [True, False, True]  # unit 1 never positive


def test_relu6_statistics_count_the_band_where_the_derivative_is_one() -> None:
    from graddiag.measure.activations.specs import _RELU6_PARAMS, RELU6
    from graddiag.measure.activations.statistics import _Site

    y = torch.tensor([[-1.0, 3.0], [6.0, 2.0], [float("nan"), 0.0]])
    site = _Site("r6", RELU6)
    with torch.no_grad():
        site.add(None, y, dict(_RELU6_PARAMS), 0.01)
    # f' = 1 only strictly inside (0, 6): 3 and 2; -1, 6, nan and 0 pass no gradient
    assert site.below is not None and site.gain is not None
    assert (site.below.item(), site.gain.item()) == (4.0, 2.0)
    assert site.alive is not None and site.alive.tolist() == [False, True]


def test_a_user_spec_with_boolean_passes_counts_like_the_built_in_relu() -> None:
    from graddiag.measure.activations.specs import RELU
    from graddiag.measure.activations.statistics import _Site

    y = torch.tensor([[1.0, -1.0, float("nan"), 0.0], [2.0, 0.0, float("nan"), -2.0],
                      [0.5, -3.0, 4.0, 0.0]])
    boolean = ActivationSpec("relu", "rectifier", RELU.derivative, passes=lambda t, p: t > 0)
    for spec in (RELU, boolean):
        site = _Site("r", spec)
        with torch.no_grad():
            site.add(None, y, {}, 0.01)
        assert site.below is not None and site.gain is not None and site.alive is not None
        # positive (|f'| = 1): 1, 2, 0.5, 4; the other eight pass no gradient
        assert (site.below.item(), site.gain.item()) == (8.0, 4.0)
        assert site.alive.tolist() == [True, False, True, False]


def test_derivative_statistics_count_values_at_the_floor_nan_and_inf_as_passing() -> None:
    from graddiag.measure.activations.statistics import _Site

    identity = ActivationSpec("ident", "saturating", lambda x, y, p: y)  # |f'| = y
    y = torch.tensor([[0.2, 0.4, float("nan"), float("inf"), 0.5],
                      [0.3, 0.1, 0.3, 0.2, 0.5]])
    site = _Site("i", identity)
    with torch.no_grad():
        site.add(None, y, {}, 0.5)
    # below 0.5: 0.2, 0.4, 0.3, 0.1, 0.3, 0.2; not NaN, inf or 0.5 itself
    assert site.below is not None and site.below.item() == 6.0
    # a unit is dead when every sample is below: units 0 and 1 only
    assert site.alive is not None and site.alive.tolist() == [False, False, True, True, True]


def test_an_empty_batch_adds_no_elements() -> None:
    from graddiag.measure.activations.specs import RELU, TANH
    from graddiag.measure.activations.statistics import _Site

    for spec in (RELU, TANH):
        site = _Site("e", spec)
        with torch.no_grad():
            site.add(None, torch.zeros(0, 3), {}, 0.01)
        assert site.below is not None and site.gain is not None
        assert (site.below.item(), site.gain.item(), site.elements) == (0.0, 0.0, 0)


def test_step_called_before_backward_says_so_not_a_graph_cut() -> None:
    """No layer has a gradient when ``monitor.step()`` comes before ``backward()``: the finding
    points at the call order, not at argmax or a straight-through estimator."""
    from graddiag.rules import wording

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, reporters=[]) as monitor:
        for _ in range(4):
            optimizer.zero_grad(set_to_none=True)
            loss = model(torch.randn(5, 4)).pow(2).mean()
            monitor.step()  # too early: .grad is still None everywhere
            loss.backward()
            optimizer.step()
    found = [f for f in monitor.findings if f.kind == "no_gradient"]
    assert sorted(f.layer for f in found) == ["0", "2"]
    for f in found:
        assert f.step == 2  # no_gradient_patience: 3 recorded steps
        assert "monitor.step() before loss.backward()" in f.message
        assert f.remedy == wording.NO_GRADIENT_ANYWHERE and "straight-through" not in f.remedy


def test_units_of_a_poisoned_forward_are_not_reported_dead() -> None:
    """Weights an earlier update made NaN make every ReLU output NaN, which passes no gradient:
    ``nonfinite`` is reported, not a ``dead_relu`` site with advice about bias init."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1,
                         replay_nonfinite=False) as monitor:
        for _ in range(4):
            model.zero_grad()
            out = model(torch.randn(6, 4))
            assert torch.isnan(model[:4](torch.randn(6, 4))).all()  # every unit of both sites
            out.sum().backward()
            monitor.step()
    kinds = {f.kind for f in monitor.findings}
    assert "nonfinite" in kinds and "dead_relu" not in kinds


def test_dead_by_site_gives_each_sites_worst_call_and_every_calls_fraction() -> None:
    # site a: one position of 4 units (1 dead); site b: three positions of 2, 4 and 2 units
    # (0, 3 and 1 dead); site c: two positions, both fully dead, and one without units; site d:
    # no positions
    flags = np.array([1, 0, 0, 0] + [0, 0] + [1, 1, 0, 1] + [1, 0] + [1, 1, 1] + [1, 1, 1],
                     dtype=float)
    widths = [(4,), (2, 4, 2), (3, 0, 3), ()]
    worst, by_call = dead_by_site(flags, widths)
    assert worst[:3].tolist() == [0.25, 0.75, 1.0] and np.isnan(worst[3])
    assert by_call[[0, 1, 2, 3, 4, 6]].tolist() == [0.25, 0.0, 0.75, 0.5, 1.0, 1.0]
    assert len(by_call) == 7 and np.isnan(by_call[5])
