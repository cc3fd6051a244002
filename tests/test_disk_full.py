"""A full disk during a checkpoint: earlier checkpoints intact, an event, a pause; resume works
once there is room again. The disk is a 12 MB tmpfs in a private mount namespace (`unshare`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_a_full_disk_pauses_the_run_and_keeps_every_checkpoint(tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    mount.mkdir()
    assert shutil.which("unshare"), "util-linux's unshare is needed to give the test a disk of its own"
    script = (f"mount -t tmpfs -o size=12m tmpfs {mount} && "
              f"exec {sys.executable} {REPO / 'tests' / 'scenarios' / 'disk_full.py'} {mount}")
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert "is full (No space left on device); earlier checkpoints are intact" in outcome["failed_message"]
    assert outcome["pause_source"][0] == "guard"
    # Whichever notices first pauses the run: the checkpoint that could not be written, or the
    # store that could not take the run's values.
    assert outcome["paused_message"].endswith(("the disk is full, no checkpoint could be written",
                                               "the disk is full, nothing can be recorded: free some space, then resume"))
    assert outcome["intact_while_full"] == outcome["listed_while_full"] and outcome["listed_while_full"]
    assert outcome["temp_files_while_full"] == []
    assert outcome["alive_while_full"] is True
    assert outcome["resume_exit"] == 0, outcome["resume_output"]
    assert len(outcome["listed_after"]) > len(outcome["listed_while_full"])
    assert outcome["stop_exit"] == 0 and outcome["trainer_exit"] == 0


def test_item6_a_disk_with_not_one_byte_left_pauses_the_run_and_it_stays_stoppable(tmp_path: Path) -> None:
    """Issue 11, item 6 (listed in tests/test_attacks.py): the database itself cannot take a write."""
    mount = tmp_path / "disk"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=12m tmpfs {mount} && "
              f"exec {sys.executable} {REPO / 'tests' / 'scenarios' / 'disk_zero.py'} {mount}")
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    log = outcome["trainer_log"]
    assert outcome["free_while_full"] == 0
    # A command cannot be queued on a full disk: said so, not "a damaged database".
    code, stderr = outcome["pause_while_full"]
    assert code == 2 and "is full; free some space" in stderr and "Traceback" not in stderr, stderr
    assert outcome["status_while_full"] == 0
    # The trainer paused by itself, and recorded it once there was room.
    assert outcome["paused_message"].endswith("the disk is full, nothing can be recorded: free some space, then resume")
    assert outcome["step_later"] == outcome["paused_step"]
    assert ["applied", "the disk is full, nothing can be recorded: free some space, then resume",
            outcome["paused_step"]] in outcome["held_pauses"]
    assert outcome["resume_exit"] == 0
    # Stopped (SIGTERM) while nothing could be written: a clean exit, no traceback.
    assert outcome["stopped_while_full_exit"] == 0, log
    assert "Traceback" not in log and "OperationalError" not in log, log
    assert outcome["stop_exit"] == 0 and outcome["last_exit"] == 0, outcome["stop_output"]
