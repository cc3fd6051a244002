"""Hostile and careless input: every bad value gets a message that names it and says what is
accepted, and nothing changes — nothing is queued (or the trainer rejects the row with the reason),
lr, momentum and branch stay, the trainer keeps stepping, and no file appears or disappears.

Most cases go through the CLI against one real ``python -m babysit train`` subprocess shared by the
module; dashboard-only cases go through Streamlit's AppTest; and where the point is that the
trainer validates again ("the queue is a file anyone can write"), rows are written straight into
the run database.

The table of bad values is tests/test_commands.py's (the CLI, the dashboard and the trainer all
validate with babysit.commands). Here a few values per command go through a real ``python -m
babysit`` process, to check the wiring: the exit code, the one line on stderr, nothing queued and
nothing changed; the CLI's own parsing (argparse's usage errors, a run that is not running) is
checked with ``cli_here``, the same ``cli.main`` without a Python start-up per case.

The attacks of issue 11 (a frozen dashboard, hostile run directories, DNS rebinding, a disk with
no byte left, long histories, compressed checkpoints, ...) are listed, item by item, with their
tests, in tests/test_attacks.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from streamlit.testing.v1 import AppTest

from babysit import commands as cmd
from babysit.checkpoint import FORMAT, TEMP_MARK
from babysit.store import CommandSignal, RunStore
from tests.conftest import REPO, Trainer, babysit_cli, cli_here, tiny_job, wait_for

FAST = ("--job", "digits", "--epoch-passes", "1", "--batch-size", "64")  # 23 steps per epoch
LIVE_LR = 1e-6
LR_ACCEPTED = "lr must be a finite number > 0 (for example 0.01)"
MOMENTUM_ACCEPTED = "momentum must be a finite number >= 0 and < 1 (for example 0.9)"
CHECKPOINT_ACCEPTED = "checkpoint must be a checkpoint id, a whole number such as 3 (see `python -m babysit status`)"
KINDS_ACCEPTED = "set_lr, set_momentum, pause, resume, checkpoint, stop, rollback, probe, sweep, cancel"
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
LONG_DIGITS = "1" + "0" * 400  # 10**400 typed out: too large even to be a float


# -- the shared trainer ------------------------------------------------------------------------
@dataclass
class Live:
    """One real trainer subprocess, shared by the cases, and a second one kept to be killed."""

    run_dir: Path
    trainer: Trainer
    store: RunStore
    victim_dir: Path
    victim: subprocess.Popen[bytes]
    used: set[int] = field(default_factory=set)

    def spare_checkpoint(self) -> dict[str, Any]:
        """A listed checkpoint with its file that no other case has used (to damage or delete)."""
        def find() -> dict[str, Any] | None:
            return next((c for c in self.store.checkpoints()
                         if c["id"] not in self.used and (self.run_dir / c["file"]).is_file()), None)

        found = wait_for(find, what="a spare checkpoint")
        self.used.add(found["id"])
        return found

    def good_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint (never one the spare ones are taken from first)."""
        return self.store.checkpoints()[-1]


VICTIM = """
import sys, time
from pathlib import Path
from tests.conftest import tiny_job
tiny_job(Path(sys.argv[1]), epochs=1_000_000, on_step=lambda run, step: time.sleep(0.05))
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("hostile")
    run_dir = base / "run"
    # A learning rate this small keeps the loss flat for the life of the module: on a converging run
    # the divergence guard can pause the run on ordinary noise (seen at epoch 85 with lr 0.05),
    # which would stop the trainer for reasons that have nothing to do with the inputs tried here.
    trainer = Trainer(run_dir, "--epochs", "1000", "--lr", str(LIVE_LR), *FAST)
    victim_dir = base / "victim"
    victim_log = open(base / "victim.log", "wb")
    # Started together so that their start-up times overlap; the victim is killed by one case.
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(victim_dir)], cwd=REPO, stdout=victim_log,
                              stderr=subprocess.STDOUT)
    try:
        trainer.wait_running(min_step=1, timeout=300)
        store = RunStore(run_dir)
        wait_for(lambda: len(store.checkpoints()) >= 9, timeout=300, what="nine checkpoints")
        yield Live(run_dir, trainer, store, victim_dir, victim)
    finally:
        trainer.kill()
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=30)
        victim_log.close()
        shutil.rmtree(run_dir, ignore_errors=True)  # ~1 MB per epoch checkpoint
        shutil.rmtree(victim_dir, ignore_errors=True)


# -- "nothing changed" -------------------------------------------------------------------------
def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime) of what is in ``directory``, without half-written checkpoint temps."""
    if not directory.is_dir():
        return {}
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if TEMP_MARK not in p.name}


def names(files: dict[str, Any]) -> set[str]:
    return {n for n in files if not n.endswith(SQLITE_SIDECARS)}


@dataclass
class Snapshot:
    status: dict[str, Any]
    files: dict[str, tuple[int, int]]
    around: set[str]
    last_command: int
    branches: int
    passwd: tuple[int, int]
    outside: dict[Path, bool]


def outside_paths(live: Live) -> list[Path]:
    """Where a path-shaped checkpoint id could land if anything took it for a path."""
    return [live.run_dir / ".." / "x", REPO / ".." / "x", Path.cwd() / ".." / "x", live.run_dir / "x"]


def snapshot(live: Live) -> Snapshot:
    commands = live.store.commands()
    passwd = Path("/etc/passwd").stat()
    return Snapshot(
        status=live.store.status(), files=files_of(live.run_dir), around=set(files_of(live.run_dir.parent)),
        last_command=commands[-1]["id"] if commands else 0, branches=len(live.store.branches()),
        passwd=(passwd.st_size, passwd.st_mtime_ns), outside={p: p.exists() for p in outside_paths(live)},
    )


def assert_unchanged(live: Live, before: Snapshot, rejected: tuple[int, ...] = ()) -> None:
    """Nothing queued but the ``rejected`` rows (each rejected by the trainer); same lr, momentum
    and branch; the trainer alive and still stepping; no file created or deleted."""
    new_rows = live.store.commands(since_id=before.last_command)
    assert [r["id"] for r in new_rows] == list(rejected), new_rows
    assert all(r["state"] == cmd.REJECTED for r in new_rows), new_rows
    assert live.trainer.process.poll() is None, live.trainer.output()[-3000:]

    def stepped() -> dict[str, Any] | None:
        status = live.store.status()
        return status if status["alive"] and status["step"] > before.status["step"] else None

    try:
        after = wait_for(stepped, timeout=30, what="the trainer to keep stepping")
    except AssertionError:
        raise AssertionError(f"the trainer stopped stepping: {live.store.status()}\n"
                             f"events: {live.store.events()[-5:]}") from None
    assert after["effective_state"] == "running", after
    assert (after["lr"], after["momentum"], after["branch"]) == (
        before.status["lr"], before.status["momentum"], before.status["branch"])
    assert len(live.store.branches()) == before.branches

    # Files: nothing deleted; nothing created but the epoch checkpoints the trainer lists; every
    # checkpoint file that was there is untouched.
    def files_settled() -> dict[str, tuple[int, int]] | None:
        files = files_of(live.run_dir)
        listed = {c["file"] for c in live.store.checkpoints() if c["reason"] == "epoch"}
        return files if names(files) - names(before.files) <= listed else None

    try:
        files = wait_for(files_settled, timeout=30, what="new files to be listed epoch checkpoints")
    except AssertionError:
        raise AssertionError(f"files appeared that are not listed epoch checkpoints: "
                             f"{sorted(names(files_of(live.run_dir)) - names(before.files))}") from None
    assert names(before.files) - names(files) == set()
    assert {n: files[n] for n in before.files if n.endswith(".pt")} == {
        n: v for n, v in before.files.items() if n.endswith(".pt")}
    assert set(files_of(live.run_dir.parent)) == before.around
    passwd = Path("/etc/passwd").stat()
    assert (passwd.st_size, passwd.st_mtime_ns) == before.passwd
    assert {p: p.exists() for p in outside_paths(live)} == before.outside


def refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    """The CLI refused before queueing: exit 2 and exactly this one line on stderr."""
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"babysit: error: {message}\n")


def refused_matching(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode == 2 and result.stdout == "", (result.returncode, result.stdout, result.stderr)
    assert re.fullmatch(f"babysit: error: {pattern}\n", result.stderr), result.stderr


# The tail of a "checkpoint does not exist" message, as a pattern: the ids change as epochs go by.
AVAILABLE = r"available: (#\d+, )*#\d+"


# -- lr and momentum through the CLI ------------------------------------------------------------
@pytest.mark.parametrize(("name", "value", "message"), [
    # A negative number in scientific notation: argparse would take it for an option and say "the
    # following arguments are required: value" although a value was given.
    ("lr", "-1e-3", f"{LR_ACCEPTED}, got '-1e-3'"),
    ("momentum", "1", f"{MOMENTUM_ACCEPTED}, got '1'"),
])
def test_cli_set_refuses_a_bad_value(live: Live, name: str, value: str, message: str) -> None:
    before = snapshot(live)
    result = babysit_cli("set", name, value, "--run-dir", str(live.run_dir), "--wait")
    refused(result, message)
    assert_unchanged(live, before)


# -- rollback through the CLI -------------------------------------------------------------------
def test_cli_rollback_refuses_anything_but_an_id(live: Live) -> None:
    # A path where an id belongs: refused before any path is formed, and no file outside changes
    # (assert_unchanged looks at ../x beside the run, the repository and the working directory).
    before = snapshot(live)
    result = babysit_cli("rollback", "../x", "--run-dir", str(live.run_dir), "--wait")
    refused(result, f"{CHECKPOINT_ACCEPTED}, got '../x'")
    assert_unchanged(live, before)


def test_cli_rollback_to_an_unknown_id_lists_the_available_ones(live: Live) -> None:
    before = snapshot(live)
    result = cli_here("rollback", "999999", "--run-dir", str(live.run_dir), "--wait")
    refused_matching(result, f"checkpoint #999999 does not exist in run {re.escape(repr(str(live.run_dir)))}; "
                             + AVAILABLE)
    assert_unchanged(live, before)


def test_cli_rollback_to_a_checkpoint_whose_file_was_deleted(live: Live) -> None:
    target = live.spare_checkpoint()
    (live.run_dir / target["file"]).unlink()
    before = snapshot(live)
    result = cli_here("rollback", str(target["id"]), "--run-dir", str(live.run_dir), "--wait")
    refused(result, f"checkpoint #{target['id']}: its file {target['file']!r} is missing from "
                    f"{str(live.run_dir)!r}; pick another checkpoint")
    assert_unchanged(live, before)


def test_cli_rollback_to_a_checkpoint_removed_by_retention(live: Live) -> None:
    target = live.spare_checkpoint()
    (live.run_dir / target["file"]).unlink()  # what keep_last does: the file goes, the row is marked
    live.store.mark_checkpoint_deleted(target["id"])
    before = snapshot(live)
    result = cli_here("rollback", str(target["id"]), "--run-dir", str(live.run_dir), "--wait")
    refused_matching(result, f"checkpoint #{target['id']} was deleted in run "
                             f"{re.escape(repr(str(live.run_dir)))}; " + AVAILABLE)
    assert f"#{target['id']}," not in result.stderr and not result.stderr.endswith(f"#{target['id']}\n")
    assert_unchanged(live, before)


def test_cli_rollback_with_a_bad_new_hyperparameter(live: Live) -> None:
    before = snapshot(live)
    result = babysit_cli("rollback", str(live.good_checkpoint()["id"]), "--lr", "0", "--run-dir",
                         str(live.run_dir), "--wait")
    refused(result, f"{LR_ACCEPTED}, got '0'")
    assert_unchanged(live, before)


# -- damaged checkpoints: queued (the file is there), rejected by the trainer -------------------
class RunsCode:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def malicious_checkpoint(marker: Path) -> bytes:
    """A file in torch's own format, shaped like a babysit checkpoint, that runs code when loaded."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "model": RunsCode(marker)}, buffer)
    return buffer.getvalue()


def test_the_malicious_checkpoint_really_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    """Proof that the payload used below is live: a plain load runs it (so its absence means something)."""
    marker = tmp_path / "proof"
    torch.load(io.BytesIO(malicious_checkpoint(marker)), weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rollback_rejected_by_trainer(live: Live, target: dict[str, Any], reason: str) -> None:
    before = snapshot(live)
    result = babysit_cli("rollback", str(target["id"]), "--run-dir", str(live.run_dir), "--wait")
    assert result.returncode == 1 and result.stdout == "", (result.returncode, result.stdout, result.stderr)
    found = re.fullmatch(rf"#(\d+) rollback to #{target['id']} \(checkpoint hparams\): rejected: (.*)\n",
                         result.stderr, re.S)
    assert found, result.stderr
    row = live.store.command(int(found.group(1)))
    assert row is not None and (row["state"], row["reason"]) == (cmd.REJECTED, reason), row
    assert found.group(2) == reason
    assert_unchanged(live, before, rejected=(row["id"],))


def damaged(path: Path, recorded: str, found: str, branch: int) -> str:
    return (f"checkpoint file {str(path)!r} does not match the hash recorded when it was written "
            f"(recorded {recorded[:12]}…, found {found[:12]}…): it was truncated or altered; it was not loaded"
            f"; the run continues on branch {branch}; pick another checkpoint")


def test_rollback_to_a_truncated_checkpoint(live: Live) -> None:
    target = live.spare_checkpoint()
    path = live.run_dir / target["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reason = damaged(path, target["sha256"], sha256_of(data[: len(data) // 2]), live.store.status()["branch"])
    rollback_rejected_by_trainer(live, target, reason)


def test_rollback_to_a_checkpoint_with_flipped_bytes(live: Live) -> None:
    target = live.spare_checkpoint()
    path = live.run_dir / target["file"]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    reason = damaged(path, target["sha256"], sha256_of(bytes(data)), live.store.status()["branch"])
    rollback_rejected_by_trainer(live, target, reason)


def test_rollback_to_a_checkpoint_replaced_by_a_pickle_that_runs_code(live: Live, tmp_path: Path) -> None:
    target = live.spare_checkpoint()
    marker = tmp_path / "marker-made-by-the-pickle"
    path = live.run_dir / target["file"]
    payload = malicious_checkpoint(marker)
    path.write_bytes(payload)
    reason = damaged(path, target["sha256"], sha256_of(payload), live.store.status()["branch"])
    rollback_rejected_by_trainer(live, target, reason)
    assert not marker.exists()


def test_rollback_to_a_pickle_that_runs_code_even_when_its_hash_was_forged(live: Live, tmp_path: Path) -> None:
    """Someone who can write the file and the database: weights_only loading is the last line."""
    target = live.spare_checkpoint()
    marker = tmp_path / "marker-made-by-the-pickle"
    path = live.run_dir / target["file"]
    payload = malicious_checkpoint(marker)
    path.write_bytes(payload)
    live.store.conn().execute("UPDATE checkpoints SET sha256 = ?, size = ? WHERE id = ?",
                              (sha256_of(payload), len(payload), target["id"]))
    branch = live.store.status()["branch"]
    reason = (f"checkpoint file {str(path)!r} was refused: it holds objects other than tensors and plain data, "
              f"which could run code; it was not loaded; the run continues on branch {branch}; "
              "pick another checkpoint")
    rollback_rejected_by_trainer(live, target, reason)
    assert not marker.exists()


# -- the dashboard, against the live trainer --------------------------------------------------
def dashboard(monkeypatch: pytest.MonkeyPatch, root: Path, run: Path | None) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["app.py", "--root", str(root)] + (["--run", str(run)] if run else []))
    monkeypatch.delenv("BABYSIT_TOKEN", raising=False)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def shows_error(at: AppTest, text: str) -> bool:
    return any(e.value == text for e in at.error)


@pytest.mark.parametrize(("box", "button", "value", "message"), [
    ("lr_exact", "lr_set", "1e400", f"{LR_ACCEPTED}, got '1e400'"),
    ("lr_exact", "lr_set", "0.0", f"{LR_ACCEPTED}, got '0.0'"),
    ("momentum_exact", "momentum_set", "0.9.9", f"{MOMENTUM_ACCEPTED}, got '0.9.9'"),
    ("momentum_exact", "momentum_set", "-1", f"{MOMENTUM_ACCEPTED}, got '-1'"),
])
def test_dashboard_refuses_a_bad_typed_value(live: Live, monkeypatch: pytest.MonkeyPatch, box: str, button: str,
                                             value: str, message: str) -> None:
    at = dashboard(monkeypatch, live.run_dir.parent, live.run_dir)
    before = snapshot(live)
    at.text_input(key=box).input(value).run()
    at.button(key=button).click().run()
    assert not at.exception, at.exception
    assert shows_error(at, f"Not sent: {message}"), [e.value for e in at.error]
    assert_unchanged(live, before)


def test_dashboard_rollback_to_a_checkpoint_whose_file_went_while_the_page_was_open(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    target = live.spare_checkpoint()
    at = dashboard(monkeypatch, live.run_dir.parent, live.run_dir)
    at.selectbox(key="rollback_target").set_value(target["id"]).run()
    (live.run_dir / target["file"]).unlink()
    before = snapshot(live)
    at.button(key="rollback").click().run()
    assert not at.exception, at.exception
    assert shows_error(at, f"Not sent: checkpoint #{target['id']}: its file {target['file']!r} is missing from "
                           f"{str(live.run_dir)!r}; pick another checkpoint"), [e.value for e in at.error]
    assert_unchanged(live, before)


def test_dashboard_rollback_to_a_checkpoint_retention_removed_while_the_page_was_open(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    target = live.spare_checkpoint()
    at = dashboard(monkeypatch, live.run_dir.parent, live.run_dir)
    at.selectbox(key="rollback_target").set_value(target["id"]).run()
    (live.run_dir / target["file"]).unlink()
    live.store.mark_checkpoint_deleted(target["id"])
    before = snapshot(live)
    at.button(key="rollback").click().run()
    assert not at.exception, at.exception
    pattern = (f"Not sent: checkpoint #{target['id']} was deleted in run {re.escape(repr(str(live.run_dir)))}; "
               + AVAILABLE)
    assert any(re.fullmatch(pattern, e.value) for e in at.error), [e.value for e in at.error]
    assert_unchanged(live, before)


# -- the dashboard, dashboard-only inputs on a run this test plays the trainer of --------------
def fake_live_run(run_dir: Path, *, lr: float) -> RunStore:
    """A run store whose status says a trainer (this test process) is alive with this lr."""
    store = RunStore(run_dir, create=True)
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                       heartbeat=time.time(), epoch=3, max_epochs=10, step=120, step_in_epoch=20, steps_per_epoch=45,
                       branch=branch, lr=lr, momentum=0.9, optimizer="SGD", message="")
    return store


def test_dashboard_doubling_a_large_lr_sends_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 20 is the default lr of well-known LSTM language-model scripts: x2 from there is a nudge, not a typo.
    store = fake_live_run(tmp_path / "run", lr=20.0)
    at = dashboard(monkeypatch, tmp_path, tmp_path / "run")
    at.button(key="lr_double").click().run()
    assert [(c["kind"], c["args"]) for c in store.commands()] == [(cmd.SET_LR, {"value": 40.0})]


def test_dashboard_asked_for_a_directory_that_is_not_a_run_says_so(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    other = fake_live_run(tmp_path / "other", lr=0.05)
    plain = tmp_path / "plain"
    plain.mkdir()
    at = dashboard(monkeypatch, tmp_path, plain)
    # Not silently another run: the user would nudge a run they did not ask for.
    assert shows_error(at, f"{str(plain)!r} is not a babysit run (it has no run.db); runs found: {tmp_path / 'other'}"), \
        [e.value for e in at.error]
    assert list(plain.iterdir()) == [] and other.commands() == []


# -- runs that are not running ------------------------------------------------------------------
def not_running(run_dir: Path, detail: str) -> str:
    more = " --epochs N (more than it has done)" if detail == "its trainer is finished" else ""
    return (f"run {str(run_dir)!r} is not running ({detail}); commands are accepted only while a trainer runs: "
            f"resume it by running your training script again, or for the demo "
            f"`python -m babysit train --run-dir {run_dir}{more}`")


def assert_dir_unchanged(run_dir: Path, before: dict[str, tuple[int, int]]) -> None:
    after = files_of(run_dir)
    assert names(after) == names(before)
    assert {n: v for n, v in after.items() if n.endswith(".pt")} == {n: v for n, v in before.items() if n.endswith(".pt")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose training loop ran to its last epoch (a user's own loop, in this process)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run, _ = tiny_job(run_dir, epochs=2)
    assert run.status == "finished"
    store = RunStore(run_dir)
    assert store.commands() == [], (store.commands(), store.events())
    return run_dir


@pytest.mark.parametrize(("command", "cli"), [(("set", "lr", "0.1"), babysit_cli), (("rollback", "1"), cli_here),
                                             (("pause",), cli_here), (("stop",), cli_here)],
                         ids=["set-in-a-process", "rollback", "pause", "stop"])
def test_commands_for_a_finished_run(finished_run: Path, command: tuple[str, ...], cli: Any) -> None:
    before = files_of(finished_run)
    result = cli(*command, "--run-dir", str(finished_run), "--wait")
    refused(result, not_running(finished_run, "its trainer is finished"))
    assert RunStore(finished_run).commands() == []
    assert_dir_unchanged(finished_run, before)


def test_commands_for_a_stopped_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run, _ = tiny_job(run_dir, epochs=5, on_step=lambda r, step: r.request_stop("test") if step == 3 else None)
    assert run.status == "stopped"
    before = files_of(run_dir)
    result = babysit_cli("set", "momentum", "0.5", "--run-dir", str(run_dir), "--wait")
    refused(result, not_running(run_dir, "its trainer is stopped"))
    assert RunStore(run_dir).commands() == [], (RunStore(run_dir).commands(), RunStore(run_dir).events())
    assert_dir_unchanged(run_dir, before)


def test_commands_for_a_run_whose_trainer_was_killed(live: Live) -> None:
    store = wait_for(lambda: (live.victim_dir / "run.db").exists() and RunStore(live.victim_dir), timeout=120,
                     what="the victim's run store")
    wait_for(lambda: store.status()["alive"] and store.checkpoints(), timeout=120, what="the victim to run")
    pid = live.victim.pid
    live.victim.send_signal(signal.SIGKILL)
    live.victim.wait(timeout=30)
    assert store.status()["effective_state"] == "crashed"  # known at once: its pid is gone
    before = files_of(live.victim_dir)
    commands_before = store.commands()
    for command, cli in ((("set", "lr", "0.01"), babysit_cli), (("rollback", "1"), cli_here)):
        result = cli(*command, "--run-dir", str(live.victim_dir), "--wait")
        refused(result, not_running(live.victim_dir, f"its trainer (pid {pid}) is no longer running"))
    assert store.commands() == commands_before
    assert_dir_unchanged(live.victim_dir, before)
    shown = cli_here("status", "--run-dir", str(live.victim_dir))
    assert shown.returncode == 0 and "state        crashed" in shown.stdout


# -- directories that are not runs, databases that are damaged -------------------------------
def test_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a run")
    before = files_of(plain)
    hint = "start one with `python -m babysit train --run-dir DIR` or pass the directory of an existing run"
    for command, cli in ((("status",), babysit_cli), (("set", "lr", "0.1"), cli_here), (("rollback", "1"), cli_here)):
        result = cli(*command, "--run-dir", str(plain))
        refused(result, f"{str(plain)!r} is not a babysit run (it has no run.db); {hint}")
    assert files_of(plain) == before


def test_a_run_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    hint = "start one with `python -m babysit train --run-dir DIR` or pass the directory of an existing run"
    result = babysit_cli("pause", "--run-dir", str(missing))
    refused(result, f"run directory {str(missing)!r} does not exist; {hint}")
    assert not missing.exists() and list(tmp_path.iterdir()) == []


def copy_database(live: Live, target: Path) -> Path:
    """A consistent copy of the live run's database (SQLite's backup API), in its own directory."""
    target.mkdir()
    source = sqlite3.connect(live.store.db_path)
    copy = sqlite3.connect(target / "run.db")
    source.backup(copy)
    copy.close()
    source.close()
    return target / "run.db"


def overwrite_page(db: Path, table: str) -> None:
    """Garbage over the page that holds ``table``'s rows (the file header and the meta table stay)."""
    connection = sqlite3.connect(db)
    root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    data = bytearray(db.read_bytes())
    data[(root - 1) * page_size: root * page_size] = (b"\xde\xad\xbe\xef" * page_size)[:page_size]
    db.write_bytes(bytes(data))


def damage_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:4096] = b"\xde\xad\xbe\xef" * 1024
    db.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "sqlite_says"), [
    (damage_header, "file is not a database"),
    (lambda db: overwrite_page(db, "status"), "database disk image is malformed"),
    (lambda db: db.write_bytes(b""), "no such table: meta"),
], ids=["garbage-header", "garbage-status-page", "empty-file"])
def test_a_damaged_run_database_gets_a_clear_message_from_cli_and_dashboard(
        live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Any, sqlite_says: str) -> None:
    db = copy_database(live, tmp_path / "copy")
    damage(db)
    damaged_bytes = db.read_bytes()
    message = (f"{str(db)!r} is not a readable babysit run database ({sqlite_says}); "
               "restore it from a backup or start a new run in another directory")
    for command, cli in ((("status",), babysit_cli), (("set", "lr", "0.1"), cli_here)):
        refused(cli(*command, "--run-dir", str(db.parent)), message)
    at = dashboard(monkeypatch, tmp_path, db.parent)
    assert shows_error(at, message), [e.value for e in at.error]
    assert db.read_bytes() == damaged_bytes
    # SQLite may leave its own empty -wal/-shm files beside a database it could not read to the end.
    assert sorted(p.name for p in db.parent.iterdir() if not p.name.endswith(("-wal", "-shm"))) == ["run.db"]


# -- CLI misuse -------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    # Through a real `python -m babysit` (the usage reaches stderr, exit 2), then in this process.
    (("frobnicate",), "python -m babysit: error: argument COMMAND: invalid choice: 'frobnicate' (choose from "
                      "'demo', 'dashboard', 'train', 'journal', 'status', 'branches', 'hints', 'set', 'rollback', "
                      "'probe', 'sweep', 'cancel', 'probes', 'pause', 'resume', 'checkpoint', 'stop')"),
    (("set", "speed", "0.1"), "python -m babysit set: error: argument name: invalid choice: 'speed' "
                              "(choose from 'lr', 'momentum')"),
    (("set", "lr"), "python -m babysit set: error: the following arguments are required: value"),
    (("rollback",), "python -m babysit rollback: error: the following arguments are required: checkpoint"),
    (("rollback", "1", "--hparams", "mine"), "python -m babysit rollback: error: argument --hparams: invalid choice: "
                                             "'mine' (choose from 'checkpoint', 'current')"),
    (("set", "lr", "0.1", "--timeout", "soon"), "python -m babysit set: error: argument --timeout: invalid float "
                                                "value: 'soon'"),
    (("pause", "--force"), "python -m babysit: error: unrecognized arguments: --force"),
    (("train", "--epochs", "ten"), "python -m babysit train: error: argument --epochs: invalid int value: 'ten'"),
    (("train", "--optimizer", "rmsprop"), "python -m babysit train: error: argument --optimizer: invalid choice: "
                                          "'rmsprop' (choose from 'sgd', 'adam')"),
], ids=lambda v: "-".join(v) if isinstance(v, tuple) else None)
def test_cli_misuse_is_explained(live: Live, args: tuple[str, ...], message: str) -> None:
    before = snapshot(live)
    cli = babysit_cli if args in (("frobnicate",), ("set", "speed", "0.1")) else cli_here
    result = cli(*args, "--run-dir", str(live.run_dir)) if args[0] != "frobnicate" else cli(*args)
    assert result.returncode == 2 and result.stdout == "", (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("usage: python -m babysit"), result.stderr  # what is accepted
    assert result.stderr.endswith(f"\n{message}\n"), result.stderr
    assert_unchanged(live, before)


# -- two dashboards, one moment ---------------------------------------------------------------
def test_two_dashboards_sending_conflicting_nudges_at_once(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both recorded, applied in the order of their ids at a step boundary, both shown with their
    fates; the later one wins."""
    before = snapshot(live)
    values = (2 * LIVE_LR, 3 * LIVE_LR)
    barrier = threading.Barrier(len(values))
    sent: dict[float, int] = {}

    def dashboard_sends(value: float) -> None:
        store = RunStore(live.run_dir)  # each dashboard process has its own connection
        barrier.wait()
        sent[value] = store.enqueue_command(cmd.SET_LR, {"value": value}, source="dashboard")

    threads = [threading.Thread(target=dashboard_sends, args=(v,)) for v in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(sent) == list(values)
    first_id, second_id = sorted(sent.values())
    value_of = {command_id: value for value, command_id in sent.items()}

    def both_done() -> list[dict[str, Any]] | None:
        rows = [live.store.command(i) for i in (first_id, second_id)]
        return rows if all(r and r["state"] != cmd.PENDING for r in rows) else None

    first, second = wait_for(both_done, what="both nudges to be answered")
    assert (first["state"], second["state"]) == (cmd.APPLIED, cmd.APPLIED)
    assert first["step"] <= second["step"]
    assert {k: first["result"][k] for k in ("before", "after")} == {"before": before.status["lr"],
                                                                   "after": value_of[first_id]}
    assert {k: second["result"][k] for k in ("before", "after")} == {  # applied after the first
        "before": value_of[first_id], "after": value_of[second_id]}
    assert wait_for(lambda: live.store.status()["lr"] == value_of[second_id], what="the later lr in the status")
    assert live.trainer.process.poll() is None and live.store.status()["branch"] == before.status["branch"]

    at = dashboard(monkeypatch, live.run_dir.parent, live.run_dir)
    history = at.dataframe[-1].value
    shown = {row["#"]: (row["from"], row["command"], row["fate"]) for _, row in history.iterrows()}
    for row in (first, second):
        assert shown[row["id"]] == ("dashboard", f"set lr {value_of[row['id']]:g}",
                                    f"applied at step {row['step']} (after {value_of[row['id']]:g})")

    # Back to where it was, for the cases that follow.
    babysit_cli("set", "lr", str(before.status["lr"]), "--run-dir", str(live.run_dir), "--wait", check=True)
    wait_for(lambda: live.store.status()["lr"] == before.status["lr"], what="the lr to be back in the status")


# -- rows written straight into the queue: the trainer validates again --------------------------
def write_row(live: Live, kind: Any, args_text: str) -> int:
    """Insert a pending command the way any process with write access to run.db could."""
    cursor = live.store.conn().execute(
        "INSERT INTO commands (created, source, kind, args, state) VALUES (?, 'someone', ?, ?, ?)",
        (time.time(), kind, args_text, cmd.PENDING),
    )
    CommandSignal.ring(live.store.signal_path)
    return int(cursor.lastrowid)


def rejected_row(live: Live, kind: Any, args_text: str) -> dict[str, Any]:
    before = snapshot(live)
    command_id = write_row(live, kind, args_text)

    def answered() -> dict[str, Any] | None:
        assert live.trainer.process.poll() is None, "the trainer died:\n" + live.trainer.output()[-3000:]
        row = live.store.command(command_id)
        return row if row and row["state"] != cmd.PENDING else None

    row = wait_for(answered, what="the trainer to answer the row")
    assert_unchanged(live, before, rejected=(command_id,))
    return row


@pytest.mark.parametrize(("kind", "args_text", "reason"), [
    ("rollback", '{"checkpoint": "../x"}', f"{CHECKPOINT_ACCEPTED}, got '../x'"),
    ("rollback", '{"checkpoint": "/etc/passwd", "hparams": "checkpoint"}', f"{CHECKPOINT_ACCEPTED}, got '/etc/passwd'"),
    ("rollback", '{"checkpoint": "epoch-0001-step-00000023-b1.pt"}',
     f"{CHECKPOINT_ACCEPTED}, got 'epoch-0001-step-00000023-b1.pt'"),
    ("rollback", '{"checkpoint": true}', f"{CHECKPOINT_ACCEPTED}, got True"),
    ("pause", '{"seconds": 5}', "pause takes no arguments, got seconds"),
    ("pause", '{"reason": "' + "x" * 301 + '"}',
     f"pause reason must be text of at most 300 characters, got '{'x' * 56}..."),
    ("set_lr", '{"value": ' + LONG_DIGITS + "}", f"{LR_ACCEPTED}, got {LONG_DIGITS[:57]}..."),
    ("set_lr", '{"value": NaN}', f"{LR_ACCEPTED}, got nan"),
    ("set_lr", '{"value": -Infinity}', f"{LR_ACCEPTED}, got -inf"),
    ("set_lr", "[0.1]", "set_lr arguments must be a mapping of names to values, got [0.1]"),
    ("set_momentum", '{"value": true}', f"{MOMENTUM_ACCEPTED}, got True"),
    ("set_momentum", '{"value": [0.9]}', f"{MOMENTUM_ACCEPTED}, got [0.9]"),
    ("rm -rf /", "{}", f"unknown command 'rm -rf /'; accepted: {KINDS_ACCEPTED}"),
    (7, "{}", f"unknown command '7'; accepted: {KINDS_ACCEPTED}"),  # the column holds text
], ids=lambda v: str(v)[:24])
def test_a_bad_row_in_the_queue_is_rejected_by_the_trainer(live: Live, kind: Any, args_text: str, reason: str) -> None:
    row = rejected_row(live, kind, args_text)
    assert row["reason"] == reason, row


def test_a_queued_rollback_to_an_unknown_checkpoint_is_rejected_by_the_trainer(live: Live) -> None:
    row = rejected_row(live, "rollback", '{"checkpoint": 99999}')
    assert re.fullmatch(f"checkpoint #99999 does not exist in run {re.escape(repr(str(live.run_dir)))}; "
                        + AVAILABLE, row["reason"]), row


def test_a_queued_rollback_with_unknown_hparams_is_rejected_by_the_trainer(live: Live) -> None:
    good = live.good_checkpoint()["id"]
    row = rejected_row(live, "rollback", f'{{"checkpoint": {good}, "hparams": "mine"}}')
    assert row["reason"] == "hparams must be one of checkpoint, current, got 'mine'", row


def test_dashboard_history_shows_bad_rows_with_their_rejection(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows anyone wrote are in the history too: the page must show them, not fail on them."""
    rows = [rejected_row(live, kind, args_text) for kind, args_text in (
        ("set_momentum", '{"value": [0.9]}'), ("set_lr", '{"value": ' + LONG_DIGITS + "}"), ("set_lr", "[0.1]"))]
    at = dashboard(monkeypatch, live.run_dir.parent, live.run_dir)
    history = at.dataframe[-1].value
    shown = {row["#"]: (row["from"], row["command"], row["fate"]) for _, row in history.iterrows()}
    for row in rows:
        source, command, fate = shown[row["id"]]
        assert (source, fate) == ("someone", f"rejected: {row['reason']}")
        assert command.startswith(row["kind"]), command


# -- last: a row whose arguments are not JSON at all -------------------------------------------
def test_a_row_whose_arguments_are_not_json_is_rejected_and_the_run_goes_on(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """Last in the module: when this fails, it fails by killing the shared trainer."""
    before = snapshot(live)
    command_id = write_row(live, "set_lr", "value=0.1")

    def answered() -> tuple[str, str | None] | None:
        # Read the row with plain SQL: the point is what the trainer did, not how babysit reads it.
        state, reason = live.store.conn().execute(
            "SELECT state, reason FROM commands WHERE id = ?", (command_id,)).fetchone()
        if state == cmd.PENDING:
            assert live.trainer.process.poll() is None, "the trainer died:\n" + live.trainer.output()[-1500:]
            return None
        return state, reason

    assert wait_for(answered, what="the trainer to answer the row") == (
        cmd.REJECTED, "set_lr arguments must be a mapping of names to values, got 'value=0.1'")
    assert_unchanged(live, before, rejected=(command_id,))
    # The row stays in the history: the CLI and the dashboard show it instead of failing on it.
    shown = babysit_cli("status", "--run-dir", str(live.run_dir))
    assert shown.returncode == 0 and "state        running" in shown.stdout, shown.stderr
    at = dashboard(monkeypatch, live.run_dir.parent, live.run_dir)
    history = at.dataframe[-1].value
    assert history[history["#"] == command_id]["fate"].tolist() == [
        "rejected: set_lr arguments must be a mapping of names to values, got 'value=0.1'"]
