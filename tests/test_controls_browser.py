"""The cockpit's controls against a real trainer, in Chromium: every click is one command (× 2
then × 2 is × 4 however fast), and the divergence remedy offers half of the healthy checkpoint's lr,
follows a nudge made while paused, and rolls back at what its button says.

Each test starts `python -m babysit train` on the digits job, a real Streamlit server of app.py and
a real Chromium at 1366×768.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from babysit import commands as cmd
from babysit.store import RunStore
from tests.conftest import chromium_page, dashboard_of, wait_for

WAIT_S = 90.0  # one acknowledgement or page update, on two cores shared with the trainer and Chromium
START_S = 240.0


def _open(page: Page, url: str) -> None:
    page.goto(url)
    page.locator(".st-key-lr_double button").wait_for(timeout=WAIT_S * 1000)
    # The page's click counter is in place (clicks before it are sent by the buttons themselves).
    page.locator(".st-key-babysit_clicks_nudges [data-testid]").first.wait_for(state="attached", timeout=WAIT_S * 1000)


def _commands(store: RunStore, kind: str) -> list[dict[str, Any]]:
    return [c for c in store.commands() if c["kind"] == kind and c["source"] == "dashboard"]


def _all_applied(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]] | None:
    """``rows`` once there are ``count`` of them (or more: then the assertions say so), all applied."""
    return rows if len(rows) >= count and all(r["state"] == cmd.APPLIED for r in rows) else None


def test_two_quick_clicks_on_times_two_make_times_four(tmp_path: Path, trainers) -> None:
    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--job", "digits", "--lr", "0.01", "--epochs", "100", "--epoch-passes", "1")
    trainer.wait_running(min_step=5, timeout=START_S)
    store = RunStore(run_dir)
    with dashboard_of(run_dir, tmp_path) as url, chromium_page(1366, 768, timeout_s=WAIT_S) as (page, errors):
        _open(page, url)
        # Two clicks 200 ms apart, where the button is (no waiting on the page in between): the
        # gap is what is tested, not a wait for something.
        box = page.locator(".st-key-lr_double button").bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.click(x, y)
        page.wait_for_timeout(200)
        page.mouse.click(x, y)
        both = wait_for(lambda: _all_applied(_commands(store, cmd.SET_LR), 2), WAIT_S, what="two nudges applied")
        assert [c["args"]["value"] for c in both] == [0.02, 0.04]
        assert [c["result"]["after"] for c in both] == [0.02, 0.04]
        wait_for(lambda: store.status()["lr"] == 0.04, WAIT_S, what="the trainer's lr at 0.04")
        # Two acknowledgements on the page: the fate of each command, in the status column.
        fates = page.locator('[data-testid="stAlert"]').filter(has_text=re.compile(
            rf"#{both[0]['id']} set lr 0\.02: applied at step \d+.*\n?.*#{both[1]['id']} set lr 0\.04: applied at step \d+"))
        expect(fates.first).to_be_visible(timeout=WAIT_S * 1000)
        # The acknowledgements are below the controls: they never move a button under a quick click.
        assert fates.first.bounding_box()["y"] > sum(page.locator(".st-key-rollback_hparams").bounding_box()[k]
                                                     for k in ("y", "height"))
        # Both clicks went through the page's click counter, numbered 1 and 2.
        assert page.locator(".st-key-babysit_clicks_nudges [data-counted]").get_attribute("data-counted") == "2"
        assert errors == []


def _send_exact_lr(page: Page, value: str) -> None:
    page.locator(".st-key-lr_exact input").fill(value)
    page.locator(".st-key-lr_set button").first.click()
    page.mouse.move(600, 5)  # away, as a hand does: "Set lr"'s tooltip would cover the button above it


def test_the_remedy_offers_half_the_checkpoints_lr_and_follows_a_nudge(tmp_path: Path, trainers) -> None:
    """lr 500 blows the run up: the remedy offers ½ × the checkpoint's 0.05, never 250; `set lr
    0.01` while paused changes it to 0.005; its click rolls back at 0.005, as its button said."""
    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--job", "digits", "--epochs", "100", "--epoch-passes", "3")
    trainer.wait_running(min_step=1, timeout=START_S)
    store = RunStore(run_dir)
    checkpoint = wait_for(lambda: store.checkpoints(), START_S, what="the first epoch's checkpoint")[0]
    assert checkpoint["hparams"]["lr"] == 0.05
    with dashboard_of(run_dir, tmp_path) as url, chromium_page(1366, 768, timeout_s=WAIT_S) as (page, errors):
        _open(page, url)
        # Early in an epoch, so that the blow-up is caught before the epoch's end writes a checkpoint.
        wait_for(lambda: 3 <= (store.status().get("step_in_epoch") or 0) <= 60, START_S, what="an epoch's start")
        _send_exact_lr(page, "500")
        divergence = wait_for(lambda: next((e for e in store.events() if e["kind"] == "divergence"), None), WAIT_S,
                              what="the guard's divergence")
        healthy = store.checkpoint(divergence["data"]["checkpoint"])
        assert healthy["hparams"]["lr"] == 0.05
        remedy = page.locator(".st-key-remedy button")
        expect(remedy).to_contain_text(f"Roll back to #{healthy['id']} with lr 0.025 (½ × 0.05, its lr)",
                                    timeout=WAIT_S * 1000)
        # A lower lr set while paused is what the remedy halves now.
        wait_for(lambda: store.status()["effective_state"] == "paused", WAIT_S, what="the guard's pause")
        _send_exact_lr(page, "0.01")
        expect(remedy).to_contain_text(f"Roll back to #{healthy['id']} with lr 0.005 (½ × 0.01 set since; its lr 0.05)",
                                    timeout=WAIT_S * 1000)
        remedy.click()
        rollback = wait_for(lambda: _all_applied(_commands(store, cmd.ROLLBACK), 1), WAIT_S, what="the remedy applied")
        assert [(c["args"], c["result"]["lr"]) for c in rollback] == [
            ({"checkpoint": healthy["id"], "hparams": "current", "lr": 0.005}, 0.005)]
        status = wait_for(lambda: (s := store.status())["branch"] == 2 and s, WAIT_S, what="branch 2")
        assert status["lr"] == 0.005 and status["effective_state"] == "running"
        assert [c["args"]["value"] for c in _commands(store, cmd.SET_LR)] == [500.0, 0.01]
        assert errors == []


def test_a_rollback_from_the_page_skips_the_batches_asked_for(tmp_path: Path, trainers) -> None:
    """The page shows the cadence and the data skip (0 by default); paused, "skip next N batches"
    5 and "Roll back" send what `rollback ID --skip-batches 5` sends, and the new branch trains on
    5 batches further along the data order: its epoch ends 5 steps sooner.

    digits with batch 32 and one pass: 45 batches an epoch; a checkpoint every 9 steps falls at
    batches 9, 18, 27 and 36 of an epoch and at its end, so 5 more batches always fit in it."""
    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--job", "digits", "--epochs", "100", "--epoch-passes", "1",
                       "--checkpoint-every-steps", "9")
    trainer.wait_running(min_step=1, timeout=START_S)
    store = RunStore(run_dir)
    wait_for(lambda: store.checkpoints(), START_S, what="a first periodic checkpoint")
    with dashboard_of(run_dir, tmp_path) as url, chromium_page(1366, 768, timeout_s=WAIT_S) as (page, errors):
        _open(page, url)
        expect(page.get_by_text(re.compile(r"Rollback points: every 9 steps \(next at step [\d,]+\), and each "
                                           r"epoch's end"))).to_be_visible(timeout=WAIT_S * 1000)
        skip = page.locator(".st-key-rollback_skip input")
        expect(skip).to_have_value("0")
        page.locator(".st-key-pause button").click()
        paused_at = wait_for(lambda: store.status()["effective_state"] == "paused" and store.status()["step"], WAIT_S,
                             what="the pause")
        # The newest rollback point is the one of the last multiple of 9 reached (epoch ends, every 45
        # steps, are multiples of 9 too); checkpoints are written in the background, so it may be
        # listed a moment after the pause: wait for it, and the select shows it.
        due = paused_at // 9 * 9
        target = wait_for(lambda: next((c for c in store.checkpoints() if c["step"] == due), None), WAIT_S,
                          what=f"the checkpoint of step {due}")
        assert store.checkpoints()[-1]["id"] == target["id"]
        expect(page.locator(".st-key-rollback_target input")).to_have_value(
            re.compile(rf"^#{target['id']} · epoch {target['epoch']} · step {target['step']} ·"), timeout=WAIT_S * 1000)
        # As a hand does it: into the box, the old value selected, 5 typed, then to the button.
        skip.click()
        page.keyboard.press("ControlOrMeta+a")
        page.keyboard.type("5", delay=120)
        page.keyboard.press("Enter")
        page.locator(".st-key-rollback button").click()
        (rollback,) = wait_for(lambda: _all_applied(_commands(store, cmd.ROLLBACK), 1), WAIT_S,
                               what="the rollback applied")
        assert rollback["args"] == {"checkpoint": target["id"], "hparams": cmd.HPARAMS_CHECKPOINT, "skip_batches": 5}
        assert rollback["result"]["skip_batches"] == 5
        event = next(e for e in store.events() if e["kind"] == "rollback")
        assert event["data"]["skip_batches"] == 5 and "skipping the next 5 batches" in event["message"]
        # Where the data order stands on the new branch: the resumed epoch ends 5 batches early.
        start = 0 if target["reason"] == "epoch" else target["step_in_epoch"]
        ended = wait_for(lambda: next((c for c in store.checkpoints() if c["branch"] == 2 and c["reason"] == "epoch"),
                                      None), START_S, what="the new branch's first epoch's end")
        assert ended["step"] == target["step"] + 45 - start - 5
        assert errors == []
