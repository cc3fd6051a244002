"""The dashboard with Streamlit's AppTest: each control queues the right command, errors show."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from babysit import commands as cmd
from babysit.checkpoint import write_atomic
from babysit.store import RunStore
from babysit.ui.clicks import new_clicks
from tests.conftest import REPO, cli_here, wait_for


def fake_trainer(run_dir: Path, *, state: str = "running", lr: float = 0.05, momentum: float | None = 0.9,
                 alive: bool = True) -> RunStore:
    """A run store whose status says a trainer (this test process) is alive, with two checkpoints."""
    store = RunStore(run_dir, create=True)
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.write_status(state=state, pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                       heartbeat=time.time() if alive else time.time() - 3600, epoch=3, max_epochs=10, step=120,
                       step_in_epoch=20, steps_per_epoch=45, branch=branch, lr=lr, momentum=momentum,
                       optimizer="SGD", message="")
    for epoch, step in ((1, 45), (2, 90)):
        name = f"epoch-{epoch:04d}-step-{step:08d}-b1.pt"
        sha, size = write_atomic(run_dir / name, {"format": "x", "model": {"w": torch.zeros(2)}})
        store.add_checkpoint(branch=branch, epoch=epoch, step=step, step_in_epoch=45, file=name, sha256=sha, size=size,
                             hparams={"lr": 0.1, "momentum": 0.9}, metrics={"val_loss": 1.0 / epoch}, reason="epoch")
    return store


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["app.py", "--root", str(tmp_path), "--run", str(tmp_path / "run")])
    monkeypatch.delenv("BABYSIT_TOKEN", raising=False)

    def start() -> AppTest:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
        at.run()
        assert not at.exception, at.exception
        return at

    return start


def queued(store: RunStore) -> list[tuple[str, dict, str]]:
    return [(c["kind"], c["args"], c["source"]) for c in store.commands()]


def test_page_shows_the_run(app, tmp_path: Path) -> None:
    fake_trainer(tmp_path / "run")
    at = app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"epoch": "3 / 10", "step": "120", "lr": "0.05", "momentum": "0.9"}
    assert any("running" in md.value for md in at.markdown)
    # Branch and throughput share the progress line (no step logged here: no rate yet).
    assert "epoch 3: 20 / 45 steps · branch 1 · – steps/s" in [p.text for p in at.get("progress")]


def test_lr_buttons_and_exact_value(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    at.button(key="lr_double").click().run()
    at.button(key="lr_half").click().run()  # halves the 0.1 just sent, not the 0.05 shown
    at.text_input(key="lr_exact").input("0.003").run()
    at.button(key="lr_set").click().run()
    assert queued(store) == [(cmd.SET_LR, {"value": 0.1}, "dashboard"), (cmd.SET_LR, {"value": 0.05}, "dashboard"),
                             (cmd.SET_LR, {"value": 0.003}, "dashboard")]
    assert [t.value for t in at.toast][-1].startswith("Sent #3: set lr 0.003")
    assert any("#3 set lr 0.003: pending" in i.value for i in at.info)


def test_lr_slider_is_log_scaled(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    slider = at.select_slider(key="lr_choice")
    assert slider.value == 0.05
    assert slider.options[:4] == ["1e-06", "2e-06", "3e-06", "5e-06"]
    slider.set_value(0.002).run()
    at.button(key="lr_set").click().run()
    assert queued(store) == [(cmd.SET_LR, {"value": 0.002}, "dashboard")]


def test_bad_lr_is_refused_with_its_value_and_nothing_is_queued(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    for bad in ("abc", "-1", "nan", "0_001"):
        at.text_input(key="lr_exact").input(bad).run()
        at.button(key="lr_set").click().run()
        assert any(f"got '{bad}'" in e.value and "lr must be a finite number > 0" in e.value for e in at.error), bad
    assert queued(store) == []


def test_momentum_moves_on_one_minus_beta(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    slider = at.select_slider(key="one_minus_beta")
    assert slider.value == 0.1
    assert "window ≈ 10 steps" in slider.format_func(slider.value)
    slider.set_value(0.02).run()
    at.button(key="momentum_set").click().run()
    at.text_input(key="momentum_exact").input("1.0").run()
    at.button(key="momentum_set").click().run()
    assert queued(store) == [(cmd.SET_MOMENTUM, {"value": 0.98}, "dashboard")]
    assert any("momentum must be a finite number >= 0 and < 1" in e.value and "'1.0'" in e.value for e in at.error)


def test_pause_checkpoint_stop(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    at.button(key="pause").click().run()
    at.button(key="checkpoint").click().run()
    at.button(key="stop").click().run()
    assert [k for k, _, _ in queued(store)] == [cmd.PAUSE, cmd.CHECKPOINT, cmd.STOP]


def test_resume_button_when_paused(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run", state="paused")
    at = app()
    assert [b.key for b in at.button if b.key in ("pause", "resume")] == ["resume"]
    at.button(key="resume").click().run()
    assert queued(store) == [(cmd.RESUME, {}, "dashboard")]


def test_rollback_with_the_chosen_hyperparameters(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    target = at.selectbox(key="rollback_target")
    assert target.options[0].startswith("#2 · epoch 2 · step 90")
    assert target.options[0] == "#2 · epoch 2 · step 90 · branch 1 · lr 0.1 val_loss 0.5"  # each with its lr
    target.select(1).run()
    hparams = at.radio(key="rollback_hparams")
    assert hparams.options == ["checkpoint's", "current"]
    assert list(hparams.proto.captions) == ["lr 0.1, β 0.9", "lr 0.05, β 0.9"]
    hparams.set_value(cmd.HPARAMS_CURRENT).run()
    store.write_status(lr=0.07)  # the numbers change (in captions: a changed label resets the choice)
    at.run()
    assert at.radio(key="rollback_hparams").value == cmd.HPARAMS_CURRENT
    assert list(at.radio(key="rollback_hparams").proto.captions) == ["lr 0.1, β 0.9", "lr 0.07, β 0.9"]
    at.button(key="rollback").click().run()
    assert queued(store) == [(cmd.ROLLBACK, {"checkpoint": 1, "hparams": "current"}, "dashboard")]


def test_the_rollback_choice_follows_the_newest_checkpoint_until_a_person_picks_one(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    assert at.selectbox(key="rollback_target").value == 2
    sha, size = write_atomic(tmp_path / "run" / "epoch-0003-step-00000135-b1.pt", {"format": "x", "model": {}})
    store.add_checkpoint(branch=1, epoch=3, step=135, step_in_epoch=45, file="epoch-0003-step-00000135-b1.pt",
                         sha256=sha, size=size, hparams={"lr": 0.1, "momentum": 0.9}, metrics={}, reason="epoch")
    at.run()
    assert at.selectbox(key="rollback_target").value == 3  # a new checkpoint: the choice moves with it
    at.selectbox(key="rollback_target").set_value(1).run()
    sha, size = write_atomic(tmp_path / "run" / "epoch-0004-step-00000180-b1.pt", {"format": "x", "model": {}})
    store.add_checkpoint(branch=1, epoch=4, step=180, step_in_epoch=45, file="epoch-0004-step-00000180-b1.pt",
                         sha256=sha, size=size, hparams={"lr": 0.1, "momentum": 0.9}, metrics={}, reason="epoch")
    at.run()
    assert at.selectbox(key="rollback_target").value == 1  # picked by a person: it stays


def test_commands_to_a_run_that_is_not_running_show_why(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run", alive=False)
    at = app()
    assert any("not responding" in md.value for md in at.markdown)
    at.button(key="pause").click().run()
    assert queued(store) == []
    assert any("is not running" in e.value for e in at.error)


def test_a_stopped_trainer_is_named_with_what_to_do(app, tmp_path: Path) -> None:
    """A trainer stopped by SIGSTOP (or Ctrl-Z) still holds the run's lock: starting the script
    again would be refused, so the page and a refused command say to SIGCONT or kill it."""
    stopped = subprocess.Popen(["sleep", "120"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{stopped.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                 what="the process stopped")
        store = fake_trainer(tmp_path / "run", alive=False)
        store.write_status(pid=stopped.pid)  # its heartbeat stopped with it
        advice = f"the trainer pid {stopped.pid} is stopped; SIGCONT it (`kill -CONT {stopped.pid}`"
        at = app()
        assert any(advice in w.value for w in at.warning), [w.value for w in at.warning]
        at.button(key="pause").click().run()
        assert queued(store) == []
        refused = [e.value for e in at.error if "Not sent" in e.value]
        assert len(refused) == 1 and advice in refused[0] and "again" not in refused[0], refused
        # `status` in a terminal says the same, not only "not responding".
        printed = cli_here("status", "--run-dir", str(tmp_path / "run")).stdout
        assert "not responding" in printed and advice in printed, printed
    finally:
        stopped.kill()
        stopped.wait(timeout=30)


def test_history_shows_each_command_fate(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    first = store.enqueue_command(cmd.SET_LR, {"value": 0.2}, source="cli")
    second = store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.5}, source="dashboard")
    store.finish_command(first, cmd.APPLIED, branch=1, step=130, result={"before": 0.05, "after": 0.2})
    store.finish_command(second, cmd.REJECTED, branch=1, step=131, reason="Adagrad has no momentum to set")
    at = app()
    history = at.dataframe[-1].value
    assert history["fate"].tolist() == ["rejected: Adagrad has no momentum to set", "applied at step 130 (after 0.2)"]


def test_a_divergence_offers_half_the_checkpoints_lr_and_follows_a_nudge(app, tmp_path: Path) -> None:
    """Checkpoint #2 was taken at lr 0.1; the run diverged at 0.4: the remedy is 0.05, not 0.2;
    a lower lr set while paused is halved instead, and the button says both numbers."""
    store = fake_trainer(tmp_path / "run", state="paused", lr=0.4)
    store.add_event("divergence", "divergence: loss became nan at step 118; run paused; remedy: roll back to "
                    "checkpoint #2 with lr 0.2", branch=1, step=118,
                    data={"what": "loss became nan at step 118", "checkpoint": 2, "suggested_lr": 0.2})
    at = app()
    assert [e.value for e in at.error if "Divergence" in e.value] == [
        "**Divergence:** loss became nan at step 118; the run is paused."]
    assert at.button(key="remedy").label == "Roll back to #2 with lr 0.05 (½ × 0.1, its lr)"
    nudge = store.enqueue_command(cmd.SET_LR, {"value": 0.04}, source="cli")
    store.finish_command(nudge, cmd.APPLIED, branch=1, step=118, result={"before": 0.4, "after": 0.04})
    at.run()
    assert at.button(key="remedy").label == "Roll back to #2 with lr 0.02 (½ × 0.04 set since; its lr 0.1)"
    at.button(key="remedy").click().run()
    assert queued(store)[1:] == [(cmd.ROLLBACK, {"checkpoint": 2, "hparams": "current", "lr": 0.02}, "dashboard")]


def test_several_runs_are_offered_to_pick(app, tmp_path: Path) -> None:
    fake_trainer(tmp_path / "run")
    fake_trainer(tmp_path / "other", lr=0.3)
    at = app()
    picker = at.selectbox(key="run_choice")
    assert sorted(picker.options) == sorted([str(tmp_path / "run"), str(tmp_path / "other")])
    picker.select(str(tmp_path / "other")).run()
    assert {m.label: m.value for m in at.metric}["lr"] == "0.3"


def test_a_token_hides_everything_until_given(app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = fake_trainer(tmp_path / "run")
    monkeypatch.setenv("BABYSIT_TOKEN", "s3cret")
    at = app()
    assert len(at.metric) == 0 and len(at.button) == 0
    at.text_input(key="_token_input").input("wrong").run()
    assert len(at.metric) == 0 and any("not the one" in e.value for e in at.error)
    at.text_input(key="_token_input").input("s3cret").run()
    assert {m.label for m in at.metric} >= {"lr", "momentum"}
    at.button(key="pause").click().run()
    assert queued(store) == [(cmd.PAUSE, {}, "dashboard")]


def test_every_click_counts_and_builds_on_the_one_before(app, tmp_path: Path) -> None:
    """× 2 twice is × 4 however fast: the second click doubles the first's command, pending or
    applied before the trainer wrote its status; once the status has the lr, that is the base."""
    store = fake_trainer(tmp_path / "run")  # lr 0.05
    at = app()
    at.button(key="lr_double").click().run()
    at.button(key="lr_double").click().run()
    assert queued(store) == [(cmd.SET_LR, {"value": 0.1}, "dashboard"), (cmd.SET_LR, {"value": 0.2}, "dashboard")]
    store.finish_command(1, cmd.APPLIED, branch=1, step=121, result={"before": 0.05, "after": 0.1})
    store.finish_command(2, cmd.APPLIED, branch=1, step=121, result={"before": 0.1, "after": 0.2})
    at.button(key="lr_double").click().run()  # applied, the status not written since: 0.2 × 2
    store.finish_command(3, cmd.APPLIED, branch=1, step=122, result={"before": 0.2, "after": 0.4})
    store.write_status(lr=0.3, heartbeat=time.time() + 1)  # a scheduler moved it after, as the status says
    at.button(key="lr_half").click().run()
    assert [c["args"]["value"] for c in store.commands()] == [0.1, 0.2, 0.4, 0.15]
    # Both clicks of the burst are acknowledged on the page, each with its command's fate.
    fates = [a.value for a in at.info]
    assert any("#3 set lr 0.4: applied at step 122" in f and "#4 set lr 0.15: pending" in f for f in fates), fates
    assert [t.value for t in at.toast] == ["Sent #4: set lr 0.15"]


def test_a_click_delivered_twice_is_carried_out_once_and_folded_clicks_each() -> None:
    """The browser numbers each click: a report delivered again sends nothing more; two clicks
    reported in one rerun are both sent, in order; a new page load counts on its own."""
    done: dict[str, int] = {}
    assert new_clicks({"page": "p1", "clicks": [["lr_double", 1]]}, done) == ["lr_double"]
    assert new_clicks({"page": "p1", "clicks": [["lr_double", 1]]}, done) == []  # the same click again
    assert new_clicks({"page": "p1", "clicks": [["lr_double", 1], ["lr_double", 2], ["pause", 3]]}, done) == [
        "lr_double", "pause"]
    assert new_clicks({"page": "p2", "clicks": [["stop", 1]]}, done) == ["stop"]
    assert done == {"p1": 3, "p2": 1}
    for bad in (None, "x", {"page": 1, "clicks": []}, {"page": "p3", "clicks": "x"},
                {"page": "p3", "clicks": [["k"], [1, 2], ["k", "2"], ["k", True]]}):
        assert new_clicks(bad, done) == []
    assert done == {"p1": 3, "p2": 1}


def test_the_lr_slider_follows_the_trainer_until_moved(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    at = app()
    assert at.select_slider(key="lr_choice").value == 0.05
    store.write_status(lr=0.2)  # nudged from the CLI
    at.run()
    assert at.select_slider(key="lr_choice").value == 0.2
    at.select_slider(key="lr_choice").set_value(0.001).run()
    store.write_status(lr=0.3)
    at.run()
    assert at.select_slider(key="lr_choice").value == 0.001  # the person's choice waits for them
    assert "now 0.3" in at.select_slider(key="lr_choice").label


def test_the_lr_slider_says_the_real_lr(app, tmp_path: Path) -> None:
    fake_trainer(tmp_path / "run", lr=0.025)  # not one of the slider's round numbers
    at = app()
    slider = at.select_slider(key="lr_choice")
    assert slider.value == 0.025 and slider.format_func(slider.value) == "0.025"


def test_lr_controls_reach_any_legitimate_lr(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run", lr=20.0)
    at = app()
    assert at.select_slider(key="lr_choice").value == 20.0
    at.button(key="lr_double").click().run()
    at.text_input(key="lr_exact").input("50").run()
    at.button(key="lr_set").click().run()
    at.text_input(key="lr_exact").input("").run()
    at.select_slider(key="lr_choice").set_value(500.0).run()
    at.button(key="lr_set").click().run()
    assert not at.error, [e.value for e in at.error]
    assert queued(store) == [(cmd.SET_LR, {"value": 40.0}, "dashboard"), (cmd.SET_LR, {"value": 50.0}, "dashboard"),
                             (cmd.SET_LR, {"value": 500.0}, "dashboard")]


def test_the_page_opens_the_run_being_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the newest run: the one whose trainer's heartbeat is the freshest."""
    monkeypatch.setattr(sys, "argv", ["app.py", "--root", str(tmp_path)])
    monkeypatch.delenv("BABYSIT_TOKEN", raising=False)
    fake_trainer(tmp_path / "a-training", lr=0.3)
    fake_trainer(tmp_path / "b-stale", lr=0.2, alive=False)  # created later, its trainer long gone
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="run_choice").value == str(tmp_path / "a-training")
    assert {m.label: m.value for m in at.metric}["lr"] == "0.3"


def test_exp_of_a_loss_is_offered_for_loss_like_metrics_only(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    for name in ("loss", "val_loss", "val_acc"):
        store.series_id(name, 1, "epoch")
    at = app()
    choice = at.multiselect(key="exp_of")
    assert choice.options == ["loss", "val_loss"]
    choice.select("val_loss").run()
    assert not at.exception and at.multiselect(key="exp_of").value == ["val_loss"]


def test_a_run_with_several_optimizers_nudges_the_one_picked_the_first_by_default(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run", lr=2e-4, momentum=0.5)
    store.write_status(optimizers='{"D": {"type": "Adam", "lr": 0.0002, "momentum": 0.5}, '
                                  '"G": {"type": "SGD", "lr": 0.001, "momentum": 0.9}}')
    at = app()
    (picker,) = [r for r in at.radio if r.label == "Optimizer"]
    assert picker.options == ["D (Adam, lr 0.0002)", "G (SGD, lr 0.001)"] and picker.value == "D"
    at.button(key="lr_double").click().run()
    picker = next(r for r in at.radio if r.label == "Optimizer")
    picker.set_value("G").run()
    assert any("Learning rate of G — now 0.001" in s.label for s in at.select_slider)
    at.button(key="lr_half").click().run()
    at.button(key="lr_half").click().run()  # builds on G's pending command, not D's
    at.button(key="momentum_set").click().run()
    assert queued(store) == [(cmd.SET_LR, {"value": 4e-4, "optimizer": "D"}, "dashboard"),
                             (cmd.SET_LR, {"value": 5e-4, "optimizer": "G"}, "dashboard"),
                             (cmd.SET_LR, {"value": 2.5e-4, "optimizer": "G"}, "dashboard"),
                             (cmd.SET_MOMENTUM, {"value": 0.9, "optimizer": "G"}, "dashboard")]
    assert not at.exception


def test_a_stopped_run_says_how_to_resume_it_train_for_a_job_s_its_own_script_for_the_rest(app, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run", state="stopped")
    at = app()
    (said,) = [i.value for i in at.info if "No trainer is running" in i.value]
    assert "running its training script again" in said and "babysit train" not in said
    store.set_meta("config", {"job": "digits"})
    at = app()
    (said,) = [i.value for i in at.info if "No trainer is running" in i.value]
    assert f"python -m babysit train --run-dir {tmp_path / 'run'}" in said
