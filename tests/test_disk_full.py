"""A full disk during a checkpoint: earlier checkpoints intact, an event, a pause; resume works
once there is room again. The disk is a 12 MB tmpfs in a private mount namespace (`unshare`)."""

from __future__ import annotations

import json
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
    assert outcome["paused_message"].endswith("the disk is full, no checkpoint could be written")
    assert outcome["intact_while_full"] == outcome["listed_while_full"] and outcome["listed_while_full"]
    assert outcome["temp_files_while_full"] == []
    assert outcome["alive_while_full"] is True
    assert outcome["resume_exit"] == 0, outcome["resume_output"]
    assert len(outcome["listed_after"]) > len(outcome["listed_while_full"])
    assert outcome["stop_exit"] == 0 and outcome["trainer_exit"] == 0
