"""The graddiag tab: a TensorBoard plugin registered through the ``tensorboard_plugins`` entry point.

Routes under ``/data/plugin/graddiag/``: the page's static files (a fixed list, served from the
package), ``runs`` (runs with graddiag data) and ``run?run=NAME`` (one run's heatmap, activation
sites and findings). Data comes only from ``context.data_provider``; a run name is looked up
among the names the provider lists and never becomes a path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

from tensorboard import context as tb_context
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from graddiag.tensorboard_plugin.reading import graddiag_runs, read_run

log = logging.getLogger("graddiag")

PLUGIN_NAME = "graddiag"
JSON = "application/json"
STATIC_FILES: dict[str, tuple[str, str]] = {  # route: (file under static/, content type)
    "/index.js": ("index.js", "text/javascript"),
    "/util.js": ("util.js", "text/javascript"),
    "/heatmap.js": ("heatmap.js", "text/javascript"),
    "/profile.js": ("profile.js", "text/javascript"),
    "/findings.js": ("findings.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}

WsgiApp = Callable[..., Any]


def _json(request: wrappers.Request, data: Any, code: int = 200) -> wrappers.Response:
    return http_util.Respond(request, json.dumps(data, allow_nan=False), JSON, code=code)


def _static(route: str) -> WsgiApp:
    filename, content_type = STATIC_FILES[route]

    @wrappers.Request.application
    def serve(request: wrappers.Request) -> wrappers.Response:
        body = (resources.files("graddiag.tensorboard_plugin") / "static" / filename).read_bytes()
        return http_util.Respond(request, body, content_type)

    return serve


class GraddiagPlugin(base_plugin.TBPlugin):
    """Per-layer gradient norms over steps, findings and a step's gradient-flow profile.

    Args:
        context: TensorBoard's ``TBContext``; only its ``data_provider`` is used.
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data_provider = context.data_provider

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="graddiag")

    def is_active(self) -> bool:
        """Whether any run holds graddiag data (the tab is listed among the inactive otherwise)."""
        if self._data_provider is None:
            return False
        try:
            return bool(graddiag_runs(self._data_provider, tb_context.RequestContext(), ""))
        except Exception:  # noqa: BLE001 - TensorBoard must keep running whatever the logs hold
            log.warning("graddiag tab: could not list runs", exc_info=True)
            return False

    def get_plugin_apps(self) -> dict[str, WsgiApp]:
        apps: dict[str, WsgiApp] = {route: _static(route) for route in STATIC_FILES}
        apps["/runs"] = wrappers.Request.application(self._serve_runs)
        apps["/run"] = wrappers.Request.application(self._serve_run)
        return apps

    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        if self._data_provider is None:
            return _json(request, {"runs": []})
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        return _json(request, {"runs": graddiag_runs(self._data_provider, ctx, eid)})

    def _serve_run(self, request: wrappers.Request) -> wrappers.Response:
        run = request.args.get("run")
        if not run:
            return _json(request, {"error": "the 'run' query parameter is required"}, 400)
        if self._data_provider is None:
            return _json(request, {"error": "no graddiag data for this run"}, 404)
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        data = read_run(self._data_provider, ctx, eid, run)  # the name only filters the listing
        if data is None:
            return _json(request, {"error": "no graddiag data for this run"}, 404)
        return _json(request, data)


class GraddiagLoader(base_plugin.TBLoader):
    """Loader for ``tensorboard.program.TensorBoard(plugins=[...])`` (the entry point needs none)."""

    def load(self, context: base_plugin.TBContext) -> GraddiagPlugin:
        return GraddiagPlugin(context)
