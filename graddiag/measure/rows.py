"""Plain recorded steps kept as rows: each step's per-parameter gradient norms in one buffer,
turned into per-layer norms and step records together, a block at a time.

A plain step is one that measures gradient norms only, and whose monitored gradients are
dense, plain tensors on one device (some may be missing: a module unused on this step).
Keeping such a step costs one fused norm kernel written straight into a preallocated row; the
per-layer norms, the clipping flag and the :class:`~graddiag.data.records.StepRecord` of every
kept step are made later, all at once, while the caches are warm.

Where the rows are read decides what a step is checked for on the step itself:

- on the CPU, the row is host memory: a finiteness check of the row and a scan for all-zero
  gradients (a parameter frozen since may show as one) cost a few plain-float sums;
- on a GPU where a step may decide (a replay asked for, ``on_nonfinite`` other than warn), the
  row is also copied to the host on the step (one small blocking copy) and checked there in
  the same way;
- with ``sent`` rows (a deferred host read, the GPU's default when nothing decides on the
  step; on a CPU when asked for), nothing is read on the step: a full block travels to the
  host in one non-blocking copy, read a step later, and a non-finite norm is found in the
  block (see :class:`SentRows`); every parameter's ``requires_grad`` is compared on the step
  instead, since a frozen parameter's all-zero gradient no longer shows there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from graddiag.data.records import StepRecord
from graddiag.measure.norms import GradientProbe, clipping_acts, nonfinite_parameters
from graddiag.measure.transfer import HostCopy

# step, optimizer, clip norm, clip value, and the row positions of parameters without a gradient
Kept = tuple[int, int, float | None, float | None, tuple[int, ...]]


class NormRows:
    """Per-parameter gradient norms of up to ``capacity`` plain steps of one probe and layout.

    Args:
        probe: The gradient probe that reads every monitored layer on these steps.
        layers: The layer names of that layout (shared by the records made from the rows).
        capacity: How many steps the rows hold.
        norm_type: The p of the per-layer p-norm.
        sent: Check nothing on the step: the rows travel to the host a block at a time
            (:meth:`send`); for a deferred host read.
    """

    def __init__(self, probe: GradientProbe, layers: list[str], capacity: int,
                 norm_type: float, sent: bool = False) -> None:
        self.probe = probe
        self.layers = layers
        self.norm_type = norm_type
        self.sent = sent
        device = probe.row_device or torch.device("cpu")
        self._buffer = torch.zeros(capacity, len(probe.row_layers), dtype=probe.row_dtype,
                                   device=device)
        # each row as the parts the probe writes, views made once and written in turn
        self._rows = [probe.row_views(row) for row in self._buffer.unbind(0)]
        host = self._buffer
        if device.type != "cpu":  # rows read on the step are copied to the host on it
            host = torch.zeros(0 if sent else capacity, len(probe.row_layers),
                               dtype=probe.row_dtype, pin_memory=torch.cuda.is_available())
        self._copies = ([(d, h) for d, h in zip(self._buffer.unbind(0), host.unbind(0))]
                        if host is not self._buffer else None)
        self._values = host.numpy()  # the host rows, read by numpy (none when sent)
        self.dtype = self._values.dtype  # the rows' dtype, as numpy's
        # and row by row as plain floats: summing 40 of them this way is the cheapest check
        # for a NaN/Inf right after a training step (numpy's or torch's reductions cost more)
        self._memory = [memoryview(row) for row in self._values]
        self._kept: list[Kept] = []
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
        needs the careful path, or (rows read on the step) some norm is NaN/Inf: that step is
        measured in full, on the step itself. The rows must not be :attr:`full`.
        """
        row = len(self._kept)
        absent = self.probe.read_row(self._rows[row])
        if absent is None:
            return None
        if not self.sent:
            if self._copies is not None:  # a GPU's row: to the host now (waits for it)
                device_row, host_row = self._copies[row]
                host_row.copy_(device_row)
            if not math.isfinite(sum(self._memory[row])):  # NaN/Inf anywhere: not plain
                return None
        self._kept.append((step, optimizer, clip_norm, clip_value, absent))
        return self._without_gradient(absent)[1] if absent else {}

    def last_without_gradient(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Row positions of the last kept step's parameters without a gradient, and of those
        whose gradient is all zero (both usually empty; the second always empty for sent rows,
        whose zeros are found in the block)."""
        row = len(self._kept) - 1
        zeros: tuple[int, ...] = ()
        if not self.sent and 0.0 in self._memory[row]:  # plain floats; positions only if one
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

    def layer_norms(self, values: np.ndarray) -> np.ndarray:
        """``(steps, layers)`` per-layer p-norms of ``values`` (kept rows), combined in the
        rows' dtype as on a fully measured step (so the same norms overflow to inf, or
        underflow to 0), returned in float64."""
        values = values[:, self._order]
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
        norms = np.zeros((len(values), self._n_layers))
        norms[:, self._present] = per_layer
        return norms

    def take(self) -> list[StepRecord]:
        """The kept steps' records, oldest first; the rows are free again afterwards."""
        if self.sent:
            return self.send().records() if self._kept else []
        kept, self._kept = self._kept, []
        return self.records(self._values[:len(kept)], kept) if kept else []

    def send(self) -> SentRows:
        """Start the kept rows' copy to the host (one non-blocking copy); the rows are free
        again at once (the device writes the next ones after the copy has read these)."""
        kept, self._kept = self._kept, []
        return SentRows(self, kept, HostCopy([self._buffer[:len(kept)]], deferred=True))

    def records(self, values: np.ndarray, kept: list[Kept]) -> list[StepRecord]:
        """The records of ``kept`` steps from their rows' ``values`` (on the host), oldest
        first."""
        norms = self.layer_norms(values)
        finite = np.isfinite(values).all(axis=1)  # False only in sent rows: found a block late
        records = []
        for (step, optimizer, clip_norm, clip_value, absent), grad_norm, row, ok in zip(
                kept, norms, values, finite):
            has_grad, missing = self.probe.all_read, {}
            if absent:  # some parameters got no gradient: as a step measured in full says it
                has_grad, names = self._without_gradient(absent)
                missing = {layer: list(params) for layer, params in names.items()}
                grad_norm[~has_grad] = np.nan
            # which tensors (a float32 norm that overflowed on finite elements cannot be told
            # apart any more, either)
            nonfinite = ({} if ok else
                         nonfinite_parameters(row, self.probe.row_layers, self.probe.row_names))
            clipped = clipping_acts(grad_norm, has_grad, clip_norm, self.norm_type)
            records.append(StepRecord(step=step, layers=self.layers, grad_norm=grad_norm,
                                      has_grad=has_grad, missing=missing, optimizer=optimizer,
                                      nonfinite=nonfinite, clipped=clipped,
                                      clip_value=clip_value, clip_norm=clip_norm))
        return records

    def clear(self) -> None:
        """Forget the kept steps."""
        self._kept.clear()


class SentRows:
    """A block of kept rows on its way to the host; :meth:`records` reads it (waiting for the
    copy if it is still under way, which a step later it no longer is)."""

    def __init__(self, rows: NormRows, kept: list[Kept], copy: HostCopy) -> None:
        self.rows = rows
        self.kept = kept
        self._copy = copy

    def records(self) -> list[StepRecord]:
        """The block's records, oldest first (see :meth:`NormRows.records`)."""
        # back in the rows' dtype (exactly: the copy widened it), so the per-layer norms are
        # combined as on a step measured in full
        values = self._copy.result()[0].astype(self.rows.dtype).reshape(len(self.kept), -1)
        return self.rows.records(values, self.kept)
