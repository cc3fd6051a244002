"""The dashboard as a cockpit, in Chromium: what fits on a laptop screen, and a chart one can read.

One Streamlit server on app.py and one browser serve every test here (each page load costs seconds
on two cores). The run is made with the store's own writes, as a trainer makes it: two branches
(a rollback), a piece superseded by a crash, a clean stop and restart, a restart after the trainer
died, a person's lr nudge and an lr change by a scheduler; a thread keeps the heartbeat fresh and
logs a step every 20 ms, so the page shows a running trainer and its throughput.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from babysit import commands as cmd
from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, REPO, dashboard_of, wait_healthy

PLOT = ".babysit-live-chart .js-plotly-plot"
WAIT_S = 60.0
SHOTS = Path(os.environ.get("BABYSIT_SCREENSHOTS", "")) if os.environ.get("BABYSIT_SCREENSHOTS") else None


def _write(store: RunStore, name: str, branch: int, steps: np.ndarray, values: np.ndarray, per: str = PER_STEP,
           segment: int = 0, wall0: float | None = None) -> None:
    series = store.series_id(name, branch, per, segment)
    walls = (wall0 if wall0 is not None else time.time() - 600) + steps * 0.02
    store.write_chunks([(series, steps[i:i + CHUNK_POINTS], values[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                        for i in range(0, len(steps), CHUNK_POINTS)])


def build_run(run_dir: Path) -> RunStore:
    store = RunStore(run_dir, create=True)
    one = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.add_event("start", "run started", branch=one, step=0, epoch=0)
    x = np.arange(1, 601)
    _write(store, "loss", one, x, 2.5 * np.exp(-x / 200) + 0.3)
    _write(store, "loss", one, np.arange(401, 441), np.full(40, 1.4), segment=1)  # a crash superseded these
    _write(store, "lr", one, np.array([0, 100, 250]), np.array([0.05, 0.025, 0.0125]))
    _write(store, "momentum", one, np.array([0]), np.array([0.9]))
    for epoch, end in enumerate(range(100, 601, 100), start=1):
        store.add_epoch(one, epoch, end)
    _write(store, "val_loss", one, np.arange(100, 601, 100), 2.4 * np.exp(-np.arange(100, 601, 100) / 220) + 0.35,
           per=PER_EPOCH)
    command = store.enqueue_command(cmd.SET_LR, {"value": 0.025}, source="dashboard", require_live=False)
    store.finish_command(command, cmd.APPLIED, branch=one, step=100, result={"before": 0.05, "after": 0.025})
    store.add_event("hparams", "lr changed by the scheduler", branch=one, step=250,
                    data={"before": {"lr": 0.025, "momentum": 0.9}, "after": {"lr": 0.0125, "momentum": 0.9},
                          "by": "scheduler"})
    store.add_event("stopped", "stopped at step 200 with a final checkpoint", branch=one, step=200)
    store.add_event("resume", "resumed from checkpoint #2 (epoch 2, step 200) after a clean stop", branch=one, step=200)
    store.add_event("resume", "resumed from checkpoint #4 (epoch 4, step 400) after the trainer died", branch=one,
                    step=400)
    for epoch in (1, 2, 3, 4, 5):
        store.add_checkpoint(branch=one, epoch=epoch, step=100 * epoch, step_in_epoch=100, file=f"e{epoch}.pt",
                             sha256="0" * 64, size=1, hparams={"lr": 0.05, "momentum": 0.9},
                             metrics={"val_loss": 1.0 / epoch}, reason="epoch")
    two = store.new_branch(parent=one, from_checkpoint=5, start_step=500, start_epoch=5)
    store.add_event("rollback", "rolled back to checkpoint #5", branch=two, step=500,
                    data={"checkpoint": 5, "from_step": 600, "from_branch": one,
                          "before": {"lr": 0.0125, "momentum": 0.9}, "after": {"lr": 0.05, "momentum": 0.9}})
    x2 = np.arange(501, 700)
    _write(store, "loss", two, x2, 2.5 * np.exp(-x2 / 150) + 0.25)
    _write(store, "lr", two, np.array([500]), np.array([0.05]))
    _write(store, "momentum", two, np.array([500]), np.array([0.9]))
    store.add_epoch(two, 6, 600)
    _write(store, "val_loss", two, np.array([600]), np.array([0.9]), per=PER_EPOCH)
    store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                       heartbeat=time.time(), epoch=7, max_epochs=30, step=699, step_in_epoch=99,
                       steps_per_epoch=100, branch=two, lr=0.05, momentum=0.9, optimizer="SGD", message="")
    return store


def _keep_training(run_dir: Path, stop: threading.Event) -> None:
    """Log a step every 20 ms (50 steps/s) on branch 2 and keep the heartbeat fresh."""
    store = RunStore(run_dir)
    step = 699
    while not stop.wait(0.2):
        steps = np.arange(step + 1, step + 11)
        series = store.series_id("loss", 2, PER_STEP)
        store.write_chunks([(series, steps, 0.3 + 0.01 * np.sin(steps), time.time() - 0.2 + 0.02 * np.arange(1, 11))])
        step += 10
        store.write_status(heartbeat=time.time(), step=step, step_in_epoch=step % 100)
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cockpit")
    build_run(root / "run").close()
    stop = threading.Event()
    trainer = threading.Thread(target=_keep_training, args=(root / "run", stop), daemon=True)
    trainer.start()
    port = _free_port()
    log = (root / "streamlit.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal", "--", "--root", str(root)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, root / "streamlit.log")
        yield url
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=20)
        log.close()
        trainer.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser: Any, url: str, width: int, height: int) -> Page:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(WAIT_S * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.__errors = errors  # type: ignore[attr-defined]
    page.goto(url)
    page.wait_for_function("(sel) => { const gd = document.querySelector(sel); return gd && gd._fullLayout"
                           " && gd.data && gd.data.length > 8; }", arg=PLOT, timeout=WAIT_S * 1000)
    page.locator(".st-key-rollback button").wait_for()
    page.locator('[data-testid="stMetric"]').first.wait_for()
    return page


def _inside(page: Page, selector: str, viewport: dict[str, int]) -> dict[str, float]:
    locator = page.locator(selector).first
    box = locator.bounding_box()
    assert box is not None, f"{selector} is not on the page"
    assert box["x"] >= 0 and box["y"] >= 0, (selector, box)
    assert box["x"] + box["width"] <= viewport["width"] + 0.5, (selector, box, viewport)
    assert box["y"] + box["height"] <= viewport["height"] + 0.5, (selector, box, viewport)
    return box


COCKPIT = {
    "chart": PLOT,
    "lr × ½": ".st-key-lr_half button",
    "lr × 2": ".st-key-lr_double button",
    "exact lr": ".st-key-lr_exact input",
    "set lr": ".st-key-lr_set button",
    "lr slider": '.st-key-lr_choice [data-testid="stSlider"]',
    "momentum slider": '.st-key-one_minus_beta [data-testid="stSlider"]',
    "set β": ".st-key-momentum_set button",
    "pause": ".st-key-pause button",
    "roll back to": ".st-key-rollback_target",
    "roll back": ".st-key-rollback button",
    "status": '[data-testid="stMetric"]',
}


@pytest.mark.parametrize("width,height", [(1366, 768), (1920, 1080)])
def test_the_curve_and_its_controls_fit_one_screen(dashboard: str, browser: Any, width: int, height: int,
                                                   tmp_path: Path) -> None:
    page = _open(browser, dashboard, width, height)
    try:
        viewport = {"width": width, "height": height}
        boxes = {name: _inside(page, selector, viewport) for name, selector in COCKPIT.items()}
        # The fate of a command shows in the same column, also in sight: click × ½ and look (it
        # halves the lr the run will have: 0.05 shown, or the other size's pending 0.025).
        page.locator(".st-key-lr_half button").click()
        fate = page.locator('[data-testid="stAlert"]').filter(has_text=re.compile(r"#\d+ set lr 0\.0(25|125): pending"))
        fate.first.wait_for()
        _inside(page, '[data-testid="stAlert"] >> text=/set lr 0.0(25|125): pending/', viewport)
        # The chart takes most of the width, and the height of the window.
        assert boxes["chart"]["width"] > 0.55 * width
        assert boxes["chart"]["height"] > 0.75 * height
        assert page.evaluate("() => document.scrollingElement.scrollTop") == 0
        shot = (SHOTS or tmp_path) / f"cockpit-{width}x{height}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        assert page.__errors == []  # type: ignore[attr-defined]
    finally:
        page.close()


def test_the_chart_reads_colours_ticks_and_markers(dashboard: str, browser: Any) -> None:
    page = _open(browser, dashboard, 1366, 768)
    try:
        chart = page.evaluate("""(sel) => {
            const gd = document.querySelector(sel);
            const legend = Array.from(gd.querySelectorAll('g.legend g.traces')).map((g) => ({
                name: g.querySelector('text.legendtext').textContent,
                stroke: (g.querySelector('path.js-line') || {getAttribute: () => null}).getAttribute('style') || '',
            }));
            const ticks = (ax) => Array.from(gd.querySelectorAll(`g.${ax}tick text`)).map((t) => t.textContent);
            return {legend, lrTicks: ticks('y3'), betaRange: gd._fullLayout.yaxis4.range,
                    markers: gd._fullData.filter((t) => t.meta && t.meta.markers).map((t) => ({
                        kind: t.meta.markers, symbol: t.marker.symbol, n: t.x.length, text: t.text}))};
        }""", PLOT)
        legend = {entry["name"]: entry["stroke"] for entry in chart["legend"]}
        # One colour per metric on the live line (branch 2 and branch 1 up to its fork); what branch 1
        # did after the fork, faint under one entry; a crash's superseded points dotted.
        colour = lambda style: re.search(r"stroke: (rgb\([^)]*\))", style).group(1)  # noqa: E731
        dashed = lambda style: "stroke-dasharray" in style and "stroke-dasharray: none" not in style  # noqa: E731
        assert list(legend) == ["1 abandoned branch", "superseded by a crash", "loss", "val_loss", "lr nudges",
                                "lr by scheduler", "rollbacks", "stops", "crashes", "restarts"]
        assert colour(legend["loss"]) == colour(legend["superseded by a crash"]) != colour(legend["val_loss"])
        assert dashed(legend["superseded by a crash"]) and not dashed(legend["loss"])
        assert colour(legend["1 abandoned branch"]) != colour(legend["loss"])
        # Log-lr ticks a person can read: 1 and 3 of each decade.
        assert chart["lrTicks"] and all(re.fullmatch(r"[13](e-\d+)?|0\.0*[13]", t) for t in chart["lrTicks"]), \
            chart["lrTicks"]
        assert {"0.01", "0.03"} <= set(chart["lrTicks"])
        # The momentum axis fits β.
        lo, hi = chart["betaRange"]
        assert 0.8 <= lo < 0.9 < hi <= 1.0
        # Markers: nudge, scheduler change, rollback, stop, restart, crash, each its own kind.
        by_kind = {m["kind"]: m for m in chart["markers"]}
        assert set(by_kind) == {"lr", "auto_lr", "rollback", "stop", "restart", "crash"}
        assert by_kind["lr"]["symbol"] != by_kind["auto_lr"]["symbol"]
        assert by_kind["auto_lr"]["text"] == ["lr 0.025 → 0.0125 at step 250 (by scheduler, no command)"]
        assert "the trainer died" in by_kind["crash"]["text"][0] and by_kind["stop"]["n"] == 1
        # The lr slider says what the lr is.
        assert page.locator(".st-key-lr_choice input[type=range]").get_attribute("aria-valuetext") == "0.05"
        # Throughput in the status.
        status = page.locator('[data-testid="stProgress"]').inner_text()
        rate = float(re.search(r"([\d.]+) steps/s", status).group(1))
        assert 20 < rate < 80, status
        assert page.__errors == []  # type: ignore[attr-defined]
    finally:
        page.close()


# True once the browser's Cache Storage holds the plotly.js bundle (it is stored after the first draw).
CACHED_PLOTLY = """async () => {
    for (const name of await caches.keys()) {
        const requests = await (await caches.open(name)).keys();
        if (requests.some((r) => r.url.includes("plotly-basic"))) return true;
    }
    return false;
}"""


def test_a_second_visit_does_not_fetch_plotly_again(dashboard: str, browser: Any) -> None:
    """plotly.js is kept in the browser's Cache Storage under its content-versioned URL."""
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    try:
        fetched: list[str] = []
        context.on("request", lambda request: fetched.append(request.url) if "plotly-basic" in request.url else None)
        for visit in (1, 2):
            page = context.new_page()
            page.goto(dashboard)
            page.wait_for_function("(sel) => { const gd = document.querySelector(sel); return gd && gd._fullLayout"
                                   " && gd.data && gd.data.length > 8; }", arg=PLOT, timeout=WAIT_S * 1000)
            if visit == 1:
                assert len(fetched) == 1, fetched
                page.wait_for_function(CACHED_PLOTLY, timeout=WAIT_S * 1000)  # stored before the page goes
            page.close()
        assert len(fetched) == 1, fetched  # the second visit drew from the cached copy
    finally:
        context.close()


# -- the worst state: after a rollback, a divergence and a hint at once ------------------------------
DIVERGED = "loss jumped to 8.82 at step 698: its 10-step average 1.771 rose far above its 100-step average 0.3905"
WORST = {
    **{name: selector for name, selector in COCKPIT.items() if name != "pause"},
    "resume": ".st-key-resume button",
    "checkpoint": ".st-key-checkpoint button",
    "stop": ".st-key-stop button",
    "exact β": ".st-key-momentum_exact input",
    "rollback hyperparameters": ".st-key-rollback_hparams",
    "skip batches": ".st-key-rollback_skip input",
    "optimizer picker": ".st-key-optimizer_choice",
    "remedy": ".st-key-remedy button",
    "divergence": '[data-testid="stAlert"]:has-text("Divergence")',
    "fates": '[data-testid="stAlert"]:has-text("set lr"):has-text(": pending")',
}


def build_worst_run(run_dir: Path) -> None:
    """The cockpit's run (two branches: a rollback), paused by a divergence on branch 2, with a
    momentum window longer than an epoch (a hint)."""
    store = build_run(run_dir)
    store.add_event("divergence", f"divergence: {DIVERGED}; run paused; remedy: roll back to checkpoint #5 with "
                    "lr 0.025", branch=2, step=698, data={"what": DIVERGED, "checkpoint": 5, "suggested_lr": 0.025})
    # Two optimizers (a GAN): the controls gain the picker of the one they nudge.
    optimizers = {"D": {"type": "SGD", "lr": 0.05, "momentum": 0.995}, "G": {"type": "Adam", "lr": 2e-4, "momentum": 0.5}}
    store.write_status(state="paused", momentum=0.995, message=f"paused at step 699: divergence: {DIVERGED}",
                       optimizers=json.dumps(optimizers))
    store.close()


def _heartbeat(run_dir: Path, stop: threading.Event) -> None:
    store = RunStore(run_dir)
    while not stop.wait(0.5):
        store.write_status(heartbeat=time.time())
    store.close()


@pytest.fixture(scope="module")
def worst_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("worst")
    build_worst_run(root / "run")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(root / "run", stop), daemon=True)
    beat.start()
    try:
        with dashboard_of(root / "run", root) as url:
            yield url
    finally:
        stop.set()
        beat.join(timeout=10)


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"] and \
        a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]


@pytest.mark.parametrize("sidebar", ["closed", "open"])
def test_the_worst_state_fits_1366x768_with_the_sidebar_closed_or_open(worst_dashboard: str, browser: Any,
                                                                        sidebar: str, tmp_path: Path) -> None:
    viewport = {"width": 1366, "height": 768}
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(WAIT_S * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(worst_dashboard)
        page.locator(".st-key-remedy button").wait_for()
        page.locator('[data-testid="stVerticalBlock"][class*="st-key-hint-momentum_window"]').wait_for()
        page.locator(".st-key-babysit_clicks_nudges [data-testid]").first.wait_for(state="attached")
        if sidebar == "open":
            page.locator('[data-testid="stExpandSidebarButton"]').click()
            page.wait_for_function("() => { const r = document.querySelector('[data-testid=stSidebar]')"
                                   ".getBoundingClientRect(); return r.x >= 0 && r.width > 200; }")
            page.locator(".st-key-lr_double button").wait_for()
        page.locator(".st-key-lr_double button").click()
        page.locator(".st-key-lr_double button").click()
        toast = page.locator('[data-testid="stToast"]').first
        toast.wait_for()
        # Both clicks acknowledged, in one box (the earlier test's two are pending still: these double them).
        expect(page.locator(WORST["fates"])).to_have_text(
            re.compile(r"#\d+ set lr of optimizer D [\d.]+: pending\s*#\d+ set lr of optimizer D [\d.]+: pending"),
            timeout=WAIT_S * 1000)
        page.wait_for_function("(sel) => { const gd = document.querySelector(sel); return gd && gd._fullLayout"
                               " && gd.data && gd.data.length > 10; }", arg=PLOT)
        # Everything a person needs in that state, in sight without scrolling.
        boxes = {name: _inside(page, selector, viewport) for name, selector in WORST.items()}
        assert page.evaluate("() => document.scrollingElement.scrollTop") == 0
        assert "#5" in page.locator(WORST["remedy"]).inner_text()
        # No label cut short ("momen…", "Checkp…").
        cut = page.evaluate("""() => Array.from(document.querySelectorAll('.st-key-cockpit_side .stMarkdownEllipsis'))
            .filter((e) => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1).map((e) => e.textContent)""")
        assert cut == []
        # The toasts cover neither the numbers nor the controls.
        toasts = [t.bounding_box() for t in page.locator('[data-testid="stToast"]').all() if t.is_visible()]
        metrics = [m.bounding_box() for m in page.locator('[data-testid="stMetric"]').all()]
        side = page.locator(".st-key-cockpit_side").bounding_box()
        assert toasts and not any(_overlap(t, m) for t in toasts for m in metrics + [side])
        assert boxes["chart"]["width"] > 0.45 * viewport["width"]
        page.screenshot(path=str((SHOTS or tmp_path) / f"cockpit-worst-sidebar-{sidebar}-1366x768.png"))
        assert errors == []
    finally:
        page.close()
