"""The gradient-flow figure: one row per layer (input side at the top), gradient norm on a log
axis; zero, missing and non-finite gradients drawn as such; activation sites with a finding marked.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, thread-safe).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from graddiag.reporters.labels import abbreviate, abbreviate_all

SITE_COLOURS = {"sigmoid": "tab:purple", "tanh": "tab:blue", "relu": "tab:green"}
SITE_FINDING_COLOURS = {"dead_relu": "tab:orange", "saturated": "tab:purple"}
SITE_FINDING_WORDS = {"dead_relu": "dead", "saturated": "saturated"}
ZERO_LABEL = "0 / no grad"
NONFINITE_LABEL = "inf / NaN"  # the right edge's tick, when a layer had inf/NaN gradients
MAX_LABELLED_ROWS = 120  # more layers than this: label every k-th row (and every flagged one)
LAYOUT_STAND_INS = 8  # the widest row labels that stand in for all of them in the layout
#: The cost assumed for a figure before one was drawn: a fixed part and a part per labelled row
#: (at most ``MAX_LABELLED_ROWS`` of them). Drawn on an idle 2-core x86-64 CPU: 21 layers
#: 0.08 s, 98 layers 0.32-0.36 s, both under the guess; a busier or slower machine can take
#: longer, and then the first figure overshoots its time share once.
FIRST_FIGURE_SECONDS = 0.05
FIRST_FIGURE_SECONDS_PER_ROW = 0.004


def first_figure_seconds(layers: int) -> float:
    """The cost assumed for a gradient-flow figure of ``layers`` layers before one was drawn (at
    most 0.05 s + 120 labelled rows x 4 ms = 0.53 s)."""
    return FIRST_FIGURE_SECONDS + FIRST_FIGURE_SECONDS_PER_ROW * min(layers, MAX_LABELLED_ROWS)


@dataclass(frozen=True)
class FlowProfile:
    """Per-layer gradient norms over an interval of recorded steps.

    Attributes:
        median, low, high: Median/min/max of the finite norms (zeros included); NaN where a
            layer had no finite norm in the interval.
        no_grad: The layer received no gradient on any step of the interval.
        nonfinite_steps: Steps on which the layer's gradient held inf/NaN.
    """

    median: np.ndarray
    low: np.ndarray
    high: np.ndarray
    no_grad: np.ndarray
    nonfinite_steps: np.ndarray

    @property
    def zero(self) -> np.ndarray:
        """Layers whose median norm is exactly zero (a zero-derivative op or dead units)."""
        with np.errstate(invalid="ignore"):
            return self.median == 0


def flow_profile(grad_norms: Sequence[np.ndarray], has_grad: Sequence[np.ndarray], *,
                 with_median: bool = True) -> FlowProfile:
    """Summarise per-step gradient norms ``(steps, layers)`` into a :class:`FlowProfile` (with
    ``with_median=False`` its median is left NaN)."""
    norms = np.vstack(grad_norms).astype(np.float64)
    got = np.vstack(has_grad).astype(bool)
    finite = got & np.isfinite(norms)
    values = np.where(finite, norms, np.nan)
    any_finite = finite.any(axis=0)
    median = np.full(norms.shape[1], np.nan)
    low, high = median.copy(), median.copy()
    if any_finite.any():
        columns = values[:, any_finite]
        if with_median:
            median[any_finite] = np.nanmedian(columns, axis=0)
        low[any_finite] = np.nanmin(columns, axis=0)
        high[any_finite] = np.nanmax(columns, axis=0)
    no_grad = np.asarray(~got.any(axis=0), dtype=bool)
    return FlowProfile(median, low, high, no_grad, (got & ~np.isfinite(norms)).sum(axis=0))


class FlowRows:
    """Per-layer gradient norms of a run of recorded steps (between two figures, or a whole
    run), in bounded memory.

    Every step counts towards the extremes, the missing layers and the non-finite counts of
    :meth:`profile`; the median is taken over an evenly spaced sample of at most ``capacity``
    steps (every step while there are no more, then every 2nd, 4th, ...). Appending a step is a
    list append; the steps are summarised ``capacity`` at a time.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # not yet summarised
        self._sample: list[tuple[np.ndarray, np.ndarray]] = []
        self._stride = 1  # the sample holds the steps whose index is a multiple of this
        self._seen = 0
        self._summary: FlowProfile | None = None  # extremes and counts of the summarised steps

    def __len__(self) -> int:
        return self._seen

    def append(self, grad_norm: np.ndarray, has_grad: np.ndarray) -> None:
        self._pending.append((grad_norm, has_grad))
        self._seen += 1
        if len(self._pending) >= self.capacity:
            self._summarise()

    def _summarise(self) -> None:
        if not self._pending:
            return
        first = self._seen - len(self._pending)
        part = flow_profile([r[0] for r in self._pending], [r[1] for r in self._pending],
                            with_median=False)
        self._summary = part if self._summary is None else _combine(self._summary, part)
        self._sample += [row for i, row in enumerate(self._pending, first)
                         if i % self._stride == 0]
        while len(self._sample) > self.capacity:
            self._sample, self._stride = self._sample[::2], self._stride * 2
        self._pending = []

    def profile(self, earlier: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> FlowProfile:
        """The :class:`FlowProfile` of every step appended (the median over the sample), and of
        ``earlier`` steps from before the first of them, ``(grad_norm, has_grad)`` rows counted
        in full."""
        self._summarise()
        rows = list(earlier) + self._sample
        assert rows, "no steps"
        sampled = flow_profile([r[0] for r in rows], [r[1] for r in rows])
        if self._summary is None:
            return sampled
        summary = self._summary
        if earlier:
            summary = _combine(summary, flow_profile([r[0] for r in earlier],
                                                     [r[1] for r in earlier], with_median=False))
        return FlowProfile(sampled.median, summary.low, summary.high, summary.no_grad,
                           summary.nonfinite_steps)


def _combine(a: FlowProfile, b: FlowProfile) -> FlowProfile:
    """Extremes and counts of two runs of steps together (no median)."""
    with np.errstate(invalid="ignore"):
        return FlowProfile(a.median, np.fmin(a.low, b.low), np.fmax(a.high, b.high),
                           a.no_grad & b.no_grad, a.nonfinite_steps + b.nonfinite_steps)


def _floor_and_ceiling(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    positive = values[np.isfinite(values) & (values > 0)]
    if not positive.size:
        return 1e-12, 1.0
    low, high = float(positive.min()), float(positive.max())
    return 10.0 ** (math.floor(math.log10(low)) - 1), 10.0 ** (math.ceil(math.log10(high)) + 1)


def gradient_flow_figure(
    layers: Sequence[str],
    profile: FlowProfile,
    *,
    flagged: set[str] | frozenset[str] = frozenset(),
    sites: Sequence[tuple[float, str, str]] = (),
    site_findings: Mapping[str, tuple[str, float]] | None = None,
    title: str = "Gradient flow",
) -> Figure:
    """Median gradient norm per layer with a min-max band over the interval.

    Layers run top (input side) to bottom (loss side); long names are abbreviated. Layers whose
    median norm is exactly zero and layers without any gradient sit on a floor line one decade
    below the smallest norm (labelled ``0 / no grad``); layers with inf/NaN gradients get a red
    marker at the right edge. Flagged layers are red.

    Args:
        layers: Layer names in forward order.
        profile: Their statistics (see :func:`flow_profile`).
        flagged: Layers (and sites) with a finding; drawn as red rings and red labels.
        sites: ``(position, site, kind)`` activation sites in layer-index units (``k - 0.5``:
            between layers ``k - 1`` and ``k``), drawn as dotted lines.
        site_findings: ``{site: (finding kind, value)}`` for sites with a ``dead_relu`` or
            ``saturated`` finding: drawn as a coloured band labelled ``net.3: dead 84%``.
        title: Figure title.
    """
    n = len(layers)
    labels = abbreviate_all(layers)
    row = 0.24 if n <= 60 else max(0.1, 60 * 0.24 / n)
    width = 7.0 + 0.055 * max((len(label) for label in labels), default=0)
    fig = Figure(figsize=(width, min(60.0, 2.2 + row * max(n, 6))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n, dtype=float)
    floor, ceiling = _floor_and_ceiling(profile.median, profile.low, profile.high)
    on_floor = lambda v: np.where(np.asarray(v) > 0, v, np.where(np.asarray(v) == 0, floor, np.nan))  # noqa: E731
    ax.fill_betweenx(y, on_floor(profile.low), on_floor(profile.high), color="tab:blue", alpha=0.2,
                     label="min-max over interval")
    ax.plot(on_floor(profile.median), y, "-o", color="tab:blue", markersize=4, label="median")
    ax.axvline(floor, color="black", linewidth=0.8, linestyle="--")
    zero = np.flatnonzero(profile.zero)
    if zero.size:
        ax.plot(np.full(zero.size, floor), y[zero], "<", color="black", markersize=8,
                label="median exactly 0 (on the floor)", zorder=4)
    missing = np.flatnonzero(profile.no_grad)
    if missing.size:
        ax.plot(np.full(missing.size, floor), y[missing], "x", color="black", markersize=8,
                markeredgewidth=2, label="no gradient (on the floor)", zorder=4)
    nonfinite = np.flatnonzero(profile.nonfinite_steps > 0)
    if nonfinite.size:
        ax.plot(np.full(nonfinite.size, ceiling), y[nonfinite], "X", color="tab:red",
                markersize=9, label="inf/NaN gradient (right edge)")
    bad = [i for i, name in enumerate(layers) if name in flagged]
    if bad:
        flagged_x = on_floor(profile.median[bad])
        flagged_x = np.where(np.isnan(flagged_x) & profile.no_grad[bad], floor, flagged_x)
        only_nonfinite = np.isnan(flagged_x) & (profile.nonfinite_steps[bad] > 0)
        flagged_x = np.where(only_nonfinite, ceiling, flagged_x)  # ringed at the right edge
        ax.plot(flagged_x, y[bad], "o", markerfacecolor="none", markeredgecolor="tab:red",
                markeredgewidth=2, markersize=12, linestyle="none", label="flagged layer",
                zorder=3)
    _draw_sites(ax, sites, site_findings or {}, ceiling)
    ax.set_xscale("log")
    ax.set_xlim(floor / 2.5, ceiling * 2.5)
    ax.set_ylim(max(n, 1) - 0.5, -0.5)  # input side at the top
    _decade_ticks(ax, floor, ceiling, nonfinite=bool(nonfinite.size))
    ax.set_ylabel("layer (input side at the top)")
    ax.set_xlabel("gradient norm (log scale)")
    ax.set_title(title)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    _fit_layout(fig, ax, y, labels, bad)
    return fig


def _draw_sites(
    ax: Axes,
    sites: Sequence[tuple[float, str, str]],
    site_findings: Mapping[str, tuple[str, float]],
    ceiling: float,
) -> None:
    kinds_seen: set[str] = set()
    findings_seen: set[str] = set()
    for position, site, kind in sites:
        finding = site_findings.get(site)
        if finding is None:
            ax.axhline(position, color=SITE_COLOURS.get(kind, "grey"), linestyle=":",
                       alpha=0.6)
            kinds_seen.add(kind)
            continue
        finding_kind, value = finding
        colour = SITE_FINDING_COLOURS.get(finding_kind, "tab:red")
        ax.axhspan(position - 0.22, position + 0.22, color=colour, alpha=0.35, linewidth=0)
        word = SITE_FINDING_WORDS.get(finding_kind, finding_kind)
        ax.text(ceiling * 1.8, position, f"{abbreviate(site)}: {word} {value:.0%}",
                color=colour, fontsize=7, ha="right", va="center", fontweight="bold",
                parse_math=False,
                bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1.0})
        findings_seen.add(finding_kind)
    for kind in sorted(kinds_seen):
        ax.plot([], [], linestyle=":", color=SITE_COLOURS.get(kind, "grey"), label=f"{kind} site")
    for kind in sorted(findings_seen):
        ax.plot([], [], linewidth=6, alpha=0.5, color=SITE_FINDING_COLOURS.get(kind, "tab:red"),
                label=f"{SITE_FINDING_WORDS.get(kind, kind)} activation site (finding)")


def _fit_layout(fig: Figure, ax: Axes, y: np.ndarray, labels: list[str], bad: list[int]) -> None:
    """Matplotlib's tight layout, with a few row labels standing in for all of them.

    The margins depend only on the widest row label and on the first and last rows, so the
    layout is computed with the :data:`LAYOUT_STAND_INS` widest labels (estimated from their
    characters' widths) and the end rows, and the y-axis title is then pinned beside the widest
    one. Every row label is laid out when drawn only, instead of a dozen times in the layout
    (a figure of 100 layers is drawn in about 15 % less time).
    """
    shown = _shown_rows(labels, bad)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    font = FontProperties(size=7)
    glyph = {c: renderer.get_text_width_height_descent(c, font, ismath=False)[0]
             for c in set("".join(labels[i] for i in shown))}
    widest = sorted(shown, key=lambda i: sum(glyph[c] for c in labels[i]))[-LAYOUT_STAND_INS:]
    stand_ins = sorted(set(widest) | {shown[0], shown[-1]}) if shown else []
    ax.set_yticks(y[stand_ins])
    ax.set_yticklabels([labels[i] for i in stand_ins], fontproperties=font, parse_math=False)
    fig.tight_layout()
    box = ax.get_window_extent(renderer)
    left = min([t.get_window_extent(renderer).x0 for t in ax.get_yticklabels()] + [box.x0])
    offset = left - ax.yaxis.labelpad * fig.dpi / 72  # where matplotlib puts the title
    ax.yaxis.set_label_coords((offset - box.x0) / box.width, 0.5)
    _label_rows(ax, y, labels, shown, bad)


def _shown_rows(labels: list[str], bad: list[int]) -> list[int]:
    """The rows that get a label: every row, or every k-th and every flagged one."""
    step = max(1, math.ceil(len(labels) / MAX_LABELLED_ROWS))
    return sorted(set(range(0, len(labels), step)) | set(bad))


def _label_rows(ax: Axes, y: np.ndarray, labels: list[str], shown: list[int],
                bad: list[int]) -> None:
    ax.set_yticks(y[shown])
    ax.set_yticklabels([labels[i] for i in shown], fontsize=7, parse_math=False)  # "$" as is
    for tick, i in zip(ax.get_yticklabels(), shown):
        if i in bad:
            tick.set_color("tab:red")


def _decade_ticks(ax: Axes, floor: float, ceiling: float, nonfinite: bool = False) -> None:
    """Decade ticks from the floor up (at most ~9); the floor's tick reads ``0 / no grad`` and,
    when ``nonfinite``, the ceiling's (the right edge, where inf/NaN markers sit) ``inf / NaN``."""
    first, last = round(math.log10(floor)), round(math.log10(ceiling))
    stride = max(1, math.ceil((last - first) / 8))
    exponents = list(range(first, last + 1, stride))
    if nonfinite and exponents[-1] != last:
        exponents[-1] = last  # the right edge gets its tick
    ax.xaxis.set_major_locator(FixedLocator([10.0**e for e in exponents]))
    ax.xaxis.set_minor_locator(NullLocator())

    def label(value: float, _position: int) -> str:
        if math.isclose(value, floor, rel_tol=1e-9):
            return ZERO_LABEL
        if nonfinite and math.isclose(value, ceiling, rel_tol=1e-9):
            return NONFINITE_LABEL
        return f"1e{round(math.log10(value))}"

    ax.xaxis.set_major_formatter(FuncFormatter(label))


def figure_to_array(fig: Figure) -> np.ndarray:
    """RGB pixels ``(height, width, 3)`` uint8 of a figure."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure_atomically(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` via a temporary file in the same folder and a rename.

    A failed write (a full disk) leaves no truncated file behind: ``path`` keeps its previous
    content, or does not exist. The error is raised after cleaning up.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(handle, "wb") as stream:
            fig.savefig(stream, format="png")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
