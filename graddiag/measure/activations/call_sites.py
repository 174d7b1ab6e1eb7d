"""Which site a functional activation call belongs to: its place in the code and what fed it.

A ``torch.tanh`` inside a loop is called many times from one place in the code. Over time steps
(a recurrent cell unrolled by hand) those calls act on the same units and are one site; over
layers (``for layer in self.layers: x = torch.tanh(layer(x))``) each call acts on another
layer's units and is a site of its own. What tells them apart is what fed the call: the
trainable tensors the autograd graph reaches from its output back to earlier outputs of the
same place (a recurrent state), within a dozen nodes, and the modules with parameters that ran
since the previous call from that place. A call joins an earlier call's site when it ran some
of the same modules (a loop over layers runs another layer each time; a cell unrolled over
time runs its own again, whatever ran before the loop or after each step) and its tensors
contain, or are contained in, the site's (the first time step also reaches a learned initial
state or an encoder's output); where no trainable tensor is in reach (frozen layers, a graph
cut by reentrant checkpointing), the modules alone decide, the same way. Shared tensors and
modules (a common scale, a shared LayerNorm, a position term) therefore do not merge layers;
layers without modules of their own whose own weights are frozen, or out of reach behind a
long chain of operations, and that share a trainable tensor, are one site; a call fed by
nothing is a site of its own. The first call from a place is searched only when the place is
called again (a place called once per pass, the usual case, searches nothing).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

#: torch's own source files: a functional activation's place is the first frame outside them.
_TORCH_SOURCES = os.path.dirname(torch.__file__) + os.sep
#: Autograd nodes searched for the trainable tensors feeding an activation's input.
MAX_NODES = 12


def call_site(depth: int) -> tuple[Any, int] | None:
    """Where the code ``depth`` frames above the caller called into torch: ``(code object,
    instruction offset)`` of the first frame outside torch's sources (``F.relu`` and torch's
    dispatch frames skipped); two calls on one line stay apart."""
    frame: FrameType | None = sys._getframe(depth + 1)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_SOURCES):
        frame = frame.f_back
    return None if frame is None else (frame.f_code, frame.f_lasti)


def trainable_leaves(node: Any, stop: set[Any]) -> frozenset[int]:
    """``id``s of the trainable leaves (parameters) that feed the output of autograd ``node``
    (a tensor's ``grad_fn``): a breadth-first search of the graph over at most
    :data:`MAX_NODES` nodes that does not go past the nodes in ``stop`` (the outputs of earlier
    calls from the same place)."""
    if node is None:
        return frozenset()
    found: set[int] = set()
    queue, seen, visited = deque([node]), {node}, 0
    while queue and visited < MAX_NODES:
        node = queue.popleft()
        visited += 1
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            found.add(id(variable))
            continue
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen and parent not in stop:
                seen.add(parent)
                queue.append(parent)
    return frozenset(found)


@dataclass
class _Place:
    """One place in the code: its sites (trainable tensors seen, number) and earlier outputs."""

    # per site: the trainable tensors and the modules seen feeding its calls, and its number
    sites: list[tuple[set[int], set[int], int]] = field(default_factory=list)
    outputs: set[Any] = field(default_factory=set)
    mark: int | None = None  # the length of the modules' log at the previous call
    # the first call, not searched yet: its output's node, the modules that fed it, its number
    first: tuple[Any, set[int], int] | None = None


class CallSites:
    """The functional activation sites of one call of one module, numbered per kind in the order
    they first run (1, 2, ...).

    Args:
        modules_run: The ``id`` of every module with parameters of its own whose ``forward``
            began in the watched pass, in order (a log the watch appends to; read, never
            changed, here).
        start: Where in that log the module's call began (default: its length now).
    """

    def __init__(self, modules_run: list[int] | None = None, start: int | None = None) -> None:
        self._log = [] if modules_run is None else modules_run
        self._start = len(self._log) if start is None else start
        self._count: dict[str, int] = {}
        self._places: dict[tuple[str, Any], _Place] = {}

    def number(self, kind: str, where: Any, node: Any, at: int | None = None
               ) -> tuple[int, bool]:
        """The site number of a ``kind`` activation called at ``where`` whose output has the
        autograd ``node`` (its ``grad_fn``), and whether it joined an earlier call's site (then
        it shares that site's units). ``at``: the modules' log length when the call was made, for
        a call numbered after it happened (default: now)."""
        end = len(self._log) if at is None else at
        place = self._places.get((kind, where))
        modules = set(self._log[self._start if place is None else place.mark:end])
        if place is None:  # the first call from here joins nothing: searched if called again
            place = self._places[(kind, where)] = _Place(mark=end)
            self._count[kind] = n = self._count.get(kind, 0) + 1
            place.first = (node, modules, n)
            if node is not None:
                place.outputs.add(node)
            return n, False
        if place.first is not None:  # as it would have been searched on its own call
            first_node, first_modules, first_n = place.first
            place.first = None
            first_tensors = set(trainable_leaves(first_node, set()))
            if first_tensors or first_modules:
                place.sites.append((first_tensors, first_modules, first_n))
        tensors = set(trainable_leaves(node, place.outputs))
        place.mark = end
        if node is not None:
            place.outputs.add(node)
        # the trainable tensors decide; where none is in reach, the modules that ran; and a
        # call that ran none of a site's modules (another layer) never joins it
        fed = tensors or modules
        if fed:
            for seen_tensors, seen_modules, n in place.sites:
                if modules and seen_modules and modules.isdisjoint(seen_modules):
                    continue
                seen = seen_tensors if tensors else seen_modules
                if seen and (fed <= seen or seen <= fed):
                    seen_tensors.update(tensors)
                    seen_modules.update(modules)
                    return n, True
        self._count[kind] = n = self._count.get(kind, 0) + 1
        if fed:
            place.sites.append((tensors, modules, n))
        return n, False
