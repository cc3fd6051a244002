"""Issue 11, "Tried to break it": each attack, and the test that shows it no longer works.

Every test named ``test_itemN_...`` failed on the code the issue was filed against and passes now.

====  =====================================================  ===========================================
item  attack                                                 test
====  =====================================================  ===========================================
1     ~250 garbage websocket frames fill the pipe the        test_attacks_server.py::test_item1_garbage_
      dashboard's server logs to: it freezes for good        websocket_frames_do_not_freeze_the_dashboard
2     a checkpoint-command flood                             test_run_robustness.py::test_a_flood_of_
                                                             checkpoint_commands_is_answered_by_one_...
3     rollback to a damaged/missing origin; tensors that     test_run_robustness.py::test_a_restart_after_
      do not fit                                             a_rollback_whose_origin_is_damaged_..., ...
                                                             test_a_rollback_to_a_checkpoint_that_does_
                                                             not_fit_..., test_no_loadable_checkpoint_...
4     run.lock planted as a link                             test_item4_a_run_lock_link_...
4     commands.signal planted as a link (trainer side)       test_item4_a_signal_file_link_...
4     forged far-future heartbeat + planted signal link      test_item4_the_cli_never_writes_through_...
      (CLI side)
4     checkpoint rows naming /abs/path or ../x, retention    test_item4_checkpoint_rows_naming_files_...
4     links planted at the temporary checkpoint names        test_item4_links_at_the_temporary_name_...
4     run.db or a checkpoint file planted as a link          test_item4_a_database_or_checkpoint_link_...
4     trainer.log planted as a link (demo)                   test_item4_the_demo_never_appends_...
5     DNS rebinding (websocket and Chromium)                 test_attacks_server.py::test_item5_*
5/8   weak, one-letter or blank tokens                       test_attacks_server.py::test_item5_item8_...
6     a disk with not one byte left                          test_disk_full.py::test_item6_...
7     history capped at the oldest 10,000 rows               test_item7_the_newest_commands_and_events_...
7     every checkpoint sent on each page load                test_item7_the_page_sends_a_bounded_...
8     a compressed checkpoint that inflates 1000× before     test_item8_a_compressed_bomb_...
      its hash is checked
8     SIGSTOP past the command expiry                        test_run_robustness.py::test_a_command_that_
                                                             waited_past_its_expiry_...
8     markdown in a run's name                               test_item8_markdown_in_a_run_name_...
8     a run dir that is a file; a 300-character name         test_item8_a_run_dir_that_is_a_file_...
8     wrong-typed values in the status row                   test_item8_wrong_typed_status_values_...
8     a read-only run directory                              test_item8_a_read_only_run_directory_...
8     run.db deleted under a running trainer; the restart    test_item8_run_db_deleted_under_a_running_...
      overwrote an existing checkpoint
9     the auto-remedy hang, sleep-ordered tests              test_run.py::test_weights_gone_nan_before_
                                                             the_guard_reads_the_loss_..., test_a_guard_
                                                             pause_for_a_branch_the_run_has_left_..., the
                                                             divergence tests ordered by writer.flush()
====  =====================================================  ===========================================

Issue 26, "Tried to break it again": every item, 1 to 8 (the tests named ``test_itemN_...`` below
the issue's heading in this file, ``test_issue26_item1_...`` and those the table names elsewhere
failed on main at dec3ec3 and pass now).

====  ================================  ====================================  ====================================
item  attack                            before                                after
====  ================================  ====================================  ====================================
1     a run.db whose branches name      the page's walk of the parents never  the walk (babysit.store.lineage) ends
      each other as parents, the        ended, its list growing ~700 MB       at the cycle; the chart says "Damaged
      freshest run under --root         every 15 s; the page showed nothing   run: branches 1 and 2 name each other
                                                                              as parents", draws the rest, keeps
                                                                              answering in under 600 MB
                                                                              (test_issue26_item1_a_forged_branch_
                                                                              cycle_...)
1     200,000 branches in a chain, a    one refresh ran past 300 s (every     the newest rows only, said in notes;
      million epochs, 20,000 series     branch's line walked for each)        a refresh is bounded (RefreshLimits)
                                                                              and cut short past 8 s (test_issue26_
                                                                              item1_one_refresh_of_a_huge_...)
1     the same cycle met by a trainer   the trainer's walk of the line        the same walk: it ends at the cycle,
      resuming through its line of      (snapshots.lineage_before) never      a damaged_run event names it, the
      descent (its fork's file gone)    ended, the resume hung at 100 % CPU   run resumes from the line's intact
                                                                              checkpoint as a new branch (test_
                                                                              issue26_item1_a_trainer_resuming_...)
3     ``run.log(big=10**400)`` at an    the flush that took it raised         that value alone is dropped; an
      epoch's last step                 OverflowError: its batch was lost     event (and a warning) names 'big'
                                        (loss of steps 9-16 gone), the        and step 8; every other value is
                                        checkpoint file written but never     stored, both checkpoints listed, no
                                        listed, then "nothing was lost"       "nothing was lost" unless true
3     the store refuses to list a       the file stayed on disk, unlisted;    the file is removed, the event says
      written checkpoint                the event said "not written"          "not kept: written but could not be
                                                                              listed" (test_run_robustness.py,
                                                                              test_checkpoint.py)
5     ``--replay /dev/zero``; a FIFO;   MemoryError traceback; a hang; read   one line each, exit 2, nothing
      a 17 MiB file; 100k levels of     whole, then "not JSON";               created: "a character device, not
      nesting                           RecursionError traceback              a regular file", "a FIFO", "17,825,
                                                                              792 bytes; at most 16 MiB", "nests
                                                                              deeper than 32 levels"
5     journal config: ``job`` a list,   TypeError, ValueError (torch),        one line each naming the value and
      ``seed`` 10**30 or true, ``lr``   RuntimeError, TypeError tracebacks;   what is accepted (text; a whole
      "0.1", ``to.epoch`` true          "finished True epochs"                number torch takes; a number; a
                                                                              whole number >= 0), exit 2
6     a rollback and a pause queued     both stayed pending after the clean   both expired, "the run stopped
      1 ms behind a stop                stop; the next start applied the      before it applied this"; the next
                                        rollback (a new branch)               start goes on on branch 1
7     ``Run('')``                       the current directory became a run    SettingsError naming '' and what is
                                        directory (run.db, run.lock)          accepted; nothing created
7     ``Run()`` with another model on   raw load_state_dict RuntimeError;     CheckpointError naming what differs
      a run; then the same again        the retry got RunLockedError naming   ("weight (1, 2) vs (1, 3) here"),
                                        its own pid                           the lock released: the retry gets
                                                                              the same answer
7     an Adam script resumed on an      KeyError ('step' or 'betas')          refused before loading: "its
      SGD run                                                                 optimizer has dampening, momentum,
                                                                              nesterov, which this Adam has not"
7     ``run.log(loss=torch.ones(3))``;  RuntimeError without the key;         the value dropped, an event names
      ``log_epoch(val_loss='x')`` or    ValueError / TypeError crashed the    the metric and step; the run and
      ``None``                          run                                   the other values go on
2     ``probe --from C`` under          the return point's retention deleted  a fork and return point in use are
      ``keep_last``                     C; probe 2 reloaded it: Checkpoint-   pinned until the excursion ends
                                        Error, the trainer died, the probe    (test_long_runs.py::test_a_probe_
                                        set "running" until a restart         set_from_an_old_checkpoint_...)
4     30 probe sets or sweeps under     30 return-point checkpoints kept      return points count against keep_
      ``keep_last=2``                   (31 listed)                           last: N kept (test_long_runs.py::
                                                                              test_thirty_probe_sets_..., test_
                                                                              retention.py::test_thirty_sweeps_...)
8     ``?token=…`` in the address bar   kept in the history and sent as       replaced in place once accepted
                                        Referer                               (test_access.py::test_with_a_token_
                                                                              the_page_shows_nothing_...)
8     a SIGSTOPped trainer              refused commands advised "run your    page, refusals and `status` say
                                        training script again" (the lock      "stopped; SIGCONT it or kill it"
                                        refuses it)                           (test_app.py::test_a_stopped_
                                                                              trainer_is_named_...)
====  ================================  ====================================  ====================================
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest
from torch import nn

from babysit import commands as cmd
from babysit.checkpoint import FORMAT, CheckpointError, read_verified, write_atomic
from babysit.rundir import RunDirError
from babysit.store import RunStore, StoreError
from tests.conftest import REPO, Trainer, babysit_cli, chromium_page, tiny_job, wait_for, wait_healthy
from tests.test_app import fake_trainer

PRECIOUS = b"a file outside the run directory that must not change\n"
FAST = ("--job", "digits", "--epoch-passes", "1", "--batch-size", "64")  # 23 steps per epoch


def victim(tmp_path: Path, name: str = "victim.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(PRECIOUS)
    return path


def planted_link(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A run directory whose ``name`` is a link to a file outside it: (the outside file, the run dir)."""
    target = victim(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(target)
    return target, run_dir


def new_run(run_dir: Path) -> None:
    import babysit

    model = nn.Linear(2, 1)
    babysit.Run(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


# -- item 4: a hostile or copied run directory -------------------------------------------------
def test_item4_a_run_lock_link_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target, run_dir = planted_link(tmp_path, "run.lock")
    with pytest.raises(RunDirError, match=rf"^'{run_dir / 'run.lock'}' is a symbolic link; babysit opens only "
                                          r"regular files in a run directory and never follows links there"):
        new_run(run_dir)
    assert target.read_bytes() == PRECIOUS


def test_item4_a_signal_file_link_is_refused_by_the_trainer(tmp_path: Path) -> None:
    target, run_dir = planted_link(tmp_path, "commands.signal")
    with pytest.raises(RunDirError, match=rf"^'{run_dir / 'commands.signal'}' is a symbolic link"):
        new_run(run_dir)
    assert target.read_bytes() == PRECIOUS


def test_item4_the_cli_never_writes_through_a_planted_signal_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    run_dir = tmp_path / "run"
    store = fake_trainer(run_dir)
    (run_dir / "commands.signal").symlink_to(target)
    # A forged status row: a heartbeat a day in the future used to pass for a live trainer.
    store.write_status(heartbeat=time.time() + 86_400)
    forged = babysit_cli("pause", "--run-dir", str(run_dir))
    assert forged.returncode == 2 and "is not running" in forged.stderr, forged.stderr
    assert store.pending_commands() == []
    # With a heartbeat that looks live, the command is queued, and the link is still not followed.
    store.write_status(heartbeat=time.time())
    queued = babysit_cli("pause", "--run-dir", str(run_dir))
    assert queued.returncode == 0, queued.stderr
    assert [c["kind"] for c in store.pending_commands()] == [cmd.PAUSE]
    assert target.read_bytes() == PRECIOUS and (run_dir / "commands.signal").is_symlink()


def forge_checkpoint_rows(run_dir: Path, files: list[str]) -> list[int]:
    connection = sqlite3.connect(run_dir / "run.db")
    try:
        ids = []
        for n, name in enumerate(files):
            cursor = connection.execute(
                "INSERT INTO checkpoints (id, created, branch, epoch, step, step_in_epoch, file, sha256, size, hparams,"
                " metrics, reason) VALUES (?, ?, 1, 1, 8, 0, ?, ?, 1, '{}', '{}', 'epoch')",
                (1000 + n, time.time(), name, "0" * 64))
            ids.append(cursor.lastrowid)
        connection.commit()
        return ids
    finally:
        connection.close()


def test_item4_checkpoint_rows_naming_files_outside_are_never_used_or_deleted(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tiny_job(run_dir, epochs=2)
    outside = victim(tmp_path, "absolute.txt")
    beside = victim(tmp_path, "relative.txt")
    forged = forge_checkpoint_rows(run_dir, [str(outside), "../relative.txt"])
    # Retention keeps the newest checkpoint only: the forged rows are the oldest-but-one to it.
    tiny_job(run_dir, epochs=4, keep_last=1)
    assert outside.read_bytes() == PRECIOUS and beside.read_bytes() == PRECIOUS
    store = RunStore(run_dir)
    assert not {c["id"] for c in store.checkpoints(include_deleted=True)} & set(forged)
    with pytest.raises(cmd.CommandError, match=rf"^checkpoint #{forged[1]} names a file outside the run directory "
                                               r"\('\.\./relative\.txt'\); it is never used: pick another checkpoint$"):
        store.checkpoint(forged[1], must_exist=True)
    listed = json.loads(babysit_cli("status", "--run-dir", str(run_dir), "--json", check=True).stdout)
    assert all(Path(c["path"]).parent == run_dir for c in listed["checkpoints"])


def test_item4_links_at_the_temporary_name_receive_nothing(tmp_path: Path) -> None:
    target = victim(tmp_path)
    path = tmp_path / "run" / "epoch-0001-step-00000008-b1.pt"
    path.parent.mkdir()
    (path.parent / f".{path.name}.tmp-{os.getpid()}").symlink_to(target)
    sha, _ = write_atomic(path, {"format": FORMAT, "model": {"w": torch.ones(3)}})
    assert target.read_bytes() == PRECIOUS
    assert read_verified(path, sha)["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_item4_a_database_or_checkpoint_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    fake_trainer(real)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.db").symlink_to(real / "run.db")
    with pytest.raises(StoreError, match=rf"^'{run_dir / 'run.db'}' is a symbolic link"):
        RunStore(run_dir)
    status = babysit_cli("status", "--run-dir", str(run_dir))
    assert status.returncode == 2 and "is a symbolic link" in status.stderr and "Traceback" not in status.stderr
    # A checkpoint file that is a link to another file, even one whose hash was recorded, is not read.
    outside = tmp_path / "outside.pt"
    sha, _ = write_atomic(outside, {"format": FORMAT, "model": {"w": torch.ones(1)}})
    (run_dir / "epoch-0001-step-00000001-b1.pt").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"is a symbolic link"):
        read_verified(run_dir / "epoch-0001-step-00000001-b1.pt", sha)


def test_item4_the_demo_never_appends_its_trainer_log_through_a_link(tmp_path: Path) -> None:
    from babysit.cli import start_trainer

    target, run_dir = planted_link(tmp_path, "trainer.log")
    with pytest.raises(RunDirError, match=r"trainer\.log' is a symbolic link"):
        start_trainer(str(run_dir))
    assert target.read_bytes() == PRECIOUS


# -- item 7: long histories ----------------------------------------------------------------------
def many_rows(store: RunStore, n: int) -> None:
    now = time.time()
    with store.transaction() as connection:
        connection.executemany(
            "INSERT INTO commands (created, source, kind, args, state, step, done_at, result) VALUES (?, 'cli', ?,"
            " '{\"value\": 0.01}', 'applied', ?, ?, '{}')", [(now, cmd.SET_LR, i, now) for i in range(n)])
        connection.executemany(
            "INSERT INTO events (wall, branch, step, kind, message) VALUES (?, 1, ?, 'resume', 'resumed')",
            [(now, i) for i in range(n)])


@pytest.fixture
def page_of(monkeypatch: pytest.MonkeyPatch):
    def start(root: Path, run: Path) -> AppTest:
        monkeypatch.setattr(sys, "argv", ["app.py", "--root", str(root), "--run", str(run)])
        monkeypatch.delenv("BABYSIT_TOKEN", raising=False)
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.run()
        assert not at.exception, at.exception
        return at

    return start


def test_item7_the_newest_commands_and_events_past_10000_are_read_and_shown(tmp_path: Path, page_of) -> None:
    store = fake_trainer(tmp_path / "run")
    many_rows(store, 10_050)
    newest_command = store.enqueue_command(cmd.SET_LR, {"value": 0.02}, source="dashboard")
    divergence = store.add_event("divergence", "divergence: loss became nan at step 99", branch=1, step=99,
                                 data={"checkpoint": 1, "suggested_lr": 0.025})
    assert store.commands()[-1]["id"] == newest_command == 10_051
    assert store.events()[-1]["id"] == divergence == 10_051
    assert store.commands(since_id=10_049, limit=1)[0]["id"] == newest_command
    at = page_of(tmp_path, tmp_path / "run")
    history = at.dataframe[-1].value
    assert history["#"].iloc[0] == newest_command and len(history) == 200
    assert any("loss became nan at step 99" in e.value for e in at.error), [e.value for e in at.error]


def test_item7_the_page_sends_a_bounded_number_of_checkpoints(tmp_path: Path, page_of) -> None:
    store = fake_trainer(tmp_path / "run")
    listed = store.checkpoints()
    with store.transaction() as connection:
        connection.executemany(
            "INSERT INTO checkpoints (created, branch, epoch, step, step_in_epoch, file, sha256, size, hparams,"
            " metrics, reason) SELECT created, branch, epoch, step, step_in_epoch, file, sha256, size, hparams,"
            " metrics, reason FROM checkpoints WHERE id = ?", [(listed[-1]["id"],)] * 3000)
    newest = store.checkpoints()[-1]["id"]
    at = page_of(tmp_path, tmp_path / "run")
    table = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    picker = at.selectbox(key="rollback_target")
    assert len(table) == 100 and len(picker.options) == 100
    assert table["id"].iloc[0] == newest and picker.value == newest
    assert any("The newest 100 of 3,002 checkpoints" in c.value for c in at.caption)


# -- item 8: smaller ones -----------------------------------------------------------------------------
def compressed_bomb(path: Path, megabytes: int) -> tuple[str, str]:
    """A checkpoint whose tensor record is deflated: a few hundred KB that torch.load would inflate
    to ``megabytes`` MiB. Returns (sha256 of the honest file, sha256 of the bomb)."""
    honest = path.with_name("honest.pt")
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(megabytes * 2**18)}}, honest)
    with zipfile.ZipFile(honest) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in source.infolist():
            with source.open(info) as src, bomb.open(info.filename, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    honest_sha = hashlib.sha256(honest.read_bytes()).hexdigest()
    honest.unlink()
    return honest_sha, hashlib.sha256(path.read_bytes()).hexdigest()


MEASURE = """
import resource, sys, json
from pathlib import Path
from babysit.checkpoint import CheckpointError, read_verified
out = []
for sha in sys.argv[2:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_verified(Path(sys.argv[1]), sha)
        message = None
    except CheckpointError as error:
        message = str(error)
    out.append([message, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024])
print(json.dumps(out))
"""


def test_item8_a_compressed_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    bomb = tmp_path / "epoch-0001-step-00000008-b1.pt"
    honest_sha, bomb_sha = compressed_bomb(bomb, megabytes=256)
    assert bomb.stat().st_size < 2 * 2**20
    (wrong_hash, grown_a), (forged_hash, grown_b) = (
        json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(bomb), sha], cwd=REPO, capture_output=True,
                                  text=True, timeout=300, check=True).stdout)[0]
        for sha in (honest_sha, bomb_sha)  # each in a process of its own: the peak is per process
    )
    assert "does not match the hash recorded when it was written" in wrong_hash
    assert "is compressed, which torch.save never does; it was not loaded" in forged_hash
    assert grown_a < 64 and grown_b < 64, (grown_a, grown_b)  # MiB; inflating would take 256


def test_item8_markdown_in_a_run_name_is_shown_as_text(tmp_path: Path, page_of) -> None:
    name = "x` [click](evil.example) ![pixel](evil.png) `y"
    fake_trainer(tmp_path / name)
    at = page_of(tmp_path, tmp_path / name)
    header = next(m.value for m in at.markdown if "-badge[" in m.value)
    tokens = [t for block in MarkdownIt().parse(header) if block.children for t in block.children]
    assert [t.type for t in tokens] == ["code_inline", "text"], header
    assert tokens[0].content == name


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a directory"), "is a file, not a directory"),
    (lambda p: None, "has a name part of 300 bytes; file systems allow at most 255: use a shorter name"),
], ids=["file", "300-characters"])
def test_item8_a_run_dir_that_is_a_file_or_has_a_300_character_name(tmp_path: Path, make, message: str) -> None:
    run_dir = tmp_path / ("r" * 300 if "300" in message else "a-file")
    make(run_dir)
    for args in (("status",), ("train", "--epochs", "1"), ("set", "lr", "0.1"), ("pause",)):
        result = babysit_cli(*args, "--run-dir", str(run_dir))
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_item8_wrong_typed_status_values_break_neither_the_cli_nor_the_page(tmp_path: Path, page_of) -> None:
    store = fake_trainer(tmp_path / "run")
    connection = sqlite3.connect(tmp_path / "run" / "run.db")
    connection.execute("UPDATE status SET lr = 'fast', momentum = x'00ff', heartbeat = 'soon', epoch = 'three',"
                       " step = 1.5, steps_per_epoch = 'many', message = 42 WHERE id = 1")
    connection.commit()
    connection.close()
    for args in (("status",), ("status", "--json")):
        result = babysit_cli(*args, "--run-dir", str(tmp_path / "run"))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert json.loads(babysit_cli("status", "--json", "--run-dir", str(tmp_path / "run")).stdout)["lr"] is None
    at = page_of(tmp_path, tmp_path / "run")
    assert {m.label: m.value for m in at.metric}["lr"] == "–"
    assert store.status()["effective_state"] == "not responding"  # no trustworthy heartbeat


def test_item8_a_read_only_run_directory_is_reported_as_such(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fake_trainer(run_dir).close()  # its last connection closed: no write-ahead log files beside run.db
    assert shutil.which("unshare"), "util-linux's unshare is needed to mount the run directory read-only"
    commands = "; ".join(f"{sys.executable} -m babysit {c} --run-dir {run_dir}; echo exit $?"
                         for c in ("status", "pause", "train"))
    script = f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir} && {{ {commands}; }}"
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.count("exit 2") == 3, result.stdout + result.stderr
    assert result.stderr.count(f"run directory {str(run_dir)!r} is read-only") == 3, result.stderr
    assert "not a readable babysit run database" not in result.stderr and "Traceback" not in result.stderr


def test_item8_run_db_deleted_under_a_running_trainer_is_noticed_and_nothing_is_overwritten(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trainer = Trainer(run_dir, "--epochs", "6", *FAST)
    try:
        trainer.wait_running()
        store = RunStore(run_dir)
        wait_for(lambda: len(store.checkpoints()) >= 2, timeout=300, what="two checkpoints")
        for name in ("run.db", "run.db-wal", "run.db-shm"):
            (run_dir / name).unlink(missing_ok=True)
        wait_for(lambda: "was deleted or replaced under this trainer" in trainer.output(), timeout=120,
                 what="the trainer noticing")
        before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run_dir.glob("epoch-*.pt")}
        trainer.process.send_signal(signal.SIGTERM)
        assert trainer.wait_exit(timeout=120) == 0, trainer.output()
    finally:
        trainer.kill()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run_dir.glob("epoch-*.pt")}
    assert before.items() <= kept.items()
    # A new trainer here starts a new run (nothing lists the old files) and overwrites none of them.
    again = Trainer(run_dir, "--epochs", "3", *FAST)
    try:
        assert again.wait_exit(timeout=300) == 0, again.output()
    finally:
        again.kill()
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run_dir.glob("epoch-*.pt")}
    assert kept.items() <= after.items()
    new = [c["file"] for c in RunStore(run_dir).checkpoints()]
    assert len(new) >= 3 and not set(new) & set(kept), (new, sorted(kept))


# -- issue 26, "Tried to break it again" ----------------------------------------------------------
def address_space_cap(memory_mib: int) -> Callable[[], None]:
    """A ``preexec_fn`` that caps the child's address space (RLIMIT_AS) at ``memory_mib`` MiB."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mib * 2**20, memory_mib * 2**20))

    return cap


def confined(*argv: str, memory_mib: int = 2048, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` from the repository root, its address space capped at ``memory_mib`` MiB
    (RLIMIT_AS) and its time at ``timeout`` s: an attack that makes it eat memory or hang fails
    the test, never the machine."""
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=address_space_cap(memory_mib), env={**os.environ, "PYTHONUNBUFFERED": "1"})


HUGE_VALUE_LOOP = """
import sys
from tests.conftest import tiny_job
# An int too large for a float, logged at the epoch's last step: the flush that takes it off the
# queue is the writer thread's or the one the epoch's checkpoint makes before it is listed.
tiny_job(sys.argv[1], epochs=2, on_step=lambda run, step: run.log(big=10**400 if step == 8 else float(step)))
"""


def test_item3_a_value_too_large_for_a_float_loses_nothing_else_and_orphans_no_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = confined("-c", HUGE_VALUE_LOOP, str(run_dir))
    assert done.returncode == 0, done.stderr
    store = RunStore(run_dir)

    def steps_of(name: str) -> list[int]:
        info = next(s for s in store.series() if s.name == name and s.per == "step")
        return store.chunk_points(info.id)[0].tolist()

    assert steps_of("loss") == list(range(1, 17))
    assert steps_of("big") == [s for s in range(1, 17) if s != 8]
    errors = [(e["step"], e["message"]) for e in store.events(kinds=["error"])]
    assert errors == [(8, "metric 'big' at step 8: value (an int of about 401 digits) is too large for a float; "
                          "such values are not stored (log numbers or one-element tensors)")]
    assert not [e for e in store.events() if "nothing was lost" in e["message"]]
    listed = sorted(c["file"] for c in store.checkpoints())
    assert listed == sorted(p.name for p in run_dir.glob("*.pt")) and len(listed) == 2


def test_item5_bad_journals_are_refused_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    from babysit.instruments.journal import export_journal
    from tests.test_journal import synthetic_run

    good = export_journal(synthetic_run(tmp_path / "r"))
    good["run"]["config"] = {"job": "digits", "seed": 0, "epochs": 1, "epoch_passes": 1, "batch_size": 64}

    def journal(name: str, change: Callable[[dict[str, Any]], object]) -> str:
        changed = json.loads(json.dumps(good))
        change(changed)
        (tmp_path / name).write_text(json.dumps(changed))
        return str(tmp_path / name)

    (tmp_path / "deep.json").write_text('{"babysit_journal": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with open(tmp_path / "huge.json", "wb") as sparse:  # 17 MiB that take no room on the disk
        sparse.truncate(17 * 2**20)
    os.mkfifo(tmp_path / "fifo")
    refusals = {
        "/dev/zero": "journal '/dev/zero' is a character device, not a regular file; a journal is a JSON file",
        str(tmp_path / "fifo"): f"journal '{tmp_path / 'fifo'}' is a FIFO, not a regular file",
        str(tmp_path / "huge.json"): f"journal '{tmp_path / 'huge.json'}' is 17,825,792 bytes; a journal is at most 16 MiB",
        str(tmp_path / "deep.json"): f"journal '{tmp_path / 'deep.json'}' nests deeper than 32 levels",
        journal("job.json", lambda j: j["run"]["config"].update(job=["digits"])):
            "the run's config: job must be text (a name such as 'digits' or 'sgd'), got ['digits']",
        journal("seed.json", lambda j: j["run"]["config"].update(seed=10**30)):
            "the run's config: seed must be a whole number from -2**63 to 2**64 - 1 (what torch.manual_seed "
            "takes), got 1000000000000000000000000000000",
        journal("seed-true.json", lambda j: j["run"]["config"].update(seed=True)):
            "(what torch.manual_seed takes), got True",
        journal("lr.json", lambda j: j["run"]["config"].update(lr="0.1")):
            "the run's config: lr must be a number (not text, not true or false), got '0.1'",
        journal("epoch.json", lambda j: j["to"].update(epoch=True)): "to.epoch must be a whole number >= 0, got True",
    }
    # One process with its memory capped reads them all through the CLI's own entry point (each
    # refusal as `python -m babysit train --replay` prints it and the exit status it returns).
    run_dir = tmp_path / "never"
    answers = json.loads(confined("-c", REPLAY_EACH, str(run_dir), *refusals, timeout=240).stdout)
    for (path, message), (code, out, err) in zip(refusals.items(), answers, strict=True):
        assert code == 2 and out == "", (path, code, out, err[-2000:])
        assert err.startswith("babysit: error: --replay: ") and message in err and err.count("\n") == 1, (path, err)
    assert not run_dir.exists()


REPLAY_EACH = """
import json, sys
from tests.conftest import cli_here
answers = [cli_here("train", "--run-dir", sys.argv[1], "--replay", path) for path in sys.argv[2:]]
print(json.dumps([[a.returncode, a.stdout, a.stderr] for a in answers]))
"""


LOOP_UNTIL_STOPPED = """
import sys
from tests.conftest import tiny_job
tiny_job(sys.argv[1], epochs=int(sys.argv[2]), keep_last=2)
"""


def test_item6_commands_queued_behind_a_clean_stop_expire_instead_of_firing_at_the_next_start(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with open(tmp_path / "trainer.log", "wb") as log:
        trainer = subprocess.Popen([sys.executable, "-c", LOOP_UNTIL_STOPPED, str(run_dir), "1000000"], cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=address_space_cap(2048))
        try:
            wait_for(lambda: (run_dir / "run.db").exists(), timeout=120, what="run.db")
            store = RunStore(run_dir)
            first = wait_for(store.checkpoints, timeout=120, what="a checkpoint")[0]["id"]
            # A stop, then 1 ms behind it a rollback and a pause: the stop ends the queue.
            stop = store.enqueue_command(cmd.STOP, source="cli")
            behind = [store.enqueue_command(cmd.ROLLBACK, {"checkpoint": first}, source="dashboard"),
                      store.enqueue_command(cmd.PAUSE, source="cli")]
            assert trainer.wait(timeout=120) == 0, (tmp_path / "trainer.log").read_text()
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait(timeout=30)
    assert store.command(stop)["state"] == cmd.APPLIED
    assert [(store.command(i)["state"], store.command(i)["reason"]) for i in behind] == [
        (cmd.EXPIRED, "the run stopped before it applied this")] * 2
    stopped = store.status()
    assert stopped["state"] == "stopped" and store.pending_commands() == []
    # Started again, it goes on from its stop on its own branch: the rollback never fires.
    again = confined("-c", LOOP_UNTIL_STOPPED, str(run_dir), str(stopped["epoch"] + 1))
    assert again.returncode == 0, again.stderr
    assert [b["id"] for b in store.branches()] == [1]
    assert store.status()["state"] == "finished" and store.status()["step"] > stopped["step"]
    assert [store.command(i)["state"] for i in behind] == [cmd.EXPIRED] * 2


API_MISUSE = """
import json, os, sys
import torch
from torch import nn
import babysit

said = {}

def attempt(label, make):
    try:
        make()
        said[label] = "ok"
    except Exception as error:
        said[label] = f"{type(error).__name__}: {error}"

def linear_run(run_dir, inputs, optimizer=torch.optim.SGD):
    model = nn.Linear(inputs, 1)
    kwargs = {"momentum": 0.9} if optimizer is torch.optim.SGD else {}
    return babysit.Run(run_dir, model, optimizer(model.parameters(), lr=0.1, **kwargs))

def one_epoch(run, log=lambda run: None, log_epoch=lambda run: None):
    with run:
        for _ in run.epochs(1):
            for _ in run.batches([0, 1, 2]):
                log(run)
            log_epoch(run)

os.chdir(sys.argv[1])
attempt("empty", lambda: linear_run("", 2))
said["left_in_cwd"] = sorted(os.listdir("."))
one_epoch(linear_run("sgd", 2))
attempt("other_model", lambda: linear_run("sgd", 3))
attempt("other_model_again", lambda: linear_run("sgd", 3))  # a notebook's retry, in the same process
attempt("adam_on_sgd", lambda: linear_run("sgd", 2, torch.optim.Adam))
attempt("right_model", lambda: one_epoch(linear_run("sgd", 2)))
attempt("bad_values", lambda: one_epoch(
    linear_run("values", 2), log=lambda run: run.log(loss=torch.ones(3) if run.step == 2 else torch.tensor(0.5)),
    log_epoch=lambda run: run.log_epoch(val_loss="x", val_acc=None, val_top=0.25)))
print(json.dumps(said))
"""


def test_item7_the_python_api_says_what_does_not_fit_and_lets_go_of_the_run(tmp_path: Path) -> None:
    done = confined("-c", API_MISUSE, str(tmp_path))
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.splitlines()[-1])
    assert said["empty"] == ("SettingsError: run_dir must name a directory, such as 'checkpoints/my-run' (or '.' for "
                             "the current one), got ''")
    assert said["left_in_cwd"] == []
    misfit = ("CheckpointError: checkpoint #1 of run 'sgd' does not fit this model and optimizer ({}): the run was "
              "trained with others; build the model and optimizer it was trained with, or start a new run in another "
              "directory; nothing was loaded")
    assert said["other_model"] == said["other_model_again"] == misfit.format("weight (1, 2) vs (1, 3) here")
    assert said["adam_on_sgd"] == misfit.format("its optimizer has dampening, momentum, nesterov, which this Adam "
                                                "has not: another kind of optimizer")
    assert said["right_model"] == "ok" and said["bad_values"] == "ok"
    store = RunStore(tmp_path / "sgd")
    assert store.status()["state"] == "finished" and [c["epoch"] for c in store.checkpoints()] == [1]
    values = RunStore(tmp_path / "values")
    assert [(e["step"], e["message"].split(": value")[0]) for e in values.events(kinds=["error"])] == [
        (2, "metric 'loss' at step 2"), (3, "metric 'val_loss' at step 3"), (3, "metric 'val_acc' at step 3")]
    assert "is a tensor of 3 elements (shape (3,)), not one number" in values.events(kinds=["error"])[0]["message"]
    assert values.checkpoints()[-1]["metrics"] == {"val_top": 0.25}


# -- issue 26, item 1: walks over a run's rows are bounded; a refresh is bounded ----------------------
def forged_cycle_run(run_dir: Path) -> None:
    """A run whose branches 1 and 2 name each other as parents, both with points and epochs, and
    the freshest heartbeat under its root (so the page opens it by default)."""
    import numpy as np

    from babysit.store import CHUNK_POINTS, PER_STEP

    store = RunStore(run_dir, create=True)
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.new_branch(parent=1, from_checkpoint=None, start_step=200, start_epoch=2)
    store.conn().execute("UPDATE branches SET parent = 2 WHERE id = 1")
    for branch, first in ((1, 1), (2, 201)):
        steps = np.arange(first, first + 400)
        series = store.series_id("loss", branch, PER_STEP)
        store.write_chunks([(series, steps[i:i + CHUNK_POINTS], np.full(len(steps[i:i + CHUNK_POINTS]), 1.0 / branch),
                             time.time() + steps[i:i + CHUNK_POINTS] * 0.01) for i in range(0, 400, CHUNK_POINTS)])
        for epoch in range(1, 5):
            store.add_epoch(branch, epoch + (2 if branch == 2 else 0), first - 1 + 100 * epoch)
    store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                       heartbeat=time.time() + 60, epoch=6, max_epochs=10, step=600, step_in_epoch=0,
                       steps_per_epoch=100, branch=2, lr=0.05, momentum=0.9, optimizer="SGD", message="")
    store.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_issue26_item1_a_forged_branch_cycle_under_root_is_shown_as_damaged_in_bounded_memory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    fake_trainer(root / "calm", alive=False)
    forged_cycle_run(root / "hostile")
    log_path = tmp_path / "dashboard.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        # Streamlit, numpy and pyarrow reserve ~2.4 GB of address space before any page: the limit
        # leaves 1 GB more, where the unbounded walk took 700 MB every 15 s.
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.address", "127.0.0.1",
             "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none", "--", "--root", str(root)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=address_space_cap(3500),
            env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    try:
        wait_healthy(url, server, log_path, timeout=90)
        with chromium_page(1366, 768, timeout_s=90) as (page, errors):
            frames: list[int] = []
            page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: frames.append(len(frame))))
            page.goto(url)
            plot = ".babysit-live-chart .js-plotly-plot"
            note = page.locator(f"{plot} .annotation-text", has_text="name each other as parents")
            note.wait_for(timeout=90_000)
            assert note.text_content().startswith("Damaged run: branches 1 and 2 name each other as parents")
            # The rest of the run still shows: its live line, branch 1 up to the fork, then branch 2.
            live = page.evaluate("""(sel) => document.querySelector(sel).data
                .filter((t) => t.meta && t.meta.role === 'live' && t.name === 'loss').map((t) => t.meta.pieces)""", plot)
            assert live == [[[1, 0], [2, 200]]], live
            # It keeps answering: the page's refreshes (a second apart) go on arriving.
            seen = len(frames)
            wait_for(lambda: page.wait_for_timeout(200) or len(frames) >= seen + 30, timeout=60,
                     what="more refreshes of the page")
            assert errors == []
        assert server.poll() is None, log_path.read_text()
        assert peak_rss_mb(server.pid) < 600, f"the dashboard peaked at {peak_rss_mb(server.pid):.0f} MB"
        assert "MemoryError" not in log_path.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)


HUGE_RUN = """
import json, resource, sys, time
from babysit.store import RunStore
from babysit.ui.data import read_view
from babysit.ui.figures import build_figure
store = RunStore(sys.argv[1])
started = time.monotonic()
view = read_view(store, store.status())
figure = build_figure(view)
print(json.dumps({"seconds": time.monotonic() - started, "notes": view.notes, "traces": len(figure["data"]),
                  "points": sum(len(t["x"]) for t in figure["data"]),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_issue26_item1_one_refresh_of_a_huge_forged_run_is_bounded_in_memory_and_time(tmp_path: Path) -> None:
    """200,000 branches in one chain, a million epochs, 20,000 series: the chart reads the newest
    rows only, says so, and answers in bounded time and memory."""
    run_dir = tmp_path / "huge"
    store = fake_trainer(run_dir)
    with store.transaction() as connection:
        connection.executemany("INSERT INTO branches (id, parent, from_checkpoint, start_step, start_epoch, created)"
                               " VALUES (?, ?, NULL, ?, 0, 0)", ((i, i - 1, i) for i in range(2, 200_001)))
        connection.executemany("INSERT INTO epochs VALUES (?, ?, ?, 0)",
                               ((1 + i % 200_000, i, i) for i in range(1_000_000)))
        connection.executemany("INSERT INTO series (name, branch, per, segment) VALUES (?, ?, 'step', 0)",
                               ((f"metric_{i}", 200_000) for i in range(20_000)))
    store.write_status(branch=200_000)
    store.close()
    result = subprocess.run([sys.executable, "-c", HUGE_RUN, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, preexec_fn=address_space_cap(2500))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert "This run has 200,000 branches; the chart reads the newest 20,000." in found["notes"]
    assert "This run has more than 5,000 series; the chart reads the newest 5,000." in found["notes"]
    assert found["peak_mb"] < 600 and found["seconds"] < 60, found


CYCLE_RESUME = """
import sys
from tests.conftest import tiny_job
tiny_job(sys.argv[1], epochs=3)
"""


def test_issue26_item1_a_trainer_resuming_through_a_forged_parent_cycle_ends_its_walk_and_says_so(
        tmp_path: Path) -> None:
    """The trainer's walk up the line of descent (a resume whose branch's own checkpoints are gone)
    shares the store's cycle-safe walk: on branches that name each other as parents it stops, says
    the run is damaged, and resumes from what the line still holds, instead of looping for ever."""
    import sqlite3

    run_dir = tmp_path / "run"
    assert confined("-c", CYCLE_RESUME.replace("epochs=3", "epochs=2"), str(run_dir)).returncode == 0
    store = RunStore(run_dir)
    first, second = store.checkpoints()
    with sqlite3.connect(run_dir / "run.db") as db:  # branch 2 forks from #2, and branch 1 names 2 as its parent
        db.execute("INSERT INTO branches (id, parent, from_checkpoint, start_step, start_epoch, created) "
                   "VALUES (2, 1, ?, ?, 2, 0)", (second["id"], second["step"]))
        db.execute("UPDATE branches SET parent = 2 WHERE id = 1")
        db.execute("UPDATE status SET branch = 2")
    (run_dir / second["file"]).unlink()  # the fork's file is gone: the resume walks the line back
    done = confined("-c", CYCLE_RESUME, str(run_dir), timeout=180)
    assert done.returncode == 0, done.stderr
    store = RunStore(run_dir)
    damaged = [e["message"] for e in store.events(kinds=["damaged_run"])]
    assert damaged == ["branches 1 and 2 name each other as parents; the line of descent ends there"], damaged
    resumed = store.events(kinds=["resume"])[-1]
    assert f"goes on from checkpoint #{first['id']} as branch 3" in resumed["message"], resumed["message"]
    assert store.status()["state"] == "finished"
