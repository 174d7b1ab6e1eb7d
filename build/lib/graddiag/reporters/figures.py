"""The gradient-flow figure: layers in forward order, gradient norm on a log axis.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, thread-safe).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SITE_COLOURS = {"sigmoid": "tab:purple", "tanh": "tab:blue", "relu": "tab:green"}


def gradient_flow_figure(
    layers: Sequence[str],
    median: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    *,
    flagged: set[str] = frozenset(),  # type: ignore[assignment]
    sites: Sequence[tuple[float, str, str]] = (),
    title: str = "Gradient flow",
) -> Figure:
    """Median gradient norm per layer with a min-max band; flagged layers in red.

    Args:
        layers: Layer names in forward order (input side left, loss side right).
        median, low, high: Per-layer statistics over the interval shown.
        flagged: Layers with a finding; drawn as red points and red tick labels.
        sites: ``(x, site, kind)`` activation sites, drawn as dotted vertical lines.
    """
    fig = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(layers))
    positive = lambda v: np.where(np.asarray(v) > 0, v, np.nan)  # noqa: E731 - log axis
    ax.fill_between(x, positive(low), positive(high), color="tab:blue", alpha=0.2,
                    label="min-max over interval")
    ax.plot(x, positive(median), "-o", color="tab:blue", markersize=4, label="median")
    bad = [i for i, name in enumerate(layers) if name in flagged]
    if bad:
        ax.plot(x[bad], positive(np.asarray(median)[bad]), "o", color="tab:red", markersize=8,
                label="flagged")
    for position, _site, kind in sites:
        ax.axvline(position, color=SITE_COLOURS.get(kind, "grey"), linestyle=":", alpha=0.6)
    kinds = sorted({kind for _, _, kind in sites})
    for kind in kinds:
        ax.plot([], [], linestyle=":", color=SITE_COLOURS.get(kind, "grey"), label=f"{kind} site")
    if np.isfinite(positive(median)).any():
        ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    for i in bad:
        ax.get_xticklabels()[i].set_color("tab:red")
    ax.set_xlabel("layer (forward order: input -> loss)")
    ax.set_ylabel("gradient norm")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """RGB pixels ``(height, width, 3)`` uint8 of a figure."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
