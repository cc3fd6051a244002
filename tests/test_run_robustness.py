"""Work any number of commands can cause is bounded; a damaged origin or a checkpoint that does not
fit never blocks the run; a command that waited past its expiry (a frozen trainer) is not applied."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from babysit import commands as cmd
from babysit.checkpoint import FORMAT, KEY_FORMAT, KEY_MODEL, write_atomic
from babysit.store import RunStore
from tests.conftest import tiny_job


def test_a_flood_of_checkpoint_commands_is_answered_by_one_snapshot_and_a_stop_comes_at_once(tmp_path: Path) -> None:
    ids: list[int] = []

    def on_step(run: Any, step: int) -> None:
        if step == 2:
            ids.extend(run.store.enqueue_command(cmd.CHECKPOINT, source="test") for _ in range(300))
        if step == 3:
            ids.append(run.store.enqueue_command(cmd.STOP, source="test"))

    run, _ = tiny_job(tmp_path / "r", epochs=50, on_step=on_step)
    store = RunStore(tmp_path / "r")
    assert run.status == "stopped" and run.step == 3
    assert {store.command(i)["state"] for i in ids} == {cmd.APPLIED}
    assert [(c["reason"], c["step"]) for c in store.checkpoints()] == [("command", 2), ("stop", 3)]
    assert {store.command(i)["result"]["checkpoint"] for i in ids[:-1]} == {store.checkpoints()[0]["id"]}


def test_a_rollback_to_a_checkpoint_that_does_not_fit_is_refused_and_the_run_goes_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"

    def on_step(run: Any, step: int) -> None:
        if step == 3:  # a listed, intact checkpoint of another model (a copied run directory, say)
            other = nn.Linear(4, 3)
            sha256, size = write_atomic(run_dir / "foreign.pt", {KEY_FORMAT: FORMAT, KEY_MODEL: other.state_dict()})
            checkpoint = run.store.add_checkpoint(branch=1, epoch=0, step=0, step_in_epoch=0, file="foreign.pt",
                                                  sha256=sha256, size=size, hparams={}, metrics={}, reason="command")
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": checkpoint}, source="test")

    run, _ = tiny_job(run_dir, epochs=2, on_step=on_step)
    store = RunStore(run_dir)
    rollback = next(c for c in store.commands() if c["kind"] == cmd.ROLLBACK)
    assert rollback["state"] == cmd.REJECTED and rollback["step"] == 3
    assert rollback["reason"].startswith("checkpoint #1 does not fit this model (")
    assert rollback["reason"].endswith("; nothing was changed")
    assert run.status == "finished" and run.branch == 1 and run.step == 16


def test_a_restart_after_a_rollback_whose_origin_is_damaged_goes_on_from_an_intact_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    tiny_job(run_dir, epochs=2)  # checkpoints #1 (step 8) and #2 (step 16) on branch 1
    runs: list[Any] = []

    def on_step(run: Any, step: int) -> None:
        runs.append(run)
        if run.branch == 1 and step == 20:
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1}, source="test")
        if run.branch == 2 and step == 10:
            raise RuntimeError("the trainer dies before branch 2's first checkpoint")

    with pytest.raises(RuntimeError, match="dies before"):
        tiny_job(run_dir, epochs=4, on_step=on_step)
    runs[-1].close()
    store = RunStore(run_dir)
    origin = store.checkpoint(1)
    (run_dir / origin["file"]).write_bytes(b"damaged")

    run, _ = tiny_job(run_dir, epochs=4)
    assert run.status == "finished" and run.step == 32
    assert store.branch(run.branch)["from_checkpoint"] == 2 and store.branch(run.branch)["parent"] == 1
    refused = [e for e in store.events() if e["kind"] == "checkpoint_refused"]
    assert any("does not match the hash" in e["message"] for e in refused)
    assert any(e["message"] == f"branch 2's origin checkpoint #1 could not be loaded, so the run goes on from "
                                f"checkpoint #2 as branch {run.branch}" for e in refused)


def test_no_loadable_checkpoint_at_all_is_a_clear_error_not_a_fresh_start(tmp_path: Path) -> None:
    from babysit.checkpoint import CheckpointError

    run_dir = tmp_path / "r"
    tiny_job(run_dir, epochs=1)
    store = RunStore(run_dir)
    (run_dir / store.checkpoints()[0]["file"]).write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=r"^no checkpoint of branch 1 or of the branches it came from in .* can be "
                                              r"loaded \(see the checkpoint_refused events\)"):
        tiny_job(run_dir, epochs=2)


def test_a_command_that_waited_past_its_expiry_while_the_trainer_was_frozen_is_not_applied(tmp_path: Path) -> None:
    def on_step(run: Any, step: int) -> None:
        if step == 3:  # queued before the trainer froze (SIGSTOP) for 11 minutes
            run.store.conn().execute(
                "INSERT INTO commands (created, source, kind, args, state) VALUES (?, 'cli', 'set_lr', '{\"value\": 0.5}', "
                "'pending')", (time.time() - 660,))
            run.signal.ring(run.store.signal_path)

    run, _ = tiny_job(tmp_path / "r", epochs=1, on_step=on_step)
    row = RunStore(tmp_path / "r").commands()[0]
    assert (row["state"], row["step"]) == (cmd.EXPIRED, 3)
    assert row["reason"] == "no trainer applied it within 600 s; send it again"
    assert run.hparams["lr"] == 0.1


def test_a_checkpoint_the_store_cannot_list_leaves_no_file_and_the_run_is_told(tmp_path: Path) -> None:
    import sqlite3
    import threading

    run_dir = tmp_path / "r"
    refused: list[int] = []

    def on_step(run: Any, step: int) -> None:
        if step == 1:  # the flush the epoch's checkpoint makes before it is listed fails once
            flush = run.writer.flush

            def refuse_once_for_the_checkpoint() -> None:
                if threading.current_thread().name == "babysit-checkpoint" and not refused:
                    refused.append(1)
                    raise sqlite3.OperationalError("database is locked")
                flush()

            run.writer.flush = refuse_once_for_the_checkpoint
        if step == 9:  # the failure paused the run; the person resumes it
            run.snapshots.wait()
            run.store.enqueue_command(cmd.RESUME, source="test")

    run, _ = tiny_job(run_dir, epochs=2, on_step=on_step)
    store = RunStore(run_dir)
    assert run.status == "finished" and refused == [1]
    assert [c["step"] for c in store.checkpoints()] == [16]
    assert sorted(p.name for p in run_dir.glob("*.pt")) == [store.checkpoints()[0]["file"]]
    assert [e["message"] for e in store.events(kinds=["checkpoint_failed"])] == [
        "checkpoint at step 8 not kept: it was written but could not be listed (OperationalError: database is "
        "locked), so its file was removed"]
    assert [(c["kind"], c["state"]) for c in store.commands()] == [(cmd.PAUSE, cmd.APPLIED), (cmd.RESUME, cmd.APPLIED)]
