"""babysit.ui.live_chart in a real browser: zoom, log scale and hidden traces survive live updates.

Starts `streamlit run tests/apps/live_chart_app.py` (a loss curve that grows every second) and
drives Debian's Chromium with Playwright, the way a user would: drag to zoom, click the mode bar's
log button, click a legend entry, double-click to reset.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Page, sync_playwright

from babysit.ui.live_chart import figure_json
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "apps" / "live_chart_app.py"
CHART = ".babysit-live-chart"
PLOT = f"{CHART} .js-plotly-plot"
LOG_BUTTON = '.modebar-btn[data-title="Toggle log scale (top y axis)"]'
REFRESH_S = 1.0  # tests/apps/live_chart_app.py
THIN = 10  # ditto: the unzoomed figure has every 10th step
WAIT_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A streamlit server on the test app; killed at the end whatever happens."""
    port = _free_port()
    log_path = tmp_path / "streamlit.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "streamlit", "run", str(APP),
                "--server.address", "127.0.0.1",
                "--server.port", str(port),
                "--server.headless", "true",
                "--browser.gatherUsageStats", "false",
                "--server.fileWatcherType", "none",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, timeout=30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_figure_json_is_strict_json() -> None:
    """numpy arrays, numpy scalars and NaN/inf become JSON that the browser's JSON.parse accepts."""
    figure = {
        "data": [{"x": np.arange(3), "y": np.array([1.0, np.nan, np.inf]), "name": np.str_("loss")}],
        "layout": {"xaxis": {"range": [np.int64(0), np.float32(2.5)]}},
    }

    def reject(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(figure_json(figure), parse_constant=reject) == {
        "data": [{"x": [0, 1, 2], "y": [1.0, None, None], "name": "loss"}],
        "layout": {"xaxis": {"range": [0, 2.5]}},
    }
    with pytest.raises(ValueError, match="only data and layout, got \\['config'\\]"):
        figure_json({"data": [], "config": {}})
    with pytest.raises(TypeError, match="figure must be a Plotly figure dict, got list"):
        figure_json([])


def test_the_committed_plotly_bundle_is_the_wheels_plotly_js_version() -> None:
    """live_chart/plotly-basic.min.js is fetched by hand (live_chart/PLOTLY.md): it must be the
    plotly.js version of the plotly wheel that requirements.txt pins."""
    import plotly

    def version(path: Path) -> str:
        head = path.read_text(errors="replace")[:300]
        found = re.search(r"plotly\.js (?:\(basic - minified\) )?v(\d+\.\d+\.\d+)", head)
        assert found, head
        return found.group(1)

    wheel = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert version(ROOT / "babysit" / "ui" / "live_chart" / "plotly-basic.min.js") == version(wheel)


def test_refreshes_are_deltas_until_the_browser_asks_for_the_whole_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    from babysit.ui import live_chart as chart
    from babysit.ui.figure_delta import apply_delta

    monkeypatch.setattr(chart.st, "session_state", {})
    figures = [{"data": [{"type": "scatter", "x": list(range(n)), "y": [0.5] * n}], "layout": {"title": "t"}}
               for n in (1000, 1010, 1010, 1020)]

    def send(figure: dict, resync: object = None) -> dict:
        message = chart._message("c", figure, resync)
        chart._remember("c", message, figure, resync)
        return message

    first = send(figures[0])
    assert first["rev"] == 1 and json.loads(first["full"]) == figures[0]
    second = send(figures[1])
    assert (second["rev"], second["base"]) == (2, 1) and len(second["delta"]) < 200
    assert apply_delta(figures[0], json.loads(second["delta"])) == figures[1]
    assert send(figures[2]) is second  # nothing changed: the very same message, which the browser skips
    resent = send(figures[2], resync="lost-one")  # the browser held another revision
    assert resent["rev"] == 3 and json.loads(resent["full"]) == figures[2]
    assert send(figures[3], resync="lost-one")["base"] == 3  # deltas again, on the new base
    chart.forget_sent("c")
    assert "full" in send(figures[1], resync="lost-one")


class Traffic:
    """What went over the wire: websocket frames from the server, HTTP requests, page errors."""

    def __init__(self, page: Page) -> None:
        self.frames: list[int] = []
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: self.frames.append(len(f))))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(str(e)))


def _until(what: str, check: Callable[[], Any], page: Page) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(50)


def _status(page: Page) -> dict:
    """The app's JSON line: what live_chart returned on its last run, how often it ran, steps."""
    return json.loads(page.locator('[data-testid="stText"]').inner_text())


def _plot(page: Page) -> dict:
    return page.evaluate(
        """(sel) => {
            const gd = document.querySelector(sel);
            const fl = gd._fullLayout;
            return {
                renders: Number(gd.closest('.babysit-live-chart').dataset.renders),
                xrange: fl.xaxis.range.slice(),
                xrange2: fl.xaxis2.range.slice(),
                xautorange: fl.xaxis.autorange,
                ytype: fl.yaxis.type,
                ytype2: fl.yaxis2.type,
                visible: gd._fullData.map((t) => t.visible),
                xs: Array.from(gd._fullData[0].x),
            };
        }""",
        PLOT,
    )


def _inside(xs: list[float], lo: float, hi: float) -> list[float]:
    return [x for x in xs if lo <= x <= hi]


def _wait_refreshes(page: Page, n: int = 2) -> dict:
    """Wait until the app has rerun and the chart has redrawn with new data at least n times."""
    runs0, renders0 = _status(page)["runs"], _plot(page)["renders"]
    _until(f"{n} refreshes", lambda: _status(page)["runs"] >= runs0 + n, page)
    return _until(f"{n} redraws", lambda: (p := _plot(page))["renders"] >= renders0 + n and p, page)


def _wait_view(page: Page, x_range: list[float] | None) -> dict:
    """Wait until the Python side has received `x_range` from the chart."""

    def received() -> dict | None:
        view = _status(page)["view"]
        if view is None or (x_range is None) != (view["x_range"] is None):
            return None
        if x_range is None or view["x_range"] == pytest.approx(x_range, rel=1e-12):
            return view
        return None

    return _until(f"the server to receive x_range={x_range}", received, page)


def test_zoom_log_and_legend_survive_live_updates(server: str) -> None:
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            traffic = Traffic(page)
            page.goto(server)
            page.wait_for_selector(f"{PLOT} .main-svg", timeout=WAIT_S * 1000)
            # Mark the chart's node: if Streamlit remounted the component, the mark would be gone.
            page.evaluate("(sel) => { document.querySelector(sel).__kept = true; }", CHART)
            assert _status(page)["view"] is None  # nothing reported before the user does anything
            before = _wait_refreshes(page, 1)
            assert before["xautorange"] is True
            assert all(x % THIN == 0 for x in before["xs"])  # the whole run, thinned

            # 1. Drag-zoom on the top panel, across the middle of the run.
            box = page.locator(f'{PLOT} .nsewdrag[data-subplot="xy"]').bounding_box()
            assert box is not None
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] * 0.30, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.45, y + 1, steps=5)
            page.mouse.move(box["x"] + box["width"] * 0.55, y + 2, steps=5)
            page.mouse.up()
            zoomed = _plot(page)
            lo, hi = zoomed["xrange"]
            assert zoomed["xautorange"] is False and hi - lo < 0.5 * before["xs"][-1]
            assert zoomed["xrange2"] == zoomed["xrange"]  # the panels share x
            # The server got exactly the window the user looks at, and reporting it reset nothing.
            _wait_view(page, [lo, hi])
            after = _wait_refreshes(page, 2)
            assert after["xrange"] == [lo, hi]
            assert after["xautorange"] is False
            # ... and it answered with every step inside the window instead of every 10th.
            assert len(_inside(after["xs"], lo, hi)) > 2 * len(_inside(before["xs"], lo, hi))
            assert _inside(after["xs"], lo, hi) == list(range(math.ceil(lo), math.floor(hi) + 1))

            # 2. Log scale from the mode bar button; plotly's uirevision alone would undo it.
            page.locator(LOG_BUTTON).click()
            assert _plot(page)["ytype"] == "log"
            after = _wait_refreshes(page, 2)
            assert (after["ytype"], after["ytype2"]) == ("log", "log")
            assert after["xrange"] == [lo, hi]

            # 3. Hide a trace from the legend.
            page.locator(f"{PLOT} g.legend g.traces", has_text="val loss").click()
            _until("val loss to hide", lambda: _plot(page)["visible"][1] == "legendonly", page)
            after = _wait_refreshes(page, 2)
            assert after["visible"] == [True, "legendonly", True]
            assert after["ytype"] == "log" and after["xrange"] == [lo, hi]

            # 4. Pan the bottom panel to the head of the run, past the last step: new steps land in
            # the window while we watch, and the view stays put.
            steps = _status(page)["steps"]
            window = [steps - 40.0, steps + 160.0]
            page.evaluate(
                "([sel, r]) => Plotly.relayout(document.querySelector(sel), {'xaxis2.range': r})",
                [PLOT, window],
            )
            _wait_view(page, window)
            head = _plot(page)
            shown = _inside(head["xs"], *window)
            after = _wait_refreshes(page, 2)
            grown = _inside(after["xs"], *window)
            assert after["xrange"] == window and after["xrange2"] == window
            assert max(grown) > max(shown)  # the trainer's new steps appeared inside the window
            assert grown == list(range(int(window[0]), int(max(grown)) + 1))
            assert after["ytype"] == "log" and after["visible"][1] == "legendonly"

            # 5. Double-click resets the zoom; the server hears None and thins the whole run again.
            page.mouse.dblclick(box["x"] + box["width"] / 2, y)
            _wait_view(page, None)
            after = _wait_refreshes(page, 1)
            assert after["xautorange"] is True
            assert all(x % THIN == 0 for x in after["xs"]) and after["xs"][0] == 0

            # 6. The chart follows the column's width (the page is narrower than the centred column).
            def width() -> float:
                return page.evaluate("(sel) => document.querySelector(sel)._fullLayout.width", PLOT)

            column = page.locator(CHART).bounding_box()
            assert column is not None and width() == pytest.approx(column["width"], abs=2)
            page.set_viewport_size({"width": 480, "height": 900})
            _until("the chart to shrink with the page", lambda: width() < column["width"] - 150, page)
            narrowed = page.locator(CHART).bounding_box()
            assert narrowed is not None and width() == pytest.approx(narrowed["width"], abs=2)

            # The same chart all along, no rerun loop, no errors, and plotly.js not in the reruns.
            assert page.evaluate("(sel) => document.querySelector(sel).__kept === true", CHART)
            elapsed = time.monotonic() - started
            runs = _status(page)["runs"]
            assert runs <= elapsed / REFRESH_S + 10, f"{runs} runs in {elapsed:.0f} s: a rerun loop"
            assert page.locator('[data-testid="stException"]').count() == 0
            assert traffic.errors == []
            plotly_fetches = [u for u in traffic.requests if "plotly" in u.rsplit("/", 1)[-1]]
            assert len(plotly_fetches) == 1 and "plotly-basic.min.js?v=" in plotly_fetches[0], plotly_fetches
            assert max(traffic.frames) < 200_000, f"a {max(traffic.frames)} byte websocket frame"
        finally:
            browser.close()
