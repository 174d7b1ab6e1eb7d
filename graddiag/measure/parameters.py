"""Per-layer parameter norms and the size of each update since the last read."""

from __future__ import annotations

import torch

from graddiag.measure.layers import LayerIndex
from graddiag.measure.norms import (
    MEASURE_ERRORS,
    LayerNormAggregator,
    _local,
    describe,
    warn_unmeasurable,
)


class ParameterProbe:
    """Reads each layer's parameter norm and the size of its update since the last read.

    The update ratio ``||w_now - w_then|| / ||w_now||`` needs a copy of the monitored weights,
    kept on their device and refreshed on every read.
    """

    def __init__(self, index: LayerIndex, warned: set[str] | None = None) -> None:
        entries = [(lid, name, p) for lid, layer in enumerate(index.layers)
                   for name, p in zip(layer.param_names, layer.params)]
        usable = _measurable_kinds([p for _, _, p in entries], [n for _, n, _ in entries],
                                   set() if warned is None else warned)
        self._params = [p for _, _, p in entries if describe(p) in usable]
        self._lids = [lid for lid, _, p in entries if describe(p) in usable]
        self._aggregate = LayerNormAggregator(len(index), 2.0)
        self._snapshot: list[torch.Tensor] | None = None

    def read(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-layer parameter norms, and per-layer update norms (``None`` on the first read)."""
        with torch.no_grad():
            params = [p.detach() for p in self._params]
            norms = self._aggregate(params, self._lids)
            update = None
            if self._snapshot is None:
                self._snapshot = [p.clone() for p in params]
            else:
                # in place, in the copy: no temporaries the size of the model (on a CPU their
                # allocation and first touch cost more than the arithmetic)
                torch._foreach_sub_(self._snapshot, params)
                update = self._aggregate(self._snapshot, self._lids)
                torch._foreach_copy_(self._snapshot, params)
        return norms, update

    def reset(self) -> None:
        """Forget the weight copy (frees its memory)."""
        self._snapshot = None


def _measurable_kinds(params: list[torch.Tensor], names: list[str], warned: set[str]) -> set[str]:
    """Kinds (dtype, layout) of parameters whose norms and differences torch can compute;
    others are left out, with one warning per kind."""
    usable: set[str] = set()
    tried: set[str] = set()
    for param in params:
        kind = describe(param)
        if kind in tried:
            continue
        tried.add(kind)
        sample = _local(param.detach()).reshape(-1)[:1]  # a local element: no collective
        try:
            LayerNormAggregator(1, 2.0)([sample], [0])
            torch._foreach_sub([sample], [sample])
        except MEASURE_ERRORS as error:
            warn_unmeasurable(warned, param, [n for p, n in zip(params, names)
                                              if describe(p) == kind], error)
            continue
        usable.add(kind)
    return usable
