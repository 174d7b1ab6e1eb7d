"""Plain recorded steps kept as rows: each step's per-parameter gradient norms in one CPU buffer,
turned into per-layer norms and step records together, a block at a time.

A plain step is one that measures gradient norms only, and whose monitored gradients are
dense, on the CPU and finite (some may be missing: a module unused on this step). Keeping such a
step costs one fused norm kernel written straight into a preallocated row, a finiteness check
of that row and a scan for all-zero gradients (a parameter frozen since may show as one); the
per-layer norms, the clipping flag and the
:class:`~graddiag.data.records.StepRecord` of every kept step are made later, all at once,
while the caches are warm.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from graddiag.data.records import StepRecord
from graddiag.measure.norms import GradientProbe


class NormRows:
    """Per-parameter gradient norms of up to ``capacity`` plain steps of one probe and layout.

    Args:
        probe: The gradient probe that reads every monitored layer on these steps.
        layers: The layer names of that layout (shared by the records made from the rows).
        capacity: How many steps the rows hold.
        norm_type: The p of the per-layer p-norm.
    """

    def __init__(self, probe: GradientProbe, layers: list[str], capacity: int,
                 norm_type: float) -> None:
        self.probe = probe
        self.layers = layers
        self.norm_type = norm_type
        buffer = torch.zeros(capacity, len(probe.row_layers), dtype=probe.row_dtype)
        # each row as the parts the probe writes, views made once and written in turn
        self._rows = [probe.row_views(row) for row in buffer.unbind(0)]
        self._values = buffer.numpy()  # the same memory, read by numpy
        # and row by row as plain floats: summing 40 of them this way is the cheapest check
        # for a NaN/Inf right after a training step (numpy's or torch's reductions cost more)
        self._memory = [memoryview(row) for row in self._values]
        # step, optimizer, clip norm, and the row positions of parameters without a gradient
        self._kept: list[tuple[int, int, float | None, float | None, tuple[int, ...]]] = []
        # per set of missing positions: (has_grad per layer, {layer: [parameter names]})
        self._absent: dict[tuple[int, ...], tuple[np.ndarray, dict[int, list[str]]]] = {}
        # columns sorted by layer, so each layer's norms are one contiguous run to reduce
        self._order = np.argsort(probe.row_layers, kind="stable")
        sorted_layers = probe.row_layers[self._order]
        self._starts = np.flatnonzero(np.r_[True, sorted_layers[1:] != sorted_layers[:-1]])
        self._present = sorted_layers[self._starts]
        self._n_layers = len(layers)

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def full(self) -> bool:
        """Every row holds a kept step."""
        return len(self._kept) == len(self._rows)

    def keep(self, step: int, optimizer: int = 0,
             clip_norm: float | None = None,
             clip_value: float | None = None) -> dict[int, list[str]] | None:
        """Read this step's gradient norms into the next row.

        Returns the step's missing gradients (``{layer: [parameter names]}``, empty when every
        gradient arrived), or ``None`` (nothing kept) when the step is not plain: a gradient
        needs the careful path, or some norm is NaN/Inf (that step is measured in full, on the
        step itself). The rows must not be :attr:`full`.
        """
        row = len(self._kept)
        absent = self.probe.read_row(self._rows[row])
        if absent is None:
            return None
        if not math.isfinite(sum(self._memory[row])):  # NaN/Inf anywhere: not plain
            return None
        self._kept.append((step, optimizer, clip_norm, clip_value, absent))
        return self._without_gradient(absent)[1] if absent else {}

    def last_without_gradient(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Row positions of the last kept step's parameters without a gradient, and of those
        whose gradient is all zero (both usually empty)."""
        row = len(self._kept) - 1
        zeros: tuple[int, ...] = ()
        if 0.0 in self._memory[row]:  # a scan of plain floats; positions only when there is one
            zeros = tuple(np.flatnonzero(self._values[row] == 0.0).tolist())
        return self._kept[row][4], zeros

    def drop_last(self) -> None:
        """Forget the last kept step (it is measured in full instead)."""
        self._kept.pop()

    def _without_gradient(self, absent: tuple[int, ...]
                          ) -> tuple[np.ndarray, dict[int, list[str]]]:
        """Which layers got a gradient, and the missing parameters' names by layer, when the
        parameters at these row positions got none (worked out once per set)."""
        known = self._absent.get(absent)
        if known is None:
            layers = self.probe.row_layers
            missing: dict[int, list[str]] = {}
            for position in absent:
                missing.setdefault(int(layers[position]), []).append(
                    self.probe.row_names[position])
            present = np.bincount(np.delete(layers, list(absent)), minlength=self._n_layers)
            has_grad = present[:self._n_layers] > 0
            has_grad.flags.writeable = False
            if len(self._absent) > 16:
                self._absent.clear()
            known = self._absent[absent] = (has_grad, missing)
        return known

    def layer_norms(self) -> np.ndarray:
        """``(kept steps, layers)`` per-layer p-norms of the kept rows, combined in the rows'
        dtype as on a fully measured step (so the same norms overflow to inf, or underflow to
        0), returned in float64."""
        values = self._values[:len(self._kept), self._order]
        p = self.norm_type
        if math.isinf(p):
            per_layer = np.maximum.reduceat(values, self._starts, axis=1)
        elif p == 1.0:
            per_layer = np.add.reduceat(values, self._starts, axis=1)
        else:
            power = values.dtype.type
            with np.errstate(over="ignore", under="ignore"):  # as the device's kernels do
                per_layer = np.add.reduceat(values ** power(p), self._starts, axis=1)
                per_layer **= power(1.0 / p)
        norms = np.zeros((len(self._kept), self._n_layers))
        norms[:, self._present] = per_layer
        return norms

    def take(self) -> list[StepRecord]:
        """The kept steps' records, oldest first; the rows are free again afterwards."""
        if not self._kept:
            return []
        norms = self.layer_norms()
        records = []
        for (step, optimizer, clip_norm, clip_value, absent), grad_norm in zip(self._kept, norms):
            has_grad, missing = self.probe.all_read, {}
            if absent:  # some parameters got no gradient: as a step measured in full says it
                has_grad, names = self._without_gradient(absent)
                missing = {layer: list(params) for layer, params in names.items()}
                grad_norm[~has_grad] = np.nan
            clipped = None
            if clip_norm is not None and self.norm_type == 2.0:
                measured = grad_norm[has_grad]
                clipped = bool(math.sqrt(float(np.dot(measured, measured))) > clip_norm)
            records.append(StepRecord(step=step, layers=self.layers, grad_norm=grad_norm,
                                      has_grad=has_grad, missing=missing, optimizer=optimizer,
                                      clipped=clipped, clip_value=clip_value))
        self._kept.clear()
        return records

    def clear(self) -> None:
        """Forget the kept steps."""
        self._kept.clear()
