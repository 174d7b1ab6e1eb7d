"""Per-layer gradient-magnitude histograms in fixed log-spaced bins, on device."""

from __future__ import annotations

import numpy as np
import torch

from graddiag.data.bins import HISTOGRAM_BINS, HISTOGRAM_EDGES
from graddiag.measure.layers import LayerIndex, is_dtensor
from graddiag.measure.norms import (
    MEASURE_ERRORS,
    _local,
    _reduce_sharded,
    norm_dtype,
    warn_unmeasurable,
)


class HistogramProbe:
    """Counts each layer's gradient magnitudes in fixed log-spaced bins, on device, without syncs.

    Fixed bins make histograms of different steps directly comparable. Returns per layer the
    counts and the sum and sum of squares of the finite gradient elements; for DTensor (FSDP2)
    gradients these are summed over the shards, so every rank sees the whole tensor's histogram.
    """

    def __init__(self, index: LayerIndex, warned: set[str] | None = None) -> None:
        self._layers = [layer.params for layer in index.layers]
        self._names = [layer.param_names for layer in index.layers]
        self._log_edges: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._warned = set() if warned is None else warned

    def read(self) -> torch.Tensor:
        """``(layers, HISTOGRAM_BINS + 2)``: counts, then sum and sum of squares (float32, or
        float64 when some gradient is float64: its magnitudes are binned in their own range)."""
        rows = []
        for params, names in zip(self._layers, self._names):
            try:
                rows.append(self._row(params))
            except MEASURE_ERRORS as error:  # a dtype torch cannot bin: an empty row
                bad = next(p.grad for p in params if p.grad is not None)
                warn_unmeasurable(self._warned, bad, names, error)
                rows.append(torch.zeros(HISTOGRAM_BINS + 2, device=params[0].device))
        home = rows[0].device if rows else torch.device("cpu")
        return torch.stack([r.to(home) for r in rows]) if rows else torch.zeros(0, HISTOGRAM_BINS + 2)

    def _row(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Counts, sum and sum of squares of one layer's gradient elements."""
        grads = [_local(p.grad).detach().reshape(-1) for p in params if p.grad is not None]
        if not grads:
            device = params[0].device if params else torch.device("cpu")
            return torch.zeros(HISTOGRAM_BINS + 2, device=device)
        # complex gradients: the magnitudes of their elements; float64 stays float64 (a finite
        # 1e100 is not an inf), any other dtype is upcast to float32 alone
        dtype = max((norm_dtype(g.dtype) for g in grads), key=lambda d: torch.finfo(d).bits)
        values = torch.cat([(g.abs() if g.is_complex() else g).to(dtype) for g in grads])
        device = values.device
        edges = self._log_edges.get((device, dtype))
        if edges is None:
            edges = self._log_edges[device, dtype] = torch.tensor(
                np.log10(HISTOGRAM_EDGES), dtype=dtype, device=device)
        magnitude = values.abs()
        finite = torch.isfinite(magnitude)
        bucket = torch.bucketize(torch.log10(magnitude), edges, right=True)
        bucket = torch.where(finite, bucket, HISTOGRAM_BINS - 1)
        counts = torch.zeros(HISTOGRAM_BINS, dtype=dtype, device=device)
        counts.index_add_(0, bucket, torch.ones_like(magnitude))
        safe = torch.where(finite, values, 0.0)
        row = torch.cat([counts, safe.sum().reshape(1), (safe * safe).sum().reshape(1)])
        sharded = next((p.grad for p in params if p.grad is not None and is_dtensor(p.grad)), None)
        if sharded is not None:  # FSDP2: add up the shards' counts and sums
            _reduce_sharded(row, sharded, 1.0)
        return row
