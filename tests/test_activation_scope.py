"""The activation watch exists only inside the monitored model's forward pass of an activation
step of training: never during evaluation, backward, between steps, in another model, or after
the monitor is closed or garbage-collected."""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from graddiag import GradientMonitor
from tests.helpers import BackwardSpy, installed

FLOOR = 0.01


def _expected_saturation(layer: nn.Linear, batches: list[torch.Tensor]) -> float:
    """Saturated fraction of sigmoid(layer(x)) over the batches, in float64 by hand."""
    below, total = 0, 0
    for x in batches:
        s = torch.sigmoid(F.linear(x.double(), layer.weight.double(), layer.bias.double()))
        d = s * (1 - s)
        below += int((d < FLOOR).sum())
        total += d.numel()
    return below / total


def _sigmoid_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 2))


@pytest.mark.parametrize("evaluation", ["eval()", "no_grad()", "eval() and no_grad()"])
def test_evaluation_between_steps_is_not_counted(evaluation: str) -> None:
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    expected = []
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        for _ in range(4):
            x = torch.randn(8, 4, generator=g) * 0.1  # training: nowhere near saturation
            expected.append(_expected_saturation(model[0], [x]))
            model(x).sum().backward()
            monitor.step()
            opt.step()
            opt.zero_grad()
            model.train(evaluation == "no_grad()")
            with torch.no_grad() if "no_grad" in evaluation else torch.enable_grad():
                model(torch.randn(8, 4, generator=g) * 100)  # evaluation: fully saturated
            model.train()
    acts = monitor.activation_history
    assert list(acts.step) == [0, 1, 2, 3]
    assert list(acts.calls) == [1, 1, 1, 1]  # one training forward per step
    assert list(acts.saturated_fraction) == pytest.approx(expected, abs=1e-9)
    assert max(expected) == 0.0  # and the evaluation batches alone would read 100 %


def test_accumulated_forwards_are_pooled_and_counted() -> None:
    model = _sigmoid_net()
    g = torch.Generator().manual_seed(2)
    # early_steps=0: steps 1 and 3 are not activation steps, so their forwards must not count
    with GradientMonitor(model, reporters=[], activation_every_n_steps=2, early_steps=0) as monitor:
        expected = {}
        for step in range(4):
            batches = [torch.randn(5, 4, generator=g) * 3 for _ in range(3)]
            expected[step] = _expected_saturation(model[0], batches)
            for x in batches:
                model(x).sum().backward()
            monitor.step()
    acts = monitor.activation_history
    assert list(acts.step) == [0, 2]
    assert list(acts.calls) == [3, 3]
    assert list(acts.saturated_fraction) == pytest.approx([expected[0], expected[2]], abs=1e-9)
    assert 0 < expected[0] < 1  # a fraction that could come out wrong


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: BackwardSpy.apply(self.block(t)), x,
                       use_reentrant=self.reentrant)
        return self.head(torch.sigmoid(h))


@pytest.mark.parametrize("reentrant", [False, True])
def test_nothing_is_watched_during_backward_or_checkpoint_recompute(reentrant: bool) -> None:
    model = _Checkpointed(reentrant)
    BackwardSpy.seen = []
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        for _ in range(2):
            x = torch.randn(3, 4, requires_grad=reentrant)
            model(x).sum().backward()  # the recompute runs block.forward again, in backward
            monitor.step()
    acts = monitor.activation_history
    assert list(acts.calls) == [1.0, 1.0, 1.0, 1.0]  # tanh and sigmoid, once per step each
    assert set(acts.site) == {"block.1", "_Checkpointed:sigmoid"}
    assert BackwardSpy.seen == [(0, 0), (0, 0)]


def test_nothing_is_installed_between_steps_and_unrelated_models_are_not_intercepted() -> None:
    unrelated = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())
    seen: list[tuple[int, int]] = []
    unrelated.register_forward_hook(lambda *_: seen.append(installed()))
    monitors, models = [], []
    for _ in range(5):  # never closed, still referenced
        model = _sigmoid_net()
        monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=1)
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            monitor.step()
            assert installed() == (0, 0)  # between steps
        monitors.append(monitor)
        models.append(model)
    unrelated(torch.randn(2, 4)).sum().backward()
    assert seen == [(0, 0)]
    assert all(len(m.activation_history) == 2 for m in monitors)  # they did watch their own


def test_a_garbage_collected_monitor_leaves_its_model_untouched() -> None:
    model = _sigmoid_net()
    plain_forward = type(model).forward
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=1)
    model(torch.randn(2, 4)).sum().backward()
    monitor.step()
    assert "forward" in vars(model)  # the per-instance wrapper, while monitored
    alive = weakref.ref(monitor)
    del monitor
    gc.collect()
    assert alive() is None  # the wrapper did not keep it alive
    assert "forward" not in vars(model) and type(model).forward is plain_forward
    inside = []
    model[1].register_forward_hook(lambda *_: inside.append(installed()))
    model(torch.randn(2, 4))
    assert inside == [(0, 0)]


def test_close_removes_the_wrapper_and_later_forwards_are_plain() -> None:
    model = _sigmoid_net()
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=1)
    monitor.close()
    assert "forward" not in vars(model)
    inside = []
    model[1].register_forward_hook(lambda *_: inside.append(installed()))
    model(torch.randn(2, 4))
    assert inside == [(0, 0)]


def test_copies_of_a_monitored_model_work_and_are_not_watched() -> None:
    model = _sigmoid_net()
    x = torch.randn(3, 4)
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        model(x).sum().backward()
        monitor.step()
        twin = copy.deepcopy(model)
        pickled = pickle.loads(pickle.dumps(model))
        with torch.no_grad():
            twin[0].weight.mul_(2)  # a different model: its outputs must be its own
        inside = []
        twin[1].register_forward_hook(lambda *_: inside.append(installed()[0]))
        torch.testing.assert_close(twin(x), F.linear(torch.sigmoid(twin[0](x)), twin[2].weight,
                                                     twin[2].bias))
        torch.testing.assert_close(pickled(x), model(x))
        model(x).sum().backward()
        monitor.step()
    assert inside == [0]
    assert list(monitor.activation_history.calls) == [1.0, 2.0]  # forwards of `model` only


def test_the_wrapped_method_keeps_its_signature() -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return x * scale

    model = Net()
    before = inspect.signature(model.forward)
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1):
        assert inspect.signature(model.forward) == before
        assert model(torch.ones(1), scale=3.0).item() == 3.0


def test_a_failing_forward_leaves_nothing_behind() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.sigmoid(self.lin(x))
            raise ValueError("bad batch")

    model = Broken()
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1):
        with pytest.raises(ValueError, match="bad batch"):
            model(torch.randn(1, 2))
        assert installed() == (0, 0)


def test_a_mode_left_open_inside_forward_is_kept_and_graddiag_leaves_from_under_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            return func(*args, **(kwargs or {}))

    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.mode = PassThrough()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.mode.__enter__()  # the user's mode, never exited
            return self.lin(x)

    model = Leaky()
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1), \
            caplog.at_level(logging.WARNING, logger="graddiag"):
        model(torch.randn(1, 2))
        assert torch.overrides._get_current_function_mode_stack() == [model.mode]
    model.mode.__exit__(None, None, None)
    assert any("still active" in r.getMessage() for r in caplog.records)


def test_foreign_models_called_inside_the_forward_are_not_attributed() -> None:
    teacher = nn.Sequential(nn.Linear(4, 4), nn.Tanh())  # not a submodule

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = teacher(x)
            return torch.relu(self.lin(x)) - target

    model = Student()
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
        model(torch.randn(3, 4)).sum().backward()
        monitor.step()
    assert list(monitor.activation_history.site) == ["Student:relu"]


def test_custom_scoping_with_watch_none() -> None:
    model = _sigmoid_net()
    x = torch.randn(4, 4) * 3
    with GradientMonitor(model, reporters=[], activation_every_n_steps=1, watch=None) as monitor:
        assert "forward" not in vars(model)
        model(x).sum().backward()  # outside any watch: not counted
        with monitor.watch_activations():
            model(x).sum().backward()
        monitor.step()
    acts = monitor.activation_history
    assert list(acts.calls) == [1.0]
    assert acts.saturated_fraction.iloc[0] == pytest.approx(_expected_saturation(model[0], [x]))


def test_watch_names_an_existing_method() -> None:
    with pytest.raises(ValueError, match="watch must name a method of the model or be None; Sequential has no method .training_step."):
        GradientMonitor(_sigmoid_net(), reporters=[], watch="training_step")


@pytest.mark.parametrize("order", ["first opened first closed", "last opened first closed"])
def test_several_monitors_on_one_model_each_watch_their_steps_and_leave_nothing(order: str) -> None:
    model = _sigmoid_net()
    # early_steps=0: without the front-loaded steps the two schedules differ from step 1 on
    every_second = GradientMonitor(model, reporters=[], activation_every_n_steps=2, early_steps=0)
    every_third = GradientMonitor(model, reporters=[], activation_every_n_steps=3, early_steps=0)
    for _ in range(6):
        model(torch.randn(2, 4)).sum().backward()
        every_second.step()
        every_third.step()
    assert list(every_second.activation_history.step) == [0, 2, 4]
    assert list(every_third.activation_history.step) == [0, 3]
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    closing = [every_second, every_third]
    for monitor in closing if order.startswith("first") else closing[::-1]:
        monitor.close()
    assert "forward" not in vars(model)
