"""The trainer's console (babysit.narrator): a line per epoch with the epoch's true mean loss, each
command's fate and each event, told from the store; `train` prints them and writes trainer.log; the
demo's exit message reads the trainer's real state."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from babysit import commands as cmd
from babysit.cli.serve import trainer_now
from babysit.store import LOG_NAME, PER_STEP, RunStore
from tests.conftest import babysit_cli, tiny_job

FAST = ("--job", "digits", "--epoch-passes", "1", "--batch-size", "64")  # 23 steps per epoch


def test_each_epoch_gets_a_line_with_its_mean_loss_values_lr_and_rate(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="babysit.narrator")
    tiny_job(tmp_path / "r", epochs=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "babysit.narrator"]
    epochs = [line for line in lines if re.match(r"babysit: epoch \d/3 · ", line)]
    assert [line.split(" · ")[0] for line in epochs] == ["babysit: epoch 1/3", "babysit: epoch 2/3",
                                                        "babysit: epoch 3/3"]
    store = RunStore(tmp_path / "r")
    loss = next(s for s in store.series() if s.name == "loss" and s.per == PER_STEP)
    steps, values, _ = store.chunk_points(loss.id)
    for number, line in enumerate(epochs, start=1):
        own = values[(steps > (number - 1) * 8) & (steps <= number * 8)]
        assert f"step {number * 8} · loss {own.mean():.4g} (epoch mean)" in line, line
        checkpoint = store.checkpoints()[number - 1]
        assert f"val_loss {checkpoint['metrics']['val_loss']:.4g}" in line
        assert f"lr {checkpoint['hparams']['lr']:.4g} · momentum 0.9 · " in line and line.endswith(" steps/s")
    assert any("start: run started" in line for line in lines)
    assert lines[-1] == "babysit: step 24 · finished: finished 3 epochs"


def test_each_command_is_told_with_its_fate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="babysit.narrator")

    def on_step(run: object, step: int) -> None:
        if step == 3:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.05}, source="test")  # type: ignore[attr-defined]
        if step == 5:
            run.store.enqueue_command(cmd.RESUME, source="test")  # type: ignore[attr-defined]

    tiny_job(tmp_path / "r", epochs=2, on_step=on_step)
    lines = [r.getMessage() for r in caplog.records if r.name == "babysit.narrator"]
    told = [line for line in lines if line.startswith("babysit: #")]
    assert told[0] == "babysit: #1 set lr 0.05 from test: applied at step 3 (after 0.05)", lines
    assert told[1:] == ["babysit: #2 resume from test: rejected: the run is not paused (it is running); nothing to "
                        "resume"], told


def test_nobody_listening_the_narrator_reads_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="babysit.narrator")
    tiny_job(tmp_path / "r", epochs=1)
    assert [r for r in caplog.records if r.name == "babysit.narrator"] == []


def test_train_prints_its_epochs_and_its_stop_and_writes_them_to_trainer_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = babysit_cli("train", "--run-dir", str(run_dir), "--epochs", "2", *FAST, check=True)
    out = result.stdout
    assert re.search(r"^babysit: epoch 1/2 · step 23 · loss [0-9.]+ \(epoch mean\) · val_loss [0-9.]+ · "
                     r"val_acc [0-9.]+ · lr 0\.05 · momentum 0\.9 · [0-9.]+ steps/s$", out, re.M), out
    assert re.search(r"^babysit: epoch 2/2 · step 46 · ", out, re.M), out
    assert out.endswith("babysit: step 46 · finished: finished 2 epochs\n"), out
    log = (run_dir / LOG_NAME).read_text()
    assert [line for line in out.splitlines() if " · " in line] == [line for line in log.splitlines() if " · " in line]


def test_the_demo_says_what_the_trainer_really_does_when_the_page_stops(tmp_path: Path) -> None:
    tiny_job(tmp_path / "r", epochs=1)
    assert trainer_now(str(tmp_path / "r"), 12345) == "the trainer in {} is finished: finished 1 epochs".format(
        tmp_path / "r")
    stopped = tmp_path / "s"
    tiny_job(stopped, epochs=3, on_step=lambda run, step: run.request_stop("test") if step == 5 else None)
    said = trainer_now(str(stopped), 12345)
    assert said.startswith(f"the trainer in {stopped} is stopped: stopped at step 5 (test)") and "resumes it" in said
