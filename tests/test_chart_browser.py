"""The learning curve of a run with fifty rollbacks, in Chromium at 1366×768 (issues 27 and 24).

One Streamlit server on app.py serves every test here, on a run made with the store's own writes
(tests/many_rollbacks.py: 51 branches, every fifth abandoned one blown up to ~10⁶) while a thread
keeps training its newest branch. What is checked is what a person sees and does: a loss panel
tall enough to read, a legend of at most two rows, the live line drawn as one curve, the
abandoned branches one click away, a y range that fits the live curve (and "show all" one click
away), and a zoom that follows new points when its right edge was at the newest one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from babysit.store import RunStore
from tests import many_rollbacks
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, REPO, wait_healthy

PLOT = ".babysit-live-chart .js-plotly-plot"
WAIT_S = 60.0
LOG_BUTTON = '.modebar-btn[data-title="Toggle log scale (top y axis)"]'


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`python -m babysit dashboard` (the real command, with its flags) on the run, trained on."""
    root = tmp_path_factory.mktemp("rollbacks")
    many_rollbacks.build(root / "run", rollbacks=50).close()
    stop = threading.Event()
    trainer = threading.Thread(target=many_rollbacks.keep_training, args=(root / "run", stop), daemon=True)
    trainer.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (root / "dashboard.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "babysit", "dashboard", "--root", str(root), "--port", str(port)],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, root / "dashboard.log", timeout=90)
        yield url, root / "run"
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)
        log.close()
        trainer.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser: Any, url: str) -> Page:
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.set_default_timeout(WAIT_S * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.__errors = errors  # type: ignore[attr-defined]
    page.goto(url)
    page.wait_for_function("(sel) => { const gd = document.querySelector(sel); return gd && gd._fullLayout"
                           " && gd.data && gd.data.length > 3; }", arg=PLOT, timeout=WAIT_S * 1000)
    return page


def _until(what: str, check: Any, page: Page, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        page.wait_for_timeout(100)


CHART = """(sel) => {
    const gd = document.querySelector(sel);
    const fl = gd._fullLayout;
    const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    return {
        panels: {loss: fl.yaxis._length, lr: fl.yaxis3._length, momentum: fl.yaxis4._length},
        legendRows: new Set(Array.from(gd.querySelectorAll('g.legend g.traces'))
                            .map((g) => Math.round(g.getBoundingClientRect().top))).size,
        legend: Array.from(gd.querySelectorAll('g.legend g.traces')).map((g) => g.textContent),
        titles: Object.fromEntries(['y3', 'y4'].map((a) => [a, box(gd.querySelector(`g.g-${a}title`))])),
        yrange: fl.yaxis.range.slice(), ytype: fl.yaxis.type, xrange: fl.xaxis.range.slice().map(Number),
        xauto: !!fl.xaxis.autorange, newest: Number(gd.closest('.babysit-live-chart').dataset.newest),
        traces: gd.data.map((t) => ({name: t.name, role: (t.meta || {}).role, branch: (t.meta || {}).branch,
                                     pieces: (t.meta || {}).pieces, n: (t.x || []).length,
                                     visible: t.visible === undefined ? true : t.visible,
                                     clip: (t.meta || {}).clip})),
        notes: (fl.annotations || []).filter((a) => a.visible !== false).map((a) => a.text),
    };
}"""


def _chart(page: Page) -> dict[str, Any]:
    return page.evaluate(CHART, PLOT)


def test_fifty_rollbacks_leave_a_tall_loss_panel_a_short_legend_and_the_live_line(run, browser) -> None:
    url, run_dir = run
    page = _open(browser, url)
    try:
        chart = _chart(page)
        assert chart["panels"]["loss"] >= 350, chart["panels"]
        assert chart["legendRows"] <= 2, chart["legend"]
        assert "50 abandoned branches" in chart["legend"]
        # The lr and momentum panels' titles do not run into each other.
        lr, momentum = chart["titles"]["y3"], chart["titles"]["y4"]
        assert lr[3] <= momentum[1] + 1, (lr, momentum)
        # The live line: one curve through the trainer's branch and the stretches it came through.
        store = RunStore(run_dir)
        parent = {b["id"]: b["parent"] for b in store.branches()}
        line = [store.status()["branch"]]
        while parent[line[-1]] is not None:
            line.append(parent[line[-1]])
        loss = next(t for t in chart["traces"] if t["role"] == "live" and t["name"] == "loss")
        assert [branch for branch, _ in loss["pieces"]] == line[::-1] and len(line) > 10
        assert sum(1 for t in chart["traces"] if t["role"] == "abandoned") == 1
        assert len(chart["traces"]) <= 14
        assert page.__errors == []  # type: ignore[attr-defined]
    finally:
        page.close()


FARTHEST_POINT = """([sel, role, branch]) => {
    // The point of the trace (meta.role, and meta.branch when given) farthest on screen from every
    // other trace's points, inside the loss panel: a click there is a click on that trace.
    const gd = document.querySelector(sel);
    const fl = gd._fullLayout, xa = fl.xaxis, ya = fl.yaxis;
    const rect = gd.querySelector('.nsewdrag[data-subplot="xy"]').getBoundingClientRect();
    const px = (x, y) => [rect.left + xa.l2p(x), rect.top + ya.l2p(y)];
    const [lo, hi] = ya.range;
    const mine = (t) => (t.meta || {}).role === role && (branch === null || t.meta.branch === branch);
    const others = [];
    gd._fullData.forEach((t) => {
        if (mine(t) || t.yaxis !== 'y' || t.visible !== true) return;
        (t.x || []).forEach((x, i) => { if (x !== null && t.y[i] !== null) others.push(px(x, t.y[i])); });
    });
    let best = null;
    gd._fullData.filter((t) => mine(t) && t.yaxis === 'y').forEach((trace) => trace.x.forEach((x, i) => {
        const y = trace.y[i];
        if (x === null || y === null || y < lo || y > hi) return;
        const [u, v] = px(x, y);
        if (u < rect.left + 5 || u > rect.right - 5 || v < rect.top + 40 || v > rect.bottom - 5) return;
        const near = Math.min(...others.map(([a, b]) => Math.hypot(a - u, b - v)));
        if (!best || near > best.near) {
            best = {u, v, near, branch: trace.customdata ? trace.customdata[i] : trace.meta.branch};
        }
    }));
    return best;
}"""


def _click(page: Page, point: dict[str, Any]) -> None:
    page.mouse.move(point["u"], point["v"])  # plotly clicks what the pointer hovers
    page.mouse.click(point["u"], point["v"])


def test_an_abandoned_branch_is_one_click_from_being_drawn_in_full(run, browser) -> None:
    url, _ = run
    page = _open(browser, url)
    try:
        point = page.evaluate(FARTHEST_POINT, [PLOT, "abandoned", None])
        assert point is not None and point["near"] > 8, point  # plotly's hover takes the nearest point
        _click(page, point)
        full = _until("the branch in full", lambda: [t for t in _chart(page)["traces"] if t["role"] == "full"], page)
        assert {t["branch"] for t in full} == {point["branch"]}
        chart = _chart(page)
        assert f"branch {point['branch']}" in chart["legend"] and "49 abandoned branches" in chart["legend"]
        assert chart["legendRows"] <= 2
        # A click on it folds it back into the sketches.
        drawn = page.evaluate(FARTHEST_POINT, [PLOT, "full", point["branch"]])
        assert drawn is not None and drawn["near"] > 8, drawn
        _click(page, drawn)
        _until("the branch folded back", lambda: not [t for t in _chart(page)["traces"] if t["role"] == "full"], page)
        assert page.__errors == []  # type: ignore[attr-defined]
    finally:
        page.close()


def test_the_y_range_fits_the_live_curve_and_show_all_is_one_click(run, browser) -> None:
    """Abandoned branches blew up to ~10⁶: the loss axis still fits the live curve (linear and
    log), says what it leaves out, and shows everything at one click on that note, and back."""
    url, _ = run
    page = _open(browser, url)
    try:
        chart = _chart(page)
        assert 0 <= chart["yrange"][0] < chart["yrange"][1] < 5, chart["yrange"]
        note = next(n for n in chart["notes"] if n.startswith("other branches reach"))
        assert float(note.split("reach ")[1].split(" ")[0]) > 1e5 and note.endswith("show all")
        page.get_by_text(note).click()
        shown = _until("everything shown", lambda: (c := _chart(page))["yrange"][1] > 1e5 and c, page)
        assert shown["notes"] == ["showing all · fit the live curve"]
        page.get_by_text("showing all · fit the live curve").click()
        fitted = _until("the fit back", lambda: (c := _chart(page))["yrange"][1] < 5 and c, page)
        assert any(n.startswith("other branches reach") for n in fitted["notes"])
        # On a log axis, the same: the fit, in decades.
        page.locator(f"{PLOT} {LOG_BUTTON}").click()
        logged = _until("a log axis", lambda: (c := _chart(page))["ytype"] == "log" and c, page)
        assert 10 ** logged["yrange"][1] < 5, logged["yrange"]
        assert page.__errors == []  # type: ignore[attr-defined]
    finally:
        page.close()


def test_a_zoom_at_the_newest_step_follows_new_points_and_one_into_the_past_stays(run, browser) -> None:
    url, _ = run
    page = _open(browser, url)
    try:
        # Read the newest point drawn and zoom to it in one go, as a person's drag is measured against
        # the chart on screen: a refresh drawn between the two would leave the zoom behind the end.
        window = page.evaluate("""(sel) => {
            const gd = document.querySelector(sel);
            const newest = Number(gd.closest('.babysit-live-chart').dataset.newest);
            const window = [newest - 300, newest];
            Plotly.relayout(gd, {'xaxis.range': window});
            return window;
        }""", PLOT)
        moved = _until("the window to move on with new points",
                       lambda: (c := _chart(page))["xrange"][1] > window[1] + 20 and c, page)
        assert moved["xrange"][1] - moved["xrange"][0] == pytest.approx(300.0)  # the same width, moved
        assert moved["xrange"][0] < moved["newest"] <= moved["xrange"][1]
        assert not moved["xauto"]
        # A zoom into the past stays where it was, however many points arrive.
        past = [200.0, 500.0]
        page.evaluate("([sel, r]) => Plotly.relayout(document.querySelector(sel), {'xaxis.range': r})", [PLOT, past])
        later = _chart(page)["newest"]
        _until("new points", lambda: _chart(page)["newest"] > later + 20, page)
        assert _chart(page)["xrange"] == past
        assert page.__errors == []  # type: ignore[attr-defined]
    finally:
        page.close()
