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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, expect, sync_playwright

from tests.conftest import REPO, babysit_cli

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
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


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """`python -m babysit demo` on a fresh run directory; dashboard and trainer stopped at the end."""
    run_dir = tmp_path / "demo"
    output: list[str] = []
    process = subprocess.Popen(
        [sys.executable, "-m", "babysit", "demo", "--run-dir", str(run_dir), "--port", str(_free_port())],
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
    """Per branch, the train-loss traces on the chart (raw and smoothed): their names, how many
    points in all, and the smallest and largest step drawn."""
    traces = page.evaluate(
        """(sel) => {
            const gd = document.querySelector(sel);
            if (!gd || !gd.data) return [];
            return gd.data.map((t) => ({name: t.name || '', x: Array.from(t.x || []).filter((v) => v !== null)}));
        }""",
        PLOT,
    )
    branches: dict[int, dict[str, Any]] = {}
    for trace in traces:
        match = re.match(r"loss · branch (\d+)\b", trace["name"])
        if match and "superseded" not in trace["name"] and trace["x"]:
            entry = branches.setdefault(int(match.group(1)),
                                        {"points": 0, "min_x": float("inf"), "max_x": float("-inf"), "names": []})
            entry["points"] += len(trace["x"])
            entry["min_x"] = min(entry["min_x"], min(float(x) for x in trace["x"]))
            entry["max_x"] = max(entry["max_x"], max(float(x) for x in trace["x"]))
            entry["names"].append(trace["name"])
    return branches


def _metric(page: Page, label: str) -> Locator:
    card = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))
    return card.locator('[data-testid="stMetricValue"]')


def _acknowledged(page: Page, sent: str) -> int:
    """Wait for the click's toast ("Sent #N: ...") and return N."""
    pattern = re.compile(rf"Sent #(\d+): {re.escape(sent)}")
    toasts = page.locator('[data-testid="stToast"]')
    match = _until(f"the toast 'Sent #N: {sent}'",
                   lambda: next(filter(None, map(pattern.search, toasts.all_inner_texts())), None), page)
    return int(match.group(1))


def _applied(page: Page, command_id: int, text: str) -> str:
    """Wait for the page's status box to say command #N was applied, and return its text."""
    alert = page.locator('[data-testid="stAlert"]').filter(
        has_text=re.compile(rf"#{command_id} {re.escape(text)}: applied at step \d+"))
    expect(alert.first).to_be_visible(timeout=WAIT_S * 1000)
    return alert.first.inner_text()


def _choose_checkpoint(page: Page, label_start: str) -> None:
    """Pick an option in the "Roll back to" select (a combobox: open it, click the option). The
    history section reruns every 2 s and may redraw the open list, so this tries again."""
    combo = page.get_by_role("combobox", name="Roll back to")
    deadline = time.monotonic() + WAIT_S
    while not combo.input_value().startswith(label_start):
        if time.monotonic() > deadline:
            raise AssertionError(f"could not choose {label_start!r} in Roll back to; it shows {combo.input_value()!r}")
        try:
            combo.click(timeout=5000)
            option = page.get_by_role("option").filter(has_text=label_start).first
            if not option.is_visible():
                combo.locator("xpath=following-sibling::button").click(timeout=5000)  # the "Open" arrow
            option.click(timeout=5000)
        except PlaywrightError:  # the list was redrawn under the click; look again
            page.keyboard.press("Escape")
        page.wait_for_timeout(200)


# -- the test --------------------------------------------------------------------------------------
def test_demo_in_the_browser_curve_lr_nudge_and_rollback(demo: Demo) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_S * 1000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(demo.url)

            # 1. The curve appears (plotly.js takes seconds to start) and grows as the trainer runs.
            first = _until("branch 1's loss curve", lambda: _loss_traces(page).get(1), page, timeout=90)
            grown = _until("branch 1's loss curve to grow",
                           lambda: (b := _loss_traces(page).get(1)) and b["max_x"] >= first["max_x"] + 20 and b, page)
            assert grown["points"] > first["points"]  # every step is drawn until a window holds 5,000
            assert any(name.startswith("loss · branch 1") for name in grown["names"])
            expect(_metric(page, "lr")).to_have_text("0.05")
            expect(_metric(page, "branch")).to_have_text("1")

            # 2. lr × 2 in the page: toast, then "applied at step S", and the trainer really uses it.
            double = page.locator(".st-key-lr_double button")
            expect(double).to_have_text("× 2")
            double.click()
            lr_command = _acknowledged(page, "set lr 0.1")
            status_text = _applied(page, lr_command, "set lr 0.1")
            applied_step = int(re.search(r"applied at step (\d+)", status_text).group(1))  # type: ignore[union-attr]
            status = demo.status()
            assert status["lr"] == INITIAL_LR * 2 == 0.1
            assert status["step"] >= applied_step and status["pending_commands"] == []
            expect(_metric(page, "lr")).to_have_text("0.1", timeout=WAIT_S * 1000)

            # 3. Roll back to the first epoch's checkpoint from the page: a new branch, drawn beside
            # the old one.
            checkpoint = _until("the first epoch's checkpoint", lambda: (c := demo.status()["checkpoints"]) and c[0], page,
                                timeout=EPOCH_S)
            assert checkpoint["epoch"] == 1 and checkpoint["branch"] == 1
            rollback = page.locator(".st-key-rollback button")
            expect(rollback).to_contain_text("Roll back", timeout=WAIT_S * 1000)
            label = f"#{checkpoint['id']} · epoch 1 · step {checkpoint['step']} · branch 1"
            _choose_checkpoint(page, label)
            rollback.click()
            sent = f"rollback to #{checkpoint['id']} (checkpoint hparams)"
            rollback_command = _acknowledged(page, sent)
            assert rollback_command > lr_command
            status_text = _applied(page, rollback_command, sent)
            assert f"(branch 2, epoch 1, step {checkpoint['step']}, checkpoint {checkpoint['id']}" in status_text
            status = demo.status()
            assert status["branch"] == 2
            assert status["lr"] == checkpoint["hparams"]["lr"]  # the checkpoint's hparams, as chosen
            expect(_metric(page, "branch")).to_have_text("2", timeout=WAIT_S * 1000)
            both = _until("branch 2's loss curve beside branch 1's",
                          lambda: (b := _loss_traces(page)).get(2) and b.get(1) and b, page)
            assert any(name.startswith("loss · branch 2") for name in both[2]["names"])
            assert both[2]["min_x"] >= checkpoint["step"]  # branch 2 starts where the checkpoint was taken
            rolled_back_at = int(re.search(r"applied at step (\d+)", status_text).group(1))  # type: ignore[union-attr]
            assert rolled_back_at > checkpoint["step"]
            # Branch 1 is still drawn, from the start to past the checkpoint (the steps it ran after it).
            assert both[1]["min_x"] <= 1 and both[1]["max_x"] > checkpoint["step"]

            assert page.locator('[data-testid="stException"]').count() == 0
            assert errors == []
        finally:
            browser.close()
