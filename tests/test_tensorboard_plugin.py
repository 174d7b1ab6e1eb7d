"""The graddiag tab's HTTP API on real logs, read through TensorBoard's data provider in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins import base_plugin
from torch.utils.tensorboard import SummaryWriter
from werkzeug import test as werkzeug_test
from werkzeug import wrappers

from graddiag import Finding, GradientMonitor
from graddiag.reporters.markdown import findings_markdown
from graddiag.reporters.tensorboard import TensorBoardReporter
from graddiag.tensorboard_plugin import GraddiagPlugin
from tests.plugin_runs import DEPTH, HOSTILE_LAYER, HOSTILE_RUN, STEPS, PluginLogs
from tests.tb_entry_point import declared_entry_points, entry_point_path

BASE = "/data/plugin/graddiag"
EXPECTED_LAYERS = ([f"body.{HOSTILE_LAYER}"] + [f"body.fc{i}" for i in range(1, DEPTH)]
                   + ["head", "muted", "unused"])


def _client(logdir: Path) -> werkzeug_test.Client:
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    plugin = GraddiagPlugin(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    app = application.TensorBoardWSGI([plugin], data_provider=provider)
    return werkzeug_test.Client(app, wrappers.Response)


def _get_json(client: werkzeug_test.Client, path: str, code: int = 200, **query: str) -> Any:
    response = client.get(BASE + path, query_string=query)
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    return json.loads(response.get_data(as_text=True))


@pytest.fixture(scope="module")
def client(plugin_logs: PluginLogs) -> werkzeug_test.Client:
    return _client(plugin_logs.root)


@pytest.fixture(scope="module")
def run_data(client: werkzeug_test.Client) -> dict[str, Any]:
    return _get_json(client, "/run", run=HOSTILE_RUN)


def test_runs_lists_the_runs_with_graddiag_data_by_their_names(client) -> None:  # noqa: ANN001
    runs = _get_json(client, "/runs")["runs"]
    assert [r["run"] for r in runs] == [HOSTILE_RUN, "healthy"]
    assert [r["has_findings"] for r in runs] == [True, False]


def test_heatmap_holds_every_layer_in_forward_order_with_float64_norms(
        run_data, plugin_logs: PluginLogs) -> None:  # noqa: ANN001
    assert run_data["layers"] == EXPECTED_LAYERS  # input side first, never-called layer last
    assert run_data["order_known"] is True
    assert run_data["steps"] == list(range(STEPS))
    reference = plugin_logs.module.reference
    for row, layer in zip(run_data["norms"], run_data["layers"]):
        for step, value in zip(run_data["steps"], row):
            expected = reference[step][layer]
            if expected is None:
                assert value is None, (layer, step)  # no gradient: nothing logged
            elif expected == 0:
                assert value == 0.0, (layer, step)  # exactly zero, kept apart from "none"
            else:
                assert value == pytest.approx(expected, rel=1e-5), (layer, step)
    assert all(v is None for v in run_data["norms"][EXPECTED_LAYERS.index("unused")])
    assert all(v == 0.0 for v in run_data["norms"][EXPECTED_LAYERS.index("muted")])


def test_findings_carry_kind_layer_step_evidence_and_remedy(run_data, plugin_logs) -> None:  # noqa: ANN001
    got = [(f["kind"], f["layer"], f["step"], f["message"], f["remedy"])
           for f in run_data["findings"]]
    assert got == [(f.kind, f.layer, f.step, f.message, f.remedy)
                   for f in plugin_logs.callback.findings]
    kinds = {(f["kind"], f["layer"]) for f in run_data["findings"]}
    assert {("vanishing", f"body.{HOSTILE_LAYER}"), ("no_gradient", "unused"),
            ("vanishing", "muted")} <= kinds


def test_activation_sites_sit_between_the_layers_they_follow(run_data) -> None:  # noqa: ANN001
    sites = {s["site"]: s for s in run_data["sites"]}
    assert set(sites) == {f"body.act{i}" for i in range(DEPTH)}
    for i in range(DEPTH):  # act_i follows layer i (row i) and precedes row i + 1
        site = sites[f"body.act{i}"]
        assert site["x"] == i + 0.5
        assert (site["kind"], site["statistic"]) == ("sigmoid", "saturated")
        assert site["steps"] == [0, 1, 2, 3, 4, 8]  # steps 0-4 (early_steps), then every 4th
        assert all(0.0 <= v <= 1.0 for v in site["values"])


@pytest.mark.parametrize("run", ["../../etc", "../outside", "..", "/etc/passwd", ".",
                                 f"{HOSTILE_RUN}/../../outside", "healthy/..", "%2e%2e/outside"])
def test_run_parameters_never_become_paths(client, plugin_logs, run: str) -> None:  # noqa: ANN001
    # the run outside the log directory does hold graddiag data; it is just not reachable
    assert [r["run"] for r in _get_json(_client(plugin_logs.outside), "/runs")["runs"]] == ["."]
    body = _get_json(client, "/run", code=404, run=run)
    assert body == {"error": "no graddiag data for this run"}


def test_missing_run_parameter_is_a_json_400(client) -> None:  # noqa: ANN001
    assert "required" in _get_json(client, "/run", code=400)["error"]


def test_hostile_names_travel_as_json_strings(client) -> None:  # noqa: ANN001
    response = client.get(BASE + "/run", query_string={"run": HOSTILE_RUN})
    data = json.loads(response.get_data(as_text=True))
    assert data["run"] == HOSTILE_RUN and data["layers"][0] == f"body.{HOSTILE_LAYER}"
    assert response.headers["Content-Type"] == "application/json"


def test_static_files_are_a_fixed_list_with_their_types(client) -> None:  # noqa: ANN001
    for path, kind in [("/index.js", "text/javascript"), ("/heatmap.js", "text/javascript"),
                       ("/style.css", "text/css")]:
        response = client.get(BASE + path)
        assert response.status_code == 200 and response.headers["Content-Type"].startswith(kind)
    js = b"".join(client.get(BASE + f).get_data() for f in
                  ["/index.js", "/heatmap.js", "/profile.js", "/findings.js", "/util.js"])
    assert b"innerHTML" not in js and b"insertAdjacentHTML" not in js and b"eval(" not in js
    outside = js.replace(b'"http://www.w3.org/2000/svg"', b"")  # a namespace, not a resource
    assert b"http://" not in outside and b"https://" not in outside and b"//cdn" not in outside
    for path in ["/plugin.py", "/static/index.js", "/../plugin.py", "/static/../plugin.py"]:
        assert client.get(BASE + path).status_code == 404


def test_listing_shows_the_tab_only_with_graddiag_data(client, tmp_path: Path) -> None:  # noqa: ANN001
    listing = json.loads(client.get("/data/plugins_listing").get_data(as_text=True))["graddiag"]
    assert listing["enabled"] is True
    assert listing["loading_mechanism"] == {"type": "IFRAME",
                                            "module_path": f"{BASE}/index.js"}
    writer = SummaryWriter(str(tmp_path / "other"))
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    empty = _client(tmp_path)
    assert json.loads(empty.get("/data/plugins_listing").get_data())["graddiag"]["enabled"] is False
    assert _get_json(empty, "/runs") == {"runs": []}
    assert _get_json(empty, "/run", code=404, run="other")["error"]


def test_logs_without_records_fall_back_to_names_and_the_markdown_table(tmp_path: Path) -> None:
    finding = Finding(kind="exploding", layer="b.10", step=2, value=3e5, threshold=1e4,
                      message="norm | 3e5", remedy="clip")
    writer = SummaryWriter(str(tmp_path / "old"))
    for step in range(3):
        for layer in ["b.10", "b.2", "b.1"]:
            writer.add_scalar(f"graddiag/grad_norm/{layer}", 1.0 + step, step)
    writer.add_text("graddiag/findings", findings_markdown([finding]), 2)
    writer.close()
    data = _get_json(_client(tmp_path), "/run", run="old")
    assert data["layers"] == ["b.1", "b.2", "b.10"] and data["order_known"] is False
    assert data["norms"] == [[1.0, 2.0, 3.0]] * 3
    assert [(f["kind"], f["layer"], f["step"], f["message"], f["remedy"], f["value"])
            for f in data["findings"]] == [("exploding", "b.10", 2, "norm | 3e5", "clip", 3e5)]


def test_all_values_of_a_step_in_one_event_under_another_prefix(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "batched"))
    for step, values in enumerate([(0.5, float("nan")), (0.25, float("inf"))]):
        summary = Summary(value=[Summary.Value(tag=f"gd/grad_norm/{name}", simple_value=v)
                                 for name, v in zip(["x", "y"], values)])
        writer._get_file_writer().add_summary(summary, step)  # one event carries the step
    writer.add_text("gd/layers_json", json.dumps({"layers": ["y", "x"], "sites": "garbage"}), 0)
    writer.add_text("gd/findings_json", "{not json", 0)
    writer.close()
    data = _get_json(_client(tmp_path), "/run", run="batched")
    assert data["prefix"] == "gd/" and data["layers"] == ["y", "x"]
    assert data["norms"] == [["nan", "inf"], [0.5, 0.25]]
    assert data["findings"] == [] and data["sites"] == []


def test_reporter_writes_the_layer_record_on_change_and_findings_on_onsets(digits) -> None:  # noqa: ANN001
    calls: list[tuple[str, int]] = []

    class Writer:
        def add_text(self, tag: str, text: str, step: int) -> None:
            calls.append((tag, step))

        def __getattr__(self, name: str):  # noqa: ANN204 - every other writer method
            return lambda *a, **k: None

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(64, 64),
                                                                 torch.nn.Sigmoid())],
                                torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits
    with GradientMonitor(model, reporters=[TensorBoardReporter(Writer(), save_png=False,
                                                               figure_every_n_steps=0)],
                         activation_every_n_steps=5) as monitor:
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(model(x[:64]), y[:64])
            opt.zero_grad()
            loss.backward()
            monitor.step()
            opt.step()
    layer_records = [s for tag, s in calls if tag == "graddiag/layers_json"]
    assert layer_records and len(layer_records) <= 2  # not once per step
    onsets = sorted({f.step for f in monitor.findings})
    assert onsets and [s for tag, s in calls if tag == "graddiag/findings_json"] == onsets


def test_entry_point_is_declared_and_found_by_tensorboard(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    assert declared_entry_points() == {
        "graddiag": "graddiag.tensorboard_plugin.plugin:GraddiagPlugin"}
    for path in entry_point_path(tmp_path):
        monkeypatch.syspath_prepend(path)
    from tensorboard import default

    assert GraddiagPlugin in default.get_dynamic_plugins()
