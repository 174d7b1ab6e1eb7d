"""Findings that mean what they say: growth from a tiny initial scale is no explosion, and a
confident output sigmoid under BCELoss is no saturation problem; real ones are still found."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.real_models.layouts import (
    LayerScaleViT,
    SigmoidClassifier,
    adapted_mlp,
    batches,
    digits,
    rezero_mlp,
)
from tests.real_models.training import train


def _layerscale_run(steps: int, **kwargs: object):  # noqa: ANN202
    torch.manual_seed(0)
    model = LayerScaleViT(dim=32, depth=3)
    data = batches(*digits(), batch_size=64)

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    return model, train(model, loss, steps, activation_every_n_steps=10, **kwargs)


def test_layerscale_growth_from_1e_minus_6_is_not_an_explosion() -> None:
    _, run = _layerscale_run(40)
    norms = pd.DataFrame(run.references)  # float64, one row per step, one column per layer
    branch = [c for c in norms if c.startswith("blocks.") and ".ls" not in c]
    # the branch layers start ~1e-5 below the rest and grow a thousandfold in one Adam step...
    assert (norms.loc[1, branch] / norms.loc[0, branch]).min() > 100
    # ... yet never go above 5x their later typical norm: a healthy start, not an explosion
    assert (norms.loc[:9].max() / norms.loc[20:].median()).max() < 5
    assert run.findings == []
    run.assert_norms_match_reference(rtol=1e-4)


def test_a_real_explosion_in_a_layerscale_net_is_found_at_its_layer_and_step() -> None:
    holder: dict[str, nn.Module] = {}

    def spike(step: int) -> None:  # one layer's gradient jumps 10,000x on step 30
        if step == 30:
            for p in holder["model"].blocks[1].mlp[2].parameters():
                p.grad.mul_(1e4)

    torch.manual_seed(0)
    model = LayerScaleViT(dim=32, depth=3)
    holder["model"] = model
    data = batches(*digits(), batch_size=64)

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    run = train(model, loss, 32, activation_every_n_steps=10, after_backward=spike)
    assert [(f.kind, f.layer, f.step) for f in run.findings] == [("exploding", "blocks.1.mlp.2", 30)]


def test_a_loss_scaled_10000x_explodes_every_layer() -> None:
    torch.manual_seed(0)
    model = LayerScaleViT(dim=32, depth=3)
    data = batches(*digits(), batch_size=64)

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(x), y) * (1e4 if step == 30 else 1.0)

    run = train(model, loss, 31, activation_every_n_steps=10)
    flagged = {f.layer for f in run.findings if f.kind == "exploding" and f.step == 30}
    assert flagged == set(run.monitor.records[30].layers)
    assert {f.step for f in run.findings} == {30}


def _binary_task() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits()
    return x, (y < 5).float()


def test_a_confident_output_sigmoid_under_bce_is_not_saturation() -> None:
    torch.manual_seed(0)
    model = SigmoidClassifier(hidden=32)
    x, target = _binary_task()
    data = batches(x, target, batch_size=64)
    cancelled: list[float] = []

    def loss(step: int) -> torch.Tensor:
        xb, tb = next(data)
        if step % 10 == 0:  # BCE cancels sigmoid's derivative: d loss / d logit = (p - y) / N
            logits = model.net[:5](xb).squeeze(-1).detach().requires_grad_(True)
            p = model.net[5](logits)
            grad = torch.autograd.grad(nn.BCELoss()(p, tb), logits)[0]
            cancelled.append(float((grad - (p - tb) / len(tb)).abs().max().detach()))
        return nn.BCELoss()(model(xb), tb)

    run = train(model, loss, 150, lr=1e-2, activation_every_n_steps=10)
    with torch.no_grad():
        p = model(x)
    accuracy = float(((p > 0.5).float() == target).float().mean())
    saturated = float((p * (1 - p) < 0.01).float().mean())  # sigmoid'(z) below the floor
    assert accuracy > 0.9 and saturated > 0.5  # right, and confident
    assert max(cancelled) < 1e-7
    sat = run.monitor.activation_history
    assert sat[sat.site == "net.5"].saturated_fraction.iloc[-2:].min() > 0.5
    assert run.findings == []


def test_a_saturated_hidden_sigmoid_is_found_at_its_site() -> None:
    torch.manual_seed(0)
    model = SigmoidClassifier(hidden=32)
    model.net[1] = nn.Sigmoid()
    with torch.no_grad():
        model.net[0].weight.mul_(40.0)  # pre-activations far in the flat tails
    x, target = _binary_task()
    data = batches(x, target, batch_size=64)

    def loss(step: int) -> torch.Tensor:
        xb, tb = next(data)
        return nn.BCELoss()(model(xb), tb)

    run = train(model, loss, 11, lr=1e-3, activation_every_n_steps=5)  # steps 0-4 front-loaded
    first = run.monitor.records[0].activations
    assert first is not None
    z = model.net[0](x[:64]).detach().double()
    # independent: the hidden sigmoid's derivative s(1-s) is below the floor for most units
    assert float((torch.sigmoid(z) * (1 - torch.sigmoid(z)) < 0.01).double().mean()) > 0.5
    assert [(f.kind, f.layer, f.step) for f in run.findings] == [("saturated", "net.1", 1)]
    assert np.isfinite(first.position).all() and first.position[0] == 0.5


@pytest.mark.parametrize("build", [adapted_mlp, rezero_mlp], ids=["lora_adapters", "rezero"])
def test_adapters_and_zero_initialised_branches_grow_without_alarms(build) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build()
    data = batches(*digits(), batch_size=64)

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    run = train(model, loss, 40, activation_every_n_steps=10)
    norms = pd.DataFrame(run.references)
    grown = [c for c in norms if c.endswith(("lora_A", "fc1"))]
    assert (norms.loc[0, grown] == 0).all()  # no gradient at all through a zero gate at first
    assert (norms.loc[39, grown] > 0).all()
    assert run.findings == []
