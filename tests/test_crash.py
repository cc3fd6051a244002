"""Crash safety with real processes: SIGKILL at random moments, half-written checkpoints, commands
acknowledged or pending at the moment of the kill."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np

from babysit import commands as cmd
from babysit.store import RunStore
from tests.conftest import babysit_cli, tiny_job, wait_for
from tests.crash_harness import FAST_CONFIG, soak, train_args

FAST = train_args(FAST_CONFIG)[2:]  # everything but --epochs


def test_sigkill_at_random_moments_resumes_bit_identically(tmp_path: Path) -> None:
    report = soak(tmp_path, kills=3, seed=7)
    assert report.kills == 3, report.as_json()
    assert report.corrupt_checkpoints_listed == 0, report.as_json()
    assert report.acknowledged_nudges_lost == 0, report.as_json()
    assert report.temp_files_left == 0, report.as_json()
    assert report.checkpoints_listed >= FAST_CONFIG.epochs, report.as_json()
    assert report.identical_weights and report.identical_losses, report.as_json()


def live_loss_steps(store: RunStore) -> np.ndarray:
    info = next(s for s in store.series() if s.name == "loss" and s.branch == 1 and s.segment == 0)
    return store.chunk_points(info.id)[0]


def test_a_half_written_or_unlisted_checkpoint_is_never_used(tmp_path: Path) -> None:
    # No kill is needed to leave these files behind, so the loop runs in this process (the tiny
    # job, 8 steps an epoch); the kills themselves are the soak's and the tests below.
    run_dir = tmp_path / "run"
    tiny_job(run_dir, epochs=2)
    store = RunStore(run_dir)
    last = store.checkpoints()[-1]
    data = (run_dir / last["file"]).read_bytes()
    # What a kill leaves behind: a temporary file cut short, and a complete file never listed.
    (run_dir / f".epoch-0003-step-00000024-b1.pt.tmp-{os.getpid()}").write_bytes(data[: len(data) // 3])
    shutil.copy(run_dir / last["file"], run_dir / "epoch-0009-step-00000072-b1.pt")
    tiny_job(run_dir, epochs=3)
    assert not list(run_dir.glob(".*.tmp-*"))
    resumed = [e for e in RunStore(run_dir).events() if e["kind"] == "resume"][-1]
    assert resumed["data"]["checkpoint"] == last["id"] and resumed["step"] == last["step"]
    assert [c["epoch"] for c in RunStore(run_dir).checkpoints()] == [1, 2, 3]


def test_an_acknowledged_nudge_is_replayed_at_its_step_after_a_kill(tmp_path: Path, trainers) -> None:
    run_dir = tmp_path / "run"
    store = None
    # The kill must land before the next checkpoint, or the nudge is simply in that checkpoint (the
    # other half of the promise, which the soak covers). So the nudge is sent just after a checkpoint,
    # in epochs ten times the usual length (~230 steps); on a fast machine, try again if not.
    longer = (*FAST, "--epoch-passes", "10")
    for value in (0.02, 0.03, 0.04):
        trainer = trainers(run_dir, "--epochs", "400", *longer)
        wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir).checkpoints(), what="a checkpoint")
        trainer.wait_running()  # this trainer, not the one killed in the previous try
        seen = len(RunStore(run_dir).checkpoints())
        wait_for(lambda: len(RunStore(run_dir).checkpoints()) > seen, what="the next checkpoint")
        result = babysit_cli("set", "lr", str(value), "--run-dir", str(run_dir), "--wait", check=True)
        step = int(result.stdout.split("applied at step ")[1].split()[0])
        trainer.process.send_signal(signal.SIGKILL)
        trainer.process.wait()
        store = RunStore(run_dir)
        checkpoint = store.checkpoints()[-1]
        if checkpoint["step"] < step:
            break
    else:
        raise AssertionError("each kill landed after the checkpoint that followed its nudge")
    command_id = int(result.stdout.split()[0].lstrip("#"))
    assert store.command(command_id)["state"] == cmd.APPLIED

    again = trainers(run_dir, "--epochs", "400", *longer)
    status = again.wait_running(min_step=step + 1)
    assert status["lr"] == value
    # (A retry above leaves the earlier tries' nudges on the branch too: at least this one is re-applied.)
    assert re.search(r"\b\d+ applied nudges will be re-applied at their steps", status["message"])
    resumed = [e for e in store.events() if e["kind"] == "resume"][-1]
    assert resumed["data"]["checkpoint"] == checkpoint["id"]
    lr = next(s for s in store.series() if s.name == "lr" and s.segment == 0)
    steps, values, _ = store.chunk_points(lr.id)
    recorded = list(zip(steps.tolist(), values.tolist()))
    assert (step, value) in recorded and (checkpoint["step"], checkpoint["hparams"]["lr"]) in recorded
    # What the dead process logged after its last checkpoint is kept, but as a superseded piece.
    superseded = [s for s in store.series() if s.name == "loss" and s.segment > 0]
    assert checkpoint["step"] + 1 in {int(store.chunk_points(s.id)[0].min()) for s in superseded}
    live = live_loss_steps(store)
    assert (np.diff(live) == 1).all() and live[0] == 1


def test_a_pending_command_survives_a_kill_and_is_applied_after_resume(tmp_path: Path, trainers) -> None:
    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--epochs", "400", *FAST)
    trainer.wait_running(min_step=5)
    trainer.process.send_signal(signal.SIGSTOP)  # frozen between two heartbeats: still "alive"
    store = RunStore(run_dir)
    command_id = store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.8}, source="test")
    trainer.process.send_signal(signal.SIGKILL)
    trainer.process.wait()
    assert store.command(command_id)["state"] == cmd.PENDING

    again = trainers(run_dir, "--epochs", "400", *FAST)
    again.wait_running(min_step=1)
    row = wait_for(lambda: (lambda r: r if r["state"] != cmd.PENDING else None)(store.command(command_id)),
                   what="the pending command applied")
    assert row["state"] == cmd.APPLIED and row["result"]["after"] == 0.8
    # The status row follows at the writer's next heartbeat (a quarter of a second at most).
    wait_for(lambda: RunStore(run_dir).status()["momentum"] == 0.8, what="the new momentum in the status")
