"""The run store: opening, status and liveness, the command queue, metrics chunks, branches, events."""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from babysit import commands as cmd
from babysit import store as st
from babysit.commands import CommandError
from babysit.store import CommandSignal, RunStore, StoreError


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    created = RunStore(tmp_path / "run", create=True)
    yield created
    created.close()


def _live(store: RunStore, **fields: Any) -> None:
    store.write_status(**{"state": st.RUNNING, "pid": os.getpid(), "host": socket.gethostname(),
                          "heartbeat": time.time(), **fields})


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _add_checkpoint(store: RunStore, *, step: int = 10, file: str | None = None, create_file: bool = True) -> int:
    name = file or f"epoch-0001-step-{step:08d}-b1.pt"
    if create_file:
        (store.run_dir / name).write_bytes(b"checkpoint")
    return store.add_checkpoint(branch=1, epoch=1, step=step, step_in_epoch=0, file=name, sha256="ab" * 32,
                                size=10, hparams={"lr": 0.1, "momentum": 0.9}, metrics={"val_loss": 0.5},
                                reason="epoch")


def _signal_bytes(store: RunStore) -> bytes:
    return store.signal_path.read_bytes()


# -- opening ---------------------------------------------------------------------------------
def test_create_makes_a_run_directory(tmp_path: Path):
    run_dir = tmp_path / "nested" / "demo"
    created = RunStore(run_dir, create=True)
    assert (run_dir / "run.db").is_file()
    assert st.is_run_dir(run_dir)
    assert created.get_meta("schema_version") == st.SCHEMA_VERSION
    assert created.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    created.close()
    reopened = RunStore(run_dir)
    assert reopened.status() == {"state": "new", "effective_state": "new", "alive": False}
    reopened.close()


def test_create_on_an_existing_run_keeps_its_data(store: RunStore):
    store.add_event("start", "run started")
    again = RunStore(store.run_dir, create=True)
    assert [e["message"] for e in again.events()] == ["run started"]
    again.close()


def test_opening_a_missing_directory(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(StoreError, match=rf"^run directory '{missing}' does not exist; start one with "
                                         r"`python -m babysit train --run-dir DIR`"):
        RunStore(missing)
    assert not missing.exists()


def test_opening_a_directory_that_is_not_a_run(tmp_path: Path):
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StoreError, match=rf"^'{plain}' is not a babysit run \(it has no run\.db\); start one with"):
        RunStore(plain)
    assert sorted(p.name for p in plain.iterdir()) == ["cat.jpg"]


def test_the_message_lists_runs_found_next_to_the_wrong_directory(tmp_path: Path):
    RunStore(tmp_path / "demo", create=True).close()
    (tmp_path / "other").mkdir()
    with pytest.raises(StoreError, match=rf"^'{tmp_path / 'other'}' is not a babysit run .*; runs found: "
                                         rf"{tmp_path / 'demo'}$"):
        RunStore(tmp_path / "other")


@pytest.mark.parametrize("garbage", [b"garbage " * 1000, bytes(range(256)) * 16], ids=["text", "bytes"])
def test_a_corrupted_database_is_refused_and_left_alone(tmp_path: Path, garbage: bytes):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.db").write_bytes(garbage)
    with pytest.raises(StoreError, match=rf"^'{run_dir / 'run.db'}' is not a readable babysit run database "
                                         r"\(file is not a database\); restore it from a backup or start a new run"):
        RunStore(run_dir)
    assert (run_dir / "run.db").read_bytes() == garbage
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.db"]


def test_a_corrupted_database_is_refused_even_with_create(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.db").write_bytes(b"garbage " * 1000)
    with pytest.raises(StoreError, match=r"is not a readable babysit run database \(file is not a database\)"):
        RunStore(run_dir, create=True)
    assert (run_dir / "run.db").read_bytes() == b"garbage " * 1000


def test_another_programs_sqlite_database_is_refused(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    foreign = sqlite3.connect(run_dir / "run.db")
    foreign.execute("CREATE TABLE photos (id INTEGER)")
    foreign.commit()
    foreign.close()
    with pytest.raises(StoreError, match=r"is not a readable babysit run database \(no such table: meta\)"):
        RunStore(run_dir)


def test_a_database_from_another_schema_version_is_refused(store: RunStore):
    store.set_meta("schema_version", 2)
    with pytest.raises(StoreError, match=rf"^'{store.db_path}' has schema version 2; this babysit reads version 1$"):
        RunStore(store.run_dir)


def test_list_runs(tmp_path: Path):
    assert st.list_runs(tmp_path / "missing") == []
    RunStore(tmp_path / "a", create=True).close()
    RunStore(tmp_path / "b", create=True).close()
    (tmp_path / "not-a-run").mkdir()
    os.utime(tmp_path / "a" / "run.db", (1_000_000, 1_000_000))
    os.utime(tmp_path / "b" / "run.db", (2_000_000, 2_000_000))
    assert st.list_runs(tmp_path) == [tmp_path / "b", tmp_path / "a"]
    assert st.list_runs(tmp_path / "a") == [tmp_path / "a"]


def test_meta_round_trip(store: RunStore):
    assert store.get_meta("config", {"none": True}) == {"none": True}
    store.set_meta("config", {"lr": 0.1, "layers": [1, 2]})
    assert store.get_meta("config") == {"lr": 0.1, "layers": [1, 2]}


# -- status ----------------------------------------------------------------------------------
def test_status_of_a_live_trainer(store: RunStore):
    _live(store, epoch=2, step=40, lr=0.1, momentum=0.9, message="hello")
    status = store.status()
    assert (status["state"], status["effective_state"], status["alive"]) == ("running", "running", True)
    assert (status["epoch"], status["step"], status["lr"], status["momentum"], status["message"]) == (
        2, 40, 0.1, 0.9, "hello")
    store.write_status(state=st.PAUSED)
    assert (store.status()["effective_state"], store.status()["alive"]) == ("paused", True)


def test_write_status_defaults_to_running_and_updates_only_given_fields(store: RunStore):
    store.write_status(step=1)
    assert store.status()["state"] == st.RUNNING
    store.write_status(epoch=3)
    status = store.status()
    assert (status["step"], status["epoch"]) == (1, 3)


def test_stale_heartbeat_is_not_responding(store: RunStore):
    _live(store, heartbeat=time.time() - st.HEARTBEAT_STALE_S - 30)
    status = store.status()
    assert (status["state"], status["effective_state"], status["alive"]) == ("running", "not responding", False)


def test_a_trainer_whose_process_is_gone_shows_as_crashed_at_once(store: RunStore):
    # The heartbeat is fresh (killed a moment ago), but the pid no longer exists on this host.
    pid = _dead_pid()
    _live(store, pid=pid)
    status = store.status()
    assert (status["state"], status["effective_state"], status["alive"]) == ("running", "crashed", False)
    assert status["message"] == (f"the trainer (pid {pid}) is gone without a clean stop; "
                                 "start it again to resume from the latest checkpoint")


def test_process_on_another_host_is_judged_by_heartbeat_only(store: RunStore):
    _live(store, pid=_dead_pid(), host="some-other-host.invalid")
    assert store.status()["alive"] is True


@pytest.mark.parametrize("state", [st.FINISHED, st.STOPPED, st.CRASHED])
def test_ended_runs_keep_their_state(store: RunStore, state: str):
    _live(store, state=state)
    status = store.status()
    assert (status["state"], status["effective_state"], status["alive"]) == (state, state, False)


# -- the command queue -----------------------------------------------------------------------
def test_enqueue_queues_a_normalised_command_and_rings(store: RunStore):
    _live(store)
    signal = CommandSignal(store.signal_path)
    assert not signal.changed()
    command_id = store.enqueue_command(cmd.SET_LR, {"value": "0.05"}, source="cli")
    assert signal.changed()
    signal.close()
    [pending] = store.pending_commands()
    assert pending["id"] == command_id
    assert (pending["kind"], pending["args"], pending["source"]) == ("set_lr", {"value": 0.05}, "cli")
    full = store.command(command_id)
    assert (full["state"], full["step"], full["result"], full["reason"]) == ("pending", None, None, None)


def test_commands_are_kept_in_order(store: RunStore):
    _live(store)
    ids = [store.enqueue_command(cmd.SET_LR, {"value": v}, source=s) for v, s in ((0.1, "a"), (0.2, "b"))]
    ids.append(store.enqueue_command(cmd.PAUSE, source="c"))
    assert ids == sorted(ids)
    assert [(c["kind"], c["args"]) for c in store.pending_commands()] == [
        ("set_lr", {"value": 0.1}), ("set_lr", {"value": 0.2}), ("pause", {})]


def test_conflicting_nudges_from_two_dashboards_are_both_kept_in_order(store: RunStore):
    _live(store)
    first_tab, second_tab = RunStore(store.run_dir), RunStore(store.run_dir)
    a = first_tab.enqueue_command(cmd.SET_LR, {"value": 0.2}, source="dashboard")
    b = second_tab.enqueue_command(cmd.SET_LR, {"value": 0.01}, source="dashboard")
    assert [(c["id"], c["args"]["value"]) for c in store.pending_commands()] == [(a, 0.2), (b, 0.01)]
    first_tab.close()
    second_tab.close()


def _assert_nothing_queued(store: RunStore, signal_before: bytes | None) -> None:
    assert store.commands() == []
    if signal_before is not None:
        assert _signal_bytes(store) == signal_before


def test_enqueue_refuses_when_no_trainer_ever_started(store: RunStore):
    with pytest.raises(CommandError, match=rf"^run '{store.run_dir}' is not running \(no trainer has started in it "
                                           r"yet\); commands are accepted only while a trainer runs: resume it by "
                                           r"running your training script again, or for the demo "
                                           rf"`python -m babysit train --run-dir {store.run_dir}`$"):
        store.enqueue_command(cmd.PAUSE, source="cli")
    _assert_nothing_queued(store, None)
    assert not store.signal_path.exists()


def test_enqueue_refuses_when_the_trainer_stopped_answering(store: RunStore):
    CommandSignal(store.signal_path).close()
    before = _signal_bytes(store)
    _live(store, pid=4242, host="elsewhere", heartbeat=time.time() - 100)
    with pytest.raises(CommandError, match=r"is not running \(its trainer \(pid 4242\) has not answered for "
                                           r"1\d\d s\); commands are accepted only while a trainer runs"):
        store.enqueue_command(cmd.SET_LR, {"value": 0.1}, source="dashboard")
    _assert_nothing_queued(store, before)


def test_enqueue_refuses_when_the_trainer_is_dead(store: RunStore):
    _live(store, pid=_dead_pid())
    with pytest.raises(CommandError, match=r"is not running \(its trainer \(pid \d+\) is no longer running\)"):
        store.enqueue_command(cmd.RESUME, source="dashboard")
    _assert_nothing_queued(store, None)


@pytest.mark.parametrize("state", [st.FINISHED, st.STOPPED, st.CRASHED])
def test_enqueue_refuses_for_an_ended_run(store: RunStore, state: str):
    _live(store, state=state)
    with pytest.raises(CommandError, match=rf"is not running \(its trainer is {state}\)"):
        store.enqueue_command(cmd.CHECKPOINT, source="cli")
    _assert_nothing_queued(store, None)


def test_enqueue_without_a_live_trainer_when_allowed(store: RunStore):
    command_id = store.enqueue_command(cmd.PAUSE, source="guard", require_live=False)
    assert [c["id"] for c in store.pending_commands()] == [command_id]


@pytest.mark.parametrize(
    ("kind", "args", "message"),
    [
        (cmd.SET_LR, {"value": -1}, r"^lr must be .*, got -1$"),
        (cmd.SET_LR, {"value": "nan"}, r"^lr must be .*, got 'nan'$"),
        (cmd.SET_MOMENTUM, {"value": 1}, r"^momentum must be .*, got 1$"),
        (cmd.ROLLBACK, {"checkpoint": "../x"}, r"^checkpoint must be .*, got '\.\./x'$"),
        ("explode", {}, r"^unknown command 'explode'"),
    ],
)
def test_enqueue_refuses_bad_commands_before_anything_else(store: RunStore, kind, args, message):
    _live(store)
    CommandSignal(store.signal_path).close()
    before = _signal_bytes(store)
    with pytest.raises(CommandError, match=message):
        store.enqueue_command(kind, args, source="cli")
    _assert_nothing_queued(store, before)


def test_rollback_to_an_unknown_checkpoint(store: RunStore):
    _live(store)
    with pytest.raises(CommandError, match=rf"^checkpoint #7 does not exist in run '{store.run_dir}'; "
                                           r"available: none yet$"):
        store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 7}, source="cli")
    first, second = _add_checkpoint(store, step=10), _add_checkpoint(store, step=20)
    with pytest.raises(CommandError, match=rf"^checkpoint #7 does not exist in run '{store.run_dir}'; "
                                           rf"available: #{first}, #{second}$"):
        store.enqueue_command(cmd.ROLLBACK, {"checkpoint": "7"}, source="cli")
    _assert_nothing_queued(store, None)


def test_rollback_to_a_deleted_checkpoint(store: RunStore):
    _live(store)
    first, second = _add_checkpoint(store, step=10), _add_checkpoint(store, step=20)
    store.mark_checkpoint_deleted(first)
    with pytest.raises(CommandError, match=rf"^checkpoint #{first} was deleted in run '{store.run_dir}'; "
                                           rf"available: #{second}$"):
        store.enqueue_command(cmd.ROLLBACK, {"checkpoint": first}, source="cli")
    _assert_nothing_queued(store, None)


def test_rollback_to_a_checkpoint_whose_file_is_missing(store: RunStore):
    _live(store)
    checkpoint_id = _add_checkpoint(store, step=10, file="epoch-0001-step-00000010-b1.pt", create_file=False)
    with pytest.raises(CommandError, match=rf"^checkpoint #{checkpoint_id}: its file "
                                           rf"'epoch-0001-step-00000010-b1\.pt' is missing from '{store.run_dir}'; "
                                           r"pick another checkpoint$"):
        store.enqueue_command(cmd.ROLLBACK, {"checkpoint": checkpoint_id}, source="cli")
    _assert_nothing_queued(store, None)


def test_rollback_to_a_listed_checkpoint_is_queued(store: RunStore):
    _live(store)
    checkpoint_id = _add_checkpoint(store)
    store.enqueue_command(cmd.ROLLBACK, {"checkpoint": str(checkpoint_id), "hparams": "current", "lr": 0.05},
                          source="dashboard")
    assert [c["args"] for c in store.pending_commands()] == [
        {"checkpoint": checkpoint_id, "hparams": "current", "lr": 0.05}]


def test_finish_command_applied_and_rejected(store: RunStore):
    _live(store)
    lr_id = store.enqueue_command(cmd.SET_LR, {"value": 0.05}, source="cli")
    pause_id = store.enqueue_command(cmd.PAUSE, source="cli")
    store.finish_command(lr_id, cmd.APPLIED, branch=1, step=120, result={"before": 0.1, "after": 0.05})
    store.finish_command(pause_id, cmd.REJECTED, branch=1, step=121, reason="the run is already paused")
    assert store.pending_commands() == []
    applied, rejected = store.command(lr_id), store.command(pause_id)
    assert (applied["state"], applied["branch"], applied["step"], applied["result"], applied["reason"]) == (
        "applied", 1, 120, {"before": 0.1, "after": 0.05}, None)
    assert applied["done_at"] is not None
    assert (rejected["state"], rejected["step"], rejected["result"], rejected["reason"]) == (
        "rejected", 121, None, "the run is already paused")
    # A finished command keeps its fate: a late second answer changes nothing.
    store.finish_command(lr_id, cmd.REJECTED, step=999, reason="too late")
    assert store.command(lr_id) == applied


def test_command_lookup(store: RunStore):
    assert store.command(1) is None
    command_id = store.enqueue_command(cmd.STOP, source="cli", require_live=False)
    assert store.command(command_id)["kind"] == "stop"
    assert store.command(command_id + 1) is None
    assert [c["id"] for c in store.commands(since_id=command_id)] == []


def test_applied_commands_after(store: RunStore):
    ids = [store.enqueue_command(cmd.SET_LR, {"value": v}, source="cli", require_live=False)
           for v in (0.1, 0.2, 0.3, 0.4)]
    store.finish_command(ids[0], cmd.APPLIED, branch=1, step=5)
    store.finish_command(ids[1], cmd.APPLIED, branch=1, step=15)
    store.finish_command(ids[2], cmd.APPLIED, branch=2, step=15)
    store.finish_command(ids[3], cmd.REJECTED, branch=1, step=20, reason="no")
    def after(step, command_id):
        return [c["args"]["value"] for c in store.applied_commands_after(1, step, command_id)]

    assert after(0, 0) == [0.1, 0.2]
    assert after(10, None) == [0.2]            # no command recorded: by step alone
    assert after(15, ids[0]) == [0.2]          # applied at the checkpoint's step, but after it
    assert after(15, ids[1]) == []
    assert after(5, ids[1]) == [0.2]           # handled later than the checkpoint's step, lower id
    assert store.last_handled_command_id() == ids[3]
    store.enqueue_command(cmd.SET_LR, {"value": 0.5}, source="cli", require_live=False)
    assert store.last_handled_command_id() == ids[3]


# -- checkpoints index -----------------------------------------------------------------------
def test_checkpoints_index(store: RunStore):
    first, second = _add_checkpoint(store, step=10), _add_checkpoint(store, step=20)
    listed = store.checkpoints()
    assert [c["id"] for c in listed] == [first, second]
    assert (listed[0]["hparams"], listed[0]["metrics"], listed[0]["reason"], listed[0]["deleted"]) == (
        {"lr": 0.1, "momentum": 0.9}, {"val_loss": 0.5}, "epoch", False)
    store.mark_checkpoint_deleted(first)
    assert [c["id"] for c in store.checkpoints()] == [second]
    assert [(c["id"], c["deleted"]) for c in store.checkpoints(include_deleted=True)] == [(first, True), (second, False)]
    assert store.checkpoint(first)["deleted"] is True
    assert store.checkpoint(99) is None


# -- metrics chunks --------------------------------------------------------------------------
def _chunk(series: int, steps: list[int], vals: list[float], wall0: float = 1000.0) -> tuple[Any, ...]:
    steps_a = np.array(steps, dtype=np.int64)
    return (series, steps_a, np.array(vals, dtype=np.float64), wall0 + steps_a.astype(np.float64))


def test_series_ids_are_stable(store: RunStore):
    loss = store.series_id("loss", 1, st.PER_STEP)
    assert store.series_id("loss", 1, st.PER_STEP) == loss
    other = store.series_id("loss", 2, st.PER_STEP)
    epoch = store.series_id("val_loss", 1, st.PER_EPOCH)
    assert len({loss, other, epoch}) == 3
    assert store.series() == [st.SeriesInfo(loss, "loss", 1, "step", 0), st.SeriesInfo(other, "loss", 2, "step", 0),
                              st.SeriesInfo(epoch, "val_loss", 1, "epoch", 0)]


def test_chunks_round_trip(store: RunStore):
    series = store.series_id("loss", 1, st.PER_STEP)
    store.write_chunks([_chunk(series, [1, 2, 3], [3.0, 1.0, 2.0]), _chunk(series, [4, 5], [5.0, 0.5])])
    steps, vals, walls = store.chunk_points(series)
    assert steps.tolist() == [1, 2, 3, 4, 5]
    assert vals.tolist() == [3.0, 1.0, 2.0, 5.0, 0.5]
    assert walls.tolist() == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]
    summaries = store.chunk_summaries(series)
    assert summaries.shape == (2, 10)
    # first_step, last_step, n, vmin, vmax, vsum, min_step, max_step, first_wall, last_wall
    assert summaries.tolist() == [[1, 3, 3, 1.0, 3.0, 6.0, 2, 1, 1001.0, 1003.0],
                                  [4, 5, 2, 0.5, 5.0, 5.5, 5, 4, 1004.0, 1005.0]]
    assert store.series_extent(series) == (1, 5, 5)


def test_a_longer_write_of_the_same_chunk_replaces_it(store: RunStore):
    series = store.series_id("loss", 1, st.PER_STEP)
    store.write_chunks([_chunk(series, [1, 2], [1.0, 2.0])])
    store.write_chunks([_chunk(series, [1, 2, 3], [1.0, 2.0, 3.0])])
    assert store.chunk_points(series)[0].tolist() == [1, 2, 3]
    assert store.series_extent(series) == (1, 3, 3)


def test_chunk_summaries_use_finite_values_only(store: RunStore):
    series = store.series_id("loss", 1, st.PER_STEP)
    store.write_chunks([_chunk(series, [1, 2, 3, 4, 5], [2.0, math.nan, math.inf, -1.0, -math.inf]),
                        _chunk(series, [6, 7], [math.nan, math.nan])])
    vals = store.chunk_points(series)[1]
    assert np.isnan(vals[1]) and vals[2] == math.inf and vals[4] == -math.inf  # raw values are kept
    first, second = store.chunk_summaries(series)
    assert first[:8].tolist() == [1, 5, 5, -1.0, 2.0, 1.0, 4, 1]
    assert second[:3].tolist() == [6, 7, 2]
    assert np.isnan(second[3:8]).tolist() == [True, True, False, True, True]  # no finite value: no min or max
    assert second[5] == 0.0
    assert st.chunk_summary(np.array([1, 2]), np.array([math.nan, 3.0])) == (3.0, 3.0, 3.0, 2, 2)


def test_chunk_reads_are_cut_to_the_overlapping_chunks(store: RunStore):
    series = store.series_id("loss", 1, st.PER_STEP)
    store.write_chunks([_chunk(series, list(range(s, s + 10)), [float(s)] * 10) for s in (1, 11, 21, 31)])
    assert store.chunk_summaries(series, lo=15, hi=25)[:, 0].tolist() == [11, 21]
    assert store.chunk_points(series, lo=15, hi=25)[0].tolist() == list(range(11, 31))
    assert store.chunk_summaries(series, lo=21, hi=21)[:, 0].tolist() == [21]
    assert store.chunk_summaries(series, lo=35)[:, 0].tolist() == [31]
    assert store.chunk_summaries(series, hi=10)[:, 0].tolist() == [1]
    assert store.chunk_summaries(series, lo=-100, hi=0).shape == (0, 10)


def test_empty_series_reads(store: RunStore):
    series = store.series_id("loss", 1, st.PER_STEP)
    steps, vals, walls = store.chunk_points(series)
    assert (steps.dtype, len(steps), len(vals), len(walls)) == (np.int64, 0, 0, 0)
    assert store.chunk_summaries(series).shape == (0, 10)
    assert store.series_extent(series) is None
    store.write_chunks([])
    assert store.series_extent(series) is None


def test_supersede_after_moves_exactly_the_later_points(store: RunStore):
    loss = store.series_id("loss", 1, st.PER_STEP)
    lr = store.series_id("lr", 1, st.PER_STEP)
    val = store.series_id("val_loss", 1, st.PER_EPOCH)
    other_branch = store.series_id("loss", 2, st.PER_STEP)
    store.write_chunks([
        _chunk(loss, list(range(1, 257)), [float(s) for s in range(1, 257)]),
        _chunk(loss, list(range(257, 301)), [float(s) for s in range(257, 301)]),
        _chunk(lr, [0, 150, 280], [0.1, 0.05, 0.01]),
        _chunk(val, [100, 200, 300], [0.9, 0.8, 0.7]),
        _chunk(other_branch, [250, 290], [1.0, 2.0]),
    ])
    for epoch, end in ((1, 100), (2, 200), (3, 300)):
        store.add_epoch(1, epoch, end)
    store.add_epoch(2, 1, 290)

    assert store.supersede_after(1, 260) == 40 + 1 + 1  # loss 261..300, lr at 280, val_loss at 300

    assert store.chunk_points(loss)[0].tolist() == list(range(1, 261))
    assert store.chunk_points(loss)[1].tolist() == [float(s) for s in range(1, 261)]
    assert store.chunk_points(lr)[0].tolist() == [0, 150]
    assert store.chunk_points(val)[0].tolist() == [100, 200]
    assert store.chunk_points(other_branch)[0].tolist() == [250, 290]
    moved = {(s.name, s.per): s for s in store.series() if s.segment == 1}
    assert set(moved) == {("loss", "step"), ("lr", "step"), ("val_loss", "epoch")}
    assert all(s.branch == 1 for s in moved.values())
    steps, vals, walls = store.chunk_points(moved[("loss", "step")].id)
    assert steps.tolist() == list(range(261, 301))
    assert vals.tolist() == [float(s) for s in range(261, 301)]
    assert walls.tolist() == [1000.0 + s for s in range(261, 301)]
    assert store.chunk_points(moved[("lr", "step")].id)[1].tolist() == [0.01]
    assert store.chunk_points(moved[("val_loss", "epoch")].id)[1].tolist() == [0.7]
    assert store.chunk_summaries(loss)[:, :3].tolist() == [[1, 256, 256], [257, 260, 4]]
    assert store.epochs() == [(1, 1, 100), (1, 2, 200), (2, 1, 290)]


def test_supersede_twice_makes_a_second_segment(store: RunStore):
    loss = store.series_id("loss", 1, st.PER_STEP)
    store.write_chunks([_chunk(loss, list(range(1, 21)), [1.0] * 20)])
    assert store.supersede_after(1, 15) == 5
    store.write_chunks([_chunk(loss, list(range(16, 31)), [2.0] * 15)])
    assert store.supersede_after(1, 25) == 5
    segments = sorted((s.segment, store.chunk_points(s.id)[0].tolist()) for s in store.series())
    assert segments == [(0, list(range(1, 26))), (1, list(range(16, 21))), (2, list(range(26, 31)))]


def test_supersede_with_nothing_later_moves_nothing(store: RunStore):
    loss = store.series_id("loss", 1, st.PER_STEP)
    store.write_chunks([_chunk(loss, [1, 2, 3], [1.0, 2.0, 3.0])])
    assert store.supersede_after(1, 3) == 0
    assert store.supersede_after(7, 0) == 0
    assert [s.segment for s in store.series()] == [0]
    assert store.chunk_points(loss)[0].tolist() == [1, 2, 3]


# -- branches, events, epochs ----------------------------------------------------------------
def test_branches(store: RunStore):
    root = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    child = store.new_branch(parent=root, from_checkpoint=3, start_step=120, start_epoch=2,
                             hparams={"lr": 0.05, "momentum": 0.9})
    assert child == root + 1
    listed = store.branches()
    assert [(b["id"], b["parent"], b["from_checkpoint"], b["start_step"], b["start_epoch"], b["hparams"])
            for b in listed] == [(root, None, None, 0, 0, {}), (child, root, 3, 120, 2, {"lr": 0.05, "momentum": 0.9})]
    assert store.branch(child) == listed[1]
    assert store.branch(child + 1) is None


def test_events_are_read_incrementally(store: RunStore):
    first = store.add_event("start", "run started", branch=1, step=0, epoch=0, data={"config": {"a": 1}})
    second = store.add_event("divergence", "loss became nan at step 7", branch=1, step=7)
    events = store.events()
    assert [(e["id"], e["kind"], e["message"], e["branch"], e["step"], e["epoch"], e["data"]) for e in events] == [
        (first, "start", "run started", 1, 0, 0, {"config": {"a": 1}}),
        (second, "divergence", "loss became nan at step 7", 1, 7, None, {}),
    ]
    assert [e["id"] for e in store.events(since_id=first)] == [second]
    assert store.events(since_id=second) == []
    assert [e["id"] for e in store.events(limit=1)] == [second]  # the newest, not the oldest


def test_epochs(store: RunStore):
    store.add_epoch(2, 1, 50)
    store.add_epoch(1, 2, 200)
    store.add_epoch(1, 1, 100)
    store.add_epoch(1, 2, 210)  # an epoch ended again (after a resume) replaces the earlier end
    assert store.epochs() == [(1, 1, 100), (1, 2, 210), (2, 1, 50)]


# -- change notification ---------------------------------------------------------------------
def test_command_signal(tmp_path: Path):
    path = tmp_path / "commands.signal"
    CommandSignal.ring(path)  # nobody listening yet: nothing is created
    assert not path.exists()
    signal = CommandSignal(path)
    assert path.read_bytes() == b"\0" * 8
    assert not signal.changed()
    CommandSignal.ring(path)
    assert signal.changed()
    assert signal.changed()  # stays changed until seen
    signal.mark_seen()
    assert not signal.changed()
    CommandSignal.ring(path)
    CommandSignal.ring(path)
    assert signal.changed()
    signal.close()


def test_command_signal_reopened_sees_the_current_value(tmp_path: Path):
    path = tmp_path / "commands.signal"
    CommandSignal(path).close()
    CommandSignal.ring(path)
    rung = path.read_bytes()
    signal = CommandSignal(path)
    assert path.read_bytes() == rung and not signal.changed()
    signal.close()


def test_a_damaged_signal_file_is_reset(tmp_path: Path):
    path = tmp_path / "commands.signal"
    path.write_bytes(b"xyz")
    signal = CommandSignal(path)
    assert path.read_bytes() == b"\0" * 8
    signal.close()


def test_data_version_changes_when_another_connection_commits(store: RunStore):
    reader = RunStore(store.run_dir)
    before = reader.data_version()
    assert reader.data_version() == before
    store.add_event("x", "y")
    assert reader.data_version() != before
    reader.close()


def test_starting_mean_is_the_first_chunk_of_the_first_branch(store: RunStore):
    assert store.starting_mean("loss") is None
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.new_branch(parent=1, from_checkpoint=None, start_step=500, start_epoch=1)
    first = store.series_id("loss", 1, st.PER_STEP)
    store.write_chunks([(first, np.arange(1, 257), np.full(256, 2.0), np.zeros(256)),
                        (first, np.arange(257, 513), np.full(256, 0.5), np.zeros(256))])
    store.write_chunks([(store.series_id("loss", 2, st.PER_STEP), np.arange(501, 757), np.full(256, 9.0), np.zeros(256))])
    assert store.starting_mean("loss") == 2.0


def test_a_command_held_in_memory_is_applied_like_any_other_and_stored_with_its_fate(tmp_path: Path):
    """What the trainer's store does when the database cannot take a row (a full disk, run.db gone)."""
    store = RunStore(tmp_path / "run", create=True)
    held = store.hold_command(cmd.PAUSE, {"reason": "the disk is full"}, source="guard")
    assert held < 0 and store.commands() == []
    assert [(c["id"], c["kind"], c["args"]) for c in store.pending_commands()] == [
        (held, cmd.PAUSE, {"reason": "the disk is full"})]
    store.finish_command(held, cmd.APPLIED, branch=1, step=7, result={"state": "paused"})
    assert store.pending_commands() == [] and store.held_count() == 1
    taken = store.take_held()
    with store.transaction():
        store.write_held(taken)
    assert store.held_count() == 0
    [row] = store.commands()
    assert (row["kind"], row["state"], row["step"], row["result"], row["source"]) == (
        cmd.PAUSE, cmd.APPLIED, 7, {"state": "paused"}, "guard")
    store.restore_held(taken)  # a transaction that failed gives everything back, in order
    assert store.held_count() == 1


# -- excursions (probe sets and lr sweeps) ---------------------------------------------------------
def test_an_excursion_and_its_branches_read_back_as_written(tmp_path):
    store = RunStore(tmp_path, create=True)
    main = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    excursion = store.add_excursion(kind="probe", command=7, origin_branch=main, origin_step=40, from_checkpoint=2,
                                    return_checkpoint=3, spec={"param": "lr", "values": [0.05, 0.1], "steps": 20})
    probes = []
    for order, value in enumerate((0.05, 0.1)):
        branch = store.new_branch(parent=main, from_checkpoint=2, start_step=40, start_epoch=2)
        store.add_excursion_branch(excursion=excursion, branch=branch, ord=order, param="lr", value=value, steps=20)
        probes.append(branch)
    assert store.running_excursion()["id"] == excursion
    store.finish_excursion_branch(probes[0], end_checkpoint=5, result={"val_loss": 0.3})
    store.finish_excursion(excursion, "done", message="2 probes of 20 steps", result={"best": probes[0]})
    found = store.excursion(excursion)
    assert (found["kind"], found["state"], found["origin_branch"], found["origin_step"]) == ("probe", "done", main, 40)
    assert (found["from_checkpoint"], found["return_checkpoint"], found["command"]) == (2, 3, 7)
    assert found["spec"] == {"param": "lr", "values": [0.05, 0.1], "steps": 20}
    assert found["result"] == {"best": probes[0]} and found["message"] == "2 probes of 20 steps"
    assert [(b["branch"], b["value"], b["end_checkpoint"], b["result"]) for b in found["branches"]] == [
        (probes[0], 0.05, 5, {"val_loss": 0.3}), (probes[1], 0.1, None, {})]
    assert store.running_excursion() is None
    assert store.excursion_branch_ids() == {probes[0]: excursion, probes[1]: excursion}
    assert [e["id"] for e in store.excursions()] == [excursion]


def test_a_run_from_before_excursions_reads_as_having_none(tmp_path):
    store = RunStore(tmp_path, create=True)
    store.conn().execute("DROP TABLE excursions")
    store.conn().execute("DROP TABLE excursion_branches")
    reader = RunStore(tmp_path)
    assert (reader.excursions(), reader.excursion(1), reader.running_excursion(), reader.excursion_branch_ids()) == (
        [], None, None, {})


def test_list_runs_finds_runs_at_any_depth_but_not_in_hidden_folders_links_or_past_its_bounds(tmp_path: Path,
                                                                                             monkeypatch) -> None:
    for where in ("a", "team/b", "team/x/y/c", ".hidden/d", "a/inside"):
        RunStore(tmp_path / where, create=True)
    (tmp_path / "link").symlink_to(tmp_path / "team")
    assert sorted(st.list_runs(tmp_path)) == [tmp_path / "a", tmp_path / "team/b", tmp_path / "team/x/y/c"]
    monkeypatch.setattr(st.schema, "RUNS_MAX_DEPTH", 2)
    assert sorted(st.list_runs(tmp_path)) == [tmp_path / "a", tmp_path / "team/b"]
    monkeypatch.setattr(st.schema, "RUNS_MAX_DIRS", 1)  # root only: what lies directly under it
    assert sorted(st.list_runs(tmp_path)) == [tmp_path / "a"]
