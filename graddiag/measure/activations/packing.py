"""Activation statistics of one step, laid out for the one host copy and, across ranks, on a
site list every rank has agreed on.

Each site becomes a row ``[saturated elements, sum of |f'|, elements, calls, dead units]``. In
one process only the device numbers travel (per site the saturated elements where counted on
the device and the sum of |f'|, and every unit's largest |f'|: one stack and one concatenation
per step); the host knows elements and calls and counts the dead units. With a :class:`~graddiag.measure.ranks.RankReducer` the ranks first exchange their site lists
(name, kind, family, unit count) and lay their rows out by the union of names in rank order; a
site a rank did not see contributes zeros. One sum over ranks then adds the counts and, per unit,
how many ranks saw it fire, so a unit is dead only if it fired on no rank. A site whose unit
count differs between ranks has no dead fraction (NaN); calls of different widths on one rank
each keep their own units (see :mod:`graddiag.measure.activations.statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from graddiag.data.records import ActivationRecord
from graddiag.measure.activations.statistics import _Site
from graddiag.measure.ranks import RankReducer

#: (name, kind, family, units): units is -1 when the site has no comparable unit mask.
SiteInfo = tuple[str, str, str, int]
COLUMNS = 5  # saturated elements, sum of |f'|, elements, calls, dead units


@dataclass
class ActivationPack:
    """Device tensors for the host copy, and the function that turns their host copy into a record."""

    chunks: list[torch.Tensor] = field(default_factory=list)
    finish: Callable[[list[np.ndarray]], ActivationRecord] = lambda host: _empty()


def _empty() -> ActivationRecord:
    nothing = np.zeros(0)
    return ActivationRecord([], [], [], nothing, nothing, nothing, nothing)


def _info(site: _Site) -> SiteInfo:
    return (site.name, site.spec.kind, site.spec.family, site.units or -1)


def _agree(local: list[SiteInfo], cut_ops: dict[str, list[str]], reducer: RankReducer
           ) -> tuple[list[SiteInfo], dict[str, list[str]]]:
    """The union of every rank's sites by name (rank order) and of their cut operations."""
    union: dict[str, SiteInfo] = {}
    widths: dict[str, set[int]] = {}
    merged: dict[str, list[str]] = {}
    for sites, cuts in reducer.all_gather_object([[list(i) for i in local], cut_ops]):
        for name, kind, family, units in sites:
            union.setdefault(name, (name, kind, family, units))
            widths.setdefault(name, set()).add(int(units))
        for caller, ops in cuts.items():
            known = merged.setdefault(caller, [])
            known.extend(op for op in ops if op not in known)
    agreed = []
    for name, (_, kind, family, units) in union.items():
        same = len(widths[name]) == 1 and units >= 0
        agreed.append((name, kind, family, units if same else -1))
    return agreed, merged


def pack_activations(sites: list[_Site], cut_ops: dict[str, list[str]],
                     reducer: RankReducer | None = None) -> ActivationPack | None:
    """Lay out one step's statistics; ``None`` when there is nothing (on every rank).

    With ``reducer`` every rank must call this on the same steps: it communicates twice (the
    site lists, then one sum).
    """
    local = [_info(s) for s in sites]
    if reducer is None:
        if not sites and not cut_ops:
            return None
        return _pack_local(sites, local, cut_ops)
    layout, cuts = _agree(local, cut_ops, reducer)
    if not layout and not cuts:
        return None
    home = reducer.device
    row = {info[0]: i for i, info in enumerate(layout)}
    width = [max(info[3], 0) for info in layout]
    offsets = np.concatenate([[0], np.cumsum(width)]).astype(int)
    counts = torch.zeros(len(layout), 4, device=home)
    fired = torch.zeros(int(offsets[-1]), device=home)
    if sites:
        rows = torch.tensor([row[s.name] for s in sites], device=home)
        calls = torch.tensor([float(s.calls) for s in sites], device=home)
        counts[rows] = torch.cat([torch.stack([s.sums(home) for s in sites]), calls[:, None]], 1)
        for site, info in zip(sites, local):
            i = row[site.name]
            alive = site.alive
            if alive is not None and info[3] == layout[i][3] >= 0:
                fired[offsets[i]:offsets[i + 1]] = alive.reshape(-1).to(home, torch.float32)
    flat = reducer.all_reduce_sum(torch.cat([counts.reshape(-1), fired]))
    counts, fired = flat[: counts.numel()].reshape(counts.shape), flat[counts.numel():]
    segment = torch.from_numpy(np.repeat(np.arange(len(layout)), width)).to(home)
    dead = torch.zeros(len(layout), device=home).index_add_(0, segment, (fired == 0).float())
    unknown = torch.tensor([info[3] < 0 for info in layout], device=home, dtype=torch.bool)
    dead = dead.masked_fill(unknown, math.nan)
    return ActivationPack([torch.cat([counts, dead[:, None]], 1)],
                          partial(_record, layout, cuts, None))


def _pack_local(sites: list[_Site], layout: list[SiteInfo], cut_ops: dict[str, list[str]]
                ) -> ActivationPack:
    """One process's statistics in two device tensors: per site the elements below the floor
    (where counted on the device) and the sum of |f'|; and every site's per-unit largest |f'|,
    end to end. The host knows the element and call counts, and counts the dead units itself,
    so a step costs two device operations here whatever the number of sites."""
    home = sites[0].gain.device if sites else torch.device("cpu")  # type: ignore[union-attr]
    values: list[torch.Tensor] = []
    largest: list[torch.Tensor] = []
    for site in sites:
        assert site.gain is not None
        counted = site.counts_below
        values += [site.below if counted else site.gain, site.gain]  # type: ignore[list-item]
        largest += site.largest
    chunks = [torch.stack([v if v.device == home else v.to(home) for v in values]),
              torch.cat([v if v.device == home else v.to(home) for v in largest])] \
        if values else []
    host = _LocalCounts(
        elements=np.array([s.elements for s in sites], dtype=float),
        calls=np.array([s.calls for s in sites], dtype=float),
        counted_below=np.array([s.counts_below for s in sites], dtype=bool),
        site_of_unit=np.repeat(np.arange(len(sites)), [s.units for s in sites]),
        floor_of_unit=np.repeat(np.array([s.floor for s in sites], dtype=np.float32),
                                [s.units for s in sites]))
    return ActivationPack(chunks, partial(_record, layout, cut_ops, host))


@dataclass
class _LocalCounts:
    """What the host knows of one process's sites: per site its elements, calls and whether its
    saturated elements were counted on the device (else they are elements - sum of |f'|); per
    unit (all sites end to end) its site and floor."""

    elements: np.ndarray
    calls: np.ndarray
    counted_below: np.ndarray
    site_of_unit: np.ndarray
    floor_of_unit: np.ndarray

    def rows(self, host: list[np.ndarray]) -> np.ndarray:
        """Rows of :data:`COLUMNS` from the host copy of :func:`_pack_local`'s chunks."""
        n = len(self.elements)
        if not n:
            return np.zeros((0, COLUMNS))
        device = host[0].reshape(n, 2)
        gain = device[:, 1]
        below = np.where(self.counted_below, device[:, 0], self.elements - gain)
        # compared in float32, as on the device: NaN is alive
        dead_flags = host[1].astype(np.float32, copy=False) < self.floor_of_unit
        dead = np.bincount(self.site_of_unit, weights=dead_flags, minlength=n)
        return np.column_stack([below, gain, self.elements, self.calls, dead])


def _record(layout: list[SiteInfo], cuts: dict[str, list[str]], local: _LocalCounts | None,
            host: list[np.ndarray]) -> ActivationRecord:
    """The record from the host copy: rows of :data:`COLUMNS` (``local`` None: summed over
    ranks), or :func:`_pack_local`'s chunks read with ``local``."""
    values = host[0].reshape(len(layout), COLUMNS) if local is None else local.rows(host)
    units = np.array([info[3] if info[3] >= 0 else np.nan for info in layout], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ActivationRecord(
            sites=[info[0] for info in layout],
            kinds=[info[1] for info in layout],
            families=[info[2] for info in layout],
            saturated=values[:, 0] / values[:, 2],
            dead=values[:, 4] / units,
            gain=values[:, 1] / values[:, 2],
            calls=values[:, 3].copy(),
            cut_ops=cuts,
        )
