"""Per-layer parameter norms and the size of each update since the last read."""

from __future__ import annotations

import torch

from graddiag.measure.layers import LayerIndex
from graddiag.measure.norms import LayerNormAggregator


class ParameterProbe:
    """Reads each layer's parameter norm and the size of its update since the last read.

    The update ratio ``||w_now - w_then|| / ||w_now||`` needs a copy of the monitored weights,
    kept on their device and refreshed on every read.
    """

    def __init__(self, index: LayerIndex) -> None:
        self._params = [p for layer in index.layers for p in layer.params]
        self._lids = [lid for lid, layer in enumerate(index.layers) for _ in layer.params]
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
                update = self._aggregate(torch._foreach_sub(params, self._snapshot), self._lids)
                torch._foreach_copy_(self._snapshot, params)
        return norms, update

    def reset(self) -> None:
        """Forget the weight copy (frees its memory)."""
        self._snapshot = None
