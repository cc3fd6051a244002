"""The README's promises that can be run: its own-loop example trains, resumes and is nudged."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from babysit import commands as cmd
from babysit.checkpoint import KEY_USER_STATE, read_verified
from babysit.store import RunStore
from tests.conftest import REPO, wait_for

README = (REPO / "README.md").read_text()


def own_loop_example() -> str:
    section = README.split("## Babysit your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_own_loop_example_marks_every_line_babysit_needs() -> None:
    lines = own_loop_example().splitlines()
    uses = [line for line in lines if "run." in line or "babysit.Run" in line]
    marked = [line for line in lines if line.endswith("# babysit")]
    assert uses and all(line in marked for line in uses), uses
    assert len(marked) <= 9, marked


def test_the_own_loop_example_trains_resumes_and_obeys(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(own_loop_example().replace("run.epochs(50)", "run.epochs(int(sys.argv[1]))")
                      .replace("import torch\n", "import sys\nimport torch\n", 1))
    first = subprocess.run([sys.executable, str(script), "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    store = RunStore(tmp_path / "checkpoints" / "my-run")
    assert [c["epoch"] for c in store.checkpoints()] == [1, 2]
    assert store.status()["state"] == "finished"
    last = store.checkpoints()[-1]
    saved = read_verified(store.run_dir / last["file"], last["sha256"])[KEY_USER_STATE]["plain"]
    assert saved["best_val_loss"] == min(c["metrics"]["val_loss"] for c in store.checkpoints())

    # Resumed for more epochs, and nudged while it runs.
    process = subprocess.Popen([sys.executable, str(script), "400"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: store.status().get("alive") and store.status()["epoch"] >= 3, what="the resumed run")
        command_id = store.enqueue_command(cmd.SET_LR, {"value": 0.005}, source="test")
        row = wait_for(lambda: (lambda r: r if r["state"] != cmd.PENDING else None)(store.command(command_id)),
                       what="the nudge applied")
        assert row["state"] == cmd.APPLIED and row["result"]["after"] == 0.005
        assert [e["kind"] for e in store.events()].count("resume") == 1
        store.enqueue_command(cmd.STOP, source="test")
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert store.status()["state"] == "stopped"
