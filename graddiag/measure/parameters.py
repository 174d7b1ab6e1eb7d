"""Per-layer parameter norms and the size of one optimizer update."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from graddiag.measure.layers import LayerIndex, is_dtensor
from graddiag.measure.norms import (
    MEASURE_ERRORS,
    LayerNormAggregator,
    _local,
    describe,
    warn_unmeasurable,
)


class ParameterProbe:
    """Reads each layer's parameter norm and, against a copy of the weights, the update since.

    :meth:`snapshot` copies the monitored weights (kept on their device, reused between
    copies); :meth:`update_norms` then gives per layer ``||w_now - w_copy||``. Taken on the
    step before an optimizer step and read on the step after it, that is one update exactly.
    """

    def __init__(self, index: LayerIndex, only: set[int] | None = None,
                 warned: set[str] | None = None) -> None:
        """Args:
            index: The monitored layers.
            only: ``id``s of the parameters to read (one optimizer's); ``None`` reads all.
            warned: Kinds of tensors already warned about as unmeasurable (shared per monitor).
        """
        entries = [(lid, name, p) for lid, layer in enumerate(index.layers)
                   for name, p in zip(layer.param_names, layer.params)
                   if only is None or id(p) in only]
        tables = {id(layer.module.weight) for layer in index.layers
                  if isinstance(layer.module, (nn.Embedding, nn.EmbeddingBag))}
        usable = _measurable_kinds([p for _, _, p in entries], [n for _, n, _ in entries],
                                   set() if warned is None else warned)
        self._params = [p for _, _, p in entries if describe(p) in usable]
        self._lids = [lid for lid, _, p in entries if describe(p) in usable]
        #: Positions in ``_params`` of embedding tables (2-D, one row per token or item): a
        #: step moves the rows it used, so their update is judged against those rows.
        self._tables = [i for i, p in enumerate(self._params)
                        if id(p) in tables and p.dim() == 2 and not is_dtensor(p)]
        self._n_layers = len(index)
        #: Elements read per layer (the full tensor's count for sharded parameters).
        self.counts = np.zeros(len(index), dtype=np.int64)
        np.add.at(self.counts, np.asarray(self._lids, dtype=np.int64),
                  np.asarray([p.numel() for p in self._params], dtype=np.int64))
        self._aggregate = LayerNormAggregator(len(index), 2.0)
        self._copy: list[torch.Tensor] | None = None
        self.has_copy = False

    def norms(self) -> torch.Tensor:
        """Per-layer parameter 2-norms, a float32 device tensor (float64 when some weight is;
        0 for layers not read)."""
        with torch.no_grad():
            return self._aggregate([p.detach() for p in self._params], self._lids)

    def snapshot(self) -> None:
        """Copy the weights as they are now (into the kept buffer once it exists)."""
        with torch.no_grad():
            params = [p.detach() for p in self._params]
            if self._copy is None:
                self._copy = [p.clone() for p in params]
            else:
                torch._foreach_copy_(self._copy, params)
        self.has_copy = True

    def update_norms(self) -> torch.Tensor:
        """Per-layer ``||w_now - w_copy||``; uses up the copy (the difference is made in place).

        Raises:
            RuntimeError: without a copy (call :meth:`snapshot` first).
        """
        if self._copy is None or not self.has_copy:
            raise RuntimeError("update_norms needs a snapshot of the weights first")
        with torch.no_grad():
            torch._foreach_sub_(self._copy, [p.detach() for p in self._params])
            self.has_copy = False
            return self._aggregate(self._copy, self._lids)

    @property
    def has_tables(self) -> bool:
        """Whether some layer is an embedding table (see :meth:`changed_rows_norms`)."""
        return bool(self._tables)

    def changed_rows_norms(self) -> torch.Tensor:
        """Per-layer norm of the rows of each embedding table that the update measured by
        :meth:`update_norms` changed (call right after it; NaN for other layers, the whole
        table's norm when no row changed).

        A step that trains on a batch moves only the rows the batch used (sparse gradients,
        SGD, SparseAdam): a 2M-row table whose 256 used rows move by 1e-4 of their norm moves
        by about 1e-7 of the whole table's, which would read as stalled.
        """
        assert self._copy is not None
        first = self._params[self._tables[0]]
        dtype = torch.float64 if any(self._params[i].dtype == torch.float64
                                     for i in self._tables) else torch.float32
        out = torch.full((self._n_layers,), float("nan"), dtype=dtype, device=first.device)
        with torch.no_grad():
            for i in self._tables:  # no host sync: the rows are selected by a mask
                weight, delta = self._params[i].detach(), self._copy[i]
                # row reductions only: no temporary the size of the table
                rows = torch.linalg.vector_norm(weight, dim=1).to(dtype)  # no cast copy
                changed = torch.linalg.vector_norm(delta, ord=float("inf"), dim=1) > 0
                squares = rows.square()
                used = (squares * changed).sum().sqrt()
                out[self._lids[i]] = torch.where(used > 0, used, squares.sum().sqrt())
        return out

    def reset(self) -> None:
        """Forget the weight copy (frees its memory)."""
        self._copy = None
        self.has_copy = False


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
            torch._foreach_sub_([sample.clone()], [sample])  # the difference is made in place
        except MEASURE_ERRORS as error:
            warn_unmeasurable(warned, param, [n for p, n in zip(params, names)
                                              if describe(p) == kind], error)
            continue
        usable.add(kind)
    return usable
