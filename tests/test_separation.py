"""The defaults separate pathology from health on real training runs (digits data)."""

from __future__ import annotations

import pytest
import torch

from graddiag.demos.models import build_mlp
from tests.helpers import train_plain


def _train(data, steps: int, optimizer: str = "adam", lr: float = 1e-3, **mlp):  # noqa: ANN001, ANN003, ANN201
    torch.manual_seed(0)
    return train_plain(build_mlp(64, 10, **mlp), data, steps=steps, optimizer=optimizer, lr=lr,
                       activation_every_n_steps=10)


def test_deep_sigmoid_is_flagged_vanishing_at_its_first_layer_within_100_steps(digits) -> None:  # noqa: ANN001
    monitor = _train(digits, 100, optimizer="sgd", lr=0.1, depth=10, width=64,
                     activation="sigmoid")
    first = [f for f in monitor.findings if f.kind == "vanishing" and f.layer == "0"]
    assert first and first[0].step < 100
    # the explanation names the sigmoid sites between the layer and the loss
    assert "10 sigmoid site(s)" in first[0].message
    assert first[0].details["expected_shrink"] == pytest.approx(
        0.25**10, rel=0.5
    )


@pytest.mark.parametrize(
    "mlp",
    [
        dict(depth=20, width=64, activation="relu", init="kaiming"),
        dict(depth=3, width=64, activation="tanh", init="xavier"),
    ],
    ids=["kaiming-relu-20", "xavier-tanh-3"],
)
def test_healthy_networks_raise_no_alarm_at_all(digits, mlp) -> None:  # noqa: ANN001
    monitor = _train(digits, 300, **mlp)
    assert monitor.findings == []
    # and the net did learn, so silence is not blindness
    assert monitor.history.grad_norm.notna().all()


def test_relu_with_far_too_large_weights_is_flagged_within_a_few_steps(digits) -> None:  # noqa: ANN001
    monitor = _train(digits, 5, depth=10, width=64, activation="relu", init="normal",
                     init_std=3.0)
    kinds = {f.kind for f in monitor.findings if f.step < 5}
    assert kinds & {"exploding", "nonfinite"}


def test_large_init_sigmoid_is_flagged_saturated(digits) -> None:  # noqa: ANN001
    monitor = _train(digits, 40, depth=4, width=64, activation="sigmoid", init="normal",
                     init_std=8.0)
    saturated = [f for f in monitor.findings if f.kind == "saturated"]
    assert saturated and saturated[0].layer == "1"  # the activation module is named
    assert saturated[0].value > 0.5


def test_negative_bias_relu_is_flagged_dead(digits) -> None:  # noqa: ANN001
    monitor = _train(digits, 40, depth=4, width=64, activation="relu", init="kaiming",
                     bias_init=-3.0)
    dead = [f for f in monitor.findings if f.kind == "dead_relu"]
    assert {f.layer for f in dead} >= {"1"}
    assert all(f.value > 0.7 for f in dead)
