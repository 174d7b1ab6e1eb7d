"""Replay one step with checks on every operation, and name the first non-finite value.

The step's loss is recomputed by the plan's closures (same batch, same weights, the step's
random state), under anomaly mode (``check_nan=True``, which also records the forward
traceback of every autograd node) and the forward checks; then its gradient with respect to
the trainable parameters is computed with ``torch.autograd.grad`` under the backward checks,
so no ``.grad`` is touched and no gradient hook of a wrapper (DDP) fires. Everything the replay
could change is put back afterwards (:func:`~graddiag.measure.replay.state.untouched`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from graddiag.data.replay import ReplayOutcome
from graddiag.measure.replay.backward import BackwardCheck, BackwardEvent
from graddiag.measure.replay.forward import ForwardCheck, ForwardEvent, node_op_name
from graddiag.measure.replay.plan import ReplayPlan, ReplayRun, ReplayUnavailable
from graddiag.measure.replay.sites import (
    CallSite,
    ModuleStack,
    closure_tensors,
    named_model_tensors,
    node_traceback,
    site_from_traceback,
)
from graddiag.measure.replay.state import untouched
from graddiag.measure.replay.stats import checkable, flags


def replay_step(model: nn.Module, plan: ReplayPlan) -> ReplayOutcome:
    """Replay the runs of ``plan`` in order until one shows where a non-finite value began.

    Returns a ``located`` outcome for the first run that names an operation, ``failed`` if a
    run raised, ``finite`` if no run produced a non-finite value, or ``not_replayed`` with the
    plan's reason. Never raises.
    """
    started = time.perf_counter()
    root = type(model).__name__
    try:
        runs = plan.runs()
    except ReplayUnavailable as missing:
        return replace(ReplayOutcome.skipped(missing.reason, missing.detail), root=root)
    except Exception as error:  # noqa: BLE001 - diagnostics never break training
        return ReplayOutcome(status="failed", reason="error", reason_detail=_error_text(error),
                             root=root)
    outcome = ReplayOutcome.skipped("no_batch")
    chosen: int | None = None
    for index, run in enumerate(runs):
        outcome = _replay_once(model, run, plan)
        if outcome.status != "finite":
            chosen = index
            break
    return replace(
        outcome,
        root=root,
        micro_batch=chosen if len(runs) > 1 else None,
        micro_batches=max(1, len(runs)),
        seconds=time.perf_counter() - started,
    )


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # anomaly mode's banner; the model's own warnings were seen
        warnings.simplefilter("ignore")
        yield


def _eager() -> AbstractContextManager[Any]:
    """``torch.compile``'d modules run eagerly in a replay: every operation is then checked,
    and the compiled code is neither traced again nor recompiled (torch >= 2.6)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def _loss_of(value: Any) -> torch.Tensor | None:
    if isinstance(value, dict):
        value = value.get("loss")
    return value if isinstance(value, torch.Tensor) else None


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _replay_once(model: nn.Module, run: ReplayRun, plan: ReplayPlan) -> ReplayOutcome:
    params = [p for p in model.parameters() if p.requires_grad]
    modules = ModuleStack(model)
    names = {**closure_tensors(run.closure), **run.inputs}
    forward = ForwardCheck(modules, named_model_tensors(model), names)
    try:
        with untouched(model, run.rng), torch.enable_grad(), _quiet(), _eager(), \
                torch.autograd.detect_anomaly(check_nan=True):
            with plan.forward_context(), modules, forward:
                loss = _loss_of(run.closure())
            if loss is None:
                return ReplayOutcome.skipped("no_loss")
            if loss.grad_fn is None or not params:
                return ReplayOutcome.skipped("loss_without_grad")
            loss_nonfinite = checkable(loss) and any(flags(loss))
            backward = BackwardCheck(loss)
            with backward:
                try:
                    torch.autograd.grad([loss], params, grad_outputs=[torch.ones_like(loss)],
                                        allow_unused=True, retain_graph=True)
                except RuntimeError as error:
                    if "returned nan values" not in str(error):  # anomaly mode's own stop
                        raise
            return _conclude(forward, backward.first, loss, loss_nonfinite, run)
    except Exception as error:  # noqa: BLE001 - the model's error, not the training's
        return ReplayOutcome(status="failed", reason="error", reason_detail=_error_text(error),
                             random_state=run.rng is not None)


def _conclude(forward: ForwardCheck, backward: BackwardEvent | None, loss: torch.Tensor,
              loss_nonfinite: bool, run: ReplayRun) -> ReplayOutcome:
    random_state = run.rng is not None
    if loss_nonfinite:
        event = forward.first_fault() or forward.loss_origin(loss, CallSite())
        if event is not None:
            return _from_forward(event, forward, random_state)
    if backward is not None:
        return _from_backward(backward, forward, random_state)
    first = forward.first_fault()
    return ReplayOutcome(status="finite", random_state=random_state,
                         forward_finite=not forward.events,
                         first_forward=first.summary() if first else None)


def _from_forward(event: ForwardEvent, forward: ForwardCheck, random_state: bool) -> ReplayOutcome:
    phase = event.source if event.source in ("data", "parameter", "buffer") else "forward"
    earlier = forward.events[0] if forward.events and forward.events[0] is not event else None
    site = event.site
    return ReplayOutcome(
        status="located",
        phase=phase,
        op=event.op,
        node=event.node.name() if event.node is not None else None,
        **site.fields(),
        nonfinite=event.nonfinite,
        inputs=list(event.inputs),
        output=event.output,
        constant=event.constant,
        tensor=event.tensor,
        forward_finite=False,
        first_forward=earlier.summary() if earlier is not None else None,
        random_state=random_state,
    )


def _from_backward(event: BackwardEvent, forward: ForwardCheck, random_state: bool) -> ReplayOutcome:
    record = forward.nodes.get(event.node)
    if record is not None:
        op, site = record.op, record.site
    else:  # made by an operation the forward check could not see (a custom Function)
        op = node_op_name(event.node)
        site = forward.refine(site_from_traceback(node_traceback(event.node)))
    first = forward.first_fault()
    return ReplayOutcome(
        status="located",
        phase="backward",
        op=op,
        node=event.node.name(),
        **site.fields(),
        nonfinite=event.nonfinite,
        inputs=list(event.saved),
        output=event.output,
        grad_index=event.grad_index,
        grad_in_max=event.grad_in_max,
        forward_finite=not forward.events,
        first_forward=first.summary() if first is not None else None,
        random_state=random_state,
    )
