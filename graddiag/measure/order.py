"""Order from what actually ran: the order in which gradients arrive during one backward pass.

The layer nearest the loss is the one whose gradient is complete first. During one watched
backward pass, a hook on every monitored parameter (``register_post_accumulate_grad_hook``)
notes when its gradient has been accumulated, and a hook on the output of every activation call
of a timed activation step notes when the gradient passes through it; both read one counter, so
layers and activation sites share one order. Sites are timed only while their place is not
known (see :class:`graddiag.measure.live_layers.LiveLayers`): a place found once is kept until
the layers change, and for at most ``KEEP_PLACES_FOR`` activation steps. This is right where module definition order and
forward-hook order are not: parameters owned by the top module (``cls_token``, ``pos_embed``,
``logit_scale``), ``nn.MultiheadAttention.out_proj`` (whose ``forward`` never runs), activation
checkpointing (blocks re-run during backward) and modules defined out of order.

Only the first backward pass that reaches the parameters after :meth:`GradientArrival.watch`
counts: later ones (other micro-batches of an accumulated step) are ignored, and so are
``torch.autograd.grad`` calls that do not accumulate into ``.grad`` (physics-informed losses
differentiate the model's output during the forward pass). Hooks exist only between ``watch``
and :meth:`GradientArrival.clear`; nothing is installed on ordinary steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from graddiag.measure.layers import Layer

#: ``position`` of an activation site with no trainable layer on its input side (nothing that
#: receives gradient through it), in layer-index units.
NO_LAYER_UPSTREAM = -0.5


def in_backward() -> bool:
    """Whether the calling code runs inside a backward pass (e.g. checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class GradientArrival:
    """Times, on one counter, the arrival of layer gradients and site gradients in one backward.

    Attributes:
        layer_time: ``{layer name: tick}`` of the last of the layer's parameters to receive its
            gradient (the use furthest from the loss); larger ticks are further from the loss.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._seen_params: set[int] = set()
        self._ended = False
        self._counter = 0
        self._task: int | None = None  # the backward pass that reached the parameters first
        self.layer_time: dict[str, int] = {}
        self._site_ticks: dict[str, list[tuple[int, int]]] = {}  # site -> [(pass, tick)]
        self._sites_without_gradient: set[str] = set()
        self._sites_hooked: set[str] = set()
        self.watched: list[str] = []  # the names of the layers timed, as they were then

    @property
    def watching(self) -> bool:
        return bool(self._handles)

    def watch(self, layers: Iterable[Layer]) -> None:
        """Hook every parameter of ``layers`` until :meth:`clear` (idempotent)."""
        if self._handles:
            return
        layers = list(layers)
        self.watched = [layer.name for layer in layers]
        for layer in layers:
            for param in layer.params:
                if not param.requires_grad:
                    continue
                hook = partial(self._layer_arrived, layer.name)
                self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def watch_site(self, name: str, output: torch.Tensor) -> None:
        """Time the gradient passing through one activation call's ``output`` (forward only);
        nothing unless the layers are timed in this pass (a site's place needs both)."""
        if not self.watching or self._ended or in_backward():
            return
        if output.requires_grad:
            output.register_hook(partial(self._site_passed, name))
            self._sites_hooked.add(name)
        elif torch.is_grad_enabled():  # nothing trainable feeds this call
            self._sites_without_gradient.add(name)

    def _layer_arrived(self, name: str, param: torch.Tensor) -> None:
        if self._ended:
            return
        if id(param) in self._seen_params:  # a second backward pass began: keep the first one
            self._ended = True
            return
        self._seen_params.add(id(param))
        if self._task is None:
            self._task = torch._C._current_graph_task_id()
        self._counter += 1
        self.layer_time[name] = self._counter  # ticks grow: the last parameter to arrive wins

    def _site_passed(self, name: str, grad: torch.Tensor) -> None:
        if self._ended:
            return
        self._counter += 1
        task = torch._C._current_graph_task_id()
        self._site_ticks.setdefault(name, []).append((task, self._counter))

    def site_time(self, name: str) -> int | None:
        """Tick of the site's call nearest the loss, in the backward pass that timed the layers."""
        ticks = [tick for task, tick in self._site_ticks.get(name, ()) if task == self._task]
        return min(ticks) if ticks else None

    def clear(self) -> None:
        """Remove the parameter hooks and forget the times (site hooks die with their graph)."""
        if not (self._handles or self._counter or self._sites_hooked
                or self._sites_without_gradient):
            return  # the ordinary step: nothing was watched
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen_params.clear()
        self._ended = False
        self._counter = 0
        self._task = None
        self.layer_time = {}
        self._site_ticks = {}
        self._sites_without_gradient = set()
        self._sites_hooked = set()
        self.watched = []

    def site_positions(self, sites: list[str], layers: list[str]) -> np.ndarray:
        """Where each site ran among ``layers`` (input side first), in layer-index units.

        A site between layers ``k-1`` and ``k`` has ``k - 0.5``; a site with no trainable
        layer on its input side (or no gradient through it) has :data:`NO_LAYER_UPSTREAM`;
        ``NaN`` where this backward pass gave no timing (e.g. gradients assigned by FSDP2, or
        the site's gradient passed in another backward pass than the layers' one).
        """
        positions = np.full(len(sites), math.nan)
        times = np.array([self.layer_time.get(n, -1) for n in layers], dtype=float)
        if not (times >= 0).any():
            return positions
        for i, site in enumerate(sites):
            tick = self.site_time(site)
            if tick is None:
                passed = site in self._site_ticks  # but in another backward pass: unknown
                if not passed and (site in self._sites_without_gradient
                                   or site in self._sites_hooked):
                    positions[i] = NO_LAYER_UPSTREAM
                continue
            upstream = np.flatnonzero(times > tick)  # gradient reached them after the site
            positions[i] = float(upstream.max()) + 0.5 if len(upstream) else NO_LAYER_UPSTREAM
        return positions


def arrival_order(names: list[str], arrival: dict[str, int], forward: dict[str, int]) -> list[str]:
    """Layer names input side first, from what ran.

    Forward order (first execution of each module) places every layer it saw; layers it did not
    see keep their discovery position. Layers whose gradient arrival was timed are then sorted
    among the places they hold by arrival (last to arrive = furthest from the loss = first).
    """
    position = {name: i for i, name in enumerate(names)}
    base = sorted(names, key=lambda n: (forward.get(n, math.inf), position[n]))
    timed = [n for n in base if n in arrival]
    if not timed:
        return base
    by_arrival = iter(sorted(timed, key=lambda n: -arrival[n]))
    return [next(by_arrival) if n in arrival else n for n in base]


def keep_order(names: list[str], known: list[str], forward: dict[str, int]) -> list[str]:
    """Layer names after the set of layers changed: known layers keep their learned order,
    new ones (e.g. just unfrozen) take their forward-order place among them."""
    return arrival_order(names, {n: len(known) - i for i, n in enumerate(known)}, forward)
