"""The gradient-flow figure (axes and pixels) and the Markdown of TensorBoard's Text tab, as
TensorBoard renders it."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from matplotlib.lines import Line2D
from PIL import Image
from tensorboard.plugin_util import markdown_to_safe_html
from torch import nn

from graddiag import Finding, GradientMonitor
from graddiag.reporters import figures
from graddiag.reporters.figures import (
    NONFINITE_LABEL,
    ZERO_LABEL,
    FlowRows,
    figure_to_array,
    flow_profile,
    gradient_flow_figure,
)
from graddiag.reporters.labels import MAX_LABEL, abbreviate, abbreviate_all
from graddiag.reporters.markdown import findings_markdown, parse_findings_markdown, summary_markdown
from graddiag.reporters.summary import summarize

HF_PARTS = ["attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "intermediate.dense", "output.dense"]


def _bert_names(blocks: int) -> list[str]:
    names = ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"]
    names += [f"bert.encoder.layer.{i}.{part}" for i in range(blocks) for part in HF_PARTS]
    return names + ["bert.pooler.dense", "classifier"]


def _line(ax, label: str) -> Line2D:  # noqa: ANN001
    lines = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(lines) == 1, [line.get_label() for line in ax.get_lines()]
    return lines[0]


def test_zero_missing_and_nonfinite_gradients_are_drawn_as_such() -> None:
    layers = ["a", "b", "c", "d", "e"]
    inf = float("inf")
    rows = [np.array([1e-3, 0.0, np.nan, 2.0, 1e-6]), np.array([2e-3, 0.0, np.nan, inf, 3e-6]),
            np.array([4e-3, 0.0, np.nan, 4.0, 2e-6])]
    has = [np.array([True, True, False, True, True])] * 3
    fig = gradient_flow_figure(layers, flow_profile(rows, has), flagged={"b"})
    ax = fig.axes[0]
    floor = 1e-7  # one decade below the smallest positive norm, 1e-6
    zero = _line(ax, "median exactly 0 (on the floor)")
    assert list(zero.get_xdata()) == [pytest.approx(floor)] and list(zero.get_ydata()) == [1]
    missing = _line(ax, "no gradient (on the floor)")
    assert list(missing.get_xdata()) == [pytest.approx(floor)] and list(missing.get_ydata()) == [2]
    nonfinite = _line(ax, "inf/NaN gradient (right edge)")
    assert list(nonfinite.get_ydata()) == [3] and nonfinite.get_xdata()[0] > 4.0
    median = _line(ax, "median")
    x = np.asarray(median.get_xdata(), dtype=float)
    assert x[0] == pytest.approx(2e-3) and x[1] == pytest.approx(floor)
    assert math.isnan(x[2])  # no gradient: no median point, only the marker
    assert x[3] == pytest.approx(3.0)  # the median of the finite values 2 and 4
    labels = {t.get_text(): t.get_position()[0] for t in ax.get_xticklabels()}
    assert labels[ZERO_LABEL] == pytest.approx(floor)
    # the inf/NaN marker sits on the right edge, labelled as such (not as a norm of 1e2):
    # one decade above the largest finite norm, 4.0
    assert labels[NONFINITE_LABEL] == pytest.approx(100.0) == nonfinite.get_xdata()[0]
    assert ax.get_xscale() == "log"
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the input side (layer 0) at the top
    red = [t.get_text() for t in ax.get_yticklabels() if t.get_color() == "tab:red"]
    assert red == ["b"]


def test_dead_and_saturated_sites_are_marked_in_the_picture() -> None:
    layers = ["net.0", "net.2", "net.4", "net.6"]
    profile = flow_profile([np.array([1e-2, 1e-2, 1e-1, 1.0])], [np.ones(4, bool)])
    sites = [(0.5, "net.1", "relu"), (1.5, "net.3", "relu"), (2.5, "net.5", "sigmoid")]
    fig = gradient_flow_figure(layers, profile, sites=sites,
                               site_findings={"net.3": ("dead_relu", 0.84),
                                              "net.5": ("saturated", 0.6)})
    ax = fig.axes[0]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["net.3: dead 84%", "net.5: saturated 60%"]
    bands = {round((p.get_extents().y0 + p.get_extents().y1) / 2) for p in ax.patches}
    pixels = figure_to_array(fig)
    height = pixels.shape[0]
    # the dead site's band, tab:orange at 35 % over white, sits where y = 1.5 is drawn
    _, y_pixel = ax.transData.transform((1.0, 1.5))
    row = pixels[height - int(round(y_pixel))]
    orange = np.abs(row.astype(int) - np.array([255, 210, 173])).sum(axis=1) < 30
    assert orange.sum() > 100, bands
    # the site without a finding is only a dotted line: no band at y = 0.5
    _, y_plain = ax.transData.transform((1.0, 0.5))
    plain = pixels[height - int(round(y_plain))]
    assert (np.abs(plain.astype(int) - np.array([255, 210, 173])).sum(axis=1) < 30).sum() == 0


def test_long_hugging_face_names_are_abbreviated_distinct_and_the_plot_keeps_its_size() -> None:
    names = _bert_names(12)
    labels = abbreviate_all(names)
    assert len(set(labels)) == len(names)
    assert max(len(label) for label in labels) <= MAX_LABEL
    assert abbreviate("bert.encoder.layer.10.attention.output.dense") == "b.e.l.10.a.output.dense"
    assert abbreviate("net.0") == "net.0"
    rng = np.random.default_rng(0)
    profile = flow_profile([10 ** rng.uniform(-8, 0, len(names))], [np.ones(len(names), bool)])
    fig = gradient_flow_figure(names, profile)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert shown == labels  # every layer labelled, input side first
    small = gradient_flow_figure(names[:8], flow_profile([np.ones(8)], [np.ones(8, bool)]))
    assert fig.get_size_inches()[1] > 2.5 * small.get_size_inches()[1]  # grows with the layers
    box = ax.get_position()  # the axes keep most of the figure: no thin strip
    assert box.height > 0.8 and box.width > 0.45
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert Image.open(io.BytesIO(png.getvalue())).size[1] == round(fig.get_size_inches()[1] * fig.dpi)


def test_sibling_layers_are_abbreviated_alike() -> None:
    """Layers of one parent module get the same abbreviated parent path, even where one
    sibling's name would fit with less cut (``self.key`` is shorter than ``self.query``)."""
    prefix = "bert.bert.encoder.layer.0.attention.self."
    names = [prefix + "query", prefix + "key", prefix + "value",
             "bert.bert.encoder.layer.0.attention.output.dense", "classifier"]
    assert abbreviate(prefix + "key") == "b.b.e.l.0.attention.self.key"  # 28 characters: fits
    assert abbreviate_all(names) == ["b.b.e.l.0.a.self.query", "b.b.e.l.0.a.self.key",
                                     "b.b.e.l.0.a.self.value", "b.b.e.l.0.a.output.dense",
                                     "classifier"]
    labels = abbreviate_all(_bert_names(12))
    parents: dict[str, set[str]] = {}
    for name, label in zip(_bert_names(12), labels):
        parents.setdefault(name.rpartition(".")[0], set()).add(label.rpartition(".")[0])
    assert all(len(prefixes) == 1 for prefixes in parents.values())


def _tight_layout_over_every_label(fig, ax, y, labels, bad) -> None:  # noqa: ANN001
    figures._label_rows(ax, y, labels, figures._shown_rows(labels, bad), bad)
    fig.tight_layout()


@pytest.mark.parametrize("blocks", [1, 12, 40])
def test_the_layout_is_matplotlibs_tight_layout_over_every_row_label(
        blocks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    names = _bert_names(blocks)
    names[6] = "bert.encoder.layer.0.WWWWWWWW"  # short, but wide glyphs (a labelled row)
    rng = np.random.default_rng(1)
    profile = flow_profile([10 ** rng.uniform(-8, 0, len(names))], [np.ones(len(names), bool)])
    fig = gradient_flow_figure(names, profile, flagged={names[3]})
    ax = fig.axes[0]
    placed = ax.get_position().bounds
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]
    title = ax.yaxis.label.get_window_extent(renderer)
    every = math.ceil(len(names) / 120)  # at most 120 rows labelled, and the flagged one
    assert len(ticks) == len(set(range(0, len(names), every)) | {3})
    assert abbreviate(names[6]) in [t.get_text() for t in ax.get_yticklabels()]
    assert min(b.x0 for b in ticks) >= 0  # no row label cut off at the left edge
    assert title.x0 >= 0 and title.x1 <= min(b.x0 for b in ticks)  # beside them, not over them
    # the reference: matplotlib's tight layout over every row label, the title placed by it
    monkeypatch.setattr(figures, "_fit_layout", _tight_layout_over_every_label)
    reference = gradient_flow_figure(names, profile, flagged={names[3]})
    width, height = fig.bbox.width, fig.bbox.height
    wanted = reference.axes[0].get_position().bounds
    for got, want, pixels in zip(placed, wanted, (width, height, width, height)):
        assert abs(got - want) * pixels <= 2
    reference.canvas.draw()
    assert reference.axes[0].yaxis.label.get_window_extent().x1 == pytest.approx(title.x1, abs=2)


def _finding(kind: str, layer: str, step: int, message: str, remedy: str = "do x") -> Finding:
    return Finding(kind=kind, layer=layer, step=step, value=1.5e-9, threshold=1e-4,
                   message=message, remedy=remedy)


HOSTILE = "a | b * c _d_ `e` [f](g) <script>x</script> --> # h"


def test_findings_text_renders_as_blocks_not_a_wide_table_and_reads_back_exactly() -> None:
    findings = [_finding("vanishing", "bert.encoder.layer.0.attention.self.query", 9,
                         "Vanishing gradient: norm 1.58e-09 is tiny."),
                _finding("dead_relu", "net.3", 30, HOSTILE, remedy=HOSTILE)]
    text = findings_markdown(findings)
    html = markdown_to_safe_html(text)
    tables = html.count("<table>")
    assert tables == 1 and len(re.findall(r"<th[\s>]", html)) == 4  # index: #, kind, layer, step
    assert html.count("<h4>") == 2
    assert "<script>" not in html and "graddiag-finding" not in html
    assert "Vanishing gradient: norm 1.58e-09 is tiny." in html
    assert "<em>" not in html and "<a " not in html  # markup in messages stays literal
    table = parse_findings_markdown(text)
    assert list(table.kind) == ["vanishing", "dead_relu"]
    assert list(table.layer) == [f.layer for f in findings]
    assert list(table.step) == [9, 30]
    assert list(table.evidence) == [f.message for f in findings]
    assert list(table.remedy) == [f.remedy for f in findings]
    assert list(table.value) == [1.5e-9, 1.5e-9]


def test_older_findings_tables_still_read_back() -> None:
    legacy = ("| kind | layer | step | value | threshold | evidence | remedy |\n"
              "|---|---|---|---|---|---|---|\n"
              "| vanishing | net.0 | 9 | 1.58e-09 | 0.0001 | tiny \\| norm | relu |")
    table = parse_findings_markdown(legacy)
    assert table.to_dict("records") == [{"kind": "vanishing", "layer": "net.0", "step": 9,
                                         "value": 1.58e-09, "threshold": 1e-4,
                                         "evidence": "tiny | norm", "remedy": "relu"}]


def test_summary_text_has_short_columns_and_activation_sites_apart() -> None:
    import pandas as pd

    history = pd.DataFrame({"step": [0, 0, 1, 1], "layer": ["net.0", "net.2"] * 2,
                            "position": [0, 1, 0, 1], "grad_norm": [1e-9, 0.5, 2e-9, 0.7]})
    findings = [_finding("vanishing", "net.0", 1, "m"), _finding("dead_relu", "net.1", 1, "m")]
    summary = summarize(history, findings)
    assert list(summary.activation_site) == [False, False, True]
    assert summary.nan_steps.tolist() == [0, 0, 0] and str(summary.nan_steps.dtype) == "int64"
    html = markdown_to_safe_html(summary_markdown(summary, skipped_steps=3))
    assert html.count("<table>") == 2
    first, second = html.split("</table>")[:2]
    assert len(re.findall(r"<th[\s>]", first)) == 5 and "net.1" not in first and "nan" not in html
    assert "<code>net.1</code>" in second and "dead_relu @ 1" in second
    assert "3 optimizer step(s) skipped" in html


def test_summary_finding_steps_are_integers_and_missing_where_a_layer_has_none() -> None:
    import pandas as pd

    history = pd.DataFrame({"step": [0, 0, 1, 1], "layer": ["net.0", "net.2"] * 2,
                            "position": [0, 1, 0, 1], "grad_norm": [1e-9, 0.5, 2e-9, 0.7]})
    findings = [_finding("vanishing", "net.0", 7, "m"), _finding("exploding", "net.0", 12, "m")]
    summary = summarize(history, findings).set_index("layer")
    for column in ("first_finding_step", "last_finding_step"):
        assert str(summary[column].dtype) == "Int64", column
        assert pd.isna(summary.loc["net.2", column]), column
    assert (summary.loc["net.0", "first_finding_step"], summary.loc["net.0", "last_finding_step"]
            ) == (7, 12)
    assert (summary.loc["net.0", "first_finding"], summary.loc["net.0", "last_finding"]) == (
        "vanishing", "exploding")


def test_summary_keeps_inf_norms_and_ignores_steps_without_a_gradient() -> None:
    """A layer whose norm was inf on every step (beyond float32's range) reads inf, not NaN; a
    step without a gradient (NaN) is left out."""
    import pandas as pd

    inf, nan = float("inf"), float("nan")
    history = pd.DataFrame({"step": [0, 0, 1, 1, 2, 2], "layer": ["a", "b"] * 3,
                            "position": [0, 1] * 3, "grad_norm": [inf, 0.5, inf, nan, inf, 0.25]})
    summary = summarize(history, []).set_index("layer")
    assert summary.loc["a", ["grad_norm_median", "grad_norm_min", "grad_norm_max"]].tolist() == [
        inf, inf, inf]
    assert summary.loc["b", ["grad_norm_median", "grad_norm_min", "grad_norm_max"]].tolist() == [
        0.375, 0.25, 0.5]


def test_summary_tells_nan_gradients_from_no_gradient() -> None:
    """A layer whose gradient is NaN on every step reads ``NaN`` in the console and the text
    tab, one that never gets a gradient ``no grad``; ``nan_steps`` counts the former."""
    from graddiag.reporters.console import summary_screen
    from graddiag.reporters.markdown import summary_markdown

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    with GradientMonitor(model, reporters=[], replay_nonfinite=False) as monitor:
        for _ in range(4):
            for param in model[0].parameters():
                param.grad = torch.full_like(param, float("nan"))
            for param in model[1].parameters():
                param.grad = None
            for param in model[2].parameters():
                param.grad = torch.full_like(param, 0.5)
            monitor.step()
    summary = monitor.summary().set_index("layer")
    assert summary.loc[["0", "1", "2"], "nan_steps"].tolist() == [4, 0, 0]
    assert summary.loc["2", "grad_norm_median"] == pytest.approx(0.5 * math.sqrt(6))
    table = monitor.summary()
    for text in (summary_screen(table, monitor.findings), summary_markdown(table)):
        rows = {line.strip().lstrip("|").split()[0].strip("`"): line
                for line in text.splitlines()
                if line.strip().startswith(("0 ", "1 ", "2 ", "| `0`", "| `1`", "| `2`"))}
        assert "NaN" in rows["0"] and "no grad" not in rows["0"], text
        assert "no grad" in rows["1"] and "NaN" not in rows["1"], text
        assert "1.22" in rows["2"], text


def test_interval_rows_keep_exact_extremes_and_a_bounded_evenly_spaced_sample() -> None:
    rng = np.random.default_rng(3)
    rows = [10 ** rng.uniform(-6, 0, 4) for _ in range(1000)]
    has = [np.ones(4, bool) for _ in rows]
    rows[5][1], rows[700][2], rows[900][3] = np.inf, np.nan, 0.0
    has[5] = np.array([True, True, True, False])  # layer 3 missing on one step
    for step in range(1000):  # layer 0 never gets a gradient
        has[step] = has[step].copy()
        has[step][0] = False
    interval = FlowRows(capacity=64)
    for norm, got in zip(rows, has):
        interval.append(norm, got)
    assert len(interval) == 1000
    got_profile, every = interval.profile(), flow_profile(rows, has)
    np.testing.assert_array_equal(got_profile.low, every.low)  # over all 1,000 steps
    np.testing.assert_array_equal(got_profile.high, every.high)
    np.testing.assert_array_equal(got_profile.no_grad, [True, False, False, False])
    np.testing.assert_array_equal(got_profile.nonfinite_steps, [0, 1, 1, 0])
    # the median: over every 16th step (1,000 steps into at most 64: stride 16, 63 steps)
    sample = flow_profile(rows[::16], has[::16])
    np.testing.assert_array_equal(got_profile.median, sample.median)
    assert len(interval._sample) == len(range(0, 1000, 16)) <= 64
    few = FlowRows(capacity=64)
    for norm, got in zip(rows[:50], has[:50]):
        few.append(norm, got)
    np.testing.assert_array_equal(few.profile().median, flow_profile(rows[:50], has[:50]).median)
    # steps from before the first appended (a resumed run's history) count in full
    later = FlowRows(capacity=64)
    for norm, got in zip(rows[500:], has[500:]):
        later.append(norm, got)
    resumed, together = later.profile(list(zip(rows[:500], has[:500]))), flow_profile(rows, has)
    np.testing.assert_array_equal(resumed.low, together.low)
    np.testing.assert_array_equal(resumed.high, together.high)
    np.testing.assert_array_equal(resumed.nonfinite_steps, together.nonfinite_steps)


def test_a_dollar_in_a_layer_or_site_name_is_drawn_as_written() -> None:
    fig = gradient_flow_figure(["net.$a$", "head"], flow_profile([np.ones(2)], [np.ones(2, bool)]),
                               sites=[(0.5, "act.$b$", "relu")],
                               site_findings={"act.$b$": ("dead_relu", 0.9)})
    ax = fig.axes[0]
    ticks = ax.get_yticklabels()
    assert [t.get_text() for t in ticks] == ["net.$a$", "head"]
    bands = [t for t in ax.texts if t.get_text().startswith("act.")]
    assert [t.get_text() for t in bands] == ["act.$b$: dead 90%"]
    assert not any(t.get_parse_math() for t in [*ticks, *bands])  # dollars shown, no math text


def test_a_flagged_layer_with_only_nonfinite_gradients_is_ringed_at_the_right_edge() -> None:
    rows = [np.array([1e-3, np.nan]), np.array([2e-3, np.inf])]
    fig = gradient_flow_figure(["a", "b"], flow_profile(rows, [np.ones(2, bool)] * 2),
                               flagged={"b"})
    ring = _line(fig.axes[0], "flagged layer")
    assert list(ring.get_ydata()) == [1] and ring.get_xdata()[0] == pytest.approx(0.1)
    plain = gradient_flow_figure(["a"], flow_profile([np.array([1e-3])], [np.ones(1, bool)]))
    assert NONFINITE_LABEL not in [t.get_text() for t in plain.axes[0].get_xticklabels()]
