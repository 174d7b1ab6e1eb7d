"""The monitored layers as the run has them: ordered by what ran, following requires_grad and
module changes.

Order: on the first recorded step (and after the layers changed) the layers are sorted by the
order their gradients arrived in the backward pass (:mod:`graddiag.measure.order`), forward
order filling in where no gradient arrived. Membership: before each measurement the
``requires_grad`` flags are compared with the last ones (on a kept plain step only the frozen
parameters' flags, see :mod:`graddiag.measure.layout`); when
they or the modules changed, the layers are discovered again, known layers keep their order and
new ones take their forward-order place until the next watched backward pass sorts them.

Activation sites: a site's place among the layers is timed on an activation step's backward
pass and kept; later activation steps time nothing (no hook on the parameters or on the sites'
outputs) while every site they see has a kept place and the layers are unchanged, and at most
:data:`KEEP_PLACES_FOR` - 1 of them in a row (a site whose place changes while the layers do
not, as a shared activation module run where the data decide, is then re-placed within that
many activation steps). A site without a kept place (new, without a timing, or with no
trainable layer timed on its input side) has the next activation step timed again; a change
of the layers forgets every kept place, and a pass timed on other layers than those measured
keeps none.
"""

from __future__ import annotations

import logging

import numpy as np
from torch import nn

from graddiag.measure.layers import ForwardOrderRecorder, LayerIndex, discover_layers
from graddiag.measure.layout import LayoutWatcher
from graddiag.measure.order import GradientArrival, arrival_order, keep_order

log = logging.getLogger("graddiag")

#: Activation steps a kept place serves, the timed one included, before the sites are timed again.
KEEP_PLACES_FOR = 10


class LiveLayers:
    """Keeps one :class:`LayerIndex` (mutated in place) right for the running model.

    Args:
        root: The monitored module.
        index: Its layers as discovered at the start (this object is kept up to date).
        include: Glob patterns of layer names to keep (``None``: all).
        exclude: Glob patterns of layer names to drop.
        record_order: Learn the order from forward and backward passes (off for compiled
            models: hooks inside compiled graphs force recompilation, and their gradients
            arrive together; definition order is kept).
    """

    def __init__(self, root: nn.Module, index: LayerIndex, *,
                 include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                 record_order: bool = True) -> None:
        self.root = root
        self.index = index
        self.include, self.exclude = include, exclude
        self.record_order = record_order
        self.arrival = GradientArrival()
        self._forward: ForwardOrderRecorder | None = (
            ForwardOrderRecorder(root) if record_order else None)
        self._forward_order: dict[str, int] = {}
        self._settled = False  # the first measurement has sorted the layers
        self._relearn = False  # the layers changed: sort them by the next watched backward
        self._watcher = LayoutWatcher(root)
        self._missing: set[int] = set()
        self.names: list[str] = index.names  # one list shared by every record
        self._placed: dict[str, float] = {}  # site -> its place among ``names``, from a timed pass
        self._sites_placed = False  # every site of the last activation step has a kept place
        self._untimed = 0  # activation steps in a row served from kept places
        if record_order:
            self.arrival.watch(index.layers)  # the first backward pass gives the order

    def update(self, all_flags: bool = True) -> bool:
        """Follow changes and settle the order before a measurement; ``True`` when the layers
        (membership or order) differ from the last measurement's, so probes must be rebuilt.
        ``all_flags=False``: read only the frozen parameters' ``requires_grad`` flags; the
        caller reads every monitored gradient on this step and asks :meth:`flags_changed` when
        one is missing or zero (see :mod:`graddiag.measure.layout`)."""
        changed = self._follow(all_flags)
        arrival = self.arrival.layer_time if self.record_order else {}
        if not self._settled:
            self._settled = changed = True
            self._forward_order = self._forward.finish() if self._forward is not None else {}
            self._forward = None
            self._sort(arrival_order(self.index.names, arrival, self._forward_order))
        elif self._relearn and arrival:
            self._relearn = False
            current = {n: i for i, n in enumerate(self.index.names)}
            names = arrival_order(self.index.names, arrival, current)
            if names != self.index.names:
                self._sort(names)
                changed = True
        return changed

    def flags_changed(self) -> bool:
        """Whether a parameter was frozen or unfrozen since the layers were last found (asked
        when a monitored gradient is missing or zero: its parameter may have been frozen); the
        next :meth:`update` then finds the layers again."""
        return self._watcher.flags_changed()

    def _follow(self, all_flags: bool = True) -> bool:
        if not self._watcher.changed(all_flags):
            return False
        self._watcher.reset()
        known = self.index.names
        found = discover_layers(self.root, self.include, self.exclude, check_patterns=False)
        self.index.layers = found.layers
        if self._settled:  # otherwise the first measurement sorts them
            self._sort(keep_order(self.index.names, known, self._forward_order))
            self._relearn = self.record_order
        self.names = self.index.names  # kept places are forgotten by the sort (or never made)
        log.info("graddiag: the trainable layers changed; now monitoring %d layer(s)",
                 len(self.index))
        return True

    def _sort(self, names: list[str]) -> None:
        self.index.reorder({n: i for i, n in enumerate(names)})
        self.names = self.index.names
        self._forget_places()

    def _forget_places(self) -> None:
        self._placed = {}
        self._sites_placed = False

    def note_missing(self, missing: dict[int, list[str]]) -> None:
        """Known layers that stopped receiving gradients may belong to a replaced module:
        walk the module tree on the next update."""
        if (missing or self._missing) and set(missing) != self._missing:
            self._missing = set(missing)
            if missing:
                self._watcher.check_modules_next()

    def site_positions(self, sites: list[str]) -> np.ndarray:
        """Where each site ran among :attr:`names` (see ``ActivationRecord.position``): timed
        in this backward pass if it was timed, else the places kept from an earlier one (NaN
        for a site without one)."""
        if self.arrival.layer_time:
            positions = self.arrival.site_positions(sites, self.names)
            self._untimed = 0
            # not kept when timed on other layers (a change found after the pass was armed)
            if set(self.arrival.watched) == set(self.names):
                self._placed.update((s, float(p)) for s, p in zip(sites, positions) if p >= 0)
        else:
            positions = np.array([self._placed.get(s, np.nan) for s in sites], dtype=float)
            self._untimed += 1
        self._sites_placed = (self._untimed + 1 < KEEP_PLACES_FOR
                              and all(s in self._placed for s in sites))
        return positions

    def finish_step(self, watch_next: bool) -> None:
        """After a measurement: forget this step's timing; watch the next backward pass if it
        will be measured with activations whose sites are not all placed yet, or the layers
        still need sorting."""
        self.arrival.clear()
        if self.record_order and (watch_next and not self._sites_placed or self._relearn):
            self.arrival.watch(self.index.layers)

    def close(self) -> None:
        if self._forward is not None:
            self._forward.finish()
            self._forward = None
        self.arrival.clear()
