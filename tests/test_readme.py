"""The README's promises that can be run: its own-loop example trains, resumes and is nudged; its
pictures are in the repo and the script that makes them goes through a real session."""

from __future__ import annotations

import json
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


def test_every_picture_the_readme_shows_is_in_the_repo_and_made_by_the_script() -> None:
    pictures = re.findall(r"\]\((docs/[^)]+\.png)\)", README)
    assert "docs/dashboard.png" in pictures and len(pictures) >= 9, pictures
    scripts = {name: (REPO / "docs" / name).read_text() for name in ("make_pictures.py", "make_instrument_pictures.py")}
    for picture in pictures:
        assert (REPO / picture).is_file(), picture
        makers = [name for name, text in scripts.items() if f'"{Path(picture).name}"' in text]
        assert makers, f"{picture} is made by neither of {', '.join(scripts)}"


def test_the_walk_through_script_goes_through_a_real_session(tmp_path: Path) -> None:
    """docs/make_pictures.py --fast: a real trainer (20-step epochs), a real dashboard, Chromium."""
    from PIL import Image

    result = subprocess.run([sys.executable, "docs/make_pictures.py", "--fast", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    names = ["walkthrough-1-plateau.png", "walkthrough-2-halved.png", "walkthrough-3-bad-x4.png", "dashboard.png"]
    assert summary["pictures"] == names and summary["page_errors"] == []
    assert re.search(r"set lr 0\.15: applied at step \d+", summary["halve"]), summary["halve"]
    assert re.search(r"set lr 0\.6: applied at step \d+", summary["bad"]), summary["bad"]
    assert re.search(r"rollback to #\d+ \(checkpoint hparams\): applied at step \d+ \(branch 2, ", summary["rollback"])
    for name in names:
        with Image.open(tmp_path / name) as image:
            assert list(image.size) == summary["viewport"] and image.mode == "P", (name, image.size, image.mode)
            assert len(image.getcolors(256) or []) > 8, f"{name} looks blank"
        assert 10_000 < (tmp_path / name).stat().st_size < 250_000, name
