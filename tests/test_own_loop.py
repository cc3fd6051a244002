"""A loop as real scripts write it (tests/stateful_lm.py: hidden state across batches, a
best-validation-loss anneal, hand-written updates): interruptions checkpoint where they happen, the
loop's own state travels with the checkpoint, Ctrl-C stops cleanly, any legitimate lr is taken,
one checkpoint per "checkpoint now", and who changed the lr is recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import babysit
from babysit import commands as cmd
from babysit import checkpoint as checkpoint_module
from babysit.checkpoint import KEY_MODEL, KEY_OPTIMIZER, KEY_USER_STATE, read_verified
from babysit.store import RunStore
from tests import stateful_lm
from tests.conftest import REPO, tiny_data, tiny_job, wait_for


def series(store: RunStore, name: str, branch: int = 1, segment: int = 0) -> list[tuple[int, float]]:
    info = next(s for s in store.series() if s.name == name and s.branch == branch and s.segment == segment)
    steps, values, _ = store.chunk_points(info.id)
    return list(zip(steps.tolist(), values.tolist()))


def final_state(run_dir: Path) -> dict[str, Any]:
    last = RunStore(run_dir).checkpoints()[-1]
    return read_verified(run_dir / last["file"], last["sha256"])


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start_script(run_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "stateful_lm.py"), "--run-dir", str(run_dir), *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})


def annealing_loop(run_dir: Path, *, epochs: int, on_step: Any = None, **kwargs: Any) -> tuple[babysit.Run, list[bool]]:
    """The tiny job, dividing its lr by 4 after every epoch as many scripts do by hand, without
    looking at run.interrupted (that is the point: babysit must keep the anneal out of the cut)."""
    seen_interrupted: list[bool] = []

    def anneal(run: babysit.Run, _epoch: int) -> None:
        seen_interrupted.append(run.interrupted)
        for group in run.optimizer.param_groups:
            group["lr"] /= 4

    run, _ = tiny_job(run_dir, epochs=epochs, on_step=(lambda r, _s: on_step(r)) if on_step else None,
                      on_epoch_end=anneal, **kwargs)
    return run, seen_interrupted


# -- 1. an interruption is checkpointed where it happens ----------------------------------------
def test_a_stop_is_checkpointed_at_its_step_boundary_before_the_loop_anneals(tmp_path: Path) -> None:
    def on_step(run: babysit.Run) -> None:
        if run.step == 12:  # epoch 2, after one anneal: lr 0.025
            run.store.enqueue_command(cmd.STOP, source="test")

    run, interrupted = annealing_loop(tmp_path / "r", epochs=5, on_step=on_step)
    assert interrupted == [False, True]
    assert run.status == "stopped" and run.step == 12
    store = RunStore(tmp_path / "r")
    last = store.checkpoints()[-1]
    assert (last["reason"], last["step"], last["hparams"]["lr"]) == ("stop", 12, 0.025)
    state = read_verified(tmp_path / "r" / last["file"], last["sha256"])
    assert state[KEY_OPTIMIZER]["param_groups"][0]["lr"] == 0.025  # not 0.00625: the anneal ran after the cut
    stop = next(c for c in store.commands() if c["kind"] == cmd.STOP)
    assert stop["state"] == cmd.APPLIED and stop["step"] == 12 and stop["result"]["checkpoint"] == last["id"]


def test_a_rollback_keeping_current_hparams_keeps_those_of_the_cut(tmp_path: Path) -> None:
    def on_step(run: babysit.Run) -> None:
        if run.branch == 1 and run.step == 12:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1, "hparams": cmd.HPARAMS_CURRENT}, source="test")

    run, interrupted = annealing_loop(tmp_path / "r", epochs=3, on_step=on_step)
    store = RunStore(tmp_path / "r")
    rollback = next(c for c in store.commands() if c["kind"] == cmd.ROLLBACK)
    assert rollback["state"] == cmd.APPLIED and rollback["step"] == 12
    assert rollback["result"]["lr"] == 0.025 and rollback["result"]["before"]["lr"] == 0.025
    assert series(store, "lr", branch=2)[0] == (8, 0.025)
    assert interrupted[1] is True and run.branch == 2


# -- 2. the loop's own state travels with the checkpoint ----------------------------------------
def test_kill_9_mid_epoch_then_resume_is_bit_identical_for_a_stateful_loop(tmp_path: Path) -> None:
    straight = stateful_lm.train(tmp_path / "straight", 3)
    run_dir = tmp_path / "killed"
    # The run pauses itself after step 80 (inside epoch 2 of 64 steps each), whatever this
    # machine's speed: no epoch end comes between the checkpoint and the kill.
    process = start_script(run_dir, "--epochs", "3", "--pause-at-step", "80")
    try:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), timeout=180, what="the store")
        wait_for(lambda: store.status()["state"] == "paused", timeout=180, what="the pause")
        checkpoint_id = store.enqueue_command(cmd.CHECKPOINT, source="test")
        wait_for(lambda: store.command(checkpoint_id)["state"] == cmd.APPLIED, timeout=120,
                 what="the mid-epoch checkpoint")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    cut = store.checkpoints()[-1]
    assert cut["reason"] == "command" and 0 < cut["step_in_epoch"] < 64
    saved_hidden = read_verified(run_dir / cut["file"], cut["sha256"])[KEY_USER_STATE]["plain"]["hidden"]
    assert saved_hidden is not None and saved_hidden[0].abs().sum() > 0  # the LSTM state at the cut, not zeros

    again = start_script(run_dir, "--epochs", "3")  # a restarted trainer runs (a pause is not carried over)
    assert again.wait(timeout=300) == 0, (run_dir.parent / "killed.log").read_text()
    assert "resumed from checkpoint" in store.status()["message"] or any(e["kind"] == "resume" for e in store.events())
    assert series(store, "loss") == series(RunStore(tmp_path / "straight"), "loss")
    assert same_tensors(final_state(run_dir)[KEY_MODEL], straight.model.state_dict())
    assert final_state(run_dir)[KEY_USER_STATE]["plain"]["best_val_loss"] == straight.state["best_val_loss"]


def test_rollback_then_replay_is_bit_identical_for_a_stateful_loop(tmp_path: Path) -> None:
    stateful_lm.train(tmp_path / "straight", 3)
    asked: dict[str, int] = {}

    def on_step(run: babysit.Run) -> None:
        if run.branch == 1 and run.step == 70:  # a mid-epoch checkpoint: the hidden state matters
            asked["checkpoint"] = run.store.enqueue_command(cmd.CHECKPOINT, source="test")
        if run.branch == 1 and run.step == 150:  # epoch 3: best_val_loss has moved on since step 70
            run.checkpointer.wait()
            target = next(c for c in run.store.checkpoints() if c["reason"] == "command")
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": target["id"]}, source="test")

    run = stateful_lm.train(tmp_path / "rolled", 3, on_step=on_step)
    store = RunStore(tmp_path / "rolled")
    assert run.branch == 2 and store.branch(2)["start_step"] == 70
    replayed = series(store, "loss", branch=2)
    straight = dict(series(RunStore(tmp_path / "straight"), "loss"))
    assert replayed[0][0] == 71 and replayed[-1][0] == 192
    assert replayed == [(step, straight[step]) for step, _ in replayed]  # the same losses, step for step
    assert same_tensors(final_state(tmp_path / "rolled")[KEY_MODEL], final_state(tmp_path / "straight")[KEY_MODEL])


def test_a_stateful_object_in_run_state_is_saved_and_loaded_into_the_live_object(tmp_path: Path) -> None:
    class Counter:
        def __init__(self) -> None:
            self.seen = 0

        def state_dict(self) -> dict[str, int]:
            return {"seen": self.seen}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.seen = state["seen"]

    def job(epochs: int) -> tuple[babysit.Run, Counter]:
        counter = Counter()
        model = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with babysit.Run(tmp_path / "r", model, optimizer, state={"counter": counter, "note": "start"}) as run:
            for _ in run.epochs(epochs):
                for _x in run.batches(range(4)):
                    counter.seen += 1
                run.state["note"] = f"after {counter.seen}"
        return run, counter

    job(2)
    run, counter = job(3)
    assert counter.seen == 12 and run.state["note"] == "after 12"
    assert final_state(tmp_path / "r")[KEY_USER_STATE]["stateful"] == {"counter": {"seen": 12}}


def test_run_state_refuses_at_once_what_a_checkpoint_cannot_hold_naming_the_key(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"^run.state\['bad'\] holds a numpy.ndarray, which a checkpoint cannot hold "
                                        r"safely; accepted: numbers, strings"):
        babysit.Run(tmp_path / "r", model, torch.optim.SGD(model.parameters(), lr=0.1), state={"bad": np.zeros(3)})
    assert not (tmp_path / "r").exists()


def test_numpy_numbers_are_kept_as_numbers_and_a_bad_value_set_later_is_left_out_not_fatal(tmp_path: Path) -> None:
    def on_step(run: babysit.Run) -> None:
        if run.step == 2:
            run.state["best"] = np.mean([1.0, 2.0])             # np.float64: a float subclass
            run.state["where"] = np.argmin([3, 1, 2])           # np.int64
            run.state["history"] = np.array([0.5, 0.25])       # an array: no checkpoint can hold it safely

    run = stateful_lm.train(tmp_path / "r", 1, on_step=on_step)
    assert run.status == "finished"
    saved = final_state(tmp_path / "r")[KEY_USER_STATE]["plain"]  # loaded with weights_only=True
    assert (saved["best"], type(saved["best"]), saved["where"], type(saved["where"])) == (1.5, float, 1, int)
    assert "history" not in saved
    refused = [e for e in RunStore(tmp_path / "r").events() if e["kind"] == "state_not_saved"]
    assert [e["data"]["key"] for e in refused] == ["history"]


def test_a_loader_with_its_own_generator_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    def job(run_dir: Path, on_step: Any = None) -> babysit.Run:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(tiny_data(), batch_size=8, shuffle=True,
                                             generator=torch.Generator().manual_seed(7))
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with babysit.Run(run_dir, model, optimizer) as run:
            for _ in run.epochs(3):
                for x, y in run.batches(loader):
                    loss = nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    run.log(loss=loss)
                    if on_step is not None:
                        on_step(run)
        return run

    def stop_mid_epoch_2(run: babysit.Run) -> None:
        if run.step == 11:
            run.store.enqueue_command(cmd.STOP, source="test")

    straight = job(tmp_path / "straight")
    job(tmp_path / "cut", stop_mid_epoch_2)
    resumed = job(tmp_path / "cut")
    assert RunStore(tmp_path / "cut").checkpoints()[1]["reason"] == "stop"
    assert series(RunStore(tmp_path / "cut"), "loss") == series(RunStore(tmp_path / "straight"), "loss")
    assert same_tensors(resumed.model.state_dict(), straight.model.state_dict())


def test_a_stop_or_checkpoint_at_an_epoch_s_last_boundary_waits_for_the_epoch_s_end(tmp_path: Path) -> None:
    ids: dict[str, int] = {}

    def on_step(run: babysit.Run) -> None:
        if run.step == 16:  # the last batch of epoch 2
            ids["checkpoint"] = run.store.enqueue_command(cmd.CHECKPOINT, source="test")
            ids["stop"] = run.store.enqueue_command(cmd.STOP, source="test")

    run, interrupted = annealing_loop(tmp_path / "r", epochs=5, on_step=on_step)
    store = RunStore(tmp_path / "r")
    assert interrupted == [False, False] and run.status == "stopped" and run.step == 16
    assert [(c["reason"], c["step"]) for c in store.checkpoints()] == [("epoch", 8), ("epoch", 16)]
    assert store.command(ids["checkpoint"])["result"]["checkpoint"] == 2
    assert store.command(ids["stop"])["result"]["checkpoint"] == 2
    assert store.status()["message"] == "stopped at step 16 with a final checkpoint"


def test_a_checkpoint_asked_while_paused_after_an_epoch_s_last_batch_says_it_waits_for_the_resume(
        tmp_path: Path) -> None:
    ids: dict[str, int] = {}

    def person() -> None:  # at the page: sees the pause, asks for a checkpoint, reads why it waits, resumes
        store = RunStore(tmp_path / "r")
        try:
            wait_for(lambda: store.status()["state"] == "paused", what="the pause")
            ids["checkpoint"] = store.enqueue_command(cmd.CHECKPOINT, source="test")
            ids["event"] = wait_for(lambda: next((e for e in store.events() if e["kind"] == "checkpoint_waits"), None),
                                    what="the word that the checkpoint waits")["message"]
            ids["state_before_resume"] = store.command(ids["checkpoint"])["state"]
        finally:  # whatever happened, the loop must not stay paused
            store.enqueue_command(cmd.RESUME, source="test")

    helper = threading.Thread(target=person)

    def on_step(run: babysit.Run) -> None:
        if run.step == 16:  # the last batch of epoch 2
            run.store.enqueue_command(cmd.PAUSE, source="test")
            helper.start()

    annealing_loop(tmp_path / "r", epochs=3, on_step=on_step)
    helper.join(timeout=60)
    store = RunStore(tmp_path / "r")
    assert ids["state_before_resume"] == cmd.PENDING
    assert ids["event"] == (f"checkpoint #{ids['checkpoint']}: the run is paused after the last batch of epoch 2; "
                            "that epoch's own checkpoint, of this step, answers it once the run resumes")
    answer = store.command(ids["checkpoint"])
    epoch_2 = next(c for c in store.checkpoints() if c["step"] == 16)
    assert answer["state"] == cmd.APPLIED and answer["result"]["checkpoint"] == epoch_2["id"]
    assert epoch_2["reason"] == "epoch"


def test_a_stop_command_during_the_epoch_s_evaluation_reuses_the_epoch_checkpoint(tmp_path: Path) -> None:
    def evaluation(run: babysit.Run, epoch: int) -> None:
        if epoch == 1:
            run.store.enqueue_command(cmd.STOP, source="test")

    run, _ = tiny_job(tmp_path / "r", epochs=3, on_epoch_end=evaluation)
    store = RunStore(tmp_path / "r")
    assert run.status == "stopped" and [(c["reason"], c["step"]) for c in store.checkpoints()] == [("epoch", 8)]


def test_the_status_after_a_stop_shows_the_lr_of_the_final_checkpoint(tmp_path: Path) -> None:
    def on_step(run: babysit.Run) -> None:
        if run.step == 12:
            run.store.enqueue_command(cmd.STOP, source="test")

    annealing_loop(tmp_path / "r", epochs=5, on_step=on_step)
    assert RunStore(tmp_path / "r").status()["lr"] == 0.025  # not the 0.00625 the loop set after the cut


def test_breaking_out_of_run_epochs_says_where_the_run_resumes(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    with babysit.Run(tmp_path / "r", model, torch.optim.SGD(model.parameters(), lr=0.1)) as run:
        for epoch in run.epochs(10):
            for _x in run.batches(range(4)):
                pass
            if epoch == 2:
                break  # early stopping, written the usual way
    status = RunStore(tmp_path / "r").status()
    assert (status["state"], status["message"]) == (
        "stopped", "the loop left run.epochs at step 8 (epoch 2); it resumes from the latest checkpoint")


# -- 3. any legitimate lr -------------------------------------------------------------------------
def test_an_lr_of_20_or_50_is_applied_and_only_a_far_out_one_warns(tmp_path: Path) -> None:
    def on_step(run: babysit.Run) -> None:
        values = {2: "20", 4: 50, 6: 1000}
        if run.step in values:
            run.store.enqueue_command(cmd.SET_LR, {"value": values[run.step]}, source="test")

    stateful_lm.train(tmp_path / "r", 1, lr=1.0, on_step=on_step)
    rows = [c for c in RunStore(tmp_path / "r").commands() if c["kind"] == cmd.SET_LR]
    assert [(c["state"], c["step"], c["result"]["after"]) for c in rows] == [
        (cmd.APPLIED, 2, 20.0), (cmd.APPLIED, 4, 50.0), (cmd.APPLIED, 6, 1000.0)]
    assert [c["result"].get("warning") for c in rows] == [
        None, None, "lr 1000 is far above the usual range (1e-07 to 100); applied as asked"]


# -- 4. exactly one checkpoint per "checkpoint now" ------------------------------------------------
def test_checkpoint_now_while_a_large_write_is_in_flight_gives_one_checkpoint_each(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    writing = threading.Event()
    real_write = checkpoint_module.write_new

    def held_write(path: Path, state: dict[str, Any]) -> tuple[Path, str, int]:
        if not release.is_set():
            writing.set()
            assert release.wait(timeout=120)
        return real_write(path, state)

    monkeypatch.setattr(checkpoint_module, "write_new", held_write)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 2))  # 17 MB of weights, 34 MB with momentum
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ids: list[int] = []
    with babysit.Run(tmp_path / "r", model, optimizer) as run:
        for _ in run.epochs(1):
            for x in run.batches(torch.randn(40, 1, 1024)):
                loss = model(x).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if run.step == 3:
                    ids.append(run.store.enqueue_command(cmd.CHECKPOINT, source="test"))
                if run.step == 6:
                    assert writing.wait(timeout=120)  # the first snapshot's write is in flight
                    ids += [run.store.enqueue_command(cmd.CHECKPOINT, source="test") for _ in range(2)]
                if run.step == 10:
                    release.set()
                if run.step == 11:
                    wait_for(lambda: run.store.command(ids[0])["state"] == cmd.APPLIED, timeout=120,
                             what="the first checkpoint listed")
    store = RunStore(tmp_path / "r")
    answered = [store.command(i) for i in ids]
    assert [c["state"] for c in answered] == [cmd.APPLIED] * 3
    by_command = [c for c in store.checkpoints() if c["reason"] == "command"]
    assert [c["step"] for c in by_command] == [3, 11] and answered[1]["step"] == 11
    assert answered[0]["result"]["checkpoint"] == by_command[0]["id"]
    assert answered[1]["result"]["checkpoint"] == answered[2]["result"]["checkpoint"] == by_command[1]["id"]
    listed = store.checkpoints()
    assert len({c["file"] for c in listed}) == len(listed)
    for c in listed:
        read_verified(tmp_path / "r" / c["file"], c["sha256"])


def test_two_checkpoints_at_one_step_never_share_a_file(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    run = babysit.Run(tmp_path / "r", model, torch.optim.SGD(model.parameters(), lr=0.1))
    first, second = run.checkpoint_now(), run.checkpoint_now()
    run.checkpointer.wait()
    run.close()
    assert first.path != second.path and first.path.name == "epoch-0000-step-00000000-b1.pt"
    assert second.path.name == "epoch-0000-step-00000000-b1-2.pt"
    for c in RunStore(tmp_path / "r").checkpoints():
        read_verified(tmp_path / "r" / c["file"], c["sha256"])


# -- 5. Ctrl-C and SIGTERM in your own loop ---------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_your_own_loop_stops_with_a_final_checkpoint_and_resumes_exactly(tmp_path: Path, signum: int) -> None:
    straight = stateful_lm.train(tmp_path / "straight", 2)
    run_dir = tmp_path / "r"
    # The process signals itself after step 70 (a real SIGINT/SIGTERM through the real handler),
    # so the moment does not depend on how fast this machine trains.
    process = start_script(run_dir, "--epochs", "2", "--signal-at-step", "70", "--signal", signal.Signals(signum).name[3:])
    try:
        assert process.wait(timeout=300) == 0
    finally:
        process.kill()
    store = RunStore(run_dir)
    status = store.status()
    last = store.checkpoints()[-1]
    assert status["state"] == "stopped" and last["reason"] == "stop" and last["step"] == status["step"] == 70
    assert status["message"] == f"stopped at step {last['step']} (signal {signal.Signals(signum).name}) with a final checkpoint"
    again = start_script(run_dir, "--epochs", "2")
    assert again.wait(timeout=300) == 0
    resume = [e for e in store.events() if e["kind"] == "resume"][-1]
    assert resume["message"].startswith(f"resumed from checkpoint #{last['id']}") and "after a clean stop" in resume["message"]
    assert series(store, "loss") == series(RunStore(tmp_path / "straight"), "loss")
    assert same_tensors(final_state(run_dir)[KEY_MODEL], straight.model.state_dict())


# -- 6. loops without an optimizer --------------------------------------------------------------
def test_a_hand_written_update_reads_run_lr_which_nudges_reach(tmp_path: Path) -> None:
    used: list[float] = []

    def on_step(run: babysit.Run) -> None:
        used.append(run.lr)
        if run.step == 3:
            run.store.enqueue_command(cmd.SET_LR, {"value": 5.0}, source="test")

    run = stateful_lm.train(tmp_path / "r", 1, on_step=on_step)
    assert used[:3] == [20.0, 20.0, 20.0] and set(used[3:]) == {5.0}
    store = RunStore(tmp_path / "r")
    assert store.status()["optimizer"] == "hand-written updates (run.lr)" and store.status()["lr"] == 5.0
    assert (3, 5.0) in series(store, "lr") and run.hparams == {"lr": 5.0, "momentum": None}


def test_a_run_without_optimizer_or_lr_is_refused_with_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^Run needs an optimizer, or lr= for a loop that updates its parameters by hand"):
        babysit.Run(tmp_path / "r", nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0 \(for example 0\.01\), got -1"):
        babysit.Run(tmp_path / "r2", nn.Linear(2, 1), lr=-1)
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


# -- 7. who changed the lr -------------------------------------------------------------------------
def test_lr_changes_no_command_made_are_marked_with_who_made_them(tmp_path: Path) -> None:
    def on_step(run: babysit.Run) -> None:
        if run.step == 3:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.2}, source="test")

    annealing_loop(tmp_path / "loop", epochs=3, on_step=on_step)
    store = RunStore(tmp_path / "loop")
    marks = [(e["step"], e["data"]["by"], e["data"]["before"]["lr"], e["data"]["after"]["lr"])
             for e in store.events() if e["kind"] == "hparams"]
    assert marks == [(8, "loop", 0.2, 0.05), (16, "loop", 0.05, 0.0125)]  # the nudge itself is not one of them
    assert next(e for e in store.events() if e["kind"] == "hparams")["message"] == "lr 0.2 → 0.05 by the loop"

    tiny_job(tmp_path / "sched", epochs=3, scheduler=True)
    marks = [(e["step"], e["data"]["by"]) for e in RunStore(tmp_path / "sched").events() if e["kind"] == "hparams"]
    assert marks == [(8, "scheduler"), (16, "scheduler")]


def test_a_schedule_that_moves_the_lr_every_step_is_marked_every_20_percent_not_every_step(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)
    with babysit.Run(tmp_path / "r", model, optimizer, scheduler) as run:
        for _ in run.epochs(1):
            for _x in run.batches(range(100)):
                optimizer.step()
                scheduler.step()
    events = [e for e in RunStore(tmp_path / "r").events() if e["kind"] == "hparams"]
    assert len(series(RunStore(tmp_path / "r"), "lr")) == 101  # every value is drawn
    assert [e["step"] for e in events] == [19, 38, 57, 76, 95]  # 0.99**19 < 1/1.2 < 0.99**18


@pytest.mark.parametrize("held_as", ["momentum", "betas", "a tensor changed in place"])
def test_a_momentum_the_loop_changes_is_drawn_at_its_step_however_the_group_holds_it(tmp_path: Path, held_as: str) -> None:
    model = nn.Linear(2, 1)
    if held_as == "betas":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999))
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    group = optimizer.param_groups[0]
    if held_as == "a tensor changed in place":
        group["momentum"] = torch.tensor(0.9, dtype=torch.float64)
    with babysit.Run(tmp_path / "r", model, optimizer) as run:
        for _ in run.epochs(1):
            for _x in run.batches(range(12)):
                model(torch.ones(1, 2)).sum().backward()
                optimizer.step()
                if run.step == 5:  # the loop's own change, at the end of step 5
                    if held_as == "betas":
                        group["betas"] = (0.5, 0.999)
                    elif held_as == "momentum":
                        group["momentum"] = 0.5
                    else:
                        group["momentum"].fill_(0.5)
                if run.step == 8 and held_as == "betas":
                    group["betas"] = (0.5, 0.99)  # beta2 alone: not a new momentum
    store = RunStore(tmp_path / "r")
    assert series(store, "momentum") == [(0, 0.9), (5, 0.5)]
    assert [(e["step"], e["data"]["by"]) for e in store.events() if e["kind"] == "hparams"] == [(5, "loop")]
