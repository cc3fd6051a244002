"""End to end, the way a user meets babysit: `python -m babysit demo`, then Chromium on its page.

Starts the real demo (a detached trainer process plus the Streamlit dashboard), opens the page in
Debian's Chromium with Playwright and checks the whole loop through the run store: the curve
appears and grows, an lr nudge clicked in the page is acknowledged there and applied by the
trainer, and a rollback clicked in the page starts branch 2, drawn beside branch 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, expect

from babysit.store import RunStore
from tests.conftest import REPO, babysit_cli, chromium_page, wait_for

PLOT = ".babysit-live-chart .js-plotly-plot"
INITIAL_LR = 0.05  # the demo job's default (babysit/jobs/digits.py)
START_S = 120.0  # the demo: trainer up (torch import, data) and streamlit healthy, on 2 busy cores
WAIT_S = 45.0  # one page action or acknowledgement
# The first epoch (270 steps) takes ~3 s on an idle machine, but over a minute on two cores shared
# with Chromium, Streamlit and other work: torch's two spinning intra-op threads fight for them.
EPOCH_S = 180.0
URL_LINE = re.compile(r"babysit: dashboard at (http://127\.0\.0\.1:\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Demo:
    url: str
    run_dir: Path
    output: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        result = babysit_cli("status", "--run-dir", str(self.run_dir), "--json", check=True)
        return json.loads(result.stdout)


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for a parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _is_our_trainer(pid: int, run_dir: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    return b"train" in argv and str(run_dir).encode() in argv


def _stop_trainer(run_dir: Path, output: list[str]) -> None:
    """Stop the demo's detached trainer: ask it politely, then make sure it is gone."""
    pids = {int(m.group(1)) for line in output if (m := re.search(r"demo trainer started in .* \(pid (\d+)", line))}
    if (run_dir / "run.db").exists():
        result = babysit_cli("status", "--run-dir", str(run_dir), "--json")
        if result.returncode == 0 and json.loads(result.stdout).get("pid"):
            pids.add(int(json.loads(result.stdout)["pid"]))
        if any(_alive(pid) for pid in pids):
            babysit_cli("stop", "--run-dir", str(run_dir), "--wait", "--timeout", "30", timeout=60)
    for pid in pids:
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid) and _is_our_trainer(pid, run_dir):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def running_demo(run_dir: Path, *extra: str) -> Iterator[Demo]:
    """`python -m babysit demo` on a fresh run directory; dashboard and trainer stopped at the end."""
    output: list[str] = []
    process = subprocess.Popen(
        [sys.executable, "-m", "babysit", "demo", "--job", "digits", "--run-dir", str(run_dir),
         "--port", str(_free_port()), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + START_S
        url = None
        while url is None:
            url = next((m.group(1) for line in list(output) if (m := URL_LINE.search(line))), None)
            if url is None and (process.poll() is not None or time.monotonic() > deadline):
                reader.join(timeout=5)
                raise AssertionError(f"the demo did not print its URL (exit {process.poll()}):\n{''.join(output)}")
            time.sleep(0.1)
        yield Demo(url=url, run_dir=run_dir, output=output)
    finally:
        try:
            if process.poll() is None:
                process.terminate()  # the demo ends its streamlit server with it
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        finally:
            _stop_trainer(run_dir, output)


def test_demo_hands_its_checkpoint_cadence_to_the_trainer(tmp_path: Path) -> None:
    """`demo --checkpoint-every-steps 7`: the trainer it starts checkpoints at the multiples of 7
    (the newest five periodic ones are kept: which five depends on how far it got)."""
    with running_demo(tmp_path / "demo", "--checkpoint-every-steps", "7") as started:
        store = RunStore(started.run_dir)
        periodic = wait_for(lambda: (steps := [c["step"] for c in store.checkpoints() if c["reason"] == "periodic"])
                            [1:] and steps, START_S, what="two periodic checkpoints")
        assert all(step % 7 == 0 for step in periodic) and periodic == sorted(set(periodic))
        assert store.get_meta("config")["checkpoint_every_steps"] == 7


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """A demo of the test's own: the nudge-and-rollback test moves it to branch 2."""
    with running_demo(tmp_path / "demo") as started:
        yield started


@pytest.fixture(scope="module")
def watched_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One demo for the tests that only watch the chart and nudge lr (zoom, freeze): each opens its
    own browser session on it, so what one does to its page's view is not seen by the other."""
    with running_demo(tmp_path_factory.mktemp("watched") / "demo") as started:
        yield started


# -- reading the page ------------------------------------------------------------------------------
def _until(what: str, check: Callable[[], Any], page: Page, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        page.wait_for_timeout(200)


def _loss_traces(page: Page) -> dict[int, dict[str, Any]]:
    """Per branch, the train-loss points on the chart (on the live line, which joins several
    branches, each branch's share of it; an abandoned branch's faint sketch; a branch drawn in
    full): how the traces are named, how many points in all, and the smallest and largest step."""
    traces = page.evaluate(
        """(sel) => {
            const gd = document.querySelector(sel);
            if (!gd || !gd.data) return [];
            return gd.data.filter((t) => t.meta && t.meta.name === 'loss' && t.meta.role !== 'superseded')
                .map((t) => ({name: t.name || '', role: t.meta.role, branch: t.meta.branch, pieces: t.meta.pieces || [],
                              x: Array.from(t.x || []), custom: t.customdata ? Array.from(t.customdata) : null}));
        }""",
        PLOT,
    )
    branches: dict[int, dict[str, Any]] = {}

    def add(branch: int, xs: list[Any], name: str) -> None:
        xs = [float(x) for x in xs if x is not None]
        if not xs:
            return
        entry = branches.setdefault(branch, {"points": 0, "min_x": float("inf"), "max_x": float("-inf"), "names": []})
        entry["points"] += len(xs)
        entry["min_x"] = min(entry["min_x"], min(xs))
        entry["max_x"] = max(entry["max_x"], max(xs))
        entry["names"].append(name)

    for trace in traces:
        if trace["role"] == "live":
            starts = [start for _, start in trace["pieces"]] + [len(trace["x"])]
            for (branch, start), stop in zip(trace["pieces"], starts[1:]):
                add(branch, trace["x"][start:stop], trace["name"])
        elif trace["role"] == "abandoned":
            for branch in set(trace["custom"]):
                add(branch, [x for x, b in zip(trace["x"], trace["custom"]) if b == branch], trace["name"])
        else:
            add(trace["branch"], trace["x"], trace["name"])
    return branches


def _metric(page: Page, label: str) -> Locator:
    card = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))
    return card.locator('[data-testid="stMetricValue"]')


def _acknowledged(page: Page, sent: str) -> int:
    """Wait for the click's toast ("Sent #N: ...") and return N; fail at once on "Not sent: ..."."""
    pattern = re.compile(rf"Sent #(\d+): {re.escape(sent)}")
    toasts = page.locator('[data-testid="stToast"]')

    def toast() -> re.Match[str] | None:
        texts = toasts.all_inner_texts()
        refused = [t for t in texts if "Not sent:" in t]
        assert not refused, f"the page refused the command: {refused}"
        return next(filter(None, map(pattern.search, texts)), None)

    return int(_until(f"the toast 'Sent #N: {sent}'", toast, page).group(1))


def _applied(page: Page, command_id: int, text: str) -> str:
    """Wait for the page's status box to say command #N was applied, and return its text."""
    alert = page.locator('[data-testid="stAlert"]').filter(
        has_text=re.compile(rf"#{command_id} {re.escape(text)}: applied at step \d+"))
    expect(alert.first).to_be_visible(timeout=WAIT_S * 1000)
    return alert.first.inner_text()


def _applied_step(status_text: str) -> int:
    match = re.search(r"applied at step (\d+)", status_text)
    assert match, status_text
    return int(match.group(1))


def _choose_checkpoint(page: Page, label_start: str) -> None:
    """Pick an option in the "Roll back to" select (a combobox: open it, click the option), even
    if it is already the one shown. The checkpoints section reruns every 2 s and may redraw the
    open list under the click, so this tries again until the select shows the option."""
    combo = page.get_by_role("combobox", name="Roll back to")
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            combo.click(timeout=5000)
            option = page.get_by_role("option").filter(has_text=label_start).first
            if not option.is_visible():
                combo.locator("xpath=following-sibling::button").click(timeout=5000)  # the "Open" arrow
            option.click(timeout=5000)
        except PlaywrightError:  # the list was redrawn under the click; look again
            page.keyboard.press("Escape")
        if combo.input_value().startswith(label_start) and page.get_by_role("option").count() == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"could not choose {label_start!r} in Roll back to; it shows {combo.input_value()!r}")
        page.wait_for_timeout(200)


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f"{wall % 1:.2f}"[1:]


def _what_went_wrong(page: Page, demo: Demo, shot: Path) -> str:
    """For a failure message: what the page says, the commands' fates, and the trainer's log."""
    lines = []
    try:
        page.screenshot(path=str(shot), full_page=True)
        lines.append(f"screenshot: {shot}")
        for testid in ("stToast", "stAlert", "stMetric", "stCaption"):
            lines += [f"{testid}: {t!r}" for t in page.locator(f'[data-testid="{testid}"]').all_inner_texts()]
    except PlaywrightError as error:
        lines.append(f"(the page could not be read: {error})")
    if (demo.run_dir / "run.db").exists():
        store = RunStore(demo.run_dir)
        status = store.status()
        lines.append(f"status: {status.get('effective_state')} step {status.get('step')} branch {status.get('branch')} "
                     f"lr {status.get('lr')} heartbeat {time.time() - (status.get('heartbeat') or 0):.1f} s ago")
        lines += [f"command #{c['id']} from {c['source']} at {_clock(c['created'])}: {c['kind']} {c['args']}: "
                  f"{c['state']} at step {c['step']} {c['result'] or c['reason'] or ''}" for c in store.commands()]
        lines += [f"event {e['kind']} at step {e['step']}: {e['message']}" for e in store.events()[-10:]]
    log = demo.run_dir / "trainer.log"
    if log.exists():
        lines.append("trainer.log ends:\n" + log.read_text(errors="replace")[-1500:])
    return "\n".join(lines)


# -- the test --------------------------------------------------------------------------------------
def test_demo_in_the_browser_curve_lr_nudge_and_rollback(demo: Demo, tmp_path: Path) -> None:
    with chromium_page(timeout_s=WAIT_S) as (page, errors):
        try:
            _curve_lr_nudge_and_rollback(page, demo)
        except (AssertionError, PlaywrightError) as failure:
            raise AssertionError(f"{failure}\n\n{_what_went_wrong(page, demo, tmp_path / 'failure.png')}") from failure
    assert errors == []


def _curve_lr_nudge_and_rollback(page: Page, demo: Demo) -> None:
    page.goto(demo.url)

    # 1. The curve appears (plotly.js takes seconds to start) and grows as the trainer runs.
    first = _until("branch 1's loss curve", lambda: _loss_traces(page).get(1), page, timeout=90)
    grown = _until("branch 1's loss curve to grow",
                   lambda: (b := _loss_traces(page).get(1)) and b["max_x"] >= first["max_x"] + 20 and b, page)
    assert grown["points"] > first["points"]  # every step is drawn until a window holds 5,000
    assert "loss" in grown["names"]  # the live line, named by its metric
    expect(_metric(page, "lr")).to_have_text("0.05")
    expect(page.locator('[data-testid="stProgress"]')).to_contain_text("branch 1")

    # The first epoch's checkpoint, taken before the nudge: lr 0.1 can make the demo diverge,
    # and then the guard pauses the run, and no epoch ends until someone rolls back.
    checkpoint = _until("the first epoch's checkpoint", lambda: (c := demo.status()["checkpoints"]) and c[0],
                        page, timeout=EPOCH_S)
    assert (checkpoint["epoch"], checkpoint["branch"], checkpoint["hparams"]["lr"]) == (1, 1, INITIAL_LR)

    # 2. lr × 2 in the page: toast, then "applied at step S", and the trainer really uses it.
    double = page.locator(".st-key-lr_double button")
    expect(double).to_have_text("× 2")
    double.click()
    lr_command = _acknowledged(page, "set lr 0.1")
    status_text = _applied(page, lr_command, "set lr 0.1")
    nudged_at = _applied_step(status_text)
    assert nudged_at > checkpoint["step"]
    status = demo.status()
    assert status["lr"] == INITIAL_LR * 2 == 0.1
    assert status["branch"] == 1 and status["step"] >= nudged_at
    assert [c for c in status["pending_commands"] if c["source"] == "dashboard"] == []
    expect(_metric(page, "lr")).to_have_text("0.1")

    # 3. Roll back to that checkpoint from the page, with its hyperparameters: branch 2 starts
    # there with lr 0.05 again, and the chart draws it beside branch 1.
    rollback = page.locator(".st-key-rollback button")
    expect(rollback).to_contain_text("Roll back")
    _choose_checkpoint(page, f"#{checkpoint['id']} · epoch 1 · step {checkpoint['step']} · branch 1")
    expect(page.get_by_role("radio", name=re.compile(r"^checkpoint's"))).to_be_checked()
    rollback.click()
    sent = f"rollback to #{checkpoint['id']} (checkpoint hparams)"
    rollback_command = _acknowledged(page, sent)
    assert rollback_command > lr_command
    status_text = _applied(page, rollback_command, sent)
    restored = f"branch 2, epoch 1, step {checkpoint['step']}, checkpoint {checkpoint['id']}, lr 0.05, momentum 0.9"
    assert f"({restored})" in status_text
    rolled_back_at = _applied_step(status_text)
    assert rolled_back_at >= nudged_at
    status = demo.status()
    assert status["branch"] == 2 and status["lr"] == INITIAL_LR
    expect(page.locator('[data-testid="stProgress"]')).to_contain_text("branch 2")
    expect(_metric(page, "lr")).to_have_text("0.05")
    both = _until("branch 2's loss curve beside branch 1's",
                  lambda: (b := _loss_traces(page)).get(2) and b.get(1) and b, page)
    assert "loss" in both[2]["names"]  # branch 2 is the live line now
    assert both[2]["min_x"] >= checkpoint["step"]  # branch 2 starts where the checkpoint was taken
    # Branch 1 is still drawn, from its start (the live line's first stretch) to past the nudge (the
    # steps it ran after the checkpoint: its abandoned sketch).
    assert "1 abandoned branch" in both[1]["names"]
    assert both[1]["min_x"] <= 1 and both[1]["max_x"] >= nudged_at

    # Each click queued exactly one command (the guard may have queued a pause of its own).
    clicked = [(c["id"], c["kind"]) for c in RunStore(demo.run_dir).commands() if c["source"] == "dashboard"]
    assert clicked == [(lr_command, "set_lr"), (rollback_command, "rollback")], f"two clicks queued {clicked}"
    assert page.locator('[data-testid="stException"]').count() == 0


# -- zoom and log scale survive live refreshes (the real dashboard, the real trainer) ---------
COUNT_DRAWS = """(sel) => {
    const gd = document.querySelector(sel);
    if (!gd.__drawCount) { gd.__drawCount = 0; gd.on('plotly_afterplot', () => { gd.__drawCount += 1; }); }
    return gd.__drawCount;
}"""
VIEW = """(sel) => {
    const gd = document.querySelector(sel);
    const loss = gd.data.filter((t) => t.meta && t.meta.role === 'live' && t.meta.name === 'loss');
    return {x: gd.layout.xaxis.range.map(Number), autorange: !!gd.layout.xaxis.autorange,
            ytype: gd.layout.yaxis.type, steps: loss.flatMap((t) => Array.from(t.x)).filter((v) => v !== null)};
}"""


def _refreshes(page: Page, after: int, count: int = 2) -> None:
    """Wait until the chart was redrawn ``count`` times with new data after draw number ``after``."""
    _until(f"{count} refreshes of the chart", lambda: page.evaluate(COUNT_DRAWS, PLOT) >= after + count, page)


def test_zoom_and_log_scale_survive_live_refreshes(watched_demo: Demo) -> None:
    with chromium_page(timeout_s=WAIT_S) as (page, errors):
        page.goto(watched_demo.url)
        first = _until("branch 1's curve past step 60", lambda: (b := _loss_traces(page).get(1))
                       and b["max_x"] >= 60 and b, page, timeout=90)
        # Zoom to a window that reaches past the last step, so the trainer keeps filling it.
        lo, hi = 20.0, first["max_x"] + 400.0
        page.evaluate("([sel, lo, hi]) => Plotly.relayout(document.querySelector(sel), {'xaxis.range': [lo, hi]})",
                      [PLOT, lo, hi])
        zoomed = page.evaluate(VIEW, PLOT)
        assert zoomed["x"] == [lo, hi]
        inside_before = sum(lo <= s <= hi for s in zoomed["steps"])
        _refreshes(page, page.evaluate(COUNT_DRAWS, PLOT))
        after = _until("new points inside the zoomed window", lambda: (v := page.evaluate(VIEW, PLOT))
                       and sum(lo <= s <= hi for s in v["steps"]) > inside_before + 10 and v, page)
        assert after["x"] == [lo, hi] and not after["autorange"]  # the view was not reset

        # Log scale on the loss axis, then more refreshes: it stays log, and the zoom stays.
        page.evaluate("(sel) => Plotly.relayout(document.querySelector(sel), {'yaxis.type': 'log'})", PLOT)
        _refreshes(page, page.evaluate(COUNT_DRAWS, PLOT))
        logged = page.evaluate(VIEW, PLOT)
        assert logged["ytype"] == "log" and logged["x"] == [lo, hi]
        assert max(logged["steps"]) > max(after["steps"])  # the data did change meanwhile
    assert errors == []


# -- "Freeze" stops the chart, not the status or the commands ------------------------------------
def _shown_step(page: Page) -> int:
    return int(_metric(page, "step").inner_text().replace(",", ""))


def _settled_draws(page: Page, quiet_s: float = 3.0) -> int:
    """The chart's draw count once it has stayed the same for ``quiet_s`` seconds."""
    last = page.evaluate(COUNT_DRAWS, PLOT)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        page.wait_for_timeout(quiet_s * 1000)
        now = page.evaluate(COUNT_DRAWS, PLOT)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the chart kept redrawing for {WAIT_S:g} s after Freeze was switched on")


def _open_sidebar(page: Page) -> None:
    """The chart options live in the sidebar, collapsed at first so the cockpit has the width."""
    page.locator('[data-testid="stExpandSidebarButton"]').click()
    expect(page.get_by_text("Freeze (stop refreshing)")).to_be_in_viewport()


def test_freeze_stops_the_chart_while_status_and_commands_stay_live(watched_demo: Demo) -> None:
    # The zoom test, on the same demo, leaves lr at the demo's 0.05: halved here.
    with chromium_page(timeout_s=WAIT_S) as (page, errors):
        page.goto(watched_demo.url)
        _until("branch 1's curve past step 30", lambda: (b := _loss_traces(page).get(1)) and b["max_x"] >= 30,
               page, timeout=90)
        _open_sidebar(page)
        page.get_by_text("Freeze (stop refreshing)").click()
        draws = _settled_draws(page)  # the toggle's own rerun draws the chart once more, then no more
        frozen = max(page.evaluate(VIEW, PLOT)["steps"])
        step = _shown_step(page)
        _until("the step shown to move on by 60", lambda: _shown_step(page) >= max(step, frozen) + 60, page,
               timeout=EPOCH_S)

        # A nudge sent while frozen is acknowledged and its fate shown, as always.
        page.locator(".st-key-lr_half button").click()
        command = _acknowledged(page, "set lr 0.025")
        _applied(page, command, "set lr 0.025")
        assert page.evaluate(COUNT_DRAWS, PLOT) == draws
        assert max(page.evaluate(VIEW, PLOT)["steps"]) == frozen

        page.get_by_text("Freeze (stop refreshing)").click()
        _until("the chart to catch up after unfreezing",
               lambda: max(page.evaluate(VIEW, PLOT)["steps"]) >= frozen + 60, page)
    assert errors == []
