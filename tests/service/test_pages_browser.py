"""The jobs page and the report in a real headless Chromium, driven over the DevTools protocol.

A real server runs real jobs; the browser loads the pages as a person would. Checked: the jobs
list fills and updates by itself, the report draws the risk curve, its upper bound, ε and λ̂,
layer names from a hostile model stay text, API keys work without ever reaching the page, and
nothing is logged to the console. Screenshots go to the test's tmp dir and to tests/artifacts/
for a person to look at.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from service_harness import FAST_CONFIG, KEY_A, KEY_B, REPO, Inputs, Server, submit, wait_terminal

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", "about:blank"]
HOSTILE_LAYERS = ("<img src=x onerror=alert(1)>", "</td><script>alert(2)</script>")

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


class Browser:
    """Chromium with a minimal DevTools-protocol client (one websocket to the browser, flat sessions)."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS[:-1], f"--user-data-dir={profile}", FLAGS[-1]],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not start: {(profile.parent / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.connection = ExitStack()
        self.ws = self.connection.enter_context(connect(f"ws://127.0.0.1:{port}{path}", max_size=None,
                                                        open_timeout=30))
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def _receive(self, timeout: float) -> dict[str, Any]:
        message = json.loads(self.ws.recv(timeout=timeout))
        if "id" not in message:
            self.events.append(message)
        return message

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        call_id = next(self.ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(max(deadline - time.monotonic(), 0.01))
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def wait_event(self, method: str, predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
                   timeout: float = 30.0, since: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and predicate(event):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {method} event in {timeout} s")
            try:
                self._receive(left)
            except TimeoutError:
                pass

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.send("Browser.close", timeout=5)
                except Exception:
                    pass
                self.connection.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log.close()


class Tab:
    """One page: navigate, evaluate JavaScript, collect console errors, take full-page screenshots."""

    def __init__(self, browser: Browser, width: int = 1200, height: int = 900) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.width, self.height = width, height
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.mark = len(browser.events)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def goto(self, url: str, timeout: float = 30.0) -> None:
        since = len(self.browser.events)
        self.call("Page.navigate", {"url": url})
        self.browser.wait_event("Page.loadEventFired", lambda ev: ev.get("sessionId") == self.session, timeout, since)

    def eval(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.1)

    def console_errors(self, allow: Callable[[str], bool] = lambda _: False) -> list[str]:
        """Errors since the tab opened (or since ``forget_errors``): exceptions, console.error, log errors."""
        out = []
        for ev in self.browser.events[self.mark:]:
            if ev.get("sessionId") != self.session:
                continue
            p = ev["params"]
            if ev["method"] == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('exception', {}).get('description')}")
            elif ev["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}")
            elif ev["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['source']}: {p['entry']['text']} ({p['entry'].get('url', '')})")
            elif ev["method"] == "Page.javascriptDialogOpening":
                out.append(f"dialog: {p.get('message')}")
        return [e for e in out if not allow(e)]

    def forget_errors(self) -> None:
        self.mark = len(self.browser.events)

    def screenshot(self, path: Path) -> Path:
        """A full-page PNG at ``path``, copied to tests/artifacts/ for a person to look at."""
        height = int(self.call("Page.getLayoutMetrics")["cssContentSize"]["height"])
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": max(min(height, 6000), 200), "deviceScaleFactor": 1,
                   "mobile": False})
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        path.write_bytes(base64.b64decode(data))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
        return path

    def close(self) -> None:
        self.browser.send("Target.detachFromTarget", {"sessionId": self.session})


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    profile.mkdir()
    b = Browser(profile)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    t = Tab(browser)
    yield t
    t.close()


def hostile_model(inputs: Inputs, path: Path) -> Path:
    """The test MLP with its layers renamed to HTML that would run script if a page wrote it unescaped."""
    import torch
    import torch.nn as nn

    trained = dict(torch.jit.load(str(inputs.model)).named_parameters())
    first, last = nn.Linear(64, 32), nn.Linear(32, 10)
    with torch.no_grad():
        for layer, prefix in ((first, "0"), (last, "2")):
            layer.weight.copy_(trained[f"{prefix}.weight"])
            layer.bias.copy_(trained[f"{prefix}.bias"])
    model = nn.Sequential(OrderedDict([(HOSTILE_LAYERS[0], first), ("relu", nn.ReLU()), (HOSTILE_LAYERS[1], last)]))
    torch.jit.script(model.eval()).save(str(path))
    return path


def job_row_status(job_id: str) -> str:
    return f"document.querySelector('#jobs tr[data-job-id=\"{job_id}\"] .badge')?.textContent"


PLOT_PARTS = """(() => {
  const svg = document.querySelector('svg.risk-plot');
  if (!svg) return null;
  const count = (sel) => svg.querySelectorAll(sel).length;
  return {risk: count('polyline.risk'), ucb: count('polyline.ucb'), epsilon: count('line.epsilon'),
          lambda: count('line.lambda-hat'), riskPoints: svg.querySelector('polyline.risk').getAttribute('points'),
          width: svg.getBoundingClientRect().width};
})()"""


def assert_report_shows(tab: Tab, job_id: str, result: dict[str, Any]) -> None:
    plot = tab.wait_for(PLOT_PARTS, what="the risk plot")
    n_criteria = len(result["criteria"])
    assert plot["risk"] == n_criteria and plot["ucb"] == n_criteria, plot  # curve + upper bound per criterion
    assert plot["epsilon"] == 1 and plot["width"] > 300, plot
    assert plot["lambda"] == (1 if result["certified"] else 0), plot
    assert len(plot["riskPoints"].split()) >= 2
    text = tab.eval("document.body.innerText")
    assert result["guarantee"] in text and "In plain words" in text
    assert f"{result['dense_accuracy']:.2%}" in text and f"{result['pruned_accuracy']:.2%}" in text
    layers = tab.eval("Array.from(document.querySelectorAll('#layers tbody tr td:first-child'), td => td.textContent)")
    assert layers == [layer["name"] for layer in result["layers"]]
    href = tab.eval("document.querySelector('a#download').getAttribute('href')")
    assert href == f"/v1/jobs/{job_id}/artifact"


def test_jobs_page_updates_live_and_report_plots_the_certificate(worker_server: Server, inputs: Inputs,
                                                                  tab: Tab, tmp_path: Path) -> None:
    tab.goto(worker_server.url + "/")
    tab.wait_for("document.getElementById('note').textContent.startsWith('Updated')", what="the first poll")

    # Submitted after the page loaded: the row appears and reaches "succeeded" without a reload.
    with worker_server.client() as client:
        r = submit(client, inputs.model, data=inputs.data,
                   config={**FAST_CONFIG, "criterion": ["magnitude", "obd"], "full_curve": True})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        tab.wait_for(job_row_status(job_id), timeout=15, what="the new job's row")
        job = wait_terminal(client, job_id)
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert client.get(f"/v1/jobs/{job_id}/report").json() == result  # JSON stays the default
        artifact = client.get(f"/v1/jobs/{job_id}/artifact").content
    tab.wait_for(f"{job_row_status(job_id)} === 'succeeded'", timeout=10, what="the row to show success")
    row_text = tab.eval(f"document.querySelector('#jobs tr[data-job-id=\"{job_id}\"]').innerText")
    assert "100%" in row_text and f"{result['certified_sparsity']:.0%}" in row_text
    tab.screenshot(tmp_path / "jobs_page.png")
    assert tab.console_errors() == []

    # The row links to the report, which the browser gets as HTML.
    since = len(tab.browser.events)
    tab.eval(f"document.querySelector('#jobs tr[data-job-id=\"{job_id}\"] a.report').click()")
    tab.browser.wait_event("Page.loadEventFired", lambda ev: ev.get("sessionId") == tab.session, since=since)
    assert tab.eval("location.pathname") == f"/v1/jobs/{job_id}/report"
    assert_report_shows(tab, job_id, result)
    assert hashlib.sha256(artifact).hexdigest() == result["artifact_sha256"]
    tab.screenshot(tmp_path / "report_page.png")
    assert tab.console_errors() == []


def test_report_keeps_hostile_layer_names_as_text(worker_server: Server, inputs: Inputs, tab: Tab,
                                                  tmp_path: Path) -> None:
    model = hostile_model(inputs, tmp_path / "hostile.pt")
    with worker_server.client() as client:
        r = submit(client, model, data=inputs.data, config=FAST_CONFIG)
        assert r.status_code == 202, r.text
        job = wait_terminal(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert {layer["name"] for layer in job["result"]["layers"]} == {f"{n}.weight" for n in HOSTILE_LAYERS}

    tab.goto(f"{worker_server.url}/v1/jobs/{job['id']}/report")
    assert_report_shows(tab, job["id"], job["result"])
    assert tab.eval("document.querySelectorAll('script, img, iframe, object, embed').length") == 0
    assert tab.console_errors() == []  # an alert() would show as a dialog here

    tab.goto(worker_server.url + "/")  # the jobs page writes data with textContent only
    tab.wait_for(job_row_status(job["id"]), what="the hostile job's row")
    assert tab.eval("document.querySelectorAll('img, iframe').length") == 0
    assert tab.console_errors() == []


def test_pages_work_with_api_keys_without_exposing_them(make_server: Callable[..., Server], inputs: Inputs,
                                                        browser: Browser, tab: Tab, tmp_path: Path) -> None:
    server = make_server(api_keys=f"{KEY_A},{KEY_B}")
    with server.client(KEY_A) as client:
        r = submit(client, inputs.model, data=inputs.data, config=FAST_CONFIG)
        assert r.status_code == 202, r.text
        job = wait_terminal(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    job_id, result = job["id"], job["result"]

    # ?key= is taken out of the address bar at once, kept in sessionStorage, and never written into the page.
    tab.goto(f"{server.url}/?key={KEY_A}")
    tab.wait_for(job_row_status(job_id), what="the keyed job's row")
    assert "key" not in tab.eval("location.href")
    assert KEY_A not in tab.eval("document.documentElement.outerHTML")
    assert tab.eval("sessionStorage.getItem('certiprune.apiKey')") == KEY_A

    # A link cannot send the key: the report opens in /jobs/{id}, which fetches it with the key.
    since = len(browser.events)
    tab.eval(f"document.querySelector('#jobs tr[data-job-id=\"{job_id}\"] a.report').click()")
    browser.wait_event("Page.loadEventFired", lambda ev: ev.get("sessionId") == tab.session, since=since)
    assert tab.eval("location.pathname") == f"/jobs/{job_id}"
    assert_report_shows(tab, job_id, result)
    assert KEY_A not in tab.eval("document.documentElement.outerHTML")
    tab.screenshot(tmp_path / "report_page_with_api_key.png")

    # The download button fetches with the key, checks the checksum and saves the file.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads),
                                                 "eventsEnabled": True})
    since = len(browser.events)
    tab.eval("document.querySelector('a#download').click()")
    done = browser.wait_event("Browser.downloadProgress", lambda ev: ev["params"]["state"] != "inProgress",
                              since=since)
    assert done["params"]["state"] == "completed", done
    saved = downloads / f"{job_id}-pruned.pt"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == result["artifact_sha256"]
    assert tab.console_errors() == []

    # "forget the API key", then another tenant's key typed into the form: it sees none of these jobs.
    tab.goto(server.url + "/")
    tab.wait_for(job_row_status(job_id), what="the keyed job's row")
    tab.forget_errors()
    since = len(browser.events)
    tab.eval("document.getElementById('forget').click()")
    browser.wait_event("Page.loadEventFired", lambda ev: ev.get("sessionId") == tab.session, since=since)
    tab.wait_for("!document.getElementById('keyform').hidden", what="the key form")
    assert tab.eval("sessionStorage.getItem('certiprune.apiKey')") is None
    tab.eval(f"(() => {{ const f = document.getElementById('keyform'); f.elements.key.value = {json.dumps(KEY_B)}; "
             "f.requestSubmit(); })()")
    tab.wait_for("!document.getElementById('empty').hidden", what="the empty list of tenant B")
    assert tab.eval("document.querySelectorAll('#jobs tbody tr').length") == 0
    assert KEY_B not in tab.eval("document.documentElement.outerHTML")
    # The one 401 before the key was entered is expected; nothing else may be logged.
    assert tab.console_errors(allow=lambda e: "401" in e and e.startswith("log network")) == []


def test_the_console_check_itself_sees_errors(tab: Tab) -> None:
    """Guards the assertions above: a page that logs an error and throws is caught."""
    tab.goto("data:text/html,<p>x</p><script>console.error('boom'); throw new Error('bang');</script>")
    tab.wait_for("document.readyState === 'complete'")
    errors = tab.console_errors()
    assert any("boom" in e for e in errors) and any("bang" in e for e in errors), errors
