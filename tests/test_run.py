"""The Run API in-process: checkpoints per epoch, resume, nudges at step boundaries, rollback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from babysit import GuardConfig, RunLockedError, commands as cmd
from babysit.checkpoint import KEY_MODEL, read_verified
from babysit.store import RunStore
from tests.conftest import tiny_job, wait_for


def losses(store: RunStore, branch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    info = next(s for s in store.series() if s.name == "loss" and s.branch == branch and s.segment == 0)
    steps, values, _ = store.chunk_points(info.id)
    return steps, values


def poison_weights(run) -> None:
    """The weights go NaN (after the last checkpoint is safely written)."""
    run.checkpointer.wait()
    with torch.no_grad():
        for p in run.model.parameters():
            p.fill_(float("nan"))


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def test_fresh_run_checkpoints_every_epoch_and_finishes(tmp_path: Path) -> None:
    run, _ = tiny_job(tmp_path / "r", epochs=3)
    store = RunStore(tmp_path / "r")
    listed = store.checkpoints()
    assert [(c["epoch"], c["step"], c["branch"], c["reason"]) for c in listed] == [
        (1, 8, 1, "epoch"), (2, 16, 1, "epoch"), (3, 24, 1, "epoch")]
    assert all((tmp_path / "r" / c["file"]).is_file() for c in listed)
    assert set(listed[0]["metrics"]) == {"val_loss"}
    steps, values = losses(store)
    assert steps.tolist() == list(range(1, 25))
    assert np.isfinite(values).all()
    status = store.status()
    assert (status["state"], status["epoch"], status["step"]) == ("finished", 3, 24)
    assert [e for _, e, _ in store.epochs()] == [1, 2, 3]


def test_resume_continues_from_latest_checkpoint_bit_identically(tmp_path: Path) -> None:
    _, straight = tiny_job(tmp_path / "straight", epochs=4)
    tiny_job(tmp_path / "resumed", epochs=2)
    _, resumed = tiny_job(tmp_path / "resumed", epochs=4)
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    s1, v1 = losses(RunStore(tmp_path / "straight"))
    s2, v2 = losses(RunStore(tmp_path / "resumed"))
    assert s1.tolist() == s2.tolist() and v1.tolist() == v2.tolist()
    events = [e["kind"] for e in RunStore(tmp_path / "resumed").events()]
    assert events.count("resume") == 1


def test_nudges_are_applied_at_the_step_boundary_and_read_back(tmp_path: Path) -> None:
    def on_step(run, step):
        if step == 5:
            run.store.enqueue_command(cmd.SET_LR, {"value": "0.02"}, source="test")
            run.store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.5}, source="test")
        if step == 6:
            assert run.optimizer.param_groups[0]["lr"] == 0.02
            assert run.optimizer.param_groups[0]["momentum"] == 0.5

    tiny_job(tmp_path / "r", epochs=1, on_step=on_step)
    store = RunStore(tmp_path / "r")
    rows = store.commands()
    assert [(r["kind"], r["state"], r["step"], r["result"]) for r in rows] == [
        (cmd.SET_LR, cmd.APPLIED, 5, {"before": 0.1, "after": 0.02, "step_in_epoch": 5}),
        (cmd.SET_MOMENTUM, cmd.APPLIED, 5, {"before": 0.9, "after": 0.5, "step_in_epoch": 5}),
    ]
    lr = next(s for s in store.series() if s.name == "lr")
    steps, values, _ = store.chunk_points(lr.id)
    assert list(zip(steps.tolist(), values.tolist())) == [(0, 0.1), (5, 0.02)]
    assert store.checkpoints()[0]["hparams"] == {"lr": 0.02, "momentum": 0.5}


def test_adam_momentum_is_beta1(tmp_path: Path) -> None:
    def on_step(run, step):
        if step == 2:
            run.store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.8}, source="test")

    run, _ = tiny_job(tmp_path / "r", epochs=1, optimizer="adam", on_step=on_step)
    assert run.optimizer.param_groups[0]["betas"] == (0.8, 0.999)
    # Applied at the boundary after step 2: the nudge records where in the epoch (a replay needs it).
    assert RunStore(tmp_path / "r").commands()[0]["result"] == {"before": 0.9, "after": 0.8, "step_in_epoch": 2}


def test_scheduler_keeps_a_nudged_lr(tmp_path: Path) -> None:
    # StepLR halves the lr every epoch: after a nudge to 0.04 in epoch 1, epoch 2 runs at 0.02.
    seen = {}

    def on_step(run, step):
        if step == 3:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.04}, source="test")
        seen[step] = run.optimizer.param_groups[0]["lr"]

    tiny_job(tmp_path / "r", epochs=2, scheduler=True, on_step=on_step)
    assert seen[2] == pytest.approx(0.1) and seen[4] == pytest.approx(0.04) and seen[9] == pytest.approx(0.02)


def test_bad_command_is_rejected_by_the_trainer_and_the_run_goes_on(tmp_path: Path) -> None:
    def on_step(run, step):
        if step == 2:  # bypass the CLI's check: a row written straight into the queue
            run.store.conn().execute(
                "INSERT INTO commands (created, source, kind, args, state) VALUES (?, 'x', 'set_lr', '{\"value\": -1}', 'pending')",
                (time.time(),))
            run.signal.seen = b"stale---"
        if step == 3:
            run.store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.5}, source="test")

    run, _ = tiny_job(tmp_path / "r", epochs=1, optimizer="sgd", on_step=on_step)
    rows = RunStore(tmp_path / "r").commands()
    assert rows[0]["state"] == cmd.REJECTED and "lr must be a finite number > 0" in rows[0]["reason"]
    assert rows[1]["state"] == cmd.APPLIED
    assert run.optimizer.param_groups[0]["lr"] == 0.1
    assert run.status == "finished"


def test_rollback_starts_a_branch_from_the_checkpoint(tmp_path: Path) -> None:
    restored = {}

    def on_step(run, step):
        if run.branch == 1 and step == 20:
            run.checkpointer.wait()
            first = run.store.checkpoints()[0]
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": first["id"], "hparams": "current", "lr": 0.05},
                                      source="test")
        if run.branch == 2 and "step" not in restored:
            restored.update(step=step, epoch=run.epoch, lr=run.optimizer.param_groups[0]["lr"])

    def set_lr_at_10(run, step):
        if step == 10 and run.branch == 1:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.3}, source="test")
        on_step(run, step)

    run, _ = tiny_job(tmp_path / "r", epochs=4, on_step=set_lr_at_10)
    store = RunStore(tmp_path / "r")
    assert restored == {"step": 9, "epoch": 2, "lr": 0.05}  # first step of branch 2 follows step 8
    rows = store.commands()
    rollback = rows[-1]
    assert rollback["state"] == cmd.APPLIED and rollback["step"] == 20 and rollback["branch"] == 1
    assert rollback["result"]["branch"] == 2 and rollback["result"]["step"] == 8
    branches = store.branches()
    assert [(b["id"], b["parent"], b["from_checkpoint"], b["start_step"]) for b in branches] == [
        (1, None, None, 0), (2, 1, 1, 8)]
    old_steps, _ = losses(store, 1)
    new_steps, _ = losses(store, 2)
    assert old_steps.tolist() == list(range(1, 21)) and new_steps.tolist() == list(range(9, 33))
    assert [(c["branch"], c["epoch"]) for c in store.checkpoints()] == [(1, 1), (1, 2), (2, 2), (2, 3), (2, 4)]
    assert run.status == "finished" and run.branch == 2


def test_rollback_with_checkpoint_hparams_restores_them(tmp_path: Path) -> None:
    def on_step(run, step):
        if run.branch == 1 and step == 10:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.3}, source="test")
        if run.branch == 1 and step == 12:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1}, source="test")

    run, _ = tiny_job(tmp_path / "r", epochs=2, on_step=on_step)
    result = RunStore(tmp_path / "r").commands()[-1]["result"]
    assert (result["lr"], result["before"]["lr"]) == (0.1, 0.3)


def test_rollback_to_a_tampered_checkpoint_is_refused_and_training_goes_on(tmp_path: Path) -> None:
    def on_step(run, step):
        if step == 10:
            run.checkpointer.wait()  # the epoch-1 checkpoint is written off the training thread
            first = run.store.checkpoints()[0]
            path = run.run_dir / first["file"]
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": first["id"]}, source="test")

    run, _ = tiny_job(tmp_path / "r", epochs=2, on_step=on_step)
    rows = RunStore(tmp_path / "r").commands()
    assert rows[0]["state"] == cmd.REJECTED
    assert "epoch-0001-step-00000008-b1.pt" in rows[0]["reason"] and "hash" in rows[0]["reason"]
    assert run.status == "finished" and run.branch == 1 and run.step == 16


def test_checkpoint_now_mid_epoch_and_resume_from_it_is_identical(tmp_path: Path) -> None:
    # Checkpoint at step 12 (mid epoch 2), stop there; resuming from it must retrace the same batches.
    def on_step(run, step):
        if step == 12:
            run.store.enqueue_command(cmd.CHECKPOINT, source="test")
        if step == 13:
            run.request_stop("test")

    _, straight = tiny_job(tmp_path / "straight", epochs=3)
    tiny_job(tmp_path / "cut", epochs=3, on_step=on_step)
    store = RunStore(tmp_path / "cut")
    listed = store.checkpoints()
    assert [(c["step"], c["reason"]) for c in listed] == [(8, "epoch"), (12, "command"), (13, "stop")]
    assert store.commands()[0]["result"] == {"checkpoint": 2}
    # Resume from the mid-epoch command checkpoint: drop the stop checkpoint from the index.
    store.mark_checkpoint_deleted(listed[2]["id"])
    _, resumed = tiny_job(tmp_path / "cut", epochs=3)
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)


def _crash_at_the_last_checkpoint(store: RunStore) -> None:
    """As if the trainer had died just before its last checkpoint: drop it from the index."""
    store.mark_checkpoint_deleted(store.checkpoints()[-1]["id"])


def _nudge_lr_at(nudge_step: int, *, stop_at: int | None = None):
    """A step hook: set lr 0.02 after step ``nudge_step``; stop (with a checkpoint) at ``stop_at``."""
    def on_step(run, step):
        if step == nudge_step:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.02}, source="test")
        if step == stop_at:
            run.request_stop("test")
    return on_step


def test_a_nudge_applied_just_after_a_checkpoint_is_replayed_on_resume(tmp_path: Path) -> None:
    # Sent during epoch 2's validation: applied at the first boundary of epoch 3, after epoch 2's
    # checkpoint but at the same step number (16). A resume from that checkpoint must replay it.
    def nudge_after_epoch_2(run, epoch):
        if epoch == 2:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.02}, source="test")

    def stop_mid_epoch_3(run, step):
        if step == 20:
            run.request_stop("test")

    _, straight = tiny_job(tmp_path / "straight", epochs=4, on_epoch_end=nudge_after_epoch_2)
    tiny_job(tmp_path / "cut", epochs=4, on_epoch_end=nudge_after_epoch_2, on_step=stop_mid_epoch_3)
    store = RunStore(tmp_path / "cut")
    [command] = store.commands()
    assert (command["state"], command["step"]) == (cmd.APPLIED, 16)
    epoch_2 = next(c for c in store.checkpoints() if c["epoch"] == 2)
    assert epoch_2["step"] == 16 and epoch_2["hparams"]["lr"] == 0.1
    # As after a crash mid epoch 3: only epoch 2's checkpoint is left to resume from.
    _crash_at_the_last_checkpoint(store)
    _, resumed = tiny_job(tmp_path / "cut", epochs=4)
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    s1, v1 = losses(RunStore(tmp_path / "straight"))
    s2, v2 = losses(store)
    assert s1.tolist() == s2.tolist() and v1.tolist() == v2.tolist()


def test_a_replay_still_waiting_survives_a_later_checkpoint_and_crash(tmp_path: Path) -> None:
    # A nudge applied at step 11 by a trainer that dies at 13. The next trainer resumes from step 8
    # and would replay it at 11, but takes a "checkpoint now" at step 9 (recording a later command
    # than the nudge) and dies at 10. The one after that must still replay the nudge at step 11.
    def checkpoint_then_die(run, step):
        if step == 9:
            run.store.enqueue_command(cmd.CHECKPOINT, source="test")
        if step == 10:
            run.request_stop("test")

    _, straight = tiny_job(tmp_path / "straight", epochs=3, on_step=_nudge_lr_at(11))
    cut = tmp_path / "cut"
    tiny_job(cut, epochs=3, on_step=_nudge_lr_at(11, stop_at=13))
    store = RunStore(cut)
    _crash_at_the_last_checkpoint(store)
    tiny_job(cut, epochs=3, on_step=checkpoint_then_die)
    assert [(c["step"], c["reason"]) for c in store.checkpoints()] == [(8, "epoch"), (9, "command"), (10, "stop")]
    assert store.checkpoints()[-1]["hparams"]["lr"] == 0.1  # the nudge is not in it
    _crash_at_the_last_checkpoint(store)
    _, resumed = tiny_job(cut, epochs=3)
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    assert losses(store)[1].tolist() == losses(RunStore(tmp_path / "straight"))[1].tolist()


def test_a_checkpoint_without_a_command_record_replays_only_later_steps(tmp_path: Path, monkeypatch) -> None:
    # Checkpoints written before they recorded the last command: on resume, only nudges applied
    # after the checkpoint's step are replayed, not the branch's whole history (with a scheduler,
    # replaying the step-5 nudge at step 8 would undo the scheduler's halving).
    import babysit.resume

    _, straight = tiny_job(tmp_path / "straight", epochs=3, scheduler=True, on_step=_nudge_lr_at(5))
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(babysit.resume, "KEY_LAST_COMMAND", "not_recorded")
        tiny_job(cut, epochs=3, scheduler=True, on_step=_nudge_lr_at(5, stop_at=13))
    store = RunStore(cut)
    _crash_at_the_last_checkpoint(store)
    _, resumed = tiny_job(cut, epochs=3, scheduler=True)
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    resume = [e for e in store.events() if e["kind"] == "resume"][-1]
    assert "re-applied" not in resume["message"]


def test_a_rollback_drops_the_old_branch_s_waiting_replays(tmp_path: Path) -> None:
    # Resumed from step 8 with a nudge to replay at step 11 on branch 1, the trainer rolls back to
    # step 8 at step 9: branch 2 must not get branch 1's nudge at its own step 11.
    lr_seen = {}

    def roll_back_at_9(run, step):
        if run.branch == 1 and step == 9:
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": run.store.checkpoints()[0]["id"]}, source="test")
        if run.branch == 2:
            lr_seen[step] = run.optimizer.param_groups[0]["lr"]

    cut = tmp_path / "cut"
    tiny_job(cut, epochs=2, on_step=_nudge_lr_at(11, stop_at=13))
    store = RunStore(cut)
    _crash_at_the_last_checkpoint(store)
    tiny_job(cut, epochs=2, on_step=roll_back_at_9)
    assert sorted(lr_seen) == list(range(9, 17)) and set(lr_seen.values()) == {0.1}


def test_second_trainer_on_the_same_run_is_refused(tmp_path: Path) -> None:
    import os

    def on_step(run, step):
        if step == 1:
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
                tiny_job(tmp_path / "r", epochs=1)

    tiny_job(tmp_path / "r", epochs=1, on_step=on_step)


def test_divergence_pauses_the_run_and_offers_the_remedy(tmp_path: Path) -> None:
    def on_step(run, step):
        if step == 12:
            poison_weights(run)
        if step == 13:
            run.writer.flush()  # the guard reads the NaN loss now (the writer would, within 0.25 s)

    def resume_when_paused(store_dir: Path) -> None:
        store = wait_for(lambda: (store_dir / "run.db").exists() and RunStore(store_dir), what="store")
        wait_for(lambda: store.status().get("state") == "paused", what="guard pause")
        store.enqueue_command(cmd.STOP, source="test")

    thread = threading.Thread(target=resume_when_paused, args=(tmp_path / "r",), daemon=True)
    thread.start()
    run, _ = tiny_job(tmp_path / "r", epochs=5, guard=GuardConfig(warmup_steps=0), on_step=on_step)
    thread.join(timeout=30)
    store = RunStore(tmp_path / "r")
    divergence = [e for e in store.events() if e["kind"] == "divergence"]
    assert len(divergence) == 1
    assert "loss became nan at step 13" in divergence[0]["message"]
    assert divergence[0]["data"]["checkpoint"] == 1 and divergence[0]["data"]["suggested_lr"] == 0.05
    pause = [c for c in store.commands() if c["kind"] == cmd.PAUSE]
    assert pause[0]["source"] == "guard" and pause[0]["state"] == cmd.APPLIED
    assert run.status == "stopped"
    # The final checkpoint holds NaN weights, so it is not written; the earlier one stays.
    assert [c["step"] for c in store.checkpoints()] == [8]
    failed = [e for e in store.events() if e["kind"] == "checkpoint_failed"]
    assert failed and "NaN or infinity" in failed[0]["message"]
    # ... and the stop says so, rather than promise a final checkpoint that is not there.
    stopped = [e for e in store.events() if e["kind"] == "stopped"]
    assert "without a final checkpoint" in stopped[0]["message"] and "NaN or infinity" in stopped[0]["message"]
    assert "without a final checkpoint" in store.status()["message"]


def test_auto_remedy_rolls_back_with_half_the_lr(tmp_path: Path) -> None:
    def on_step(run, step):
        if run.branch == 1 and step == 12:
            poison_weights(run)
        if run.branch == 1 and step == 13:
            run.writer.flush()

    run, _ = tiny_job(tmp_path / "auto", epochs=3, guard=GuardConfig(warmup_steps=0, auto_remedy_max=1), on_step=on_step)
    store = RunStore(tmp_path / "auto")
    rollback = [c for c in store.commands() if c["kind"] == cmd.ROLLBACK]
    assert len(rollback) == 1 and rollback[0]["source"] == "guard" and rollback[0]["state"] == cmd.APPLIED
    assert rollback[0]["result"]["lr"] == 0.05 and rollback[0]["result"]["checkpoint"] == 1
    assert run.status == "finished" and run.branch == 2
    state = read_verified(tmp_path / "auto" / store.checkpoints()[-1]["file"], store.checkpoints()[-1]["sha256"])
    assert all(torch.isfinite(t).all() for t in state[KEY_MODEL].values() if t.is_floating_point())


def test_weights_gone_nan_before_the_guard_reads_the_loss_still_get_the_auto_remedy(tmp_path: Path) -> None:
    # The writer never flushes on its own here: the epoch's checkpoint finds the NaN weights first.
    # That used to queue a plain pause that no remedy followed, and it could land on the new branch.
    def on_step(run, step):
        if run.branch == 1 and step == 12:
            poison_weights(run)
        if run.branch == 1 and step == 17:  # the checkpoint thread is niced: let it report first
            wait_for(lambda: any(c["kind"] == cmd.ROLLBACK for c in run.store.commands()), what="the remedy")

    run, _ = tiny_job(tmp_path / "r", epochs=3, guard=GuardConfig(warmup_steps=0, auto_remedy_max=1),
                      on_step=on_step, flush_interval=3600.0)
    store = RunStore(tmp_path / "r")
    assert run.status == "finished" and run.branch == 2 and run.step == 24
    divergence = [e for e in store.events() if e["kind"] == "divergence"]
    assert len(divergence) == 1 and "the weights hold NaN or infinity at step 16" in divergence[0]["message"]
    rollback = [c for c in store.commands() if c["kind"] == cmd.ROLLBACK]
    assert [(c["source"], c["state"], c["args"]["checkpoint"]) for c in rollback] == [("guard", cmd.APPLIED, 1)]
    assert [c for c in store.commands() if c["kind"] == cmd.PAUSE] == []


def test_a_guard_pause_for_a_branch_the_run_has_left_is_rejected(tmp_path: Path) -> None:
    def on_step(run, step):
        if run.branch == 1 and step == 10:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1}, source="test")
            run.store.enqueue_command(cmd.PAUSE, {"reason": "divergence: loss became nan", "branch": 1}, source="guard")

    run, _ = tiny_job(tmp_path / "r", epochs=2, on_step=on_step)
    pause = next(c for c in RunStore(tmp_path / "r").commands() if c["kind"] == cmd.PAUSE)
    assert run.status == "finished" and run.branch == 2
    assert pause["state"] == cmd.REJECTED
    assert pause["reason"] == "this pause was for a divergence on branch 1; the run has moved on to branch 2"


def test_a_guard_rollback_for_a_branch_the_run_has_left_is_rejected(tmp_path: Path) -> None:
    def on_step(run, step):
        if run.branch == 1 and step == 10:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1, "lr": 0.01}, source="test")
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1, "hparams": "current", "lr": 0.05, "branch": 1},
                                      source="guard")

    run, _ = tiny_job(tmp_path / "r", epochs=2, on_step=on_step)
    person, guard = [c for c in RunStore(tmp_path / "r").commands() if c["kind"] == cmd.ROLLBACK]
    assert person["state"] == cmd.APPLIED and run.branch == 2 and run.hparams["lr"] == 0.01
    assert guard["state"] == cmd.REJECTED
    assert guard["reason"] == "this rollback was for a divergence on branch 1; the run has moved on to branch 2"


def test_a_restart_with_another_lr_says_on_the_terminal_that_the_checkpoint_s_lr_is_used(tmp_path: Path, capsys) -> None:
    import babysit

    def start(lr: float, epochs: int) -> torch.optim.Optimizer:
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        with babysit.Run(tmp_path / "r", model, optimizer, config={"lr": lr}) as run:
            for _ in run.epochs(epochs):
                for _ in run.batches(range(2)):
                    pass
        return optimizer

    start(0.1, 1)
    assert "differ" not in capsys.readouterr().err
    assert start(0.01, 2).param_groups[0]["lr"] == 0.1
    said = [line for line in capsys.readouterr().err.splitlines() if "differ" in line]
    assert said == ["babysit: this restart's settings differ from checkpoint #1's: lr 0.01 here, 0.1 in the run; the "
                    "optimizer was built with lr 0.01, checkpoint #1 holds 0.1 and it is used (`python -m babysit set "
                    "lr` nudges it); model, optimizer, lr and momentum come from the checkpoint, the new config is "
                    "used for everything else"]


def test_the_guard_watches_each_loss_a_gan_loop_logs(tmp_path: Path) -> None:
    """Two networks, two losses, none named "loss": the generator's turning NaN at step 13 pauses
    the run, and the event names it."""
    import babysit

    torch.manual_seed(0)
    net_d, net_g = torch.nn.Linear(4, 1), torch.nn.Linear(2, 4)
    model = torch.nn.ModuleDict({"D": net_d, "G": net_g})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)

    def stop_when_paused() -> None:
        wait_for(lambda: (tmp_path / "gan" / "run.db").exists() and RunStore(tmp_path / "gan").status().get("state")
                 == "paused", what="the guard's pause")
        RunStore(tmp_path / "gan").enqueue_command(cmd.STOP, source="test")

    thread = threading.Thread(target=stop_when_paused, daemon=True)
    thread.start()
    with babysit.Run(tmp_path / "gan", model, optimizer, guard=GuardConfig(warmup_steps=0)) as run:
        for _epoch in run.epochs(3):
            for real in run.batches(data):
                fake = net_g(torch.randn(4, 2))
                loss_d = net_d(real).mean() - net_d(fake.detach()).mean()
                loss_g = -net_d(fake).mean()
                optimizer.zero_grad()
                (loss_d + loss_g).backward()
                optimizer.step()
                run.log(loss_D=loss_d, loss_G=loss_g if run.step < 13 else torch.tensor(float("nan")))
                if run.step == 14:
                    run.writer.flush()  # the guard reads the NaN now (the writer would, within 0.25 s)
    thread.join(timeout=60)
    store = RunStore(tmp_path / "gan")
    [divergence] = [e for e in store.events() if e["kind"] == "divergence"]
    assert "loss_G became nan at step 13" in divergence["message"] and divergence["data"]["metric"] == "loss_G"
    assert store.status()["state"] == "stopped"


def test_run_enumerate_counts_from_where_a_resumed_epoch_goes_on(tmp_path: Path) -> None:
    """Stopped at the 5th of 8 batches, the resumed epoch's indices go on at 5, as an
    uninterrupted run's would; enumerate(run.batches(...)) would start again at 0."""
    import babysit

    def indices(stop_at: int | None) -> list[tuple[int, int]]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=8, shuffle=True)
        seen = []
        with babysit.Run(tmp_path / "run", model, optimizer) as run:
            for epoch in run.epochs(2):
                for i, batch in run.enumerate(loader, start=100):
                    loss = model(batch).pow(2).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    run.log(loss=loss)
                    seen.append((epoch, i))
                    if run.step == stop_at:
                        run.request_stop("the test")
        return seen

    assert indices(stop_at=5) == [(1, 100 + i) for i in range(5)]
    assert indices(stop_at=None) == [(1, 105), (1, 106), (1, 107)] + [(2, 100 + i) for i in range(8)]
