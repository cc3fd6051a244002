"""Probe sets and lr sweeps on the trainer side (babysit.excursion_runner): in-process runs of the
tiny job for the rules, a real trainer subprocess for kill -9 and for the CLI end to end."""

from __future__ import annotations


import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from babysit import commands as cmd
from babysit.instruments.probes import read_probes, winner
from babysit.instruments.sweep import read_sweep
from babysit.store import RunStore
from tests.conftest import babysit_cli, cli_here, tiny_job, wait_for


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


def loss_steps(store: RunStore, branch: int) -> list[int]:
    info = next(s for s in store.series() if s.name == "loss" and s.branch == branch and s.segment == 0)
    return store.chunk_points(info.id)[0].tolist()


def send_at(step: int, kind: str, args: dict[str, Any] | None = None) -> Any:
    """An on_step hook that queues one command after ``step`` (applied at that step's boundary)."""
    def on_step(run: Any, now: int) -> None:
        if now == step and run.branch == 1:
            run.store.enqueue_command(kind, args or {}, source="test")
    return on_step


def resume_when_paused(run_dir: Path) -> threading.Thread:
    """A person who resumes the run once it pauses (after an excursion that ends in a pause)."""
    def watch() -> None:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), what="the run store")
        try:
            wait_for(lambda: store.status().get("state") == "paused", timeout=120, what="the pause")
        finally:  # resumed, or, if the pause never came, the run is not left waiting for ever
            store.enqueue_command(cmd.RESUME, {}, source="test")
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_probe_set_from_now_tries_each_value_and_leaves_the_run_exactly_as_it_was(tmp_path: Path) -> None:
    _, straight = tiny_job(tmp_path / "straight", epochs=3)
    probe = {"factors": "0.5, 1, 2", "steps": 4, "then": "continue"}
    run, probed = tiny_job(tmp_path / "probed", epochs=3, on_step=send_at(10, cmd.PROBE, probe))
    assert same_weights(straight, probed)  # the main line is bit-identical to a run without probes
    store = RunStore(tmp_path / "probed")
    (excursion,) = store.excursions()
    assert (excursion["state"], excursion["origin_branch"], excursion["origin_step"]) == ("done", 1, 10)
    assert excursion["from_checkpoint"] == excursion["return_checkpoint"]
    readings = read_probes(store, excursion["id"])
    assert [(r.value, r.steps_done, r.start_step, r.diverged) for r in readings] == [
        (0.05, 4, 10, False), (0.1, 4, 10, False), (0.2, 4, 10, False)]
    for reading in readings:
        assert loss_steps(store, reading.branch) == [11, 12, 13, 14]
        end = store.checkpoint(reading.end_checkpoint)
        assert (end["branch"], end["step"], end["reason"], end["hparams"]["lr"]) == (reading.branch, 14, "probe",
                                                                                    reading.value)
        branch = store.branch(reading.branch)
        assert (branch["parent"], branch["from_checkpoint"], branch["start_step"]) == (1, excursion["from_checkpoint"],
                                                                                       10)
    # The lr ×1 probe trained what the main line trained next: the same losses, step for step.
    main_info = next(s for s in store.series() if s.name == "loss" and s.branch == 1)
    steps, values, _ = store.chunk_points(main_info.id)
    probe_info = next(s for s in store.series() if s.name == "loss" and s.branch == readings[1].branch)
    assert store.chunk_points(probe_info.id)[1].tolist() == values[10:14].tolist()
    assert steps.tolist() == list(range(1, 25))  # nothing of the probes on the main line
    assert [c["branch"] for c in store.checkpoints() if c["reason"] == "epoch"] == [1, 1, 1]
    assert winner(readings) is not None
    assert run.branch == 1


def hooks(*pairs: tuple[int, str, dict[str, Any]]) -> Any:
    """An on_step hook that queues each (step, kind, args) once, on whatever branch the run is."""
    sent: set[int] = set()

    def on_step(run: Any, now: int) -> None:
        for i, (step, kind, args) in enumerate(pairs):
            if now == step and i not in sent:
                sent.add(i)
                run.store.enqueue_command(kind, args, source="test")
    return on_step


def rejections(store: RunStore) -> dict[str, str]:
    return {c["kind"]: c["reason"] for c in store.commands() if c["state"] == cmd.REJECTED}


def test_a_sweep_restores_the_exact_pre_sweep_state(tmp_path: Path) -> None:
    _, straight = tiny_job(tmp_path / "straight", epochs=3)
    resume_when_paused(tmp_path / "swept")
    _, swept = tiny_job(tmp_path / "swept", epochs=3, on_step=send_at(10, cmd.SWEEP, {"steps": 12}))
    assert same_weights(straight, swept)
    store = RunStore(tmp_path / "swept")
    (excursion,) = store.excursions()
    assert (excursion["kind"], excursion["state"]) == ("sweep", "done")
    assert excursion["spec"]["lr_min"] == pytest.approx(1e-4) and excursion["spec"]["lr_max"] == pytest.approx(10.0)
    reading = read_sweep(store, excursion["id"])
    assert len(reading.lrs) == len(reading.losses) >= 2
    expected = 1e-4 * (1e5) ** (np.arange(len(reading.lrs)) / 11)  # lr_i = lr_min·(lr_max/lr_min)^(i/(steps-1))
    np.testing.assert_allclose(reading.lrs, expected, rtol=1e-12)
    (branch,) = excursion["branches"]
    assert branch["end_checkpoint"] is None  # no end checkpoint for a sweep
    assert loss_steps(store, 1) == list(range(1, 25))


def test_a_diverging_sweep_stops_early_and_the_guard_neither_pauses_nor_rolls_back(tmp_path: Path) -> None:
    resume_when_paused(tmp_path / "r")
    tiny_job(tmp_path / "r", epochs=8, on_step=send_at(3, cmd.SWEEP, {"steps": 40, "lr_min": 1e-3, "lr_max": 1e12}))
    store = RunStore(tmp_path / "r")
    (excursion,) = store.excursions()
    (branch,) = excursion["branches"]
    assert branch["result"]["diverged"] is True
    assert branch["result"]["steps_done"] < 40
    assert read_sweep(store, excursion["id"]).divergence_lr is not None
    guard_commands = [c for c in store.commands() if c["source"] == "guard"]
    assert guard_commands == []
    assert store.status()["state"] == "finished"
    assert loss_steps(store, 1) == list(range(1, 65))


def test_a_diverging_probe_ends_early_with_that_fact_and_the_others_go_on(tmp_path: Path) -> None:
    probe = {"values": "0.05, 1e9", "steps": 6, "then": "continue"}
    tiny_job(tmp_path / "r", epochs=2, on_step=send_at(2, cmd.PROBE, probe))
    store = RunStore(tmp_path / "r")
    readings = read_probes(store, store.excursions()[0]["id"])
    assert [r.diverged for r in readings] == [False, True]
    assert readings[1].steps_done < 6 and readings[1].end_checkpoint is None
    assert winner(readings).value == 0.05
    assert [c for c in store.commands() if c["source"] == "guard"] == []
    assert store.status()["state"] == "finished"


def test_a_probe_from_a_checkpoint_forks_there_and_evaluates_each_probe(tmp_path: Path) -> None:
    from tests.conftest import tiny_data

    data = tiny_data(0)
    seen: dict[str, Any] = {}

    def evaluate() -> dict[str, float]:
        model = seen["run"].model
        model.eval()  # left in eval mode and an RNG drawn on purpose: neither may reach the run
        torch.rand(3)
        return {"val_loss": float(torch.nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]))}

    def remember(run: Any, step: int) -> None:
        seen["run"] = run
        if step == 12 and run.branch == 1:
            run.checkpointer.wait()  # epoch 1's checkpoint is listed
            run.store.enqueue_command(cmd.PROBE, {"checkpoint": 1, "values": [0.01, 0.3], "steps": 3,
                                                  "then": "continue"}, source="test")

    _, straight = tiny_job(tmp_path / "straight", epochs=3)
    _, probed = tiny_job(tmp_path / "probed", epochs=3, on_step=remember, evaluate=evaluate)
    assert same_weights(straight, probed)
    store = RunStore(tmp_path / "probed")
    (excursion,) = store.excursions()
    assert (excursion["from_checkpoint"], excursion["origin_step"]) == (1, 12)
    assert store.checkpoint(excursion["return_checkpoint"])["step"] == 12
    readings = read_probes(store, excursion["id"])
    assert [(r.value, r.start_step, r.steps_done) for r in readings] == [(0.01, 8, 3), (0.3, 8, 3)]
    assert all(loss_steps(store, r.branch) == [9, 10, 11] for r in readings)
    assert all(set(r.evaluation) == {"val_loss"} for r in readings)
    assert readings[0].evaluation != readings[1].evaluation
    assert set(excursion["result"]["origin_evaluation"]) == {"val_loss"}


def test_momentum_probes_scale_one_minus_beta_and_refuse_a_momentum_out_of_range(tmp_path: Path) -> None:
    tiny_job(tmp_path / "r", epochs=1, on_step=hooks(
        (2, cmd.PROBE, {"param": "momentum", "factors": [0.5, 20], "steps": 2}),
        (3, cmd.PROBE, {"param": "momentum", "factors": [0.5, 2], "steps": 2, "then": "continue"})))
    store = RunStore(tmp_path / "r")
    (reason,) = [c["reason"] for c in store.commands() if c["state"] == cmd.REJECTED]
    assert "momentum must be >= 0 and < 1" in reason and "×20" in reason
    (excursion,) = store.excursions()  # the refused one changed nothing
    assert [b["value"] for b in excursion["branches"]] == pytest.approx([0.95, 0.8])
    assert all(store.branch(b["branch"])["hparams"]["momentum"] == pytest.approx(b["value"])
               for b in excursion["branches"])


def test_a_probe_crossing_an_epoch_end_is_interrupted_there_and_writes_no_epoch_checkpoint(tmp_path: Path) -> None:
    """The loop's epoch-end code runs on the probe's branch with run.interrupted True, so a loop
    that keeps its best validation loss outside run.state (a plain local, as real scripts do) and
    guards it as the README says ends with the run's own best, not a probe's."""
    def keep_best(best: dict[str, Any], seen: list[tuple[int, bool]]) -> Any:
        def on_epoch_end(run: Any, _epoch: int) -> None:
            seen.append((run.branch, run.interrupted))
            if not run.interrupted:  # what a loop keeps of an epoch: here its weights, which a probe changes
                best.setdefault("kept", []).append(float(sum(p.detach().sum() for p in run.model.parameters())))
        return on_epoch_end
    straight_best: dict[str, Any] = {}
    probed_best: dict[str, Any] = {}
    seen: list[tuple[int, bool]] = []
    _, straight = tiny_job(tmp_path / "straight", epochs=3, on_epoch_end=keep_best(straight_best, []))
    run, probed = tiny_job(tmp_path / "probed", epochs=3, on_epoch_end=keep_best(probed_best, seen),
                           on_step=send_at(5, cmd.PROBE, {"values": [0.3], "steps": 6, "then": "continue"}))
    assert same_weights(straight, probed)
    assert probed_best == straight_best and len(straight_best["kept"]) == 3
    store = RunStore(tmp_path / "probed")
    (reading,) = read_probes(store, store.excursions()[0]["id"])
    assert seen[0] == (reading.branch, True) and all(not cut for branch, cut in seen if branch == 1)
    assert loss_steps(store, reading.branch) == list(range(6, 12))
    assert reading.epoch_metrics == {}  # log_epoch on the probe's branch is not kept either
    assert [(c["branch"], c["reason"]) for c in store.checkpoints() if c["reason"] != "excursion"] == [
        (reading.branch, "probe"), (1, "epoch"), (1, "epoch"), (1, "epoch")]


def test_a_probe_reaching_the_run_s_last_step_ends_there_and_the_run_finishes_on_its_branch(tmp_path: Path) -> None:
    _, straight = tiny_job(tmp_path / "straight", epochs=2)
    run, probed = tiny_job(tmp_path / "probed", epochs=2,
                           on_step=send_at(13, cmd.PROBE, {"values": [0.1, 0.2], "steps": 10, "then": "continue"}))
    assert same_weights(straight, probed)
    store = RunStore(tmp_path / "probed")
    readings = read_probes(store, store.excursions()[0]["id"])
    assert [r.steps_done for r in readings] == [3, 3]
    assert (store.status()["state"], store.status()["branch"], run.branch) == ("finished", 1, 1)


def test_during_a_probe_nudges_checkpoints_and_another_excursion_are_refused(tmp_path: Path) -> None:
    tiny_job(tmp_path / "r", epochs=1, on_step=hooks(
        (2, cmd.PROBE, {"values": [0.05, 0.2], "steps": 4, "then": "continue"}),
        (3, cmd.SET_LR, {"value": 0.3}), (3, cmd.CHECKPOINT, {}), (3, cmd.SWEEP, {"steps": 10}),
        (4, cmd.CANCEL, {"excursion": 7})))
    store = RunStore(tmp_path / "r")
    refused = rejections(store)
    assert refused[cmd.SET_LR].startswith("set lr 0.3 is refused while excursion #1, probe 1 of 2 (lr 0.05) runs")
    assert "cancel it" in refused[cmd.SET_LR]
    assert refused[cmd.CHECKPOINT].startswith("checkpoint is refused while excursion #1")
    assert refused[cmd.SWEEP] == "excursion #1 is running; cancel it first (python -m babysit cancel 1)"
    assert refused[cmd.CANCEL] == "excursion #7 is not running (there is no such excursion); nothing to cancel"
    assert store.excursions()[0]["state"] == "done"


def test_a_paused_run_probes_when_asked_and_pause_and_resume_work_during_a_probe(tmp_path: Path) -> None:
    """A person pauses, probes from the paused run, pauses and resumes it mid-probe, and resumes
    it after the probes (then="pause"): the run ends as if none of it had happened."""
    run_dir = tmp_path / "probed"
    failures: list[BaseException] = []

    def person() -> None:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), what="the run store")
        try:
            paused_on = lambda: (lambda s: s["branch"] if s.get("state") == "paused" else None)(store.status())  # noqa: E731
            wait_for(lambda: paused_on() == 1, what="the first pause")
            store.enqueue_command(cmd.PROBE, {"values": [0.05, 0.2], "steps": 6}, source="test")
            wait_for(lambda: paused_on() not in (None, 1), what="the pause in the first probe")
            store.enqueue_command(cmd.RESUME, {}, source="test")
            wait_for(lambda: paused_on() == 1 and store.excursions()[0]["state"] == "done", what="the probes' end")
            store.enqueue_command(cmd.RESUME, {}, source="test")
        except BaseException as error:  # never leave the run paused for ever: stop it, fail below
            failures.append(error)
            store.enqueue_command(cmd.STOP, {}, source="test")

    def pause_in_the_first_probe(run: Any, step: int) -> None:
        if step == 3 and run.branch == 1:
            run.store.enqueue_command(cmd.PAUSE, {}, source="test")
        if step == 5 and run.branch == 2:  # two steps into the first probe
            run.store.enqueue_command(cmd.PAUSE, {}, source="test")

    _, straight = tiny_job(tmp_path / "straight", epochs=2)
    threading.Thread(target=person, daemon=True).start()
    _, probed = tiny_job(run_dir, epochs=2, on_step=pause_in_the_first_probe)
    assert not failures, failures
    assert same_weights(straight, probed)
    store = RunStore(run_dir)
    assert [b["result"]["steps_done"] for b in store.excursions()[0]["branches"]] == [6, 6]
    assert [(c["kind"], c["state"], c["branch"]) for c in store.commands()] == [
        (cmd.PAUSE, cmd.APPLIED, 1), (cmd.PROBE, cmd.APPLIED, 1), (cmd.PAUSE, cmd.APPLIED, 2),
        (cmd.RESUME, cmd.APPLIED, 2), (cmd.RESUME, cmd.APPLIED, 1)]
    assert store.status()["state"] == "finished"


def test_cancel_ends_the_excursion_and_the_run_goes_back_exactly(tmp_path: Path) -> None:
    _, straight = tiny_job(tmp_path / "straight", epochs=2)
    _, probed = tiny_job(tmp_path / "probed", epochs=2, on_step=hooks(
        (4, cmd.PROBE, {"values": [0.05, 0.2], "steps": 5, "then": "continue"}), (6, cmd.CANCEL, {"excursion": 1})))
    assert same_weights(straight, probed)
    store = RunStore(tmp_path / "probed")
    (excursion,) = store.excursions()
    assert excursion["state"] == "cancelled"
    assert [(b["result"]["steps_done"], b["end_checkpoint"]) for b in excursion["branches"]] == [(2, None)]


def test_a_stop_during_a_probe_stops_at_the_return_point_and_resumes_exactly(tmp_path: Path) -> None:
    _, straight = tiny_job(tmp_path / "straight", epochs=3)
    tiny_job(tmp_path / "probed", epochs=3, on_step=hooks(
        (10, cmd.PROBE, {"values": [0.5, 0.01], "steps": 5}), (12, cmd.STOP, {})))
    store = RunStore(tmp_path / "probed")
    status = store.status()
    assert (status["state"], status["branch"], status["step"]) == ("stopped", 1, 10)
    (excursion,) = store.excursions()
    assert excursion["state"] == "cancelled"
    # The final checkpoint is the return point itself (nothing trained on branch 1 since), never a probe's state.
    final = store.checkpoints()[-1]
    assert (final["id"], final["branch"], final["step"], final["hparams"]["lr"]) == (
        excursion["return_checkpoint"], 1, 10, 0.1)
    (stop,) = [c for c in store.commands() if c["kind"] == cmd.STOP]
    assert (stop["state"], stop["result"]["checkpoint"]) == (cmd.APPLIED, final["id"])
    _, resumed = tiny_job(tmp_path / "probed", epochs=3)
    assert same_weights(straight, resumed)


def test_a_rollback_during_a_probe_cancels_it_and_keeps_the_run_s_own_hparams(tmp_path: Path) -> None:
    tiny_job(tmp_path / "r", epochs=2, on_step=hooks(  # the return point waits for every write: #1 is listed
        (10, cmd.PROBE, {"factors": [0.5, 2], "steps": 4}),
        (11, cmd.ROLLBACK, {"checkpoint": 1, "hparams": "current"})))
    store = RunStore(tmp_path / "r")
    (excursion,) = store.excursions()
    assert excursion["state"] == "cancelled" and "rollback" in excursion["message"]
    newest = store.branches()[-1]
    assert (newest["parent"], newest["from_checkpoint"], newest["start_step"]) == (1, 1, 8)
    assert newest["hparams"]["lr"] == 0.1  # the run's lr at the return point, not the probe's 0.05
    assert newest["id"] not in store.excursion_branch_ids()


def test_probe_checkpoints_are_outside_keep_last_and_the_next_excursion_retires_all_but_an_adopted_one(
        tmp_path: Path) -> None:
    def adopt_winner(run: Any, step: int) -> None:
        if step == 7 and run.branch == 1:
            run.checkpointer.wait()
            (first,) = run.store.excursions()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": first["branches"][1]["end_checkpoint"],
                                                     "hparams": "checkpoint"}, source="test")

    on_step = hooks((2, cmd.PROBE, {"values": [0.05, 0.2], "steps": 2, "then": "continue"}),
                    (12, cmd.PROBE, {"values": [0.05], "steps": 2, "then": "continue"}))
    tiny_job(tmp_path / "r", epochs=3, keep_last=1, on_step=lambda run, step: (adopt_winner(run, step),
                                                                              on_step(run, step)))
    store = RunStore(tmp_path / "r")
    first, second = sorted(store.excursions(), key=lambda e: e["id"])
    ends = [b["end_checkpoint"] for b in first["branches"]]
    listed = {c["id"] for c in store.checkpoints()}
    assert ends[0] not in listed and ends[1] in listed  # the adopted winner stays
    assert not (tmp_path / "r" / store.checkpoint(ends[0])["file"]).exists()
    assert second["branches"][0]["end_checkpoint"] in listed  # the newest excursion's probes stay
    main_line = [c for c in store.checkpoints() if c["branch"] not in store.excursion_branch_ids()]
    assert [c["reason"] for c in main_line][-1:] == ["epoch"]
    assert len([c for c in main_line if c["id"] not in {b["from_checkpoint"] for b in store.branches()}]) == 1


# -- real trainer subprocesses ---------------------------------------------------------------------
def fast_digits() -> list[str]:
    from tests.crash_harness import FAST_CONFIG, train_args

    return train_args(FAST_CONFIG)[2:]  # 23 steps an epoch; everything but --epochs


def test_kill_9_during_a_probe_resumes_on_the_main_line_and_abandons_the_excursion(tmp_path: Path, trainers) -> None:
    import signal

    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--epochs", "400", *fast_digits())
    trainer.wait_running(min_step=5)
    store = RunStore(run_dir)
    store.enqueue_command(cmd.PROBE, {"values": [0.02, 0.1], "steps": 5000}, source="test")
    excursion = wait_for(lambda: (lambda e: e if e and e["branches"] else None)(store.running_excursion()),
                         what="the first probe branch")
    probe_branch = excursion["branches"][0]["branch"]
    wait_for(lambda: store.status()["branch"] == probe_branch and store.status()["step"] >= excursion["origin_step"] + 3,
             what="the probe training")
    trainer.process.send_signal(signal.SIGKILL)
    trainer.process.wait()
    assert store.running_excursion()["id"] == excursion["id"]

    again = trainers(run_dir, "--epochs", "400", *fast_digits())
    again.wait_running(min_step=1)
    assert store.excursion(excursion["id"])["state"] == "abandoned"
    resume = [e for e in store.events() if e["kind"] == "resume"][-1]
    assert resume["data"]["checkpoint"] == excursion["return_checkpoint"]
    assert f"excursion #{excursion['id']} was abandoned" in resume["message"]
    assert any(e["kind"] == "excursion" and e["data"].get("state") == "abandoned" for e in store.events())
    wait_for(lambda: store.status()["step"] > excursion["origin_step"] + 2, what="training on past the fork")
    status = store.status()
    assert status["branch"] == excursion["origin_branch"] and status["state"] == "running"
    assert store.running_excursion() is None
    assert all(c["branch"] not in store.excursion_branch_ids() for c in store.checkpoints())


def test_probe_sweep_cancel_and_probes_through_the_cli(tmp_path: Path, trainers) -> None:
    run_dir = tmp_path / "run"
    trainers(run_dir, "--epochs", "400", *fast_digits()).wait_running(min_step=5)
    d = ("--run-dir", str(run_dir))

    refused = cli_here("cancel", *d)
    assert refused.returncode == 2 and "no probe set or sweep is running" in refused.stderr
    bad = cli_here("probe", *d, "--values", "0.1,-2")
    assert bad.returncode == 2 and "-2" in bad.stderr

    probed = babysit_cli("probe", *d, "--values", "0.01,0.05", "--steps", "6", "--then", "continue", "--wait",
                         "--timeout", "120")
    assert probed.returncode == 0, probed.stderr
    assert "probe lr 0.01, 0.05 for 6 steps from now: applied at step" in probed.stdout
    assert "excursion #1: probe lr 0.01, 0.05 for 6 steps from now — done" in probed.stdout
    rows = [line for line in probed.stdout.splitlines() if "6/6" in line]
    assert len(rows) == 2 and sum("<- winner" in line for line in rows) == 1
    assert "val_loss" in probed.stdout and "continue from the winner: python -m babysit rollback" in probed.stdout
    assert cli_here("probes", *d).stdout == probed.stdout[probed.stdout.index("excursion #1:"):]

    cli_here("probe", *d, "--values", "0.02", "--steps", "5000")
    wait_for(lambda: RunStore(run_dir).running_excursion(), what="the long probe")
    cancelled = cli_here("cancel", *d, "--wait", "--timeout", "60")
    assert cancelled.returncode == 0 and "cancel excursion #2: applied" in cancelled.stdout, cancelled.stderr
    wait_for(lambda: RunStore(run_dir).excursion(2)["state"] == "cancelled", what="the cancel")

    swept = cli_here("sweep", *d, "--steps", "20", "--wait", "--timeout", "120")
    assert swept.returncode == 0, swept.stderr
    assert "lr sweep over 20 steps: applied at step" in swept.stdout
    assert "steepest descent: lr" in swept.stdout and "divergence: lr" in swept.stdout
    assert wait_for(lambda: RunStore(run_dir).status()["state"] == "paused", what="the pause after the sweep")
    unknown = cli_here("probes", *d, "9")
    assert unknown.returncode == 2 and "there is no excursion '9'" in unknown.stderr and "its excursions: #3, #2, #1" in unknown.stderr


def test_the_lightning_callback_refuses_a_probe_saying_why_and_what_works(tmp_path: Path) -> None:
    from tests.test_lightning import fit_two_optimizers

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    fit_two_optimizers(run_dir, 1)
    store = RunStore(run_dir)
    probe = store.enqueue_command(cmd.PROBE, {"steps": 3}, source="test", require_live=False)
    sweep = store.enqueue_command(cmd.SWEEP, {"steps": 10}, source="test", require_live=False)
    fit_two_optimizers(run_dir, 2)
    for command_id in (probe, sweep):
        row = store.command(command_id)
        assert row["state"] == cmd.REJECTED
        assert row["reason"].startswith("probes and sweeps are not available under the Lightning callback yet")
        assert "they work with babysit.Run in your own loop" in row["reason"]
    assert store.excursions() == [] and len(store.branches()) == 1


def test_the_hugging_face_callback_refuses_a_sweep_saying_why_and_what_works(tmp_path: Path) -> None:
    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    hf_script.make_trainer(str(run_dir), epochs=1)[0].train()
    store = RunStore(run_dir)
    sweep = store.enqueue_command(cmd.SWEEP, {"steps": 10}, source="test", require_live=False)
    babysit.hf.train(hf_script.make_trainer(str(run_dir), epochs=2)[0])
    row = store.command(sweep)
    assert row["state"] == cmd.REJECTED
    assert row["reason"].startswith("probes and sweeps need babysit.Run in your own loop: the Hugging Face Trainer")
    assert store.excursions() == [] and len(store.branches()) == 1


def test_under_torchrun_a_probe_is_refused_saying_why_and_what_works(tmp_path: Path) -> None:
    from tests.test_torchrun import Job

    job = Job(tmp_path, "run", "--epochs", "10000", "--pause-at-step", "3")
    try:
        job.wait_state("paused")
        refused = babysit_cli("probe", "--run-dir", str(job.run_dir), "--steps", "5", "--wait", "--timeout", "120",
                              timeout=180)
        assert refused.returncode == 1
        assert "rejected: probes and sweeps do not run under torch.distributed" in refused.stderr
        assert "they work in a single-process run" in refused.stderr
        store = job.store()
        assert store.excursions() == [] and len(store.branches()) == 1 and store.status()["state"] == "paused"
    finally:
        job.kill()
