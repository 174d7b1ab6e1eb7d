"""What the optimizers hold: each parameter's learning rate, and trainable parameters they miss."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graddiag.measure.layers import clean_name


@dataclass
class Coverage:
    """The optimizers' view of a model at one moment.

    Attributes:
        learning_rate: ``{id(parameter): lr}`` for every parameter some optimizer holds (the
            largest lr if several param groups hold it; NaN when the lr is a device tensor,
            which is not read to avoid a host sync).
        base_rate: ``{id(parameter): initial_lr}`` where a learning-rate scheduler set its
            param group's ``initial_lr`` (the rate the schedule starts from and scales; the
            largest if several groups hold it).
        orphaned: ``{module name: [parameter names]}``: trainable parameters of the model
            (``requires_grad=True``) that no optimizer holds.
        held_any: Whether the optimizers hold any of the model's trainable parameters at all.
            When they hold none (a strategy that flattens or copies parameters, an optimizer
            built for another model), ``orphaned`` is left empty: nothing can be concluded.
        along_gradient: ``{id(parameter): bool}``: whether every optimizer holding the
            parameter moves it along its gradient, in proportion to it (see
            :func:`steps_along_gradient`).
    """

    learning_rate: dict[int, float] = field(default_factory=dict)
    orphaned: dict[str, list[str]] = field(default_factory=dict)
    base_rate: dict[int, float] = field(default_factory=dict)
    held_any: bool = False
    along_gradient: dict[int, bool] = field(default_factory=dict)


#: How many wrappers deep :func:`wrapped_optimizer` looks for the optimizer doing the steps.
_MAX_WRAPPERS = 4


def wrapped_optimizer(wrapper: object) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` a wrapper that is none holds as ``.optimizer`` (Hugging
    Face Accelerate's) or ``._optimizer`` (Lightning's), looked for a few wrappers deep; ``None``
    where there is none."""
    for _ in range(_MAX_WRAPPERS):
        inner = getattr(wrapper, "optimizer", None) or getattr(wrapper, "_optimizer", None)
        if inner is None or inner is wrapper:
            return None
        if isinstance(inner, torch.optim.Optimizer):
            return inner
        wrapper = inner
    return None


def steps_along_gradient(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s update is the learning rate times the gradient, or a running sum
    of such steps (momentum), plus weight decay: ``torch.optim.SGD`` itself, also behind
    wrappers that hold it as ``.optimizer`` (Hugging Face Accelerate's) or ``._optimizer``
    (Lightning's). Adaptive optimizers (Adam, RMSprop, Adagrad, ...) scale each weight's step
    by its gradient's running size, and others (subclasses of SGD included, which may rescale
    the step) are unknown: for them a small gradient says nothing about the size of the
    update."""
    inner: torch.optim.Optimizer | None = optimizer
    for _ in range(_MAX_WRAPPERS):  # an Optimizer subclass may wrap another (Accelerate's)
        if inner is None or type(inner) is torch.optim.SGD:
            return inner is not None
        inner = wrapped_optimizer(inner)
    return False


def _as_float(lr: Any) -> float:
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else math.nan
    try:
        return float(lr)
    except (TypeError, ValueError):
        return math.nan


def learning_rates(optimizers: Sequence[torch.optim.Optimizer]
                   ) -> tuple[dict[int, float], dict[int, float], dict[int, bool]]:
    """``{id(parameter): learning rate}`` over every param group of every optimizer,
    ``{id(parameter): initial_lr}`` for the groups a scheduler gave one (its starting rate), the
    largest where several groups hold a parameter; and ``{id(parameter): bool}``, whether every
    optimizer holding it steps along the gradient (:func:`steps_along_gradient`). One walk over
    the param groups."""
    rates: dict[int, float] = {}
    bases: dict[int, float] = {}
    along: dict[int, bool] = {}
    for optimizer in optimizers:
        follows = steps_along_gradient(optimizer)
        for group in optimizer.param_groups:
            lr = _as_float(group.get("lr", math.nan))
            base = _as_float(group["initial_lr"]) if "initial_lr" in group else None
            for param in group["params"]:
                _keep_largest(rates, id(param), lr)
                along[id(param)] = follows and along.get(id(param), True)
                if base is not None:
                    _keep_largest(bases, id(param), base)
    return rates, bases, along


def _keep_largest(rates: dict[int, float], key: int, rate: float) -> None:
    known = rates.get(key)
    if known is None or math.isnan(known) or rate > known:
        rates[key] = rate


def coverage(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
) -> Coverage:
    """Which of ``model``'s trainable parameters the ``optimizers`` hold, and at which lr.

    Modules are named as layers are (qualified name relative to ``model``); ``include`` and
    ``exclude`` glob patterns filter the reported modules as they filter layers.
    """
    rates, bases, along = learning_rates(optimizers)
    orphaned: dict[str, list[str]] = {}
    held_any = False
    seen: set[int] = set()
    for raw_name, module in model.named_modules():
        name = clean_name(raw_name) or type(module).__name__
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in rates:
                held_any = True
            elif (include is None or any(fnmatch.fnmatchcase(name, p) for p in include)) \
                    and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
                orphaned.setdefault(name, []).append(pname)
    return Coverage(rates, orphaned if held_any else {}, held_any=held_any,
                    base_rate=bases, along_gradient=along)
