"""Fill the disk under a running trainer to the last byte; print what happened as JSON.

Run inside a private mount namespace with the run directory on a small tmpfs (tests/test_disk_full.py
does this with `unshare`). Unlike disk_full.py, which leaves less room than a checkpoint needs, this
leaves none at all, so not even the database can take a write.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from babysit.store import RunStore
from tests.scenarios.disk_full import cli, wait_for

REPO = Path(__file__).resolve().parents[2]
NOTICE = "storing the run's values failed: the disk holding"


def fill(path: Path) -> None:
    """Append to ``path`` until not one more byte fits."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    size = 1 << 20
    try:
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)


def main(mount: Path) -> dict:
    run_dir = mount / "run"
    log_path = mount.parent / "disk-zero-trainer.log"
    args = [sys.executable, "-m", "babysit", "train", "--job", "digits", "--run-dir", str(run_dir), "--epochs", "400",
            "--epoch-passes", "1", "--batch-size", "64"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(args, cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)

    def notices() -> int:
        return log_path.read_text(errors="replace").count(NOTICE)

    def full_until(count: int) -> None:
        ballast = mount / "ballast"
        # The trainer frees what a failed write left (a temporary checkpoint): fill again until it noticed.
        wait_for(lambda: (fill(ballast), notices() >= count)[1], timeout=300, what=f"notice #{count} of the full disk")

    trainer = start()
    try:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), what="run store")
        wait_for(lambda: store.checkpoints(), what="first checkpoint")
        full_until(1)
        free_while_full = os.statvfs(mount).f_bavail
        pause_while_full = cli("pause", "--run-dir", str(run_dir))
        status_while_full = cli("status", "--run-dir", str(run_dir), "--json")
        (mount / "ballast").unlink()
        paused = wait_for(lambda: (lambda s: s if s.get("state") == "paused" else None)(store.status()),
                          what="the paused state, stored once there is room")
        # Still paused two heartbeats later: the step stands.
        wait_for(lambda: (store.status().get("heartbeat") or 0) > paused["heartbeat"] + 1.0, what="two heartbeats")
        still = store.status()
        held_pauses = [c for c in store.commands() if c["kind"] == "pause" and c["source"] == "guard"]
        resumed = cli("resume", "--run-dir", str(run_dir), "--wait")
        wait_for(lambda: (store.status().get("step") or 0) > still["step"], what="steps after resuming")
        full_until(2)
        trainer.send_signal(signal.SIGTERM)
        stopped_while_full = trainer.wait(timeout=120)
        (mount / "ballast").unlink()
        trainer = start()
        wait_for(lambda: (lambda s: s.get("alive") and s.get("pid") == trainer.pid)(store.status()),
                 what="the restarted trainer")
        stop = cli("stop", "--run-dir", str(run_dir), "--wait")
        last_exit = trainer.wait(timeout=120)
        return {
            "free_while_full": free_while_full,
            "pause_while_full": [pause_while_full.returncode, pause_while_full.stderr],
            "status_while_full": status_while_full.returncode,
            "paused_message": paused["message"], "paused_step": paused["step"], "step_later": still["step"],
            "held_pauses": [[c["state"], c["args"].get("reason"), c["step"]] for c in held_pauses],
            "resume_exit": resumed.returncode, "stopped_while_full_exit": stopped_while_full,
            "stop_exit": stop.returncode, "stop_output": stop.stdout + stop.stderr, "last_exit": last_exit,
            "trainer_log": log_path.read_text(errors="replace")[-6000:],
        }
    finally:
        if trainer.poll() is None:
            trainer.kill()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
