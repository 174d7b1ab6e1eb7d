"""Noticing that the set of layers changed: a layer unfrozen, frozen, added or replaced.

Gradual unfreezing (Lightning's ``BackboneFinetuning``, fine-tuning recipes) flips
``requires_grad`` during the run, and some recipes swap modules (a new head). The monitor asks
:meth:`LayoutWatcher.changed` on recorded steps: comparing the ``requires_grad`` flags of the
parameters seen last time costs one attribute read per parameter; walking the module tree for
added or replaced parameters happens every ``full_check_every`` calls, and on the next call after
:meth:`check_modules_next` (asked for when parameters stop receiving gradients: they may belong
to a module that was replaced).

A caller that reads the monitored parameters' gradients on the step anyway (a kept plain step)
asks with ``all_flags=False``: then only the frozen parameters' flags are read (except on the
periodic full check), so the check costs nothing per trainable parameter. A parameter frozen
since shows up in that read, as a missing gradient (``zero_grad(set_to_none=True)``, the
default) or an all-zero one (``set_to_none=False``), and the caller then compares every flag
(:meth:`LayoutWatcher.flags_changed`) when the set of such parameters differs from its last
kept step's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class LayoutWatcher:
    """Says when the trainable parameters of ``root`` differ from the last :meth:`reset`."""

    def __init__(self, root: nn.Module, full_check_every: int = 50) -> None:
        self.root = root
        self.full_check_every = full_check_every
        self._calls = 0
        self._params: list[nn.Parameter] = []
        self._flags: list[bool] = []
        self._modules: list[nn.Module] = []
        self._frozen: list[nn.Parameter] = []
        self._full_next = False
        self.reset()

    def reset(self) -> None:
        """Take the current modules, parameters and ``requires_grad`` flags as the reference."""
        self._modules = list(self.root.modules())
        self._params = list(self.root.parameters())
        self._flags = [p.requires_grad for p in self._params]
        self._frozen = [p for p, trainable in zip(self._params, self._flags) if not trainable]

    def changed(self, all_flags: bool = True) -> bool:
        """Whether any parameter was (un)frozen, or modules/parameters added, removed or replaced,
        since the last :meth:`reset`; every ``full_check_every``-th call also walks the modules.

        Args:
            all_flags: Read every parameter's flag; ``False`` reads only those of the parameters
                frozen at the last reset (see the module's docstring), except on the periodic
                full check.
        """
        self._calls += 1
        full = self._full_next or self._calls % self.full_check_every == 0
        if all_flags or full:
            if self.flags_changed():
                return True
        elif any(p.requires_grad for p in self._frozen):
            return True
        if full:
            self._full_next = False
            return not _same(list(self.root.modules()), self._modules) or not _same(
                list(self.root.parameters()), self._params)
        return False

    def flags_changed(self) -> bool:
        """Whether any parameter's ``requires_grad`` differs from the last :meth:`reset` (only
        the flags: no module walk, and it does not count as a call of :meth:`changed`)."""
        return [p.requires_grad for p in self._params] != self._flags

    def check_modules_next(self) -> None:
        """Walk the module tree on the next :meth:`changed` call."""
        self._full_next = True


def _same(current: Sequence[object], reference: Sequence[object]) -> bool:
    return len(current) == len(reference) and all(a is b for a, b in zip(current, reference))
