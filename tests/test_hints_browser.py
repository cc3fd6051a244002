"""Hints on the page, in Chromium: a hint shows with its numbers, its button queues its command,
and dismissing it hides it for good (a reload, a new session, does not bring it back).

The run is written with the store's own writes, as a trainer writes it: eight epochs of a loss
that fell in its first steps and then stayed flat, at lr 0.05 (a plateau), with momentum 0.995 (a
window of ~200 steps, longer than the epoch of 100); a thread keeps the heartbeat fresh, so the
page takes commands as from a running trainer.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np

from babysit import commands as cmd
from babysit.store import CHUNK_POINTS, PER_STEP, RunStore
from tests.conftest import chromium_page, dashboard_of, wait_for

WAIT_S = 60.0
PLATEAU = ".st-key-hint-plateau-branch1-lr0-05"
MOMENTUM = ".st-key-hint-momentum_window-branch1-beta0-995"


def _plateau_run(run_dir: Path) -> None:
    store = RunStore(run_dir, create=True)
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    steps = np.arange(1, 801)
    losses = 0.8 * (1 + 0.1 * np.random.default_rng(0).standard_normal(800))
    losses[:10] = np.linspace(2.3, 0.8, 10)  # it came down first: a plateau, not a run that never learned
    walls = time.time() - 60 + steps * 0.01
    series = store.series_id("loss", branch, PER_STEP)
    store.write_chunks([(series, steps[i:i + CHUNK_POINTS], losses[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                        for i in range(0, 800, CHUNK_POINTS)])
    for epoch in range(1, 9):
        store.add_epoch(branch, epoch, epoch * 100)
    store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                       heartbeat=time.time(), epoch=9, max_epochs=30, step=800, step_in_epoch=0,
                       steps_per_epoch=100, branch=branch, lr=0.05, momentum=0.995, optimizer="SGD", message="")
    store.close()


def _heartbeat(run_dir: Path, stop: threading.Event) -> None:
    store = RunStore(run_dir)
    while not stop.wait(0.5):
        store.write_status(heartbeat=time.time())
    store.close()


def test_a_hint_shows_acts_through_its_button_and_stays_dismissed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _plateau_run(run_dir)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(run_dir, stop), daemon=True)
    beat.start()
    store = RunStore(run_dir)
    try:
        with dashboard_of(run_dir, tmp_path) as url, chromium_page(1366, 1200, timeout_s=WAIT_S) as (page, errors):
            page.goto(url)
            plateau = page.locator(PLATEAU)
            plateau.wait_for()
            text = plateau.inner_text()
            assert "Plateau: try lr ×½" in text
            assert "over the last 3 epochs" in text and "flat since epoch" in text, text
            assert "Momentum window longer than an epoch" in page.locator(MOMENTUM).inner_text()
            # Its button queues the command, from the dashboard, like every other button.
            plateau.get_by_role("button", name="lr × ½ (0.025)").click()
            row = wait_for(lambda: next((c for c in store.commands() if c["kind"] == cmd.SET_LR), None),
                           WAIT_S, what="the hint's set lr command")
            assert (row["args"], row["source"], row["state"]) == ({"value": 0.025}, "dashboard", cmd.PENDING)
            page.locator('[data-testid="stAlert"]').filter(has_text=f"#{row['id']} set lr 0.025: pending").wait_for()
            # Dismissed: gone from the page, kept in the run store.
            plateau.get_by_role("button", name="Dismiss").click()
            plateau.wait_for(state="detached")
            assert store.dismissed_hints() == {"plateau@branch1:lr0.05"}
            # A reload is a new session: the other hint shows again, the dismissed one does not.
            page.reload()
            page.locator(MOMENTUM).wait_for()
            assert page.locator(PLATEAU).count() == 0
            assert len(store.commands()) == 1  # nothing queued without a click
            assert errors == []
    finally:
        stop.set()
        beat.join(timeout=10)
        store.close()
