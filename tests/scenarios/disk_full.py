"""Fill the disk under a running trainer; print what happened as JSON.

Run inside a private mount namespace with RUN_DIR on a small tmpfs (tests/test_disk_full.py does
this with `unshare`), so the disk that fills is the run's own and nothing else on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from babysit.checkpoint import TEMP_MARK, CheckpointError, read_verified
from babysit.store import RunStore

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "babysit", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def main(mount: Path) -> dict:
    run_dir = mount / "run"
    log = open(mount.parent / "disk-full-trainer.log", "wb") if os.access(mount.parent, os.W_OK) else subprocess.DEVNULL
    trainer = subprocess.Popen([sys.executable, "-m", "babysit", "train", "--run-dir", str(run_dir), "--epochs", "400",
                                "--job", "digits", "--epoch-passes", "1", "--batch-size", "64"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), what="run store")
        first = wait_for(lambda: store.checkpoints(), what="first checkpoint")[0]
        # Leave less room than one checkpoint needs (the digits job's is 1.25 MB).
        ballast = mount / "ballast"
        stat = os.statvfs(mount)
        ballast.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 700_000))
        failed = wait_for(lambda: [e for e in store.events() if e["kind"] == "checkpoint_failed"], what="a failed checkpoint")[0]
        paused = wait_for(lambda: (lambda s: s if s.get("state") == "paused" else None)(store.status()), what="pause")
        listed_while_full = store.checkpoints()
        intact = []
        for c in listed_while_full:
            try:
                read_verified(run_dir / c["file"], c["sha256"])
                intact.append(c["id"])
            except CheckpointError:
                pass
        temps = [p.name for p in run_dir.glob(f".*{TEMP_MARK}*")]
        alive_while_full = store.status()["alive"]
        ballast.unlink()
        resumed = cli("resume", "--run-dir", str(run_dir), "--wait")
        after = wait_for(lambda: (lambda l: l if len(l) > len(listed_while_full) else None)(store.checkpoints()),
                         what="a checkpoint after resuming")
        stop = cli("stop", "--run-dir", str(run_dir), "--wait")
        code = trainer.wait(timeout=120)
        return {
            "first_checkpoint": first["id"], "failed_message": failed["message"], "paused_message": paused["message"],
            "pause_source": [c["source"] for c in store.commands() if c["kind"] == "pause"],
            "listed_while_full": [c["id"] for c in listed_while_full], "intact_while_full": intact,
            "temp_files_while_full": temps, "alive_while_full": alive_while_full,
            "resume_exit": resumed.returncode, "resume_output": resumed.stdout + resumed.stderr,
            "listed_after": [c["id"] for c in after], "stop_exit": stop.returncode, "trainer_exit": code,
        }
    finally:
        if trainer.poll() is None:
            trainer.kill()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
