"""The report in a real browser: headless Chromium over the DevTools protocol (websockets).

Opens report.html from disk, collects console messages, exceptions and CSP violations, reads the
DOM and keeps a full-page screenshot under tests/artifacts/ for a person to look at.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import pytest
from test_report import HOSTILE, REPLAYED, hostile_records, write_hostile_pcap
from test_report_synthetic import TZ, synthetic_findings, synthetic_records
from websockets.sync.client import connect

from observer.config import LabConfig
from observer.report import write_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")


class Browser:
    """One headless Chromium with a fresh profile, driven over its DevTools websocket."""

    def __init__(self, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().splitlines()[0]
        self.port = int(port)
        self.ws = None
        self._stack = ExitStack()
        self.events: list[dict] = []
        self._id = 0

    def open_page(self) -> None:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = self._stack.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        )

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            try:
                self.events.append(
                    json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                )
            except TimeoutError:
                break
        raise TimeoutError(method)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=deadline - time.monotonic())))
            except TimeoutError:
                return

    def load(self, path: Path, width: int = 1280, height: int = 900) -> None:
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.drain(0.5)

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and CSP violations, as text."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "warning",
            ):
                out.append(json.dumps(params.get("args"))[:300])
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                out.append(params["entry"]["text"][:300])
        return out

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def screenshot(self, path: Path, *, full: bool = True, clip: dict | None = None) -> None:
        if full and clip is None:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"]}
        params = {"format": "png", "captureBeyondViewport": clip is not None}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._stack.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def browser(tmp_path):
    chrome = Browser(tmp_path / "profile")
    chrome.open_page()
    yield chrome
    chrome.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    records = synthetic_records(days=7)
    out = tmp_path_factory.mktemp("report")
    return write_report(records, synthetic_findings(records), out)


def test_report_renders_in_chromium_without_errors(browser, report):
    browser.load(report)
    assert browser.problems() == []
    headline = browser.evaluate("document.getElementById('headline').textContent")
    assert headline.startswith("Yes: 1 periodic bulk upload") and "tracker-example.com" in headline
    cards = browser.evaluate("[...document.querySelectorAll('article.card')].map(c => c.className)")
    assert cards == ["card export", "card backup"]
    sentence = browser.evaluate("document.querySelector('.card.backup .sentence').textContent")
    assert "scheduled backup" in sentence and "02:00" in sentence and "6 of 7" in sentence
    # Every plot decoded to a real picture: timeline, heatmap, two clocks, coverage.
    images = browser.evaluate(
        "[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(images) == 5
    assert all(done and w > 100 and h > 100 for done, w, h in images)
    rows = browser.evaluate("document.querySelectorAll('#endpoints tbody tr').length")
    assert rows == 17
    up_cell = browser.evaluate(
        "getComputedStyle(document.querySelector('#endpoints td.num')).textAlign"
    )
    assert up_cell == "right"
    assert browser.evaluate("document.scripts.length") == 0
    # The stylesheet applied (its hash is in the CSP): the headline box has its background.
    background = browser.evaluate(
        "getComputedStyle(document.getElementById('headline')).backgroundColor"
    )
    assert background == "rgb(246, 248, 250)"
    browser.screenshot(ARTIFACTS / "report-synthetic-week.png")
    assert (ARTIFACTS / "report-synthetic-week.png").stat().st_size > 50_000


def test_csp_violations_are_caught(browser, report, tmp_path):
    """The check above can fail: an injected inline script and style are refused and reported."""
    html = report.read_text(encoding="utf-8")
    tampered = tmp_path / "tampered.html"
    tampered.write_text(
        html.replace(
            "</body>", "<script>document.title='ran'</script><p style='color:red'>x</p></body>"
        ),
        encoding="utf-8",
    )
    browser.load(tampered)
    problems = browser.problems()
    assert any("Content Security Policy" in p and "script" in p for p in problems), problems
    assert browser.evaluate("document.title") != "ran"


def test_fleet_index_renders_and_links_each_device(browser, tmp_path):
    from observer.analysis import Findings
    from observer.report import write_fleet

    one = synthetic_records(days=3)
    hostile = '"><script>alert(1)</script>'
    two = {t: df.assign(device=hostile, **({"conn_id": "b-" + df["conn_id"]}
                                            if "conn_id" in df.columns else {}))
           for t, df in synthetic_records(days=3).items()}
    records = {t: pd.concat([one[t], two[t]], ignore_index=True) for t in one}
    findings = Findings.from_dict(synthetic_findings(one))
    index = write_fleet(records, findings, tmp_path / "fleet")
    browser.load(index)
    assert browser.problems() == []
    links = browser.evaluate("[...document.querySelectorAll('#devices a')].map(a => a.textContent)")
    assert links == [hostile, "pixel-7"]
    assert browser.evaluate("document.scripts.length") == 0
    for href in browser.evaluate("[...document.querySelectorAll('#devices a')]"
                                 ".map(a => a.getAttribute('href'))"):
        assert (tmp_path / "fleet" / href).is_file() and "<" not in href and ".." not in href


def test_hostile_report_runs_nothing_and_shows_names_as_text(browser, tmp_path):
    records, findings = hostile_records()
    page = write_report(records, findings, tmp_path / "hostile")
    browser.load(page)
    assert browser.problems() == []
    assert browser.evaluate("document.title") == "Timing report: pixel-7"
    assert browser.evaluate("document.querySelectorAll('script, svg, iframe, object').length") == 0
    shown = browser.evaluate("document.querySelector('.card.export h3').firstChild.textContent")
    assert shown == HOSTILE["export"]
    assert browser.evaluate("[...document.images].every(i => i.naturalWidth > 0)")
    browser.screenshot(ARTIFACTS / "report-hostile.png")


def test_replayed_hostile_capture_report_is_clean_in_chromium(browser, tmp_path):
    """Names from a real pcap (DNS, SNI, Host) through replay and analysis, shown as text."""
    pytest.importorskip("observer.sources.pipeline")
    from observer.analysis import analyze
    from observer.catalog import load_catalog
    from observer.sources import replay_tables

    config = LabConfig(timezone=TZ)
    records = replay_tables([write_hostile_pcap(tmp_path / "h.pcap")], config=config)
    findings = analyze(records, config, load_catalog(config.catalogs))
    page = write_report(records, findings, tmp_path / "report")
    browser.load(page)
    assert browser.problems() == []
    names = browser.evaluate(
        "[...document.querySelectorAll('#endpoints td.name')].map(td => td.firstChild.textContent)"
    )
    assert set(REPLAYED.values()) <= set(names)
    outside = "script, svg, iframe, object, img:not([src^='data:image/svg+xml;base64,'])"
    assert browser.evaluate(f"document.querySelectorAll({outside!r}).length") == 0


def screenshots(page: Path, out_dir: Path) -> list[Path]:
    """The docs' pictures of a report: the top of the page and its main sections, at 1280 px."""
    with tempfile.TemporaryDirectory() as tmp:
        chrome = Browser(Path(tmp) / "profile")
        try:
            chrome.open_page()
            chrome.load(page)
            if chrome.problems():
                raise RuntimeError(f"{page}: {chrome.problems()}")
            shots = []
            for name, selector in (
                ("report-top", None),
                ("report-timeline", "#timeline, #heatmap"),
                ("report-clock", "#periodic"),
                ("report-endpoints", "#endpoints, #coverage"),
            ):
                if selector is None:
                    clip = {"x": 0, "y": 0, "width": 1280, "height": 1100}
                elif not chrome.evaluate(f"document.querySelector('{selector}') !== null"):
                    continue  # e.g. no periodic finding, so no clock section
                else:
                    clip = chrome.evaluate(
                        f"(() => {{ const r = [...document.querySelectorAll('{selector}')]"
                        ".map(e => e.getBoundingClientRect());"
                        " const top = Math.min(...r.map(b => b.top)) + scrollY - 16;"
                        " const bottom = Math.max(...r.map(b => b.bottom)) + scrollY + 8;"
                        " return {x: 0, y: top, width: 1280, height: Math.min(bottom - top, 1800)};"
                        " })()"
                    )
                path = out_dir / f"{name}.png"
                chrome.screenshot(path, clip=clip)
                shots.append(path)
            return shots
        finally:
            chrome.close()


if __name__ == "__main__":
    # .venv/bin/python tests/test_report_browser.py demo-output/report/report.html docs/img
    for shot in screenshots(Path(sys.argv[1]), Path(sys.argv[2])):
        print(shot)
