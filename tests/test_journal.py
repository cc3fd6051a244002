"""The panda journal: exported from a run's store (babysit.instruments.journal), checked when read,
and replayed on a fresh run (babysit.journal_replay) to the same weights, bit for bit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import babysit
from babysit import commands as cmd
from babysit.errors import SettingsError
from babysit.instruments.journal import export_journal, read_journal
from babysit.store import RunStore
from tests.conftest import babysit_cli, cli_here, tiny_data, wait_for

FAST = ("--job", "digits", "--epoch-passes", "1", "--batch-size", "64")  # 23 steps per epoch


# -- a synthetic store: two rollbacks, exported exactly --------------------------------------------
def _command(store: RunStore, kind: str, args: dict[str, Any], *, branch: int, step: int,
             result: dict[str, Any], source: str = "page", wall: float) -> int:
    cur = store.conn().execute(
        "INSERT INTO commands (created, source, kind, args, state, branch, step, done_at, result)"
        " VALUES (?, ?, ?, ?, 'applied', ?, ?, ?, ?)",
        (wall - 1, source, kind, json.dumps(args), branch, step, wall, json.dumps(result)))
    return int(cur.lastrowid)


def _checkpoint(store: RunStore, *, branch: int, epoch: int, step: int, lr: float, momentum: float = 0.9,
                reason: str = "epoch", step_in_epoch: int = 10) -> int:
    return store.add_checkpoint(branch=branch, epoch=epoch, step=step, step_in_epoch=step_in_epoch,
                                file=f"b{branch}-s{step}.pt", sha256="0" * 64, size=1,
                                hparams={"lr": lr, "momentum": momentum}, metrics={}, reason=reason)


def synthetic_run(run_dir: Path) -> RunStore:
    """Ten steps an epoch. Branch 1: lr 0.1 → 0.05 at step 5, an epoch-1 checkpoint (#1, step 10),
    then momentum 0.8 at the first boundary of epoch 2 (after #1), #2 at step 20, lr 0.01 at 25;
    rolled back at step 27 to #2 keeping the current hyperparameters with lr 0.02 → branch 2; lr
    0.03 at 30 (epoch 3's last boundary), #3 at 30; rolled back at 33 to #1 with the checkpoint's
    hyperparameters → branch 3; lr 0.2 at 10 (epoch 2's first boundary), #4 at step 20. And a probe
    from #1 (branches 4 and 5)."""
    store = RunStore(run_dir, create=True)
    store.set_meta("config", {"seed": 0, "epochs": 3})
    b1 = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0,
                          hparams={"lr": 0.1, "momentum": 0.9})
    _command(store, cmd.SET_LR, {"value": 0.05}, branch=b1, step=5, wall=1000,
             result={"before": 0.1, "after": 0.05, "step_in_epoch": 5})
    c1 = _checkpoint(store, branch=b1, epoch=1, step=10, lr=0.05)
    _command(store, cmd.SET_MOMENTUM, {"value": 0.8}, branch=b1, step=10, wall=1010, source="cli",
             result={"before": 0.9, "after": 0.8, "step_in_epoch": 0})
    c2 = _checkpoint(store, branch=b1, epoch=2, step=20, lr=0.05, momentum=0.8)
    _command(store, cmd.SET_LR, {"value": 0.01}, branch=b1, step=25, wall=1020,
             result={"before": 0.05, "after": 0.01, "step_in_epoch": 5})
    b2 = store.new_branch(parent=b1, from_checkpoint=c2, start_step=20, start_epoch=2,
                          hparams={"lr": 0.02, "momentum": 0.8})
    _command(store, cmd.ROLLBACK, {"checkpoint": c2, "hparams": "current", "lr": 0.02}, branch=b1, step=27,
             wall=1030, result={"branch": b2, "epoch": 2, "step": 20, "checkpoint": c2, "lr": 0.02, "momentum": 0.8,
                                "before": {"lr": 0.01, "momentum": 0.8}})
    _command(store, cmd.SET_LR, {"value": 0.03}, branch=b2, step=30, wall=1040,
             result={"before": 0.02, "after": 0.03, "step_in_epoch": 10})
    _checkpoint(store, branch=b2, epoch=3, step=30, lr=0.03, momentum=0.8)
    b3 = store.new_branch(parent=b1, from_checkpoint=c1, start_step=10, start_epoch=1,
                          hparams={"lr": 0.05, "momentum": 0.9})
    _command(store, cmd.ROLLBACK, {"checkpoint": c1, "hparams": "checkpoint"}, branch=b2, step=33, wall=1050,
             result={"branch": b3, "epoch": 1, "step": 10, "checkpoint": c1, "lr": 0.05, "momentum": 0.9,
                     "before": {"lr": 0.03, "momentum": 0.8}})
    _command(store, cmd.SET_LR, {"value": 0.2}, branch=b3, step=10, wall=1060,
             result={"before": 0.05, "after": 0.2, "step_in_epoch": 0})
    c4 = _checkpoint(store, branch=b3, epoch=2, step=20, lr=0.2)
    # A probe of lr ×½ and ×2 from #1, on branch 1's line: history only (the person chose nothing from it).
    probe = store.add_excursion(kind="probe", command=None, origin_branch=b1, origin_step=10, from_checkpoint=c1,
                                return_checkpoint=c1, spec={"param": "lr", "values": [0.025, 0.1], "steps": 5})
    for order, value in enumerate((0.025, 0.1)):
        probe_branch = store.new_branch(parent=b1, from_checkpoint=c1, start_step=10, start_epoch=1,
                                        hparams={"lr": value, "momentum": 0.9})
        store.add_excursion_branch(excursion=probe, branch=probe_branch, ord=order, param="lr", value=value, steps=5)
        store.finish_excursion_branch(probe_branch, end_checkpoint=None, result={"loss": 1.0 - order / 10})
    store.finish_excursion(probe, "done", message="2 probes of 5 steps", result={"best": 0.1})
    store.conn().execute("UPDATE excursions SET created = 1015")
    store.write_status(state="stopped", branch=b3, step=20, epoch=2)
    assert (b1, b2, b3, c4) == (1, 2, 3, 4)
    return store


def test_the_journal_of_a_run_with_two_rollbacks(tmp_path: Path) -> None:
    store = synthetic_run(tmp_path / "r")
    found = export_journal(store)
    assert found["babysit_journal"] == 1
    assert found["run"] == {"run_dir": str(tmp_path / "r"), "config": {"seed": 0, "epochs": 3}}
    assert found["to"] == {"checkpoint": 4, "branch": 3, "epoch": 2, "step": 20, "reason": "epoch", "metrics": {},
                           "hparams": {"lr": 0.2, "momentum": 0.9}}
    assert found["lineage"] == [
        {"branch": 1, "parent": None, "from_checkpoint": None, "start_step": 0, "until_step": 10},
        {"branch": 3, "parent": 1, "from_checkpoint": 1, "start_step": 10, "until_step": 20},
    ]
    # Branch 2 is a dead end: its nudge and the rollback that created it are not on the way to #4.
    assert found["history"] == [
        {"kind": "set_lr", "value": 0.05, "before": 0.1, "step": 5, "at": "step", "branch": 1, "source": "page",
         "command": 1, "time": "1970-01-01T00:16:40Z", "text": "set lr 0.05"},
        {"kind": "probe", "excursion": 1, "step": 10, "at": "step", "branch": 1, "state": "done",
         "spec": {"param": "lr", "values": [0.025, 0.1], "steps": 5},
         "tried": [{"branch": 4, "param": "lr", "value": 0.025, "steps": 5, "result": {"loss": 1.0}},
                   {"branch": 5, "param": "lr", "value": 0.1, "steps": 5, "result": {"loss": 0.9}}],
         "result": {"best": 0.1}, "message": "2 probes of 5 steps", "source": "trainer", "command": None,
         "time": "1970-01-01T00:16:55Z"},
        {"kind": "rollback", "checkpoint": 1, "step": 10, "at": "epoch_start", "branch": 3, "from_branch": 2,
         "from_step": 33, "hparams": "checkpoint", "after": {"lr": 0.05, "momentum": 0.9}, "source": "page",
         "command": 6, "time": "1970-01-01T00:17:30Z", "text": "rollback to #1 (checkpoint hparams)"},
        {"kind": "set_lr", "value": 0.2, "before": 0.05, "step": 10, "at": "epoch_start", "branch": 3,
         "source": "page", "command": 7, "time": "1970-01-01T00:17:40Z", "text": "set lr 0.2"},
    ]
    assert found["schedule"] == [
        {"step": 5, "at": "step", "set": "lr", "value": 0.05, "from": "command #1"},
        {"step": 10, "at": "epoch_start", "set": "lr", "value": 0.2, "from": "command #7"},
    ]
    # To #3, on branch 2: the nudges of branch 1 up to #2 (the momentum after #1 included), then the
    # rollback's "current" (lr 0.01 at the cut) and its lr 0.02 at the fork, then branch 2's own.
    to_3 = export_journal(store, to=3)
    assert [(h["kind"], h["branch"], h["step"]) for h in to_3["history"]] == [
        ("set_lr", 1, 5), ("probe", 1, 10), ("set_momentum", 1, 10), ("rollback", 2, 20), ("set_lr", 2, 30)]
    assert to_3["schedule"] == [
        {"step": 5, "at": "step", "set": "lr", "value": 0.05, "from": "command #1"},
        {"step": 10, "at": "epoch_start", "set": "momentum", "value": 0.8, "from": "command #2"},
        {"step": 20, "at": "epoch_start", "set": "lr", "value": 0.01, "from": "rollback #4"},
        {"step": 20, "at": "epoch_start", "set": "lr", "value": 0.02, "from": "rollback #4"},
        {"step": 30, "at": "step", "set": "lr", "value": 0.03, "from": "command #5"},
    ]
    assert read_journal(json.loads(json.dumps(to_3))) == to_3  # what is written reads back


def test_a_rollback_that_skipped_batches_is_a_skip_at_its_fork(tmp_path: Path) -> None:
    """A rollback to a checkpoint taken inside an epoch (#2 at step 14, its 4th batch) that skipped
    200 batches of the data order: in history with its skip, and in the schedule as a skip at the
    fork, on the fork's side of the boundary, that reads back."""
    store = RunStore(tmp_path / "r", create=True)
    b1 = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0,
                          hparams={"lr": 0.1, "momentum": 0.9})
    _checkpoint(store, branch=b1, epoch=1, step=10, lr=0.1)
    c2 = _checkpoint(store, branch=b1, epoch=2, step=14, lr=0.1, reason="periodic", step_in_epoch=4)
    b2 = store.new_branch(parent=b1, from_checkpoint=c2, start_step=14, start_epoch=2,
                          hparams={"lr": 0.1, "momentum": 0.9})
    _command(store, cmd.ROLLBACK, {"checkpoint": c2, "hparams": "checkpoint", "skip_batches": 200}, branch=b1,
             step=19, wall=1000, source="cli", result={"branch": b2, "epoch": 2, "step": 14, "checkpoint": c2,
                                                       "lr": 0.1, "momentum": 0.9})
    _checkpoint(store, branch=b2, epoch=2, step=18, lr=0.1, reason="periodic", step_in_epoch=208)
    store.write_status(state="stopped", branch=b2, step=18, epoch=2)
    found = export_journal(store)
    (rollback,) = [h for h in found["history"] if h["kind"] == "rollback"]
    assert (rollback["checkpoint"], rollback["step"], rollback["at"], rollback["skip_batches"], rollback["text"]) == (
        2, 14, "step", 200, "rollback to #2 (checkpoint hparams, skipping 200 batches)")
    assert found["schedule"] == [{"step": 14, "at": "step", "skip_batches": 200, "from": "rollback #1"}]
    assert read_journal(json.loads(json.dumps(found))) == found


@pytest.mark.parametrize("skip, message", [
    (0, "skip_batches must be a whole number of batches from 1 to 1000000000, got 0"),
    ("200", "skip_batches must be a whole number, got '200'"),
    (2.5, "skip_batches must be a whole number, got 2.5"),
    (True, "skip_batches must be a whole number, got True"),
])
def test_a_journal_s_skip_that_is_not_a_whole_number_of_batches_is_refused(skip: Any, message: str) -> None:
    journal = {"babysit_journal": 1, "schedule": [{"step": 3, "at": "step", "skip_batches": skip}]}
    with pytest.raises(SettingsError, match=rf"^the journal: schedule\[0\]: {re.escape(message)}$"):
        read_journal(journal)


def test_the_cli_prints_the_journal_and_names_what_it_cannot_find(tmp_path: Path) -> None:
    synthetic_run(tmp_path / "r")
    printed = cli_here("journal", "--run-dir", str(tmp_path / "r"), "--to", "3")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == export_journal(RunStore(tmp_path / "r"), to=3)
    unknown = cli_here("journal", "--run-dir", str(tmp_path / "r"), "--to", "9")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "checkpoint #9 does not exist in run" in unknown.stderr and "available: #1, #2, #3, #4" in unknown.stderr
    empty = tmp_path / "empty"
    RunStore(empty, create=True)
    none = cli_here("journal", "--run-dir", str(empty))
    assert none.returncode == 2 and "has no checkpoint yet" in none.stderr


@pytest.mark.parametrize("change, message", [
    (lambda j: j.update(babysit_journal=2), "journal format version 2; this babysit reads version 1 only"),
    (lambda j: j.pop("babysit_journal"), "is not a babysit journal"),
    (lambda j: j["schedule"][0].update(value=-1), r"schedule\[0\]: lr must be a finite number > 0"),
    (lambda j: j["schedule"][0].update(at="later"), r"schedule\[0\]: at must be 'step' or 'epoch_start', got 'later'"),
    (lambda j: j["schedule"].reverse(), r"schedule\[1\] \(step 5, step\) comes before the entry above it"),
    (lambda j: j["run"].update(config=[1]), r"the run's 'config' must be an object, got \[1\]"),
])
def test_a_journal_that_cannot_be_replayed_is_refused_before_anything_starts(
        tmp_path: Path, change: Callable[[dict[str, Any]], Any], message: str) -> None:
    journal = export_journal(synthetic_run(tmp_path / "r"))
    change(journal)
    with pytest.raises(SettingsError, match=message):
        read_journal(journal)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(journal))
    with pytest.raises(SettingsError, match=message):
        anneal_loop(tmp_path / "never", replay=str(path))
    assert not (tmp_path / "never").exists()
    refused = cli_here("train", "--run-dir", str(tmp_path / "never"), "--replay", str(path))
    assert refused.returncode == 2 and "--replay:" in refused.stderr and not (tmp_path / "never").exists()


def test_the_journal_checks_every_whole_number_setting_of_the_built_in_jobs() -> None:
    # The journal reader names the settings it checks (it must not import the jobs, which load torch).
    import dataclasses

    from babysit.instruments.journal import TEXT_SETTINGS, WHOLE_NUMBER_SETTINGS
    from babysit.jobs import JOBS

    for job in JOBS.values():
        config_class, _ = job.load()
        fields = {f.name: f.type for f in dataclasses.fields(config_class)}
        assert {name for name, kind in fields.items() if kind == "int"} - {"seed"} <= set(WHOLE_NUMBER_SETTINGS)
        assert {name for name, kind in fields.items() if kind == "str"} <= set(TEXT_SETTINGS) - {"job"}


def test_a_loaded_journal_that_contains_itself_is_refused_as_too_deep(tmp_path: Path) -> None:
    journal = export_journal(synthetic_run(tmp_path / "r"))
    journal["history"].append(journal)
    with pytest.raises(SettingsError, match=r"^the journal nests deeper than 32 levels; a journal nests a few levels"):
        read_journal(journal)


# -- replayed in process: a loop that anneals its own lr at every epoch end ------------------------
def anneal_loop(run_dir: Path, *, epochs: int = 4, replay: Any = None,
                on_step: Callable[[Any], None] | None = None,
                on_epoch_end: Callable[[Any], None] | None = None, **run_kwargs: Any) -> nn.Module:
    """8 steps an epoch; the loop halves the lr after each epoch's evaluation."""
    torch.manual_seed(0)
    loader = DataLoader(tiny_data(0), batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with babysit.Run(run_dir, model, optimizer, config={"seed": 0}, replay=replay, **run_kwargs) as run:
        for _epoch in run.epochs(epochs):
            for x, y in run.batches(loader):
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                run.log(loss=loss)
                if on_step is not None:
                    on_step(run)
            if not run.interrupted:
                run.log_epoch(val_loss=float(loss.detach()))
                run.lr = run.lr * 0.5  # the loop's own anneal, at the epoch's end
            if on_epoch_end is not None:
                on_epoch_end(run)
    return model


def test_a_replay_applies_each_setting_on_its_side_of_the_loop_s_epoch_end(tmp_path: Path) -> None:
    # Sent during epoch 1's last step: applied at its last boundary (step 8), before the anneal.
    # Sent after epoch 2's end: applied at epoch 3's first boundary (also step 16), after it. At
    # step 27 a rollback to epoch 2's checkpoint keeps the current lr and sets momentum 0.5.
    def person(run: Any) -> None:
        if run.branch == 1 and run.step == 8:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.04}, source="test")
        if run.branch == 1 and run.step == 20:
            run.store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.8}, source="test")
        if run.branch == 1 and run.step == 27:
            run.checkpointer.wait()  # epoch 2's checkpoint is written in the background: listed once written
            epoch_2 = next(c for c in run.store.checkpoints() if c["epoch"] == 2)
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": epoch_2["id"], "hparams": "current",
                                                     "momentum": 0.5}, source="test")

    def after_epoch_end(run: Any) -> None:
        if run.branch == 1 and run.epoch == 2:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.3}, source="test")

    babysat = anneal_loop(tmp_path / "babysat", on_step=person, on_epoch_end=after_epoch_end)
    store = RunStore(tmp_path / "babysat")
    applied = [(c["kind"], c["step"], (c["result"] or {}).get("step_in_epoch")) for c in store.commands()]
    assert applied == [(cmd.SET_LR, 8, 8), (cmd.SET_LR, 16, 0), (cmd.SET_MOMENTUM, 20, 4), (cmd.ROLLBACK, 27, None)]
    journal = export_journal(store)
    # Epoch 2's checkpoint (step 16) holds the first nudge, not the second; the rollback's "current"
    # is what the cut had (lr 0.3 annealed once, momentum 0.8), then its momentum 0.5: all after
    # epoch 2's end.
    assert [(s["step"], s["at"], s["set"], s["value"]) for s in journal["schedule"]] == [
        (8, "step", "lr", 0.04), (16, "epoch_start", "lr", 0.15), (16, "epoch_start", "momentum", 0.8),
        (16, "epoch_start", "momentum", 0.5)]
    path = tmp_path / "journal.json"
    path.write_text(json.dumps(journal))

    replayed = anneal_loop(tmp_path / "replayed", replay=str(path))
    for a, b in zip(babysat.state_dict().values(), replayed.state_dict().values()):
        assert torch.equal(a, b)
    again = RunStore(tmp_path / "replayed")
    assert [c["source"] for c in again.commands()] == ["replay"] * len(journal["schedule"])
    [event] = again.events(kinds=("replay",))
    assert f"replaying the journal of {str(tmp_path / 'babysat')!r} to checkpoint #" in event["message"]
    # The replay's own journal is the same schedule: a replay can itself be replayed.
    assert [{k: s[k] for k in ("step", "at", "set", "value")} for s in export_journal(again)["schedule"]] == [
        {k: s[k] for k in ("step", "at", "set", "value")} for s in journal["schedule"]]


def test_a_replay_through_a_rollback_to_a_checkpoint_taken_inside_an_epoch(tmp_path: Path) -> None:
    # At step 5: lr 0.05, then "checkpoint now", then lr 0.2, all at one boundary; the checkpoint
    # holds the first nudge only. At step 13 a rollback to it with the checkpoint's hyperparameters:
    # the run goes on from inside epoch 1, and the journal's line holds the first nudge, not the second.
    def person(run: Any) -> None:
        if run.branch == 1 and run.step == 5:
            for kind, args in ((cmd.SET_LR, {"value": 0.05}), (cmd.CHECKPOINT, {}), (cmd.SET_LR, {"value": 0.2})):
                run.store.enqueue_command(kind, args, source="test")
        if run.branch == 1 and run.step == 13:
            run.checkpointer.wait()
            inside = next(c for c in run.store.checkpoints() if c["reason"] == "command")
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": inside["id"]}, source="test")
        if run.branch == 2 and run.step == 7:
            run.store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.7}, source="test")

    babysat = anneal_loop(tmp_path / "babysat", epochs=3, on_step=person)
    journal = export_journal(RunStore(tmp_path / "babysat"))
    assert [(s["step"], s["at"], s["set"], s["value"]) for s in journal["schedule"]] == [
        (5, "step", "lr", 0.05), (7, "step", "momentum", 0.7)]
    replayed = anneal_loop(tmp_path / "replayed", epochs=3, replay=journal)
    for a, b in zip(babysat.state_dict().values(), replayed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fork", ["periodic", "epoch"])
def test_a_rollback_that_skipped_batches_replays_from_its_journal_to_the_same_weights(tmp_path: Path, fork: str) -> None:
    """Rolled back at step 13 to a checkpoint inside epoch 1 (a periodic one, step 3) or to epoch
    1's own (step 8), skipping 2 batches of the data order: the journal's replay skips them at the
    same point, to the same weights; the epoch it skipped in ends 2 steps early in both."""
    def person(run: Any) -> None:
        if run.branch == 1 and run.step == 13:
            run.checkpointer.wait()
            target = next(c for c in run.store.checkpoints() if c["reason"] == fork)
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": target["id"], "skip_batches": 2}, source="test")

    babysat = anneal_loop(tmp_path / "babysat", epochs=3, on_step=person, checkpoint_every_steps=3)
    store = RunStore(tmp_path / "babysat")
    journal = export_journal(store)
    step = 3 if fork == "periodic" else 8
    assert [(s["step"], s["skip_batches"]) for s in journal["schedule"] if "skip_batches" in s] == [(step, 2)]
    replayed = anneal_loop(tmp_path / "replayed", epochs=3, replay=journal, checkpoint_every_steps=3)
    for a, b in zip(babysat.state_dict().values(), replayed.state_dict().values()):
        assert torch.equal(a, b)
    again = RunStore(tmp_path / "replayed")
    assert [e["step"] for e in again.events() if e["kind"] == "data_skip"] == [step]
    assert again.status()["step"] == store.status()["step"] == 22  # 3 epochs of 8 batches, 2 of them skipped


def test_a_setting_this_optimizer_cannot_take_is_refused_and_the_replay_goes_on(tmp_path: Path) -> None:
    journal = {"babysit_journal": 1, "run": {"run_dir": "elsewhere", "config": {}}, "to": {"checkpoint": 1},
               "schedule": [{"step": 2, "at": "step", "set": "momentum", "value": 0.5},
                            {"step": 3, "at": "step", "set": "lr", "value": 0.02}]}
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    with babysit.Run(tmp_path / "r", model, optimizer, replay=journal) as run:
        for _epoch in run.epochs(1):
            for x, y in run.batches(DataLoader(tiny_data(0), batch_size=8)):
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 0.02
    rows = RunStore(tmp_path / "r").commands()
    assert [(c["kind"], c["state"], c["step"], c["source"]) for c in rows] == [
        (cmd.SET_MOMENTUM, cmd.REJECTED, 2, "replay"), (cmd.SET_LR, cmd.APPLIED, 3, "replay")]
    assert "Adagrad has no momentum to set" in rows[0]["reason"]


def test_a_resume_re_applies_a_nudge_on_its_side_of_the_epoch_s_end(tmp_path: Path) -> None:
    # The same record serves the replay after a crash: a nudge applied after epoch 2's end (step 16,
    # after the loop's anneal), then a trainer that died in epoch 3 and left only epoch 1's
    # checkpoint. The resume re-applies the nudge after epoch 2's anneal again, not before it.
    def nudge_after_epoch_2(run: Any) -> None:
        if run.epoch == 2:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.3}, source="test")

    def stop_at_20(run: Any) -> None:
        if run.step == 20:
            run.request_stop("test")

    straight = anneal_loop(tmp_path / "straight", on_epoch_end=nudge_after_epoch_2)
    cut = tmp_path / "cut"
    anneal_loop(cut, on_epoch_end=nudge_after_epoch_2, on_step=stop_at_20)
    store = RunStore(cut)
    assert [(c["step"], c["reason"]) for c in store.checkpoints()] == [(8, "epoch"), (16, "epoch"), (20, "stop")]
    for lost in store.checkpoints()[1:]:
        store.mark_checkpoint_deleted(lost["id"])
    resumed = anneal_loop(cut)
    assert "1 applied nudges will be re-applied" in store.events(kinds=("resume",))[-1]["message"]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# -- THE test: a babysat digits run, its journal, and a replay to the same weights -----------------
def _checkpoint_of_epoch(run_dir: Path, branch: int, after_step: int) -> dict[str, Any] | None:
    listed = RunStore(run_dir).checkpoints()
    return next((c for c in listed if c["branch"] == branch and c["reason"] == "epoch" and c["step"] > after_step), None)


def _applied_step(printed: Any) -> int:
    assert printed.returncode == 0, printed.stderr
    return int(printed.stdout.split("applied at step ")[1].split()[0].rstrip(","))


def test_a_replay_of_a_babysat_digits_run_reproduces_its_weights_bit_for_bit(tmp_path: Path, trainers) -> None:
    babysat, replayed = tmp_path / "babysat", tmp_path / "replayed"
    d = ("--run-dir", str(babysat))
    trainer = trainers(babysat, "--epochs", "400", *FAST)
    trainer.wait_running(min_step=3)
    # The person: lr and momentum nudges wherever they land (an epoch's edge included), a rollback
    # to the checkpoint after them that keeps the current hyperparameters and sets an lr, one more.
    _applied_step(cli_here("set", "lr", "0.03", *d, "--wait"))
    first = wait_for(lambda: _checkpoint_of_epoch(babysat, 1, 0), what="epoch 1's checkpoint")
    momentum_step = _applied_step(cli_here("set", "momentum", "0.8", *d, "--wait"))
    fork = wait_for(lambda: _checkpoint_of_epoch(babysat, 1, momentum_step), what="a checkpoint after the momentum")
    wait_for(lambda: _checkpoint_of_epoch(babysat, 1, fork["step"]), what="a later checkpoint")
    rolled = cli_here("rollback", str(fork["id"]), "--hparams", "current", "--lr", "0.02", *d, "--wait")
    assert rolled.returncode == 0 and "branch 2" in rolled.stdout, rolled.stderr
    last_nudge = _applied_step(cli_here("set", "lr", "0.01", *d, "--wait"))
    target = wait_for(lambda: _checkpoint_of_epoch(babysat, 2, last_nudge), what="a checkpoint after the last nudge")
    assert cli_here("stop", *d, "--wait").returncode == 0
    assert trainer.wait_exit(timeout=120) == 0

    exported = babysit_cli("journal", *d, "--to", str(target["id"]))  # the real command, its stdout the file
    assert exported.returncode == 0, exported.stderr
    journal = json.loads(exported.stdout)
    assert [h["kind"] for h in journal["history"]] == ["set_lr", "set_momentum", "rollback", "set_lr"]
    # The rollback kept what the fork checkpoint holds anyway (lr 0.03, momentum 0.8): its one setting is the lr.
    assert [(s["set"], s["value"], s["from"].split()[0]) for s in journal["schedule"]] == [
        ("lr", 0.03, "command"), ("momentum", 0.8, "command"), ("lr", 0.02, "rollback"), ("lr", 0.01, "command")]
    path = tmp_path / "journal.json"
    path.write_text(exported.stdout)

    # A fresh run, no person: the journal's job, config and settings, up to the checkpoint's epoch.
    again = trainers(replayed, "--replay", str(path))
    assert again.wait_exit(timeout=300) == 0, again.output()
    store = RunStore(replayed)
    final = store.checkpoints()[-1]
    assert (final["branch"], final["epoch"], final["step"]) == (1, target["epoch"], target["step"])
    assert [c["source"] for c in store.commands()] == ["replay"] * len(journal["schedule"])
    assert store.events(kinds=("replay",))[0]["data"]["to"]["checkpoint"] == target["id"]
    original = torch.load(babysat / target["file"], weights_only=True)["model"]
    reproduced = torch.load(replayed / final["file"], weights_only=True)["model"]
    assert list(original) == list(reproduced)
    assert all(torch.equal(original[name], reproduced[name]) for name in original)


# -- the page: the journal of the checkpoint chosen in "Roll back to", downloaded ----------------
def test_the_page_downloads_the_journal_of_the_chosen_checkpoint(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO, chromium_page, wait_healthy

    synthetic_run(tmp_path / "run").close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "streamlit.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.address", "127.0.0.1",
             "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none", "--", "--root", str(tmp_path), "--run", str(tmp_path / "run")],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, server, log_path)
            with chromium_page() as (page, errors):
                page.goto(url)
                page.get_by_role("button", name="Journal to #4").click()
                download_button = page.get_by_role("button", name="Download run-journal-to-4.json")
                with page.expect_download() as download:
                    download_button.click()
                saved = json.loads(Path(download.value.path()).read_text())
                assert download.value.suggested_filename == "run-journal-to-4.json"
                assert saved == export_journal(RunStore(tmp_path / "run"), to=4)
                assert errors == []
        finally:
            server.terminate()
            server.wait(timeout=20)


def test_the_readme_s_example_is_a_journal_this_babysit_reads() -> None:
    from tests.conftest import REPO

    section = (REPO / "docs" / "instruments.md").read_text().split("## The panda journal", 1)[1]
    example = section.split("```json\n", 1)[1].split("```", 1)[0]
    assert read_journal(json.loads(example))["schedule"][-1] == {
        "step": 300, "at": "epoch_start", "set": "lr", "value": 0.05, "from": "rollback #9"}
