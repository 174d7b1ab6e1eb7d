"""No dtype or layout that PyTorch trains crashes graddiag: float64, sparse, complex, float8."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.real_models.layouts import ComplexLinear, Recommender, physics_net
from tests.real_models.training import train


def test_float64_physics_informed_net_trains_and_norms_match_float64(
        caplog: pytest.LogCaptureFixture) -> None:
    model = physics_net()
    x = torch.linspace(-math.pi, math.pi, 64, dtype=torch.float64).reshape(-1, 1)

    def loss(step: int) -> torch.Tensor:
        xs = x.clone().requires_grad_(True)
        u = model(xs)
        du = torch.autograd.grad(u.sum(), xs, create_graph=True)[0]  # a derivative in the loss
        return F.mse_loss(u, torch.sin(x)) + F.mse_loss(du, torch.cos(x))

    weights: dict[int, list[float]] = {}

    def weights_now(step: int) -> None:  # the weights graddiag reads on this step
        weights[step] = [math.sqrt(sum(float(p.detach().double().pow(2).sum())
                                       for p in model[i].parameters())) for i in (0, 2, 4)]

    with caplog.at_level(logging.WARNING, logger="graddiag"):
        run = train(model, loss, 20, activation_every_n_steps=5, param_every_n_steps=5,
                    histogram_every_n_steps=5, after_backward=weights_now)
    assert run.findings == [] and caplog.records == []
    run.assert_norms_match_reference(rtol=1e-5)
    acts = run.monitor.records[0].activations
    assert acts is not None and acts.kinds == ["tanh", "tanh"]
    # the derivative taken inside the loss does not confuse the order: tanh "1" runs between
    # layers 0 and 2, tanh "3" between 2 and 4
    assert list(acts.position) == [0.5, 1.5]
    for step in (5, 10):
        params = run.monitor.records[step].param_norm
        assert params is not None and params == pytest.approx(weights[step], rel=1e-5)


def test_sparse_embeddings_after_a_dense_layer(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Recommender()
    g = torch.Generator().manual_seed(0)
    target = torch.randn(50, 40, generator=g)
    dense = [p for n, p in model.named_parameters() if not n.startswith(("users", "items"))]
    sparse = [model.users.weight, model.items.weight]
    optimizers = [torch.optim.Adam(dense, lr=1e-2), torch.optim.SparseAdam(sparse, lr=1e-2)]

    def loss(step: int) -> torch.Tensor:
        user = torch.randint(0, 50, (32,), generator=g)
        item = torch.randint(0, 40, (32,), generator=g)
        return F.mse_loss(model(user, item, torch.randn(32, 4, generator=g)), target[user, item])

    with caplog.at_level(logging.WARNING, logger="graddiag"):
        run = train(model, loss, 15, optimizers=optimizers, activation_every_n_steps=5,
                    histogram_every_n_steps=5)
    assert model.users.weight.grad is not None and model.users.weight.grad.is_sparse
    assert run.findings == [] and caplog.records == []
    assert run.monitor.records[0].layers[-1] == "out"
    assert run.assert_norms_match_reference(rtol=1e-5) == 15 * 4
    counts = run.monitor.records[5].grad_histograms
    assert counts is not None
    users = run.monitor.records[5].layers.index("users")
    # the histogram counts the stored (coalesced) elements of the sparse gradient
    assert counts[users, :-2].sum() > 0


def test_complex_parameters_norms_are_those_of_the_magnitudes(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = ComplexLinear()
    g = torch.Generator().manual_seed(0)

    def loss(step: int) -> torch.Tensor:
        x = torch.randn(16, 8, dtype=torch.complex64, generator=g)
        return model(x).pow(2).mean()

    with caplog.at_level(logging.WARNING, logger="graddiag"):
        run = train(model, loss, 10, param_every_n_steps=2, histogram_every_n_steps=2)
    assert run.findings == [] and caplog.records == []
    run.assert_norms_match_reference(rtol=1e-5)
    record = run.monitor.records[2]
    assert record.param_norm is not None and np.isfinite(record.param_norm).all()
    assert record.grad_histograms is not None
    weight_grad_elements = 8 * 8 + 8
    assert record.grad_histograms[0, :-2].sum() == weight_grad_elements


def test_a_dtype_torch_cannot_norm_is_measured_upcast_or_skipped_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    model.scale = torch.nn.Parameter(torch.ones(4).to(torch.float8_e4m3fn))  # no norm kernels

    def loss(step: int) -> torch.Tensor:
        return model(torch.randn(8, 4)).pow(2).mean()

    def fp8_grad(step: int) -> None:
        model.scale.grad = torch.full((4,), 0.5).to(torch.float8_e4m3fn)

    with caplog.at_level(logging.WARNING, logger="graddiag"):
        run = train(model, loss, 6, optimizers=[torch.optim.SGD([model.weight, model.bias], 0.1)],
                    after_backward=fp8_grad, param_every_n_steps=1, histogram_every_n_steps=1)
    # the gradient norm takes the float8 gradient upcast; the update ratio cannot be computed
    # for float8 weights: one warning for the whole run, and training went on
    run.assert_norms_match_reference(rtol=1e-5)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "float8_e4m3fn" in warnings[0]
    assert len(run.monitor.records) == 6


class ComplexTanh(ComplexLinear):
    """A complex-valued activation (``torch.tanh`` of a complex tensor) before the read-out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(torch.tanh(self.mix(x)).abs())


def test_a_complex_activation_is_skipped_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = ComplexTanh()
    g = torch.Generator().manual_seed(0)

    def loss(step: int) -> torch.Tensor:
        return model(torch.randn(16, 8, dtype=torch.complex64, generator=g)).pow(2).mean()

    with caplog.at_level(logging.WARNING, logger="graddiag"):
        run = train(model, loss, 6, activation_every_n_steps=2)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ComplexTanh:tanh" in warnings[0]
    assert len(run.monitor.activation_history) == 0  # no statistics from complex values
    run.assert_norms_match_reference(rtol=1e-5)
