"""Scoping the watch to one entry point of one module: a per-instance wrapper of a method.

:func:`watch_entry` replaces ``module.<method>`` on that instance only (an instance attribute;
no class or global patch) with a :class:`WatchedEntry`. Each call asks the owner for a context
(``None``: not an activation step) and runs the method inside it, only while ``module.training``
and ``torch.is_grad_enabled()``, never while dynamo traces. The wrapper holds its owner and the
module weakly: when the owner is garbage-collected the wrapper removes itself on its next call,
and copies or pickles of the module carry an inert wrapper that only calls the method.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from graddiag.measure.compat import is_compiling

Opener = Callable[[], "AbstractContextManager[None] | None"]


class WatchedEntry:
    """Runs ``owner.<name>`` inside the watch its opener returns (see the module docstring)."""

    def __init__(self, module: nn.Module, name: str, opener: Opener | None) -> None:
        self._module = weakref.ref(module)
        self._name = name
        self._own = vars(module).get(name)  # an instance attribute it replaces, if any
        self._opener = weakref.WeakMethod(opener) if opener is not None else None  # type: ignore[arg-type]

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The wrapped method, through any other monitor's wrapper below this one
        (``inspect.signature`` and Lightning's hook checks look here)."""
        method = self._method()
        while isinstance(method, WatchedEntry):
            method = method._method()
        return method

    def _method(self) -> Callable[..., Any]:
        if self._own is not None:
            return self._own  # type: ignore[no-any-return]
        module = self._module()
        return getattr(type(module), self._name).__get__(module, type(module))  # type: ignore[no-any-return]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        method = self._method()
        if self._opener is None or is_compiling():
            return method(*args, **kwargs)
        opener = self._opener()
        if opener is None:  # the monitor is gone: leave no trace
            self.remove()
            return method(*args, **kwargs)
        module = self._module()
        if module is None or not module.training or not torch.is_grad_enabled():
            return method(*args, **kwargs)
        context = opener()
        if context is None:
            return method(*args, **kwargs)
        with context:
            return method(*args, **kwargs)

    def remove(self) -> None:
        """Put back what was there, or step out of a chain of such wrappers (several monitors on
        one module); below a wrapper of another kind, only go inert."""
        self._opener = None
        module = self._module()
        if module is None:
            return
        above = vars(module).get(self._name)
        if above is self:
            if self._own is None:
                del vars(module)[self._name]
            else:
                vars(module)[self._name] = self._own
            return
        while isinstance(above, WatchedEntry):
            if above._own is self:
                above._own = self._own
                return
            above = above._own

    def __reduce__(self) -> tuple[Any, ...]:
        # a copy (deepcopy, pickle) of the module is not monitored: it gets an inert wrapper
        return (WatchedEntry, (self._module(), self._name, None), {"_own": self._own})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._own = state["_own"]


def watch_entry(module: nn.Module, name: str, opener: Opener) -> WatchedEntry:
    """Wrap ``module.<name>`` so that each call runs inside ``opener()`` when that is not ``None``.

    Args:
        module: The module whose method is wrapped (this instance only).
        name: The method, e.g. ``"forward"`` or a LightningModule's ``"training_step"``.
        opener: A bound method (held weakly) returning the watch context or ``None``.

    Raises:
        ValueError: if ``module`` has no callable ``name``.
    """
    if not callable(getattr(module, name, None)):
        raise ValueError(f"{type(module).__name__} has no method {name!r} to watch")
    entry = WatchedEntry(module, name, opener)
    vars(module)[name] = entry
    return entry
