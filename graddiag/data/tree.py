"""The monitored module tree as plain data: module names in definition order, and where
activation sites sit among the layers (for explanations and the gradient-flow figure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from graddiag.data.records import ActivationRecord


@dataclass(frozen=True)
class SiteMark:
    """Where an activation site sits among the layers of a gradient-flow figure.

    Attributes:
        x: Position in layer-index units: a site between layers ``k-1`` and ``k`` (forward
            order) has ``x = k - 0.5``.
        site: The activation site's name.
        kind: Its activation kind (``"sigmoid"``, ``"relu"``, ...).
    """

    x: float
    site: str
    kind: str


@dataclass(frozen=True)
class ModuleTree:
    """Module names of the monitored model in ``named_modules()`` order (``""`` is the root).

    Attributes:
        names: Qualified module names, without ``torch.compile``'s ``_orig_mod`` parts.
        root_name: The root module's class name (functional sites of the root are named by it).
    """

    names: tuple[str, ...]
    root_name: str
    _position: dict[str, float] = field(init=False, repr=False, compare=False)
    _subtree_end: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = self.names
        position = {name: float(i) for i, name in enumerate(names)}
        # a module's subtree ends where the next name not under it begins
        subtree_end: dict[str, float] = {}
        for i, name in enumerate(names):
            end = i
            prefix = f"{name}." if name else ""
            for j in range(i + 1, len(names)):
                if prefix and not names[j].startswith(prefix):
                    break
                end = j
            subtree_end[name] = end + 0.5
        object.__setattr__(self, "_position", position)
        object.__setattr__(self, "_subtree_end", subtree_end)

    def position(self, name: str) -> float | None:
        """A module's index in definition order, or ``None`` for an unknown name."""
        return self._position.get(name)

    def site_position(self, site: str) -> float:
        """Where a site sits in module order (a functional site just after its caller's subtree)."""
        if site in self._position:
            return self._position[site]
        caller = site.split(":", 1)[0]
        if caller == self.root_name:
            caller = ""
        return self._subtree_end.get(caller, math.inf)

    def site_marks(self, layers: Sequence[str], activations: ActivationRecord | None
                   ) -> tuple[SiteMark, ...]:
        """Where each activation site of ``activations`` sits among ``layers`` (forward order)."""
        if activations is None:
            return ()
        measured = activations.position
        if measured is not None and len(measured) and not all(math.isnan(x) for x in measured):
            # where each site ran, by the order gradients arrived (relative to ``layers``)
            return tuple(SiteMark(float(x), site, kind) for x, site, kind in
                         zip(measured, activations.sites, activations.kinds) if not math.isnan(x))
        layer_pos = [self._position.get(n, math.inf) for n in layers]
        marks = []
        for site, kind in zip(activations.sites, activations.kinds):
            where = self.site_position(site)
            marks.append(SiteMark(sum(1 for p in layer_pos if p < where) - 0.5, site, kind))
        return tuple(marks)
