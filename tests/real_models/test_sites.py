"""Activation sites that tell the truth: units follow the producer's layout, a module reused
across widths keeps each call's units, Hugging Face activations are one site each."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations as hf

from graddiag import GradientMonitor
from graddiag.data.records import ActivationRecord
from graddiag.measure.activations import ActivationWatch
from graddiag.measure.activations.packing import pack_activations
from tests.real_models.layouts import Conv1dNet, ReusedReLU, batches, digits
from tests.real_models.training import train

FLOOR = 0.01


class CallRecorder:
    """Keeps the output of every call of a ReLU module on the watched steps (independent of
    graddiag): per call, which units (channels, dimension 1) fire for any sample."""

    def __init__(self, module: nn.Module, steps: set[int]) -> None:
        self.steps, self.step = steps, -1
        self.alive: dict[int, list[torch.Tensor]] = {}
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        if self.step in self.steps and not torch.is_inference_mode_enabled():
            per_unit = (output.detach() > 0).movedim(1, 0).reshape(output.shape[1], -1)
            self.alive.setdefault(self.step, []).append(per_unit.any(dim=1))

    def dead_fraction(self, step: int) -> float:
        """The dead fraction of the worst call: each call has units of its own."""
        return max(float((~a).sum()) / a.numel() for a in self.alive[step])


def _digits_loss(model: nn.Module, recorders: list[CallRecorder] = ()):  # noqa: ANN202
    data = batches(*digits(), batch_size=64)

    def loss(step: int) -> torch.Tensor:
        for recorder in recorders:
            recorder.step = step
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    return loss


def _dead(run, site: str) -> dict[int, float]:  # noqa: ANN001
    return {r.step: float(r.activations.dead[r.activations.sites.index(site)])
            for r in run.monitor.records if r.activations is not None}


def test_conv1d_units_are_channels() -> None:
    torch.manual_seed(0)
    model = Conv1dNet(channels=32)
    with torch.no_grad():  # 27 of 32 channels never fire: 84 % of the units are dead
        model.conv1.weight[:27] = 0.0
        model.conv1.bias[:27] = -1.0
    recorder = CallRecorder(model.act1, {0, 3, 6})
    run = train(model, _digits_loss(model, [recorder]), 7, activation_every_n_steps=3,
                early_steps=0)  # the cadence alone: the recorder reads steps 0, 3 and 6
    dead = _dead(run, "act1")
    assert dead == {s: pytest.approx(recorder.dead_fraction(s)) for s in (0, 3, 6)}
    assert dead[0] >= 27 / 32
    assert [(f.kind, f.layer, f.step) for f in run.findings] == [("dead_relu", "act1", 3)]


def test_healthy_conv1d_net_dead_fractions_match_and_raise_nothing() -> None:
    torch.manual_seed(0)
    model = Conv1dNet(channels=16)
    recorders = [CallRecorder(model.act1, {0, 5, 10}), CallRecorder(model.act2, {0, 5, 10})]
    run = train(model, _digits_loss(model, recorders), 12, activation_every_n_steps=5,
                early_steps=0)
    for recorder, site in zip(recorders, ("act1", "act2")):
        assert _dead(run, site) == {s: pytest.approx(recorder.dead_fraction(s)) for s in (0, 5, 10)}
    assert run.findings == []


def test_a_relu_reused_across_widths_keeps_each_calls_units() -> None:
    torch.manual_seed(0)
    model = ReusedReLU(wide=16, narrow=8)
    recorder = CallRecorder(model.relu, {0, 4, 8})
    run = train(model, _digits_loss(model, [recorder]), 9, activation_every_n_steps=4,
                early_steps=0)
    assert _dead(run, "relu") == {s: pytest.approx(recorder.dead_fraction(s)) for s in (0, 4, 8)}
    assert all(len(recorder.alive[s]) == 2 for s in (0, 4, 8))  # two calls: 16 + 8 units
    assert run.findings == []


def test_a_dead_relu_reused_across_widths_is_found() -> None:
    torch.manual_seed(0)
    model = ReusedReLU(wide=16, narrow=8)
    with torch.no_grad():  # every call of the shared ReLU is 100 % dead
        for conv in (model.conv1, model.conv2):
            conv.weight.mul_(0.01)
            conv.bias.fill_(-10.0)
    recorder = CallRecorder(model.relu, {0, 2})
    run = train(model, _digits_loss(model, [recorder]), 5, activation_every_n_steps=2,
                early_steps=0)
    assert recorder.dead_fraction(0) == 1.0
    assert _dead(run, "relu") == {0: 1.0, 2: 1.0, 4: 1.0}
    # the convolutions behind the dead ReLU get exactly zero gradient (the float64 references):
    # overwhelming evidence, reported at step 1
    zero = sorted(k for k, v in run.references[0].items() if v == 0.0 == run.references[1][k])
    assert zero == ["conv1", "conv2"]
    assert [(f.kind, f.layer, f.step) for f in run.findings] == [
        *(("vanishing", k, 1) for k in zero), ("dead_relu", "relu", 2)]
    # every call is dead, and the finding says so
    dead_relu = run.findings[-1]
    assert (dead_relu.details["calls"], dead_relu.details["call_positions"]) == ([1, 2], 2)
    assert "called at 2 places in each forward pass" in dead_relu.message
    assert "the units of every call are over 70% dead" in dead_relu.message


def test_one_dead_call_of_a_reused_relu_among_live_ones_is_found() -> None:
    """The shared ReLU dead on its second (8-channel) call only: its dead fraction is that
    call's, 1.0, not 8 of its 24 units, and it is reported like a ReLU of its own."""
    torch.manual_seed(0)
    model = ReusedReLU(wide=16, narrow=8)
    with torch.no_grad():  # the second call of the shared ReLU is 100 % dead
        model.conv2.weight.mul_(0.01)
        model.conv2.bias.fill_(-10.0)
    recorder = CallRecorder(model.relu, {0, 2})
    run = train(model, _digits_loss(model, [recorder]), 5, activation_every_n_steps=2,
                early_steps=0)
    assert len(recorder.alive[0]) == 2 and not recorder.alive[0][1].any()  # call 2: all dead
    assert recorder.alive[0][0].float().mean() > 0.5  # call 1: mostly alive
    assert _dead(run, "relu") == {0: 1.0, 2: 1.0, 4: 1.0}
    kinds = [(f.kind, f.layer, f.step) for f in run.findings]
    assert ("dead_relu", "relu", 2) in kinds
    assert {("vanishing", "conv1"), ("vanishing", "conv2")} <= {k[:2] for k in kinds}
    # the finding names the dead call: the second of the two (the recorder's call order)
    dead_relu = next(f for f in run.findings if f.kind == "dead_relu")
    assert (dead_relu.details["calls"], dead_relu.details["call_positions"]) == ([2], 2)
    assert "called at 2 places in each forward pass" in dead_relu.message
    assert "the dead units are those of its call 2 " in dead_relu.message
    # and each call's own dead fraction, as counted from the module's outputs
    checked = 0
    for record in (r for r in run.monitor.records if r.activations is not None):
        acts = record.activations
        assert acts.sites == ["relu"] and acts.call_positions.tolist() == [2]
        if record.step in recorder.alive:
            per_call = [float((~alive).double().mean()) for alive in recorder.alive[record.step]]
            assert acts.dead_by_call.tolist() == pytest.approx(per_call)
            checked += 1
    assert checked == 2


def _watched(root: nn.Module, *passes: torch.Tensor) -> ActivationRecord:
    """Activation statistics of ``root`` over one watched forward pass per input."""
    watch = ActivationWatch(root, derivative_floor=FLOOR)
    for x in passes:
        with watch.watching():
            root(x)
    pack = pack_activations(*watch.take())
    assert pack is not None
    return pack.finish([c.detach().double().numpy().reshape(-1) for c in pack.chunks])


class ModuleCell(nn.Module):
    """A recurrent cell unrolled by hand whose nonlinearity is a module: ``self.act`` is
    called once per time step, always on the same 8 hidden units."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8, bias=False)
        self.rec = nn.Linear(8, 8, bias=False)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = self.act(self.inp(x[:, t]) + self.rec(h))
        return self.head(h).sum()


def test_a_module_called_once_per_time_step_keeps_one_set_of_units() -> None:
    """With a zero state and a zero first frame every unit is 0 on step 1 (all dead there, if
    steps were call positions of their own); a unit is dead only if it fired on no step for no
    sample, counted here from the module's outputs."""
    torch.manual_seed(0)
    model = ModuleCell()
    x = torch.randn(16, 6, 4)
    x[:, 0] = 0.0
    outputs: list[torch.Tensor] = []
    model.act.register_forward_hook(lambda m, a, out: outputs.append(out.detach() > 0))
    watch = ActivationWatch(model, derivative_floor=FLOOR)
    with watch.watching():
        model(x)
    sites, cuts = watch.take()
    assert [site.widths for site in sites] == [(8,)]  # six calls, one set of 8 units
    pack = pack_activations(sites, cuts)
    assert pack is not None
    record = pack.finish([c.detach().double().numpy().reshape(-1) for c in pack.chunks])
    assert len(outputs) == 6 and not outputs[0].any()  # the first step: nothing fires
    fired = torch.stack(outputs).any(dim=0).any(dim=0)  # per unit, on any step or sample
    expected = float((~fired).double().mean())
    assert expected < 0.5
    assert record.sites == ["act"] and float(record.dead[0]) == pytest.approx(expected)
    assert record.call_positions.tolist() == [1]


class SharedBeforeCell(ModuleCell):
    """:class:`ModuleCell` whose ``act`` is also called once before the time loop, on units of
    another layer (``pre``, whose 8 units are all dead: a bias of -10)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 8)
        with torch.no_grad():
            self.pre.weight.zero_()
            self.pre.bias.fill_(-10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 8)
        start = self.act(self.pre(x[:, 0]))
        for t in range(x.shape[1]):
            h = self.act(self.inp(x[:, t]) + self.rec(h))
        return self.head(h + start).sum()


def test_a_module_called_before_a_time_loop_keeps_the_loops_units_apart_from_that_call() -> None:
    """``act`` runs once on ``pre``'s units (all dead) and then once per time step on the
    cell's: two call positions, the first 100 % dead, the second dead only where a unit fired
    on no step (counted from the module's outputs), not merged with the first call's."""
    torch.manual_seed(0)
    model = SharedBeforeCell()
    x = torch.randn(16, 6, 4)
    outputs: list[torch.Tensor] = []
    model.act.register_forward_hook(lambda m, a, out: outputs.append(out.detach() > 0))
    record = _watched(model, x)
    assert len(outputs) == 7 and not outputs[0].any()  # the call before the loop: all dead
    fired = torch.stack(outputs[1:]).any(dim=0).any(dim=0)  # the cell's units, on any step
    expected = float((~fired).double().mean())
    assert expected < 0.5
    assert record.sites == ["act"] and record.call_positions.tolist() == [2]
    assert record.dead_by_call.tolist() == pytest.approx([1.0, expected])


def _autograd_derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double().requires_grad_(True)
    module.double()(x).sum().backward()
    module.float()
    return x.grad.abs()


HUGGING_FACE = [
    hf.NewGELUActivation(), hf.GELUActivation(), hf.FastGELUActivation(), hf.GELUTanh(),
    hf.AccurateGELUActivation(), hf.QuickGELUActivation(), hf.ClippedGELUActivation(-1.0, 2.0),
    hf.SiLUActivation(), hf.MishActivation(), hf.ReLUSquaredActivation(), hf.LaplaceActivation(),
    nn.GELU(approximate="tanh"), nn.Mish(), nn.Hardswish(),
]


@pytest.mark.parametrize("module", HUGGING_FACE, ids=lambda m: type(m).__name__)
def test_composite_activations_are_one_site_with_their_own_derivative(module: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 16) * 3
    x[:, :3] = -torch.rand(32, 3) * 5 - 8  # three units always very negative
    d = _autograd_derivative(module, x)
    record = _watched(nn.Sequential(module), x)
    assert record.sites == ["0"]  # no "0:tanh"/"0:sigmoid" from the functions it calls inside
    assert float(record.gain[0]) == pytest.approx(d.mean().item(), rel=1e-4)
    assert float(record.saturated[0]) == pytest.approx((d < FLOOR).double().mean().item(), abs=1e-6)
    assert float(record.dead[0]) == pytest.approx((d < FLOOR).all(dim=0).double().mean().item(),
                                                  abs=1e-6)


def test_graddiag_does_not_import_transformers() -> None:
    code = "import sys, graddiag; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_units_follow_the_producer_when_the_shape_is_ambiguous() -> None:
    from graddiag.measure.activations.statistics import unit_dim

    x = torch.randn(4, 6, 10, requires_grad=True)
    conv = nn.Conv1d(6, 6, 3, padding=1)
    lin = nn.Linear(10, 10)
    assert unit_dim(torch.relu(conv(x))) == 1  # (batch, channels, length)
    assert unit_dim(torch.relu(conv(x) + x)) == 1  # through a residual addition
    assert unit_dim(torch.relu(nn.BatchNorm1d(6)(conv(x)))) == 1
    assert unit_dim(torch.relu(lin(x))) == 2  # (batch, tokens, features)
    assert unit_dim(torch.relu(nn.LayerNorm(10)(x))) == 2
    assert unit_dim(torch.relu(conv(x).transpose(1, 2))) == 2  # channels moved last: fallback
    with torch.no_grad():
        assert unit_dim(torch.relu(conv(x))) == 2  # no graph: 3-D tensors fall back to last
    assert np.array_equal(unit_dim(torch.relu(torch.randn(2, 3, 4, 5))), 1)


def test_units_of_a_call_position_add_up_over_micro_batches() -> None:
    torch.manual_seed(0)
    model = ReusedReLU(wide=16, narrow=8)
    with torch.no_grad():
        model.conv1.bias[:10] = -0.5  # some channels fire for few samples only
        model.conv2.bias[:5] = -0.3
    recorder = CallRecorder(model.relu, {0})
    recorder.step = 0
    # two micro-batches of one accumulated step: two watched forward passes
    record = _watched(model, torch.rand(4, 64), torch.rand(4, 64))
    first, second = recorder.alive[0][:2], recorder.alive[0][2:]
    # a unit is alive if it fired in either micro-batch; call 1 and call 2 are different units
    alive = [a | b for a, b in zip(first, second)]
    expected = max(float((~a).sum()) / a.numel() for a in alive)  # the worst call's
    assert record.calls[0] == 4
    assert float(record.dead[0]) == pytest.approx(expected)
    assert 0 < expected < 1


class SharedOutputReLU(nn.Module):
    """One ``nn.ReLU`` after two hidden layers and on the output (a non-negative regression):
    the site's place is its call nearest the loss, after the last trainable layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.act(self.out(x))


def test_a_shared_relu_whose_last_call_feeds_the_loss_is_still_judged() -> None:
    """The second call (after ``fc2``, bias -30) is 100 % dead, counted from the module's
    outputs; the site's last call comes after the last layer, yet the dead call sits between
    layers and is reported, named."""
    torch.manual_seed(0)
    model = SharedOutputReLU()
    with torch.no_grad():
        model.fc2.bias.fill_(-30.0)
        model.out.bias.fill_(1.0)
    recorder = CallRecorder(model.act, {1})
    x_all = torch.randn(512, 16)
    y_all = x_all[:, :4].abs().sum(1, keepdim=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, optimizers=optimizer, reporters=[])
    for step in range(6):
        recorder.step = step
        idx = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(step))
        loss = F.mse_loss(model(x_all[idx]), y_all[idx])
        optimizer.zero_grad()
        loss.backward()
        monitor.step(step)
        optimizer.step()
    monitor.close()
    per_call = [float((~alive).double().mean()) for alive in recorder.alive[1]]
    assert len(per_call) == 3 and per_call[1] == 1.0 and max(per_call[0], per_call[2]) < 0.7
    record = next(r for r in monitor.records if r.step == 1).activations
    assert record is not None and record.sites == ["act"]
    assert record.position[0] == len(monitor.records[-1].layers) - 0.5  # placed after the last
    assert record.dead_by_call.tolist() == pytest.approx(per_call)
    found = [f for f in monitor.findings if f.kind == "dead_relu"]
    assert [(f.layer, f.details["calls"]) for f in found] == [("act", [2])]
