"""The README's promises that can be run: its own-loop examples train, resume and are nudged; its
framework lines are those of the scripts docs/frameworks.md holds (which the framework tests run);
the pictures it and docs/ show are in the repo and the script that makes them goes through a real
session; every relative link of the README and docs/ leads somewhere; its test command is CI's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from markdown_it import MarkdownIt

from babysit import commands as cmd
from babysit.checkpoint import KEY_MODEL, KEY_OPTIMIZER, KEY_OTHER_OPTIMIZERS, KEY_USER_STATE, read_verified
from babysit.store import RunStore
from tests.conftest import REPO, babysit_cli, wait_for

README = (REPO / "README.md").read_text()
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of its level or
    above; a line of a code block that starts with '#' is code, not a heading."""
    lines = text.split("\n")
    level, fenced, body = len(heading.split(" ", 1)[0]), False, []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "\n".join(body)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def own_loop_examples() -> tuple[str, str]:
    """The five-line loop, then the same loop keeping its own state."""
    loop = section(README, "## Babysit your own loop")
    (minimal,) = python_blocks(loop.split("\n### ", 1)[0])
    (stateful,) = python_blocks(section(loop, "### The loop's own state"))
    return minimal, stateful


def run_script(script: Path, epochs: int) -> None:
    done = subprocess.run([sys.executable, str(script), str(epochs)], cwd=script.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def with_epochs_from_argv(example: str, epochs: str) -> str:
    assert f"run.epochs({epochs})" in example
    return (example.replace(f"run.epochs({epochs})", "run.epochs(int(sys.argv[1]))")
            .replace("import torch\n", "import sys\nimport torch\n", 1))


def test_the_minimal_loop_marks_its_five_babysit_lines() -> None:
    minimal, _ = own_loop_examples()
    marked = [line.split("#")[0].strip() for line in minimal.splitlines() if line.endswith("# babysit")]
    assert marked == ["import babysit", 'with babysit.Run("checkpoints/my-run", model, optimizer) as run:',
                      "for epoch in run.epochs(50):", "for xb, yb in run.batches(train):", "run.log(loss=loss)"]
    assert [line for line in minimal.splitlines() if "babysit" in line or "run." in line] == [
        line for line in minimal.splitlines() if line.endswith("# babysit")]


def test_the_minimal_loop_trains_checkpoints_every_epoch_and_resumes(tmp_path: Path) -> None:
    minimal, _ = own_loop_examples()
    script = tmp_path / "train.py"
    script.write_text(with_epochs_from_argv(minimal, "50"))
    run_script(script, 2)
    store = RunStore(tmp_path / "checkpoints" / "my-run")
    assert [c["epoch"] for c in store.checkpoints()] == [1, 2] and store.status()["state"] == "finished"
    run_script(script, 3)  # the same script for more epochs: it resumes after epoch 2
    assert [c["epoch"] for c in store.checkpoints()] == [1, 2, 3] and store.status()["state"] == "finished"
    assert [e["kind"] for e in store.events() if e["kind"] in ("start", "resume")] == ["start", "resume"]
    losses = next(s for s in store.series() if s.name == "loss")
    steps, _, _ = store.chunk_points(losses.id)
    assert steps.tolist() == list(range(1, 3 * 2048 // 64 + 1))  # every step once: none trained twice


def test_the_stateful_loop_marks_every_line_babysit_needs() -> None:
    _, stateful = own_loop_examples()
    lines = stateful.splitlines()
    uses = [line for line in lines if "run." in line or "babysit" in line]
    marked = [line for line in lines if line.endswith("# babysit")]
    assert uses and all(line in marked for line in uses), uses
    assert len(marked) <= 10, marked  # the import, and at most nine lines in the loop
    assert "run.state" in stateful and "run.interrupted" in stateful and "run.log_epoch" in stateful


def test_the_stateful_loop_trains_resumes_and_obeys(tmp_path: Path) -> None:
    _, stateful = own_loop_examples()
    script = tmp_path / "train.py"
    script.write_text(with_epochs_from_argv(stateful, "50"))
    run_script(script, 2)
    store = RunStore(tmp_path / "checkpoints" / "my-loop")
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


def test_the_readme_s_framework_lines_are_those_of_the_scripts_the_framework_tests_run() -> None:
    """The README shows each framework's babysit lines; docs/frameworks.md holds the whole script
    (run by test_lightning, test_hf and test_torchrun): the lines shown are that script's, in order."""
    frameworks = (REPO / "docs" / "frameworks.md").read_text()
    trainers = section(README, "## Babysit the trainer you already use")
    for title in ("PyTorch Lightning", "Hugging Face Trainer", "torchrun and DDP"):
        (shown,) = python_blocks(section(trainers, f"### {title}"))
        script = python_blocks(section(frameworks, f"## {title}"))[0].splitlines()
        shown_lines = [line for line in shown.splitlines() if line.strip() not in ("", "...")]
        assert any("# babysit" in line for line in shown_lines), title
        position = 0
        for line in shown_lines:
            assert line in script[position:], f"{title}: {line!r} is not in docs/frameworks.md's script after line {position}"
            position = script.index(line, position) + 1


def links(page: Path) -> list[str]:
    """Every link and image target of a Markdown page, as CommonMark reads it (code is not a link)."""
    targets = []
    for token in MarkdownIt("commonmark").parse(page.read_text()):
        for child in token.children or []:
            if child.type in ("link_open", "image"):
                targets.append(str(child.attrs["href" if child.type == "link_open" else "src"]))
    return targets


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as '-'."""
    tokens = MarkdownIt("commonmark").parse(page.read_text())
    titles = [tokens[i + 1].content for i, token in enumerate(tokens) if token.type == "heading_open"]
    return {re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-") for title in titles}


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file_or_its_heading() -> None:
    checked = 0
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... : not the repository's
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)} links to {target}"
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"{where}, which is not in the repository"
            if anchor:
                assert resolved.suffix == ".md" and anchor in heading_anchors(resolved), f"{where}: no such heading"
            checked += 1
    assert checked >= 40, checked  # the README's index and pictures, and the pages' links back


def test_the_readme_gives_the_test_command_ci_runs() -> None:
    (command,) = re.findall(r"```bash\n(.*?)\n```", section(README, "## Tests"), re.S)
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci[-1] == command == "python -m pytest -n 2"


def test_every_picture_the_readme_and_the_instruments_page_show_is_in_the_repo_and_made_by_a_script() -> None:
    """The pictures of the first session (README) and of the instruments (docs/instruments.md) are
    made from real runs by the two picture scripts."""
    pictures = {str((page.parent / target).resolve().relative_to(REPO))
                for page in (REPO / "README.md", REPO / "docs" / "instruments.md")
                for target in links(page) if target.endswith(".png")}
    assert "docs/dashboard.png" in pictures and len(pictures) >= 9, pictures
    scripts = {name: (REPO / "docs" / name).read_text() for name in ("make_pictures.py", "make_instrument_pictures.py")}
    for picture in sorted(pictures):
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
    names = ["walkthrough-1-plateau.png", "walkthrough-2-halved.png", "walkthrough-3-bad-x4.png", "dashboard.png",
             "walkthrough-5-blow-up.png", "walkthrough-6-remedy.png"]
    assert summary["pictures"] == names and summary["page_errors"] == []
    assert list(summary["viewport"]) == [1366, 768]
    # Every nudge is a click on the page: × ½, then × 2 twice (lr × 4, both clicks counted).
    assert re.search(r"set lr 0\.15: applied at step \d+", summary["halve"]), summary["halve"]
    assert re.search(r"set lr 0\.3: applied at step \d+.*\n.*set lr 0\.6: applied at step \d+", summary["bad"]), \
        summary["bad"]
    assert summary["lr_after_bad"] == 0.6
    assert re.search(r"rollback to #\d+ \(checkpoint hparams\): applied at step \d+ \(branch 2, ", summary["rollback"])
    # After the blow-up at lr 500, the remedy offers half of the healthy checkpoint's 0.15, and does it.
    assert re.search(r"set lr 500: applied at step \d+", summary["blow_up"]), summary["blow_up"]
    assert re.fullmatch(r"Roll back to #\d+ with lr 0\.075 \(½ × 0\.15, its lr\)", summary["remedy_offer"]), \
        summary["remedy_offer"]
    assert re.search(r"rollback to #\d+ \(current hparams, lr 0\.075\): applied at step \d+ \(branch 3, ",
                     summary["remedy"]), summary["remedy"]
    for name in names:
        with Image.open(tmp_path / name) as image:
            assert list(image.size) == summary["viewport"] and image.mode == "P", (name, image.size, image.mode)
            assert len(image.getcolors(256) or []) > 8, f"{name} looks blank"
        assert 10_000 < (tmp_path / name).stat().st_size < 250_000, name


def test_the_readme_s_gan_is_nudged_rolled_back_killed_and_restarted_to_the_weights_of_a_straight_run(
        tmp_path: Path) -> None:
    """The README's two-optimizer loop, driven by the CLI only: G's lr nudged by name, a rollback to
    epoch 1, a kill -9, a restart; it ends with both nets and both optimizers bit for bit those of a
    run that never left its course (the rollback restored G's lr with the rest)."""
    (gan,) = python_blocks(section(README, "### Several optimizers (a GAN)"))
    script = tmp_path / "driven" / "train.py"
    script.parent.mkdir()
    script.write_text(with_epochs_from_argv(gan, "25"))
    run_dir = script.parent / "checkpoints" / "my-gan"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this tree's babysit, wherever the script runs
    process = subprocess.Popen([sys.executable, str(script), "100000"], cwd=script.parent, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        store = wait_for(lambda: RunStore(run_dir) if (run_dir / "run.db").exists() else None, what="the run's store")
        wait_for(lambda: store.status().get("alive") and len(store.checkpoints()) >= 1, timeout=120,
                 what="epoch 1's checkpoint")
        where = ("--run-dir", str(run_dir))
        nudged = babysit_cli("set", "lr", "1e-4", "--optimizer", "G", "--wait", *where, check=True)
        assert "set lr of optimizer G 0.0001: applied at step" in nudged.stdout and "optimizer G)" in nudged.stdout
        assert "G: Adam, lr 0.0001, momentum 0.5" in babysit_cli("status", *where, check=True).stdout
        babysit_cli("rollback", "1", "--wait", *where, check=True)
        assert "G: Adam, lr 0.0002, momentum 0.5" in babysit_cli("status", *where, check=True).stdout
        wait_for(lambda: any(c["branch"] == 2 and c["reason"] == "epoch" for c in store.checkpoints()), timeout=120,
                 what="an epoch checkpoint on the rollback's branch")
        babysit_cli("pause", "--wait", *where, check=True)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    last = max((c for c in store.checkpoints() if c["branch"] == 2), key=lambda c: c["step"])
    epochs = last["epoch"] + 1
    restarted = subprocess.run([sys.executable, str(script), str(epochs)], cwd=script.parent, env=env,
                               capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert store.status()["state"] == "finished" and store.status()["branch"] == 2

    straight = tmp_path / "straight" / "train.py"
    straight.parent.mkdir()
    straight.write_text(script.read_text())
    done = subprocess.run([sys.executable, str(straight), str(epochs)], cwd=straight.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = RunStore(straight.parent / "checkpoints" / "my-gan")

    def final(of: RunStore) -> dict:
        record = of.checkpoints()[-1]
        assert record["epoch"] == epochs
        return read_verified(of.run_dir / record["file"], record["sha256"])

    ours, theirs = final(store), final(reference)
    assert any(name.startswith("G.1.running_mean") for name in ours[KEY_MODEL])  # G's BatchNorm statistics too
    for key in (KEY_MODEL, KEY_OPTIMIZER, KEY_OTHER_OPTIMIZERS):
        assert _same(ours[key], theirs[key]), key


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
