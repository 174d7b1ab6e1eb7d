"""A plain training loop that records float64 reference norms next to graddiag's."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from graddiag import GradientMonitor
from tests.real_models.layouts import float64_layer_norms


class Run:
    """A finished run: the closed monitor and the reference norms of every step."""

    def __init__(self, monitor: GradientMonitor, references: list[dict[str, float]]) -> None:
        self.monitor = monitor
        self.references = references

    @property
    def findings(self) -> list[Any]:
        return self.monitor.findings

    def kinds(self) -> list[tuple[str, str, int]]:
        return [(f.kind, f.layer, f.step) for f in self.monitor.findings]

    def assert_norms_match_reference(self, rtol: float = 1e-4) -> int:
        """Every recorded finite layer norm equals the float64 reference; returns how many."""
        checked = 0
        for record in self.monitor.records:
            reference = self.references[record.step]
            for name, value, has in zip(record.layers, record.grad_norm, record.has_grad):
                if not has or not math.isfinite(value):
                    continue
                assert value == pytest_approx(reference[name], rtol), (record.step, name)
                checked += 1
        assert checked > 0
        return checked


def pytest_approx(expected: float, rtol: float) -> Any:
    import pytest

    return pytest.approx(expected, rel=rtol, abs=1e-30)


def train(
    model: nn.Module,
    loss_of_step: Callable[[int], torch.Tensor],
    steps: int,
    *,
    optimizers: list[torch.optim.Optimizer] | None = None,
    lr: float = 1e-3,
    after_backward: Callable[[int], None] | None = None,
    before_step: Callable[[int], None] | None = None,
    **options: Any,
) -> Run:
    """Train ``steps`` steps; ``loss_of_step(step)`` runs the forward pass and returns the loss.

    ``before_step(step)`` runs before the forward pass (unfreeze, inject), ``after_backward``
    after the backward pass (e.g. scale one layer's gradient). Reference norms are taken from
    ``.grad`` right before ``monitor.step()``.
    """
    optimizers = optimizers or [torch.optim.Adam(model.parameters(), lr=lr)]
    options.setdefault("reporters", [])
    references: list[dict[str, float]] = []
    with GradientMonitor(model, **options) as monitor:
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = loss_of_step(step)
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            references.append(float64_layer_norms(model))
            if monitor.step().should_skip:
                continue
            for opt in optimizers:
                opt.step()
    return Run(monitor, references)


def finite_fraction(values: np.ndarray) -> float:
    return float(np.isfinite(values).mean()) if len(values) else 0.0
