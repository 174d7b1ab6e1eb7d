"""Activation sites keep their place among the layers: an activation step times the gradient
through its sites only while some site has no kept place, and the host counts dead units from
each unit's largest |f'|."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graddiag import ActivationSpec, GradientMonitor
from graddiag.measure.activations.packing import pack_activations
from graddiag.measure.activations.specs import RELU, TANH
from graddiag.measure.activations.statistics import _Site
from graddiag.measure.live_layers import KEEP_PLACES_FOR
from graddiag.measure.order import NO_LAYER_UPSTREAM
from graddiag.measure.transfer import to_host


class ThreeLayers(nn.Module):
    """Linear - Tanh - Linear - ReLU - Linear; with ``extra``, a functional sigmoid between the
    last two layers as well; with ``moved``, the tanh runs after ``b`` instead of after ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.tanh, self.relu = nn.Tanh(), nn.ReLU()
        self.extra = self.moved = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.moved:
            h = self.relu(self.tanh(self.b(self.a(x))))
        else:
            h = self.relu(self.b(self.tanh(self.a(x))))
        if self.extra:
            h = torch.sigmoid(h)
        return self.c(h)


def _hooked(model: nn.Module) -> bool:
    """Whether some parameter carries a post-accumulate-grad hook now."""
    return any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


def _run(model: ThreeLayers, steps: int, before=None):  # noqa: ANN001, ANN202
    """Trains ``steps`` steps with activation statistics on every step; returns the monitor and,
    per step, whether the layers were timed and whether a site's output carried a hook."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs: list[torch.Tensor] = []
    spy = model.tanh.register_forward_hook(lambda m, a, out: outputs.append(out))
    timed, site_hooked = [], []
    with GradientMonitor(model, optimizers=optimizer, activation_every_n_steps=1,
                         early_steps=0, evaluate_every_n_records=1) as monitor:
        for step in range(steps):
            if before is not None:
                before(step)
            outputs.clear()
            loss = F.cross_entropy(model(x), y)
            timed.append(_hooked(model))
            site_hooked.append(bool(outputs[0]._backward_hooks))
            optimizer.zero_grad()
            loss.backward()
            monitor.step()
            optimizer.step()
    spy.remove()
    return monitor, timed, site_hooked


def test_sites_are_timed_once_then_keep_their_place() -> None:
    model = ThreeLayers()
    monitor, timed, site_hooked = _run(model, 4)
    assert timed == [True, False, False, False]
    assert site_hooked == [True, False, False, False]
    assert len(monitor.records) == 4
    for record in monitor.records:
        acts = record.activations
        assert acts is not None and acts.sites == ["tanh", "relu"]
        # tanh between layers 0 (a) and 1 (b), ReLU between 1 (b) and 2 (c)
        assert acts.position.tolist() == [0.5, 1.5]
    assert not _hooked(model)


def test_a_new_site_is_unplaced_on_its_first_step_and_timed_on_the_next() -> None:
    model = ThreeLayers()

    def switch(step: int) -> None:
        model.extra = step >= 2

    monitor, timed, _ = _run(model, 5, switch)
    assert timed == [True, False, False, True, False]
    acts = [r.activations for r in monitor.records]
    assert all(a is not None for a in acts)
    new_site = "ThreeLayers:sigmoid"
    assert acts[2] is not None and acts[2].sites == ["tanh", "relu", new_site]
    assert acts[2].position[:2].tolist() == [0.5, 1.5] and math.isnan(acts[2].position[2])
    for step in (3, 4):  # the sigmoid also runs between b and c
        assert acts[step] is not None and acts[step].position.tolist() == [0.5, 1.5, 1.5]


def test_a_change_of_the_layers_forgets_every_place() -> None:
    model = ThreeLayers()

    def freeze(step: int) -> None:
        if step == 2:
            model.a.requires_grad_(False)

    monitor, timed, _ = _run(model, 5, freeze)
    records = monitor.records
    assert records[1].layers == ["a", "b", "c"] and records[3].layers == ["b", "c"]
    # step 2 was not timed (its places were kept when it began); they are forgotten when
    # the step finds the layers changed, not reported against the new layers
    acts = records[2].activations
    assert records[2].layers == ["b", "c"] and acts is not None
    assert np.isnan(acts.position).all()
    # the tanh now has no trainable layer on its input side: never kept, timed every step
    assert timed == [True, False, False, True, True]
    for record in records[3:]:
        acts = record.activations
        assert acts is not None
        assert acts.position.tolist() == [NO_LAYER_UPSTREAM, 0.5]


def test_kept_places_are_timed_again_after_a_bounded_number_of_activation_steps() -> None:
    # the tanh moves from between a and b to between b and c while the layers stay the same
    model = ThreeLayers()

    def move(step: int) -> None:
        model.moved = step >= 3

    steps = KEEP_PLACES_FOR + 2
    assert KEEP_PLACES_FOR == 10
    monitor, timed, _ = _run(model, steps, move)
    assert timed == [step % KEEP_PLACES_FOR == 0 for step in range(steps)]
    positions = [r.activations.position.tolist() for r in monitor.records if r.activations]
    assert len(positions) == steps
    assert positions[:3] == [[0.5, 1.5]] * 3
    assert positions[3:KEEP_PLACES_FOR] == [[0.5, 1.5]] * (KEEP_PLACES_FOR - 3)  # kept, stale
    assert positions[KEEP_PLACES_FOR:] == [[1.5, 1.5]] * 2  # timed again: after b


def test_a_pass_timed_on_other_layers_than_those_measured_keeps_no_place() -> None:
    # b is frozen at first; a new site arms the timing of step 3, and b is unfrozen before it:
    # that pass times a and c only, its places (against a, b, c) are not kept
    model = ThreeLayers()
    model.b.requires_grad_(False)

    def change(step: int) -> None:
        model.extra = step >= 2
        if step == 3:
            model.b.requires_grad_(True)

    monitor, timed, _ = _run(model, 6, change)
    records = monitor.records
    assert [r.layers for r in records] == [["a", "c"]] * 3 + [["a", "b", "c"]] * 3
    assert timed == [True, False, False, True, True, False]
    for record in records[4:]:  # tanh after a, ReLU and sigmoid after b
        acts = record.activations
        assert acts is not None and acts.position.tolist() == [0.5, 1.5, 1.5]


def test_the_host_counts_dead_units_from_each_units_largest_derivative() -> None:
    relu = _Site("relu", RELU)
    tanh = _Site("tanh", TANH)
    empty = _Site("empty", RELU)
    with torch.no_grad():
        # units are columns: unit 0 passes on one sample, unit 1 never (NaN passes nothing),
        # unit 2 never
        relu.add(None, torch.tensor([[1.0, -1.0, 0.0], [-2.0, float("nan"), -3.0]]), {}, 0.01)
        # |f'| = 1 - y^2: column 0 is 1 on both samples, column 1 about 2e-4 and 2e-5 (< 0.01)
        tanh.add(None, torch.tensor([[0.0, 0.9999], [0.0, 0.99999]]), {}, 0.01)
        empty.add(None, torch.zeros(0, 4), {}, 0.01)
    pack = pack_activations([relu, tanh, empty], {})
    assert pack is not None
    record = pack.finish(to_host(pack.chunks))
    assert record.sites == ["relu", "tanh", "empty"]
    # ReLU: 1 of 6 elements passes; tanh: 2 of 4 below the floor; no samples: every unit dead
    np.testing.assert_allclose(record.saturated[:2], [5 / 6, 2 / 4])
    assert math.isnan(record.saturated[2])  # 0 of 0 elements
    np.testing.assert_allclose(record.dead, [2 / 3, 1 / 2, 4 / 4])
    expected_gain = (2.0 + (1 - 0.9999 ** 2) + (1 - 0.99999 ** 2)) / 4
    np.testing.assert_allclose(record.gain[:2], [1 / 6, expected_gain], rtol=1e-4)
    assert record.calls.tolist() == [1.0, 1.0, 1.0]


def test_a_unit_alive_in_one_micro_batch_is_alive() -> None:
    site = _Site("relu", RELU)
    with torch.no_grad():
        site.add(None, torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]), {}, 0.01, forward_pass=1)
        site.add(None, torch.tensor([[-1.0, 2.0]]), {}, 0.01, forward_pass=2)
    pack = pack_activations([site], {})
    assert pack is not None
    record = pack.finish(to_host(pack.chunks))
    assert record.dead.tolist() == [0.5]  # unit 1 passed in the second micro-batch
    np.testing.assert_allclose(record.saturated, [5 / 6])
    assert record.calls.tolist() == [2.0]


def test_the_host_compares_with_the_floor_in_float32_as_the_device_does() -> None:
    identity = ActivationSpec("ident", "saturating", lambda x, y, p: y)  # |f'| = y
    site = _Site("i", identity)
    with torch.no_grad():  # float32(0.01) is just below 0.01 in float64, equal in float32
        site.add(None, torch.tensor([[0.01, 0.5], [0.01, 0.5]]), {}, 0.01)
    pack = pack_activations([site], {})
    assert pack is not None
    record = pack.finish(to_host(pack.chunks))
    assert record.saturated.tolist() == [0.0] and record.dead.tolist() == [0.0]


def test_a_nan_call_keeps_its_units_alive_across_calls() -> None:
    identity = ActivationSpec("ident", "saturating", lambda x, y, p: y)  # |f'| = y
    site = _Site("i", identity)
    with torch.no_grad():  # unit 0 is NaN in one micro-batch: alive; unit 1 below in both
        site.add(None, torch.tensor([[float("nan"), 0.001]]), {}, 0.01, forward_pass=1)
        site.add(None, torch.tensor([[0.001, 0.001]]), {}, 0.01, forward_pass=2)
    pack = pack_activations([site], {})
    assert pack is not None
    record = pack.finish(to_host(pack.chunks))
    assert record.dead.tolist() == [0.5]
    np.testing.assert_allclose(record.saturated, [3 / 4])  # NaN is not below the floor
