"""Backward checks for a replay: the first autograd node that turned a finite gradient non-finite.

A hook on every node of the replayed graph (registered on the nodes themselves, gone with the
graph) looks at the gradients a node receives and the gradients it returns. The first node,
in the order the backward pass runs them, that receives only finite gradients and returns a
non-finite one is where the non-finite gradient was born: ``SqrtBackward0`` at 0, a custom
``autograd.Function`` whose ``backward`` returns inf, ``0 * inf`` from a masked ``-inf``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from graddiag.measure.replay.stats import checkable, flags, nonfinite_word, tensor_stats

log = logging.getLogger("graddiag")

_MAX_SAVED_STATS = 3


@dataclass
class BackwardEvent:
    """The node where a non-finite gradient was born, with the numbers around it."""

    node: Any
    grad_index: int
    nonfinite: str
    output: dict[str, Any]
    grad_in_max: float
    saved: list[dict[str, Any]] = field(default_factory=list)


def saved_values(node: Any) -> list[dict[str, Any]]:
    """Statistics of the forward values a node saved for its backward (``self``, ``result``...)."""
    found: list[tuple[str, torch.Tensor]] = []
    for attribute in dir(node):
        if attribute.startswith("_saved_") and not attribute.startswith("_saved_raw"):
            try:
                value = getattr(node, attribute)
            except Exception:  # noqa: BLE001 - freed or not a tensor
                continue
            if checkable(value):
                found.append((f"saved {attribute[len('_saved_'):]}", value))
    if not found and hasattr(node, "_forward_cls"):  # a custom Function: ctx.save_for_backward
        try:
            found = [(f"saved {i}", t) for i, t in enumerate(node.saved_tensors) if checkable(t)]
        except Exception:  # noqa: BLE001
            found = []
    return [tensor_stats(t, role) for role, t in found[:_MAX_SAVED_STATS]]


class BackwardCheck:
    """Hooks every node reachable from ``loss`` while entered; :attr:`first` is the result."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss
        self.first: BackwardEvent | None = None
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> BackwardCheck:
        start = self.loss.grad_fn
        stack = [start] if start is not None else []
        seen: set[int] = set()
        alive: list[Any] = []  # ids stay unique only while the wrappers live
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            alive.append(node)
            if type(node).__name__ != "AccumulateGrad":
                self._handles.append(node.register_hook(self._hook_for(node)))
            stack.extend(next_node for next_node, _ in node.next_functions
                         if next_node is not None)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, node: Any):  # noqa: ANN202
        def hook(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> None:
            if self.first is not None:
                return
            try:
                self._check(node, grad_inputs, grad_outputs)
            except Exception:  # noqa: BLE001 - a check must never break the replay
                log.debug("graddiag: replay backward check failed on %s", node, exc_info=True)

        return hook

    def _check(self, node: Any, grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> None:
        bad = [i for i, g in enumerate(grad_inputs) if checkable(g) and any(flags(g))]
        if not bad:
            return
        incoming = [g for g in grad_outputs if checkable(g)]
        if any(any(flags(g)) for g in incoming):
            return  # passed on, not born here
        with torch.no_grad():
            top = max((float(g.detach().abs().max()) for g in incoming if g.numel()), default=0.0)
        grad = grad_inputs[bad[0]]
        self.first = BackwardEvent(
            node=node,
            grad_index=bad[0],
            nonfinite=nonfinite_word(grad),
            output=tensor_stats(grad, f"gradient of input {bad[0]}"),
            grad_in_max=top,
            saved=saved_values(node),
        )
