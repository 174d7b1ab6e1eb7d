"""A TensorBoard server in a subprocess and headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import websocket

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FRAME_DOC = "document.querySelector('iframe').contentDocument"  # the tab inside TensorBoard's page
FRAME_READY = ("(() => { const f = document.querySelector('iframe');"
               " const d = f && f.contentDocument;"
               " return !!(d && d.body && d.body.dataset.ready === '1'); })()")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@contextmanager
def tensorboard_server(logdir: Path, extra_path: list[str], runs: set[str],
                       timeout: float = 120, expect_data: bool = True) -> Iterator[str]:
    """``tensorboard --logdir`` on 127.0.0.1 (this checkout first on the path); yields its URL
    once the graddiag tab lists every run in ``runs`` (at least one, unless ``expect_data`` is
    false: then as soon as the tab answers)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *extra_path]))
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline and server.poll() is None:
            try:
                seen = {r["run"] for r in json.loads(get(url + "/data/plugin/graddiag/runs"))["runs"]}
                if (seen or not expect_data) and runs <= seen:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        if server.poll() is not None or (expect_data and not seen) or not runs <= seen:
            server.kill()
            err = server.stderr.read().decode(errors="replace") if server.stderr else ""
            raise RuntimeError(f"TensorBoard did not serve the graddiag runs {runs} (saw {seen}):"
                               f"\n{err[-3000:]}")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol.

    Events that arrive while waiting for replies are kept in :attr:`events`; page errors are
    collected from ``Runtime.exceptionThrown``, console errors and ``Log.entryAdded``.
    """

    def __init__(self, binary: str, profile: Path, width: int = 1440, height: int = 900) -> None:
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        deadline = time.monotonic() + 30
        pages: list[dict[str, Any]] = []
        while not pages and time.monotonic() < deadline:
            targets = json.loads(get(f"http://127.0.0.1:{port}/json/list"))
            pages = [t for t in targets if t.get("type") == "page"]
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._id = 0
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout} s for {expression}")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def errors(self) -> list[str]:
        """Script errors, console errors and dialogs (an alert) seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                if not entry.get("url", "").endswith("/favicon.ico"):  # the browser's own ask
                    found.append(f"{entry.get('text', '')[:500]} ({entry.get('url', '')})")
            elif method == "Page.javascriptDialogOpening":
                found.append("dialog: " + params.get("message", ""))
        return found

    def drain(self, seconds: float = 0.3) -> None:
        """Collect the events that arrive within ``seconds``."""
        self.ws.settimeout(seconds)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.ws.settimeout(60)

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
