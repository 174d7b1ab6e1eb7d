"""Probes read numbers off the model on recorded steps: per-layer gradient and parameter norms.

Norms are computed with one fused ``torch._foreach_norm`` per (device, dtype) group,
accumulated in float32 (float64 gradients in float64, so that their tiny and huge norms do not
read as 0 or inf), and aggregated per layer on the device. Nothing here copies to the
host: the monitor gathers every probe's tensors into one transfer (:mod:`graddiag.measure.transfer`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from graddiag.measure.layers import LayerIndex, is_dtensor

log = logging.getLogger("graddiag")


@dataclass
class GradientReading:
    """Device-side result of one gradient read, plus what is known on the host already."""

    # (L,) on device, float32, or float64 when some gradient is float64; 0 for layers
    # without gradients
    layer_norms: torch.Tensor
    has_grad: np.ndarray  # (L,) bool per layer: at least one parameter has a gradient
    missing: dict[int, list[str]] = field(default_factory=dict)  # layer -> params without grad
    # per group read: the per-tensor norms on device, and whose they are (layer ids, parameter
    # names); what a deferred host read names non-finite parameters from
    tensor_norms: list[torch.Tensor] = field(default_factory=list)
    tensor_keys: list[tuple[list[int], list[str]]] = field(default_factory=list)

    def nonfinite_tensors(self, values: np.ndarray) -> dict[int, dict[str, int]]:
        """``{layer: {parameter: -1}}`` for the tensors whose host-side norm ``values`` (the
        :attr:`tensor_norms` concatenated) are NaN/Inf; -1: the elements were not counted."""
        lids = [lid for group_lids, _ in self.tensor_keys for lid in group_lids]
        names = [name for _, group_names in self.tensor_keys for name in group_names]
        return nonfinite_parameters(values, lids, names)


def nonfinite_parameters(values: np.ndarray, layer_ids: Sequence[int] | np.ndarray,
                         names: Sequence[str]) -> dict[int, dict[str, int]]:
    """``{layer: {parameter: -1}}`` for the parameters whose norm in ``values`` is NaN/Inf
    (``layer_ids[i]`` and ``names[i]`` say whose ``values[i]`` is); -1: the elements were not
    counted (a norm read later, or sent, no longer has them)."""
    result: dict[int, dict[str, int]] = {}
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        result.setdefault(int(layer_ids[i]), {})[names[i]] = -1
    return result


def clipping_acts(grad_norm: np.ndarray, has_grad: np.ndarray, clip_norm: float | None,
                  norm_type: float) -> bool | None:
    """Whether clipping the global 2-norm to ``clip_norm`` will rescale the gradients whose
    per-layer norms these are (``None``: no clipping by norm, or not 2-norms to tell by)."""
    if clip_norm is None or norm_type != 2.0:
        return None
    measured = grad_norm[has_grad]
    return bool(math.sqrt(float(np.dot(measured, measured))) > clip_norm)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_sparse:
        tensor = tensor.coalesce().values()
    return cast(Any, tensor).to_local() if is_dtensor(tensor) else tensor


def _group_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    if is_dtensor(tensor):
        sharded = cast(Any, tensor)  # a DTensor: mesh and placements say how it is split
        return (tensor.device, tensor.dtype, id(sharded.device_mesh), tuple(sharded.placements))
    return (tensor.device, tensor.dtype, None, None)


_ACCUMULATE_IN_FLOAT32 = (torch.float16, torch.bfloat16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-tensor norms of ``dtype`` tensors are kept in: float64 for float64 (and
    complex128) tensors, whose norms can lie beyond float32's range (a vanishing gradient of
    1e-50 in a deep float64 network), float32 for every other kind."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _norms(tensors: list[torch.Tensor], p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor p-norms as one vector on the tensors' device, in :func:`norm_dtype` (written
    into ``out``, a float32 or float64 vector of their number, when given).

    float16/bfloat16 are accumulated in float32 (values above 65504 do not read as inf);
    float64 is normed in its own precision and complex tensors by the magnitude of their
    elements (a real norm).
    """
    dtype = tensors[0].dtype
    if dtype == torch.float32:  # already float32: the plain kernel is the fastest
        return torch.stack(torch._foreach_norm(tensors, p), out=out)
    if dtype in _ACCUMULATE_IN_FLOAT32:
        return torch.stack(torch._foreach_norm(tensors, p, dtype=torch.float32), out=out)
    norms = torch.stack(torch._foreach_norm(tensors, p)).to(norm_dtype(dtype))
    return norms if out is None else out.copy_(norms)


def _reduce_sharded(contrib: torch.Tensor, sample: torch.Tensor, p: float) -> None:
    """Combine per-shard contributions of DTensors into the full tensor's (in place)."""
    sharded = cast(Any, sample)  # a DTensor
    mesh = sharded.device_mesh
    op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
    for dim, placement in enumerate(sharded.placements):
        if placement.is_shard():
            dist.all_reduce(contrib, op=op, group=mesh.get_group(dim))


class LayerNormAggregator:
    """Computes per-layer p-norms of many tensors with fused kernels, on device.

    The norm of a layer is the p-norm of all its tensors' elements together:
    ``(sum_i ||t_i||_p^p)^(1/p)``, or the largest ``||t_i||_inf`` for ``p = inf``.
    """

    def __init__(self, n_layers: int, p: float) -> None:
        self.n_layers = n_layers
        self.p = p
        self._index_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def index(self, device: torch.device, layer_ids: list[int]) -> torch.Tensor:
        """The layer ids as a device tensor (cached: built once per distinct list)."""
        key = (device, tuple(layer_ids))
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            index = torch.tensor(layer_ids, dtype=torch.long).to(device, non_blocking=True)
            self._index_cache[key] = index
        return index

    def group_contribution(self, tensors: list[torch.Tensor], index: torch.Tensor,
                           sample: torch.Tensor,
                           norms_out: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Per-layer sums of ``||t||_p^p`` (or maxima for inf) of one (device, dtype) group;
        the per-tensor norms are appended to ``norms_out`` if given."""
        p = self.p
        local = [_local(t) for t in tensors] if is_dtensor(sample) or sample.is_sparse else tensors
        norms = _norms(local, p)
        if norms_out is not None:
            norms_out.append(norms)
        contrib = torch.zeros(self.n_layers, dtype=norms.dtype, device=norms.device)
        if math.isinf(p):
            contrib.scatter_reduce_(0, index, norms, "amax", include_self=True)
        else:
            contrib.index_add_(0, index, norms if p == 1.0 else norms.pow(p))
        if is_dtensor(sample):
            _reduce_sharded(contrib, sample, p)
        return contrib

    def combine(self, contributions: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer norms from group contributions, on the first contribution's device (in
        float64 when some contribution is)."""
        if not contributions:
            return torch.zeros(self.n_layers, dtype=torch.float32)
        p = self.p
        total = contributions[0]
        for contrib in contributions[1:]:
            contrib = contrib.to(total.device, non_blocking=True)
            if contrib.dtype != total.dtype:  # combined in the wider of the two
                wider = torch.promote_types(contrib.dtype, total.dtype)
                total, contrib = total.to(wider), contrib.to(wider)
            total = torch.maximum(total, contrib) if math.isinf(p) else total + contrib
        if math.isinf(p) or p == 1.0:
            return total
        return total.pow(1.0 / p)

    def __call__(self, tensors: list[torch.Tensor], layer_ids: list[int]) -> torch.Tensor:
        """Per-layer norms, a float32 (float64 if some tensor is float64) ``(n_layers,)``
        tensor on the first tensor's device."""
        groups: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[int]]] = {}
        for tensor, lid in zip(tensors, layer_ids):
            entry = groups.setdefault(_group_key(tensor), ([], []))
            entry[0].append(tensor)
            entry[1].append(lid)
        return self.combine([
            self.group_contribution(ts, self.index(ts[0].device, lids), ts[0])
            for ts, lids in groups.values()
        ])


class _ParamGroup:
    """Monitored parameters sharing device, dtype (and DTensor layout)."""

    def __init__(self) -> None:
        self.params: list[torch.nn.Parameter] = []
        self.names: list[str] = []
        self.lids: list[int] = []
        self.mixed = False  # its gradients once needed the careful path (e.g. sparse ones)
        self.index: torch.Tensor | None = None  # the lids on the gradients' device (all present)


MEASURE_ERRORS = (RuntimeError, NotImplementedError, TypeError)


def _present(group: _ParamGroup) -> list[str]:
    """Names of the group's parameters that have a gradient now (aligned with their grads)."""
    return [n for n, p in zip(group.names, group.params) if p.grad is not None]


def _grad_key(grad: torch.Tensor) -> tuple[Any, ...]:
    return (*_group_key(grad), grad.layout)


def describe(tensor: torch.Tensor) -> str:
    """A tensor's kind as warnings name it: ``"torch.float8_e4m3fn, strided"``."""
    return f"{tensor.dtype}, {str(tensor.layout).replace('torch.', '')}"


def warn_unmeasurable(warned: set[str], tensor: torch.Tensor, names: list[str],
                      error: BaseException) -> None:
    """Warn once per kind of tensor (dtype, layout) that graddiag cannot measure."""
    what = describe(tensor)
    if what in warned:
        return
    warned.add(what)
    log.warning(
        "graddiag: cannot measure tensors of kind (%s), e.g. parameter(s) %s (%s: %s); they are "
        "left out of the norms, training goes on.",
        what, names[:5], type(error).__name__, (str(error).splitlines() or [""])[0],
    )


class GradientProbe:
    """Reads each layer's gradient norm; notes parameters that got no gradient."""

    def __init__(self, index: LayerIndex, norm_type: float,
                 only: set[int] | None = None, warned: set[str] | None = None) -> None:
        """Args:
            index: The monitored layers.
            norm_type: p of the p-norm.
            only: ``id``s of the parameters to read (one optimizer's); ``None`` reads all.
            warned: Kinds of gradients already warned about as unmeasurable (shared by the
                probes of one monitor, so each kind is warned about once).
        """
        self._warned = set() if warned is None else warned
        self._flat = [
            (lid, name, param)
            for lid, layer in enumerate(index.layers)
            for name, param in zip(layer.param_names, layer.params)
            if only is None or id(param) in only
        ]
        self._n_layers = len(index)
        self.measured = np.zeros(self._n_layers, dtype=bool)
        for lid, _, _ in self._flat:
            self.measured[lid] = True
        self._aggregate = LayerNormAggregator(self._n_layers, norm_type)
        groups: dict[tuple[Any, ...], _ParamGroup] = {}
        for lid, name, param in self._flat:
            group = groups.setdefault(_group_key(param), _ParamGroup())
            group.params.append(param)
            group.names.append(name)
            group.lids.append(lid)
        self._groups = list(groups.values())
        #: ``has_grad`` of a read in which every measured layer got its gradients (shared and
        #: read-only: records keep a reference; ``reading.has_grad is probe.all_read`` tells it)
        self.all_read = self.measured.copy()
        self.all_read.flags.writeable = False
        self.measures_all = bool(self.measured.all())  # every layer (not one optimizer's)
        #: Layer and parameter name of each norm :meth:`read_row` writes, in its order.
        self.row_layers = np.array([lid for g in self._groups for lid in g.lids], dtype=np.int64)
        self.row_names = [name for g in self._groups for name in g.names]
        self._row_starts = np.cumsum([0] + [len(g.params) for g in self._groups]).tolist()
        #: The dtype of a row :meth:`read_row` writes: float64 when some group's norms are.
        self.row_dtype = max((norm_dtype(g.params[0].dtype) for g in self._groups),
                             key=lambda d: torch.finfo(d).bits, default=torch.float32)
        # where the present gradients' norms go, by (group's first row position, missing ones)
        self._places: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        devices = {g.params[0].device for g in self._groups}
        #: The one device every monitored parameter is on, as plain tensors (not DTensors), so
        #: :meth:`read_row` can write their gradients' norms into a row there; ``None`` when
        #: there is no such one.
        self.row_device: torch.device | None = (
            next(iter(devices)) if len(devices) == 1
            and not any(is_dtensor(g.params[0]) for g in self._groups) else None)
        self.reads_rows = self.row_device is not None

    def row_views(self, row: torch.Tensor) -> list[torch.Tensor]:
        """The parts of ``row`` (a vector of ``len(row_layers)`` in :attr:`row_dtype` on
        :attr:`row_device`) that :meth:`read_row` writes each group's norms into; made once per
        row and reused (a view made on every step costs more than the read's host work after a
        backward pass)."""
        starts = self._row_starts
        if len(self._groups) == 1:
            return [row]
        return [row[start:end] for start, end in zip(starts[:-1], starts[1:])]

    def read_row(self, views: list[torch.Tensor]) -> tuple[int, ...] | None:
        """Write every monitored parameter's gradient p-norm into its row, given as the
        :meth:`row_views` of it (one fused kernel per group, nothing else on the host); a
        parameter without a gradient gets 0.

        Returns the positions in the row of the parameters that got no gradient (usually
        none), or ``None``, with the row not to be used, when the step needs :meth:`read`: a
        sparse gradient, or one of a kind that needs the careful path.
        """
        if not self.reads_rows:
            return None
        absent: tuple[int, ...] = ()
        for group, view, start in zip(self._groups, views, self._row_starts):
            if group.mixed:
                return None
            grads = [p.grad for p in group.params]
            try:  # a missing gradient (None) makes the kernel raise a TypeError: checking
                # for it first would cost every step more than the exception costs the rare one
                first = grads[0]
                if first is not None and first.layout == torch.strided:
                    _norms(cast("list[torch.Tensor]", grads), self._aggregate.p, out=view)
                    continue
            except MEASURE_ERRORS:
                if all(g is not None for g in grads):  # a sparse gradient among dense ones, say
                    return None
            missing = self._read_some(grads, view, start)
            if missing is None:
                return None
            absent += tuple(start + i for i in missing)
        return absent

    def _read_some(self, grads: list[torch.Tensor | None], row: torch.Tensor,
                   group: int) -> tuple[int, ...] | None:
        """:meth:`read_row` for one group where some gradients are ``None``: the others' norms
        into their places, 0 for the missing ones; returns the missing ones' positions."""
        missing = tuple(i for i, g in enumerate(grads) if g is None)
        present = [g for g in grads if g is not None]
        row.zero_()
        if not present:
            return missing
        if any(g.layout != torch.strided for g in present):
            return None
        places = self._places.get((group, missing))
        if places is None:
            if len(self._places) > 16:
                self._places.clear()
            places = torch.tensor([i for i, g in enumerate(grads) if g is not None],
                                  dtype=torch.long)
            pinned = row.device.type == "cuda"  # copied without a sync, stream-ordered
            places = self._places[group, missing] = (
                places.pin_memory() if pinned else places).to(row.device, non_blocking=pinned)
        try:
            row[places] = _norms(present, self._aggregate.p).to(row.dtype)
        except MEASURE_ERRORS:
            return None
        return missing

    def read(self, grad_scale: torch.Tensor | None = None) -> GradientReading:
        """Read the current ``.grad`` of every monitored parameter.

        When every parameter has a gradient of the group's kind (the usual case) the host work
        per step is one list of ``.grad`` per group and a few fused device operations, whatever
        the number of layers; per-parameter bookkeeping happens only on steps where some
        gradient is missing, or for groups whose gradients needed the careful path.

        Args:
            grad_scale: If gradients are still multiplied by an AMP loss scale, the scale
                (a device tensor); norms are divided by it on device, without a host sync.
        """
        missing: dict[int, list[str]] = {}
        contributions: list[torch.Tensor] = []
        tensor_norms: list[torch.Tensor] = []
        tensor_keys: list[tuple[list[int], list[str]]] = []
        slow: list[int] | None = None  # layers measured, once the fast path does not apply
        for position, group in enumerate(self._groups):
            maybe = [p.grad for p in group.params]
            if not group.mixed and not any(g is None for g in maybe):
                grads = cast("list[torch.Tensor]", maybe)
                index = group.index
                if index is None or index.device != grads[0].device:
                    index = group.index = self._aggregate.index(grads[0].device, group.lids)
                try:
                    contributions.append(self._aggregate.group_contribution(
                        grads, index, grads[0], tensor_norms))
                    tensor_keys.append((group.lids, group.names))
                    if slow is not None:
                        slow.extend(group.lids)
                    continue
                except MEASURE_ERRORS:  # e.g. a sparse gradient among dense ones
                    group.mixed = True
            # the careful, per-parameter path
            if slow is None:
                # every group before this one took the fast path: all their layers were read
                slow = [lid for g in self._groups[:position] for lid in g.lids]
            lids, names = group.lids, group.names
            if any(g is None for g in maybe):  # some parameters got no gradient this step
                for g, lid, name, param in zip(maybe, lids, names, group.params):
                    if g is None and param.requires_grad:  # frozen ones are never flagged
                        missing.setdefault(lid, []).append(name)
                names = [n for g, n in zip(maybe, names) if g is not None]
                lids = [lid for g, lid in zip(maybe, lids) if g is not None]
            grads = [g for g in maybe if g is not None]
            if not grads:
                continue
            if group.mixed:
                slow.extend(self._careful(grads, lids, names, contributions, tensor_norms,
                                          tensor_keys))
                continue
            index = self._aggregate.index(grads[0].device, lids)
            try:
                contributions.append(self._aggregate.group_contribution(
                    grads, index, grads[0], tensor_norms))
                tensor_keys.append((lids, names))
                slow.extend(lids)
            except MEASURE_ERRORS:
                group.mixed = True
                slow.extend(self._careful(grads, lids, names, contributions, tensor_norms,
                                          tensor_keys))
        norms = self._aggregate.combine(contributions)
        if grad_scale is not None:
            norms = norms / grad_scale.to(norms.device, norms.dtype)
        if slow is None:
            has_grad = self.all_read
        else:
            has_grad = np.zeros(self._n_layers, dtype=bool)
            has_grad[slow] = True
        return GradientReading(norms, has_grad, missing, tensor_norms, tensor_keys)

    def _careful(self, grads: list[Any], lids: list[int], names: list[str],
                 contributions: list[torch.Tensor],
                 tensor_norms: list[torch.Tensor] | None = None,
                 tensor_keys: list[tuple[list[int], list[str]]] | None = None) -> list[int]:
        """Measure gradients of mixed layouts/dtypes by kind; skip (warn once) what cannot be.

        Returns the layers that got at least one measured gradient.
        """
        kinds: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[int], list[str]]] = {}
        for grad, lid, name in zip(grads, lids, names):
            entry = kinds.setdefault(_grad_key(grad), ([], [], []))
            entry[0].append(grad)
            entry[1].append(lid)
            entry[2].append(name)
        measured: list[int] = []
        for tensors, kind_lids, kind_names in kinds.values():
            index = self._aggregate.index(tensors[0].device, kind_lids)
            try:
                contributions.append(self._aggregate.group_contribution(
                    tensors, index, tensors[0], tensor_norms))
            except MEASURE_ERRORS as error:
                try:  # dtypes without norm kernels (float8): upcast one kind at a time
                    upcast = [_local(t).float() for t in tensors]
                    contributions.append(self._aggregate.group_contribution(
                        upcast, index, upcast[0], tensor_norms))
                except MEASURE_ERRORS:
                    warn_unmeasurable(self._warned, tensors[0], kind_names, error)
                    continue
            if tensor_keys is not None:
                tensor_keys.append((kind_lids, kind_names))
            measured.extend(kind_lids)
        return measured

    def exact_norms(self, layer_ids: set[int]) -> dict[int, float]:
        """Each given layer's gradient p-norm in float64 (slow path, anomalies only): a float32
        norm overflows to inf once its sum of squares passes 3.4e38 (elements near 1e19),
        although every element is finite. Layers holding a sharded (DTensor) gradient are left
        out: their local shard alone does not give the norm."""
        entries = [(lid, param.grad) for lid, _, param in self._flat
                   if lid in layer_ids and param.grad is not None]
        sharded = {lid for lid, grad in entries if is_dtensor(grad)}
        entries = [(lid, grad) for lid, grad in entries if lid not in sharded]
        if not entries:
            return {}
        norms = self._aggregate([_local(grad).detach().double() for _, grad in entries],
                                [lid for lid, _ in entries]).tolist()
        return {lid: norms[lid] for lid, _ in entries}

    def nonfinite_elements(self, layer_ids: set[int]) -> dict[int, dict[str, int]]:
        """Count NaN/Inf elements per parameter of the given layers (slow path, anomalies only)."""
        entries = [
            (lid, name, param.grad)
            for lid, name, param in self._flat
            if lid in layer_ids and param.grad is not None
        ]
        if not entries:
            return {}
        home = entries[0][2].device
        counts = torch.stack(
            [(~torch.isfinite(_local(g))).sum().to(home) for _, _, g in entries]
        ).tolist()
        result: dict[int, dict[str, int]] = {}
        for (lid, name, _), count in zip(entries, counts):
            if count:
                result.setdefault(lid, {})[name] = int(count)
        return result
