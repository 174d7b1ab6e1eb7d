"""Activation statistics of one step, laid out for the one host copy and, across ranks, on a
site list every rank has agreed on.

Each site becomes a row ``[saturated elements, sum of |f'|, elements, calls, dead fraction]``,
the dead fraction being that of its worst call position: a site called at several positions of
a forward pass (a shared ``self.relu``) has different units on each (see
:mod:`graddiag.measure.activations.statistics`), and one position whose units are all dead is a
dead site even where the others fire; each position's own fraction travels beside the rows.

In one process only the device numbers travel (per site the saturated elements where counted on
the device and the sum of |f'|, and every unit's largest |f'|: one stack and one concatenation
per step); the host knows elements and calls and counts the dead units. With a
:class:`~graddiag.measure.ranks.RankReducer` the ranks first exchange their site lists (name,
kind, family, unit count, units per call position) and lay their rows out by the union of names
in rank order; a site a rank did not see contributes zeros. One sum over ranks then adds the
counts and, per unit, how many ranks saw it fire, so a unit is dead only if it fired on no rank.
A site whose call positions differ between ranks has no dead fraction (NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from graddiag.data.records import ActivationRecord
from graddiag.measure.activations.statistics import _Site
from graddiag.measure.ranks import RankReducer

#: (name, kind, family, units, units per call position): units is -1 (and the positions empty)
#: when the site has no comparable unit mask.
SiteInfo = tuple[str, str, str, int, tuple[int, ...]]
COLUMNS = 5  # saturated elements, sum of |f'|, elements, calls, dead fraction (worst position)


@dataclass
class ActivationPack:
    """Device tensors for the host copy, and the function that turns their host copy into a record."""

    chunks: list[torch.Tensor] = field(default_factory=list)
    finish: Callable[[list[np.ndarray]], ActivationRecord] = lambda host: _empty()


def _empty() -> ActivationRecord:
    nothing = np.zeros(0)
    return ActivationRecord([], [], [], nothing, nothing, nothing, nothing)


def _info(site: _Site) -> SiteInfo:
    return (site.name, site.spec.kind, site.spec.family, site.units or -1, site.widths)


def dead_by_site(dead_flags: np.ndarray, widths: list[tuple[int, ...]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per site, the dead fraction of its worst call position; and per call position, its own.

    ``dead_flags`` holds every unit of every site end to end (each site's call positions in
    order, ``widths`` units each). Returns the worst fraction of each site (NaN for a site
    without units) and the fraction of each call position, the sites' positions end to end
    (NaN for a position without units).
    """
    sizes = np.array([w for site in widths for w in site], dtype=np.int64)
    position = np.repeat(np.arange(len(sizes)), sizes)
    dead = np.bincount(position, weights=dead_flags, minlength=len(sizes))
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = dead / sizes
    worst = np.full(len(widths), np.nan)
    site = np.repeat(np.arange(len(widths)), [len(w) for w in widths])
    if len(site):
        worst[:] = -np.inf
        np.fmax.at(worst, site, fraction)  # a position without units (NaN) does not count
        worst[np.isneginf(worst)] = np.nan  # no positions
    return worst, fraction


def _agree(local: list[SiteInfo], cut_ops: dict[str, list[str]], reducer: RankReducer
           ) -> tuple[list[SiteInfo], dict[str, list[str]]]:
    """The union of every rank's sites by name (rank order) and of their cut operations."""
    union: dict[str, SiteInfo] = {}
    widths: dict[str, set[tuple[int, tuple[int, ...]]]] = {}
    merged: dict[str, list[str]] = {}
    for sites, cuts in reducer.all_gather_object([[list(i) for i in local], cut_ops]):
        for name, kind, family, units, positions in sites:
            union.setdefault(name, (name, kind, family, units, tuple(positions)))
            widths.setdefault(name, set()).add((int(units), tuple(positions)))
        for caller, ops in cuts.items():
            known = merged.setdefault(caller, [])
            known.extend(op for op in ops if op not in known)
    agreed = []
    for name, (_, kind, family, units, positions) in union.items():
        same = len(widths[name]) == 1 and units >= 0
        agreed.append((name, kind, family, units if same else -1, positions if same else ()))
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
    return ActivationPack([counts, fired], partial(_record, layout, cuts, None))


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
        widths=[s.widths for s in sites],
        floor_of_unit=np.repeat(np.array([s.floor for s in sites], dtype=np.float32),
                                [s.units for s in sites]))
    return ActivationPack(chunks, partial(_record, layout, cut_ops, host))


@dataclass
class _LocalCounts:
    """What the host knows of one process's sites: per site its elements, calls, whether its
    saturated elements were counted on the device (else they are elements - sum of |f'|) and
    the units of each call position; per unit (all sites end to end) its floor."""

    elements: np.ndarray
    calls: np.ndarray
    counted_below: np.ndarray
    widths: list[tuple[int, ...]]
    floor_of_unit: np.ndarray

    def rows(self, host: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of :data:`COLUMNS` from the host copy of :func:`_pack_local`'s chunks, and the
        dead fraction of every call position (see :func:`dead_by_site`)."""
        n = len(self.elements)
        if not n:
            return np.zeros((0, COLUMNS)), np.zeros(0)
        device = host[0].reshape(n, 2)
        gain = device[:, 1]
        below = np.where(self.counted_below, device[:, 0], self.elements - gain)
        # compared in float32, as on the device: NaN is alive
        dead_flags = host[1].astype(np.float32, copy=False) < self.floor_of_unit
        dead, by_call = dead_by_site(dead_flags, self.widths)
        return np.column_stack([below, gain, self.elements, self.calls, dead]), by_call


def _record(layout: list[SiteInfo], cuts: dict[str, list[str]], local: _LocalCounts | None,
            host: list[np.ndarray]) -> ActivationRecord:
    """The record from the host copy: ``local`` None, the counts summed over ranks and how many
    ranks saw each unit fire (units of the sites whose positions agree, end to end); else
    :func:`_pack_local`'s chunks read with ``local``."""
    if local is None:
        values = np.empty((len(layout), COLUMNS))
        values[:, :4] = host[0].reshape(len(layout), 4)
        values[:, 4], by_call = dead_by_site(host[1] == 0, [info[4] for info in layout])
    else:
        values, by_call = local.rows(host)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ActivationRecord(
            sites=[info[0] for info in layout],
            kinds=[info[1] for info in layout],
            families=[info[2] for info in layout],
            saturated=values[:, 0] / values[:, 2],
            dead=values[:, 4].copy(),
            gain=values[:, 1] / values[:, 2],
            calls=values[:, 3].copy(),
            cut_ops=cuts,
            call_positions=np.array([len(info[4]) for info in layout], dtype=np.int64),
            dead_by_call=by_call,
        )
