"""Parameter statistics of a step: norms, one-step update ratios and what the optimizers hold.

On a *parameter step* ``t`` (``param_every_n_steps``, front-loaded by ``early_steps``) the
monitor reads ``||w_t||``. The weights were copied on the optimizer's previous step ``t - 1``,
and both reads happen after ``backward()`` and before ``optimizer.step()``, so
``||w_t - w_(t-1)||`` is exactly one optimizer update. The copy is made only on the step before
a parameter step, into one buffer kept on the weights' device. With optimizers known
(``GradientMonitor(optimizers=...)``, or the Lightning trainer's), parameter steps also read
each layer's learning rate and list trainable parameters that no optimizer holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from graddiag.data.options import MonitorConfig
from graddiag.data.schedule import Schedule
from graddiag.measure.layers import LayerIndex
from graddiag.measure.optimizers import coverage, wrapped_optimizer
from graddiag.measure.parameters import ParameterProbe

log = logging.getLogger("graddiag")

#: The widest gap between one optimizer's steps that widens the parameter steps' window (a
#: WGAN's generator steps once per six steps with five critic steps); wider ones are ignored.
MAX_TURN = 16


@dataclass
class UpdateView:
    """What one step's parameter statistics need on the host, captured when the step is read.

    Attributes:
        measured: Layers the optimizer's parameter reads cover (others read NaN).
        counts: Elements per layer behind the norms, or ``None`` off parameter steps.
        learning_rate: Per-layer learning rate, or ``None`` when not read.
        base_learning_rate: Per-layer rate a scheduler started from (NaN without one).
        orphaned: Trainable parameters no optimizer holds, or ``None`` when not checked.
        along_gradient: Per layer, whether its optimizers step along the gradient (SGD), or
            ``None`` when not read.
    """

    measured: np.ndarray
    counts: np.ndarray | None = None
    learning_rate: np.ndarray | None = None
    base_learning_rate: np.ndarray | None = None
    orphaned: dict[str, list[str]] | None = None
    along_gradient: np.ndarray | None = None
    copy_step: int | None = None  # the step whose copy the update was measured against
    void: set[int] = field(default_factory=set)  # steps whose optimizer step was not applied

    def ratios(self, host: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-layer parameter norms and ``||w_t - w_(t-1)|| / ||w_t||`` from the host copy
        (no ratio when the optimizer step after the copy turned out not to be applied); for an
        embedding table, ``||w_t||`` over the rows the step changed."""
        param_norm = host.get("param_norm")
        if param_norm is None:
            return None, None
        if not self.measured.all():
            param_norm[~self.measured] = np.nan
        update = host.get("update_norm")
        if update is None or self.copy_step in self.void:
            return param_norm, None
        base = param_norm
        rows = host.get("update_base")
        if rows is not None:  # embedding tables: the rows this step moved
            base = np.where(np.isnan(rows), param_norm, rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            return param_norm, np.where(base > 0, update / base, np.nan)


@dataclass
class _OptimizerState:
    probe: ParameterProbe
    measured: np.ndarray  # layers this optimizer's parameter reads cover
    copy_step: int | None = None  # step whose weights the probe's copy holds
    void: set[int] = field(default_factory=set)  # recent steps whose update was not applied
    read_window: int | None = None  # the cadence window (step // cadence) last read in


def as_optimizers(optimizers: object) -> list[torch.optim.Optimizer]:
    """One optimizer or a sequence of them as a list (a wrapper that is no
    ``torch.optim.Optimizer`` but holds one as ``.optimizer`` or ``._optimizer`` stands for
    it); ``ValueError`` for anything else."""
    if optimizers is None:
        return []
    single = isinstance(optimizers, torch.optim.Optimizer) or wrapped_optimizer(optimizers)
    items = [optimizers] if single else optimizers
    allowed = ("optimizers must be a torch.optim.Optimizer (or a wrapper holding one as "
               ".optimizer) or a list of them")
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{allowed}, got {type(optimizers).__name__}")
    found: list[torch.optim.Optimizer] = []
    for i, item in enumerate(items):
        inner = item if isinstance(item, torch.optim.Optimizer) else wrapped_optimizer(item)
        if inner is None:
            raise ValueError(f"{allowed}, got {type(item).__name__} at position {i}")
        found.append(inner)
    return found


class UpdateTracker:
    """Reads parameter norms, exact one-step update norms and what the optimizers hold."""

    def __init__(self, model: nn.Module, index: LayerIndex, config: MonitorConfig,
                 schedule: Schedule) -> None:
        self.model = model
        self.index = index
        self.config = config
        self.schedule = schedule
        self._optimizers: list[torch.optim.Optimizer] = []
        self._states: dict[int, _OptimizerState] = {}
        self._frozen_said: set[str] = set()
        self._unheld_said = False
        self._warned: set[str] = set()
        #: How many steps apart optimizers taking turns on the step counter step (manual
        #: optimization counts each optimizer's step): how far back a parameter step's weight
        #: copy may be, and how wide the window of steps that read parameters is.
        self.lookahead = 1
        self._last_steps: dict[int, int] = {}  # each optimizer's last measured step
        self._widest_turn = 1  # the widest gap seen between one optimizer's steps

    def reset(self, warned: set[str]) -> None:
        """The layers changed: parameter probes are rebuilt, weight copies are dropped.

        Args:
            warned: Kinds of tensors already warned about as unmeasurable (shared per monitor).
        """
        self._states.clear()
        self._warned = warned
        self._count_optimizers()

    def watch(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Read learning rates and coverage from these optimizers from now on."""
        self._optimizers = as_optimizers(list(optimizers))
        self._count_optimizers()

    # ----------------------------------------------------------------- cadence
    def _count_optimizers(self) -> None:
        self.lookahead = max(1, len(self._optimizers), len(self._states), self._widest_turn)

    def _note_turn(self, step: int, optimizer: int) -> None:
        """Learn how far apart one optimizer's steps are when several take turns (a WGAN's
        generator steps once per ``n_critic + 1`` steps). Only where every step is measured
        (``every_n_steps=1``): elsewhere the gaps between measured steps are the cadence's, not
        the turns'."""
        if self.schedule.gradients != 1:
            return
        last = self._last_steps.get(optimizer)
        self._last_steps[optimizer] = step
        if (last is not None and len(self._last_steps) > 1
                and self._widest_turn < step - last <= MAX_TURN):
            self._widest_turn = step - last
            self._count_optimizers()

    def is_param_step(self, step: int, optimizer: int | None = None) -> bool:
        """Whether ``step`` reads parameter norms and update ratios; for ``optimizer``, only on
        its first step in the window of :meth:`Schedule.records_parameters` (each optimizer
        taking turns reads its own layers once per window)."""
        if not self.schedule.records_parameters(step, self.lookahead):
            return False
        if optimizer is None or self.schedule.front(step):
            return True
        state = self._states.get(optimizer)
        return state is None or state.read_window != step // self.schedule.parameters

    def copies_on(self, step: int) -> bool:
        """Whether ``step`` copies the weights for the next parameter step."""
        return self.schedule.copies_parameters(step, self.lookahead)

    def needs_record(self, step: int) -> bool:
        """Whether ``step`` must be measured for the parameter statistics."""
        return self.is_param_step(step) or self.copies_on(step)

    def checks_optimizers_on(self, step: int) -> bool:
        """Learning rates and coverage: on parameter steps, and on the first steps of a run."""
        return bool(self._optimizers) and (self.schedule.first_steps(step)
                                           or self.is_param_step(step))

    # ----------------------------------------------------------------- device side
    def _state(self, optimizer: int, measured: np.ndarray) -> _OptimizerState:
        state = self._states.get(optimizer)
        if state is None:
            only = None
            if not measured.all():
                only = {id(p) for lid, layer in enumerate(self.index.layers) if measured[lid]
                        for p in layer.params}
            state = _OptimizerState(ParameterProbe(self.index, only, self._warned),
                                    measured.copy())
            self._states[optimizer] = state
            self._count_optimizers()
        return state

    def read(self, step: int, optimizer: int,
             measured: np.ndarray) -> tuple[dict[str, torch.Tensor], UpdateView | None]:
        """Device tensors for this step's one host copy (``param_norm``, ``update_norm``) and
        what the host needs with them; copies the weights when the next parameter step needs
        them. Learning rates and coverage are read now, before ``optimizer.step()``."""
        out: dict[str, torch.Tensor] = {}
        view = None
        self._note_turn(step, optimizer)
        if self.schedule.parameters and self.needs_record(step):
            state = self._state(optimizer, measured)
            view = UpdateView(state.measured, void=state.void)
            if self.is_param_step(step, optimizer):
                state.read_window = step // self.schedule.parameters
                out["param_norm"] = state.probe.norms()
                view.counts = state.probe.counts
                copied = state.copy_step
                if state.probe.has_copy and copied is not None \
                        and 0 < step - copied <= self.lookahead:
                    out["update_norm"] = state.probe.update_norms()
                    if state.probe.has_tables:
                        out["update_base"] = state.probe.changed_rows_norms()
                    view.copy_step = copied
            self._copy_if_due(step, optimizer, measured)
        rates, bases, along, orphaned = self.optimizer_view(step)
        if rates is not None or orphaned is not None:
            view = view or UpdateView(np.ones(len(self.index), dtype=bool))
            view.learning_rate, view.base_learning_rate, view.orphaned = rates, bases, orphaned
            view.along_gradient = along
        return out, view

    def copy(self, step: int, optimizer: int, measured: np.ndarray) -> None:
        """Copy the weights (on their device) if a parameter step among the next ``lookahead``
        needs them; ``measured``: the layers this optimizer's reads cover."""
        self._note_turn(step, optimizer)
        self._copy_if_due(step, optimizer, measured)

    def _copy_if_due(self, step: int, optimizer: int, measured: np.ndarray) -> None:
        if self.copies_on(step):
            state = self._state(optimizer, measured)
            state.probe.snapshot()
            state.copy_step = step

    def discard_copies(self) -> None:
        """Forget every weight copy (the weights are replaced, e.g. by loading a checkpoint)."""
        for state in self._states.values():
            state.copy_step = state.read_window = None

    def discard_copy(self, step: int, optimizer: int) -> None:
        """The optimizer step at ``step`` is not applied (AMP overflow, skip): a copy taken on it
        is void, and so is an update already measured against it (a deferred host read)."""
        state = self._states.get(optimizer)
        if state is None:
            return
        if state.copy_step == step:
            state.copy_step = None
        state.void.add(step)
        for old in [s for s in state.void if s < step - 8]:  # only the last few steps matter
            state.void.discard(old)

    # ----------------------------------------------------------------- optimizers
    def optimizer_view(self, step: int) -> tuple[np.ndarray | None, np.ndarray | None,
                                                  np.ndarray | None, dict[str, list[str]] | None]:
        """Per-layer learning rates, the rates schedulers started from (NaN without one),
        whether the layer's optimizers step along the gradient (SGD; False for a layer no
        optimizer holds), and the parameters no optimizer holds (``None``: not read)."""
        if not self.checks_optimizers_on(step):
            return None, None, None, None
        c = self.config
        seen = coverage(self.model, self._optimizers, c.include, c.exclude)
        if not seen.held_any:
            if not self._unheld_said:
                self._unheld_said = True
                log.info("graddiag: the optimizers hold none of the model's trainable parameters "
                         "(wrapped or flattened by a strategy?); learning rates and "
                         "not_in_optimizer are not checked.")
            return None, None, None, None
        rates = np.full(len(self.index), np.nan)
        bases = np.full(len(self.index), np.nan)
        along = np.zeros(len(self.index), dtype=bool)
        for lid, layer in enumerate(self.index.layers):
            held = [seen.along_gradient[id(p)] for p in layer.params
                    if p.requires_grad and id(p) in seen.along_gradient]
            along[lid] = bool(held) and all(held)
            known = [seen.learning_rate[id(p)] for p in layer.params
                     if p.requires_grad and id(p) in seen.learning_rate]
            known = [r for r in known if not np.isnan(r)]
            if known:
                rates[lid] = max(known)
            elif not any(p.requires_grad for p in layer.params):
                rates[lid] = 0.0  # frozen since the monitor started
            started = [seen.base_rate[id(p)] for p in layer.params if id(p) in seen.base_rate]
            started = [r for r in started if not np.isnan(r)]
            if started:
                bases[lid] = max(started)
        frozen = [n for n, r in zip(self.index.names, rates) if r == 0.0 and n not in self._frozen_said]
        if frozen:
            self._frozen_said.update(frozen)
            log.info("graddiag: layer(s) %s have learning rate 0 or requires_grad=False (frozen, "
                     "or a schedule at zero): not judged as stalled while that lasts.", frozen)
        return rates, bases, along, seen.orphaned
