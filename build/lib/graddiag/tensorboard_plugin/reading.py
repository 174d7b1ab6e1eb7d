"""What the graddiag tab shows, read through TensorBoard's data provider only (never files).

Every function takes the provider, the request context and the experiment id that TensorBoard
hands to the plugin, and returns plain JSON-ready data. Run names are only ever compared with
the names the provider lists; they never reach a file system call.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from tensorboard.data import provider as tb_provider

from graddiag.reporters.plugin_data import FINDINGS_TAG, LAYERS_TAG, json_number
from graddiag.tensorboard_plugin.tags import MARKDOWN_FINDINGS, RunTags, run_tags

log = logging.getLogger("graddiag")

SCALARS_PLUGIN = "scalars"
TEXT_PLUGIN = "text"
MAX_STEPS = 5000  # columns of the heatmap; TensorBoard keeps 1,000 scalars per tag by default
TEXT_SAMPLES = 100


def _listing(data_provider: Any, ctx: Any, experiment_id: str,
             runs: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    flt = tb_provider.RunTagFilter(runs=runs) if runs is not None else None
    scalars = data_provider.list_scalars(ctx, experiment_id=experiment_id,
                                         plugin_name=SCALARS_PLUGIN, run_tag_filter=flt)
    texts = data_provider.list_tensors(ctx, experiment_id=experiment_id,
                                       plugin_name=TEXT_PLUGIN, run_tag_filter=flt)
    return scalars or {}, texts or {}


def graddiag_runs(data_provider: Any, ctx: Any, experiment_id: str) -> list[dict[str, Any]]:
    """Runs that hold graddiag data: ``[{"run", "layers", "has_findings"}]`` sorted by name."""
    scalars, texts = _listing(data_provider, ctx, experiment_id)
    out = []
    for run in sorted(set(scalars) | set(texts)):
        tags = run_tags(scalars.get(run, {}), texts.get(run, {}))
        if not tags.empty:
            out.append({"run": run, "layers": len(tags.grad_norm),
                        "has_findings": FINDINGS_TAG in tags.texts
                        or MARKDOWN_FINDINGS in tags.texts})
    return out


def _latest_text(data_provider: Any, ctx: Any, experiment_id: str, run: str,
                 tag: str) -> str | None:
    data = data_provider.read_tensors(
        ctx, experiment_id=experiment_id, plugin_name=TEXT_PLUGIN, downsample=TEXT_SAMPLES,
        run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=[tag]))
    series = (data or {}).get(run, {}).get(tag) or []
    if not series:
        return None
    values = series[-1].numpy.reshape(-1)
    if not values.size:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _json_record(text: str | None) -> dict[str, Any] | None:
    """A JSON object from a text record (a Markdown code fence around it is tolerated)."""
    if not text:
        return None
    start, end = text.find("{"), text.rfind("}")
    try:
        data = json.loads(text[start:end + 1]) if start >= 0 else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _findings(data_provider: Any, ctx: Any, experiment_id: str, run: str,
              tags: RunTags) -> list[dict[str, Any]]:
    if FINDINGS_TAG in tags.texts:
        record = _json_record(_latest_text(data_provider, ctx, experiment_id, run,
                                           tags.texts[FINDINGS_TAG]))
        rows = record.get("findings") if record else None
        if isinstance(rows, list):
            return [_finding(r) for r in rows if isinstance(r, dict)]
    if MARKDOWN_FINDINGS in tags.texts:  # logs written before findings_json existed
        text = _latest_text(data_provider, ctx, experiment_id, run, tags.texts[MARKDOWN_FINDINGS])
        try:
            from graddiag.reporters.markdown import parse_findings_markdown

            table = parse_findings_markdown(text or "")
        except Exception:  # noqa: BLE001 - an unreadable table means no findings shown
            log.warning("graddiag tab: the findings table of run %r could not be read", run)
            return []
        return [_finding(row) for row in table.rename(columns={"evidence": "message"})
                .to_dict("records")]
    return []


def _finding(row: dict[str, Any]) -> dict[str, Any]:
    def number(value: Any) -> float | str | None:
        try:
            return json_number(float(value))
        except (TypeError, ValueError):
            return None

    step = number(row.get("step"))
    return {"kind": str(row.get("kind", "")), "layer": str(row.get("layer", "")),
            "step": int(step) if isinstance(step, float) else None,
            "value": number(row.get("value")), "threshold": number(row.get("threshold")),
            "message": str(row.get("message", "")), "remedy": str(row.get("remedy", ""))}


def _series(data_provider: Any, ctx: Any, experiment_id: str, run: str,
            wanted: list[str]) -> dict[str, list[Any]]:
    if not wanted:
        return {}
    data = data_provider.read_scalars(
        ctx, experiment_id=experiment_id, plugin_name=SCALARS_PLUGIN, downsample=MAX_STEPS,
        run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=wanted))
    return (data or {}).get(run, {})


def _layer_order(record: dict[str, Any] | None, tags: RunTags) -> tuple[list[str], bool]:
    """Layers in forward order and whether that order is graddiag's own (else sorted by name)."""
    recorded = record.get("layers") if record else None
    if isinstance(recorded, list):
        layers = [str(n) for n in recorded]
        extra = sorted(set(tags.grad_norm) - set(layers))
        return layers + extra, True
    return sorted(tags.grad_norm, key=_natural_key), False


def _natural_key(name: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def read_run(data_provider: Any, ctx: Any, experiment_id: str, run: str) -> dict[str, Any] | None:
    """Everything the tab shows for ``run``, or ``None`` if the run has no graddiag data.

    Returns:
        ``layers`` (forward order, input side first), ``steps`` (logged steps),
        ``norms[layer][step]`` (a gradient norm; ``None``: no value logged for that layer at
        that step, i.e. no gradient; ``"nan"``/``"inf"``: non-finite), ``sites`` (activation
        sites with position ``x`` among the layers and their saturated/dead fraction over
        steps), ``findings`` and ``order_known``.
    """
    scalars, texts = _listing(data_provider, ctx, experiment_id, runs=[run])
    if run not in scalars and run not in texts:
        return None
    tags = run_tags(scalars.get(run, {}), texts.get(run, {}))
    if tags.empty:
        return None
    record = None
    if LAYERS_TAG in tags.texts:
        record = _json_record(_latest_text(data_provider, ctx, experiment_id, run,
                                           tags.texts[LAYERS_TAG]))
    layers, order_known = _layer_order(record, tags)
    series = _series(data_provider, ctx, experiment_id, run,
                     list(tags.grad_norm.values()) + list(tags.fractions.values()))
    by_layer = {layer: {d.step: json_number(d.value) for d in series.get(tag, [])}
                for layer, tag in tags.grad_norm.items()}
    steps = sorted({step for values in by_layer.values() for step in values})
    norms = [[by_layer.get(layer, {}).get(step) for step in steps] for layer in layers]
    return {
        "run": run, "prefix": tags.prefix, "layers": layers, "order_known": order_known,
        "steps": steps, "norms": norms,
        "sites": _sites(record, tags, series),
        "findings": _findings(data_provider, ctx, experiment_id, run, tags),
    }


def _sites(record: dict[str, Any] | None, tags: RunTags,
           series: dict[str, list[Any]]) -> list[dict[str, Any]]:
    listed = record.get("sites") if record else None
    sites = [s for s in listed if isinstance(s, dict)] if isinstance(listed, list) else []
    known = {str(s.get("site")) for s in sites}
    sites += [{"site": name, "x": None, "kind": "", "family": ""}
              for name in sorted(set(tags.fractions) - known)]
    out = []
    for site in sites:
        name = str(site.get("site", ""))
        x = site.get("x")
        tag = tags.fractions.get(name)
        data = series.get(tag, []) if tag else []
        out.append({
            "site": name, "kind": str(site.get("kind", "")), "family": str(site.get("family", "")),
            "x": float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None,
            "statistic": tag[len(tags.prefix):].split("/", 1)[0] if tag else None,
            "steps": [d.step for d in data], "values": [json_number(d.value) for d in data],
        })
    return out
