"""The graddiag tab in a real browser: headless Chromium on a live ``tensorboard --logdir``."""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import FRAME_DOC, FRAME_READY, Chromium, find_chromium, tensorboard_server
from tests.plugin_runs import DEPTH, HOSTILE_LAYER, HOSTILE_RUN, PluginLogs
from tests.tb_entry_point import entry_point_path

pytestmark = pytest.mark.slow

LAYERS = ([f"body.{HOSTILE_LAYER}"] + [f"body.fc{i}" for i in range(1, DEPTH)]
          + ["head", "muted", "unused"])
DOC = "document"  # the page's document; the TensorBoard test swaps in the plugin's iframe


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    binary = find_chromium()
    if binary is None:
        message = ("headless Chromium is needed for the browser tests "
                   "(Debian: apt-get install -y chromium; .ci/run installs it)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def server(plugin_logs: PluginLogs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    extra = entry_point_path(tmp_path_factory.mktemp("entry_points"))
    with tensorboard_server(plugin_logs.root, extra, {HOSTILE_RUN, "healthy"}) as url:
        yield url


@pytest.fixture()
def browser(chromium_binary: str, tmp_path: Path) -> Iterator[Chromium]:
    chrome = Chromium(chromium_binary, tmp_path / "profile")
    yield chrome
    chrome.close()


def _page(chrome: Chromium, server: str, **query: str) -> None:
    chrome.navigate(f"{server}/data/plugin_entry.html?"
                    + urllib.parse.urlencode({"name": "graddiag", **query}))
    chrome.wait_for("document.body && document.body.dataset.ready === '1'")


def _texts(chrome: Chromium, selector: str, what: str = "textContent", doc: str = DOC) -> list:
    return chrome.evaluate(f"[...{doc}.querySelectorAll({json.dumps(selector)})]"
                           f".map(e => e.{what})")


def _attrs(chrome: Chromium, selector: str, name: str, doc: str = DOC) -> list:
    return chrome.evaluate(f"[...{doc}.querySelectorAll({json.dumps(selector)})]"
                           f".map(e => e.getAttribute({json.dumps(name)}))")


def test_tab_renders_the_heatmap_and_findings_of_a_real_run(browser, server, plugin_logs) -> None:  # noqa: ANN001
    _page(browser, server)
    browser.drain()
    assert browser.errors() == []
    assert browser.evaluate("document.body.dataset.error || ''") == ""
    assert browser.evaluate("document.getElementById('graddiag-errors').hidden") is True
    assert browser.evaluate("document.body.dataset.run") == HOSTILE_RUN  # the run with findings
    # one heatmap row per layer, input side first, full names on hover
    assert _attrs(browser, ".hm-row", "title") == LAYERS
    assert browser.evaluate("document.querySelector('.hm').dataset.rows") == str(len(LAYERS))
    marked = [f for f in plugin_logs.callback.findings if f.layer in LAYERS]
    assert browser.evaluate("document.querySelector('.hm').dataset.marks") == str(len(marked))
    # every finding listed with its kind, layer and step; hostile names shown as text
    findings = plugin_logs.callback.findings
    assert _attrs(browser, ".finding", "data-kind") == [f.kind for f in findings]
    assert _texts(browser, ".finding-layer") == [f.layer for f in findings]
    assert _texts(browser, ".finding-step") == [f"step {f.step}" for f in findings]
    assert _texts(browser, ".finding-evidence") == [f.message for f in findings]
    assert _texts(browser, "#graddiag-run option") == [HOSTILE_RUN, "healthy"]
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    assert HOSTILE_LAYER in browser.evaluate("document.body.textContent")


def test_a_finding_or_a_step_shows_that_steps_gradient_flow(browser, server, plugin_logs) -> None:  # noqa: ANN001
    _page(browser, server)
    first = plugin_logs.callback.findings[0]  # the profile opens on the first finding
    assert browser.evaluate("document.querySelector('svg.profile').dataset.step") == str(first.step)
    rows = _attrs(browser, "svg.profile .profile-row", "data-layer")
    assert rows == LAYERS
    specials = dict(browser.evaluate(
        "[...document.querySelectorAll('svg.profile .profile-row .special')]"
        ".map(e => [e.parentNode.dataset.layer, e.textContent])"))
    assert specials == {"unused": "none", "muted": "0"}  # no gradient; an exact zero
    kinds = dict(browser.evaluate(
        "[...document.querySelectorAll('svg.profile .profile-row .finding-kinds')]"
        ".map(e => [e.parentNode.dataset.layer, e.textContent])"))
    # the only finding begun by this step: the exact zero, two steps running, is reported early
    assert (first.kind, first.layer, first.step) == ("vanishing", "muted", 1)
    assert kinds == {"muted": "vanishing"}

    vanishing = next(i for i, f in enumerate(plugin_logs.callback.findings)
                     if f.layer == f"body.{HOSTILE_LAYER}")
    browser.evaluate(f"document.querySelector('.finding[data-index=\"{vanishing}\"]').click()")
    step = plugin_logs.callback.findings[vanishing].step
    assert browser.evaluate("document.querySelector('svg.profile').dataset.step") == str(step)
    flagged = _attrs(browser, "svg.profile .profile-row.flagged", "data-layer")
    assert f"body.{HOSTILE_LAYER}" in flagged and "head" not in flagged
    assert len(_attrs(browser, "svg.profile .site", "data-site")) == DEPTH

    # a real mouse click on the heatmap column of step 3
    box = browser.evaluate("(() => { const b = document.querySelector('.hm-overlay')"
                           ".getBoundingClientRect(); return [b.left, b.top, b.width]; })()")
    columns = int(browser.evaluate("document.querySelector('.hm').dataset.cols"))
    browser.click(box[0] + (3.5 / columns) * box[2], box[1] + 5)
    assert browser.evaluate("document.querySelector('svg.profile').dataset.step") == "3"
    browser.drain()
    assert browser.errors() == []


def test_runs_are_selectable(browser, server) -> None:  # noqa: ANN001
    _page(browser, server)
    browser.evaluate("(() => { const s = document.getElementById('graddiag-run');"
                     "s.value = 'healthy'; s.dispatchEvent(new Event('change')); })()")
    browser.wait_for("document.body.dataset.run === 'healthy'")
    assert _attrs(browser, ".hm-row", "title") == ["0", "2"]
    assert _texts(browser, ".finding") == []
    assert "No findings" in browser.evaluate("document.querySelector('.findings-panel').textContent")


def test_the_tab_is_in_tensorboards_own_page(browser, server) -> None:  # noqa: ANN001
    browser.navigate(server + "/#graddiag")
    browser.wait_for(FRAME_READY, timeout=90)
    doc = FRAME_DOC
    assert _attrs(browser, ".hm-row", "title", doc=doc) == LAYERS
    tabs = browser.evaluate("document.body.innerText.toLowerCase()")
    assert "graddiag" in tabs
    assert browser.evaluate(f"{doc}.body.dataset.error || ''") == ""


def test_a_log_directory_without_graddiag_data_shows_a_note(browser, tmp_path: Path) -> None:  # noqa: ANN001
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs" / "plain"))
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    extra = entry_point_path(tmp_path / "entry_points")
    with tensorboard_server(tmp_path / "logs", extra, set(), expect_data=False) as url:
        _page(browser, url)
        browser.drain()
        assert browser.errors() == []
        assert "No graddiag data in this log directory" in browser.evaluate(
            "document.querySelector('.heatmap-panel').textContent")
        assert _texts(browser, ".hm-row") == [] and _texts(browser, "#graddiag-run option") == []
