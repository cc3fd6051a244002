"""Long runs (docs/long-runs.md): periodic checkpoints by steps and by time, each an exact resume
point and a rollback target; the retention policy applied as they are written; what a resume that
had to read its batches says; a rollback that skips data; the final checkpoint of a stop timed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import babysit
from babysit import commands as cmd
from babysit.checkpoint import KEY_MODEL, read_verified
from babysit.store import RunStore
from babysit.ui.data import markers
from tests.conftest import REPO, babysit_cli, tiny_data, tiny_job, wait_for

SCRIPT = REPO / "tests" / "long_script.py"
TIMEOUT = 240


# -- in process ------------------------------------------------------------------------------------
def test_a_one_epoch_run_of_2000_steps_checkpoints_every_200_steps_at_the_multiples(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(2000, 2), torch.randn(2000, 1))
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with babysit.Run(tmp_path / "r", model, optimizer, checkpoint_every_steps=200,
                     retention=babysit.RetentionPolicy(keep_recent=20)) as run:
        for _ in run.epochs(1):
            for x, y in run.batches(DataLoader(data, batch_size=1, shuffle=True)):
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    listed = RunStore(tmp_path / "r").checkpoints()
    # Ten rollback points, one every 200 steps; the one due at the epoch's last step is the epoch's.
    assert [(c["step"], c["reason"]) for c in listed] == [(s, "periodic") for s in range(200, 2000, 200)] + [
        (2000, "epoch")]
    assert RunStore(tmp_path / "r").get_meta("cadence") == {"every_steps": 200, "every_minutes": None,
                                                             "next_step": 2200, "next_wall": None}


def test_a_resume_from_a_periodic_checkpoint_and_a_rollback_to_one_are_exact(tmp_path: Path) -> None:
    """Killed (in effect) after a periodic checkpoint mid-epoch: resumed, it trains what the run
    that was never stopped trained; rolled back to one, the branch trains it again exactly."""
    def job(run_dir: Path, **kwargs: Any) -> nn.Module:
        return tiny_job(run_dir, epochs=3, checkpoint_every_steps=5, **kwargs)[1]

    whole = job(tmp_path / "whole")

    class Killed(Exception):
        pass

    cut: list[Any] = []

    def kill_at_13(run: Any, step: int) -> None:
        if step == 13:
            run.checkpointer.wait()
            cut.append(run)
            raise Killed  # the periodic checkpoint of step 10 is the newest
    with pytest.raises(Killed):
        job(tmp_path / "cut", on_step=kill_at_13)
    cut[0].close()  # the trainer is gone: only its lock on the directory must go too
    assert [(c["step"], c["reason"]) for c in RunStore(tmp_path / "cut").checkpoints()] == [
        (5, "periodic"), (8, "epoch"), (10, "periodic")]
    resumed = job(tmp_path / "cut")
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))

    def back_to_10_once(run: Any, step: int) -> None:
        if step == 17 and run.branch == 1:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 3}, source="test")  # #3: step 10, periodic
    again = job(tmp_path / "back", on_step=back_to_10_once)
    store = RunStore(tmp_path / "back")
    assert store.branch(2)["from_checkpoint"] == 3 and store.checkpoint(3)["reason"] == "periodic"
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), again.state_dict().values()))


def test_a_rollback_that_skips_batches_trains_on_after_them_and_refuses_to_skip_past_the_epoch(tmp_path: Path) -> None:
    """tiny_job: 8 batches an epoch. Rolled back to step 10 (the 2nd batch of epoch 2) skipping 3
    batches: epoch 2 goes on with its 6th batch, so it ends at step 13 after 3 more steps."""
    seen: list[tuple[int, int]] = []

    def act(run: Any, step: int) -> None:
        seen.append((run.branch, step))
        if step == 12 and run.branch == 1:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 3, "skip_batches": 7}, source="test")
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 3, "skip_batches": 3}, source="test")
    tiny_job(tmp_path / "r", epochs=3, checkpoint_every_steps=5, on_step=act)
    store = RunStore(tmp_path / "r")
    assert store.checkpoint(3)["step"] == 10 and store.checkpoint(3)["step_in_epoch"] == 2
    too_far, skip = store.commands(kinds=(cmd.ROLLBACK,))
    assert too_far["state"] == "rejected" and too_far["reason"] == (
        "skip_batches 7 goes past the end of the epoch: checkpoint #3 resumes after batch 2 of epoch 2, and an epoch "
        "has 8 batches; at most 5 can be skipped")
    assert skip["state"] == "applied" and skip["result"]["skip_batches"] == 3
    event = next(e for e in store.events() if e["kind"] == "rollback")
    assert event["data"]["skip_batches"] == 3 and "skipping the next 3 batches" in event["message"]
    (marker,) = [m for m in markers(store, store.branches()) if m.kind == "rollback"]  # on the curve
    assert marker.text.endswith("; the next 3 batches skipped")
    assert [step for branch, step in seen if branch == 2] == [11, 12, 13] + list(range(14, 22))
    assert [(c["branch"], c["step"], c["reason"]) for c in store.checkpoints() if c["branch"] == 2][:1] == [
        (2, 13, "epoch")]  # epoch 2 ends after its last 3 batches


class _Stream(IterableDataset):
    def __iter__(self):  # noqa: ANN204
        return iter(tiny_data(0))


def test_a_loader_that_must_read_says_how_many_once_per_trainer_not_at_every_rollback(tmp_path: Path, capfd: Any) -> None:
    """A loader with neither a sampler nor a state of its own must read a resumed epoch's trained
    batches: resumed at step 5 (of 8 an epoch), the trainer says the 5 batches it reads; two
    rollbacks to the checkpoint of step 3 read 3 batches each, silently: one event, one line."""
    rolled: list[int] = []

    def job(stop_at: int | None) -> None:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with babysit.Run(tmp_path / "r", model, optimizer, checkpoint_every_steps=3) as run:
            for _ in run.epochs(2):
                for x, y in run.batches(DataLoader(_Stream(), batch_size=8)):
                    loss = nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if run.step == stop_at:
                        run.request_stop()
                    if stop_at is None and (run.branch, run.step) in ((1, 6), (2, 5)):
                        rolled.append(run.branch)
                        run.checkpointer.wait()
                        run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1}, source="test")
    job(stop_at=5)
    job(stop_at=None)
    store = RunStore(tmp_path / "r")
    assert store.checkpoint(1)["step"] == 3 and rolled == [1, 2]
    assert [r["state"] for r in store.commands(kinds=(cmd.ROLLBACK,))] == ["applied", "applied"]
    assert store.status()["branch"] == 3 and store.status()["state"] == "finished"
    said = [e for e in store.events() if e["kind"] == "resume_skip"]
    assert len(said) == 1 and said[0]["data"] == {"batches": 5, "read": 5}
    assert said[0]["message"].startswith("resuming inside the epoch reads the 5 batches it already trained")
    assert capfd.readouterr().err.count("babysit: resuming inside the epoch reads the") == 1


# -- retention, with probes and sweeps (issue 26, items 2 and 4) ------------------------------------
def test_a_probe_set_from_an_old_checkpoint_keeps_it_while_it_runs_under_keep_last(tmp_path: Path) -> None:
    """keep_last=1: the return point written as the probe set begins would have retired its fork,
    which the second probe loads again (the trainer died: CheckpointError, missing file)."""
    def probe(run: Any, step: int) -> None:
        if step == 18 and run.branch == 1:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.PROBE, {"checkpoint": run.store.checkpoints()[0]["id"],
                                                  "values": [0.05, 0.2], "steps": 2, "then": "continue"},
                                      source="test")
    tiny_job(tmp_path / "r", epochs=3, keep_last=1, on_step=probe)
    store = RunStore(tmp_path / "r")
    (excursion,) = store.excursions()
    assert excursion["state"] == "done", excursion["message"]
    assert [b["result"]["steps_done"] for b in excursion["branches"]] == [2, 2]


def test_thirty_probe_sets_leave_the_disk_bounded_by_keep_last(tmp_path: Path) -> None:
    """Each probe set's return point is on the run's branch and its probes' branches start from it:
    only while it runs does that keep it."""
    def probe(run: Any, step: int) -> None:
        if run.branch == 1 and step % 3 == 0 and len(run.store.excursions()) < 30:
            run.store.enqueue_command(cmd.PROBE, {"values": [0.05], "steps": 1, "then": "continue"}, source="test")
    tiny_job(tmp_path / "r", epochs=12, keep_last=2, on_step=probe)
    store = RunStore(tmp_path / "r")
    assert len(store.excursions()) == 30
    legs = store.excursion_branch_ids()
    main_line = [c for c in store.checkpoints() if c["branch"] not in legs]
    assert len(main_line) == 2, [(c["id"], c["reason"]) for c in main_line]
    files = [p for p in (tmp_path / "r").iterdir() if p.suffix == ".pt"]
    assert len(files) == len(store.checkpoints())


def test_a_periodic_checkpoint_over_the_disk_budget_is_not_written_and_says_why(tmp_path: Path) -> None:
    tiny_job(tmp_path / "r", epochs=2, checkpoint_every_steps=3,  # each checkpoint listed before the next step
             retention=babysit.RetentionPolicy(keep_last=1, max_bytes=100), on_step=lambda run, _: run.checkpointer.wait())
    store = RunStore(tmp_path / "r")
    skipped = [e for e in store.events() if e["kind"] == "checkpoint_skipped"]
    assert len(skipped) == 1 and "disk budget" in skipped[0]["message"]
    assert [c["reason"] for c in store.checkpoints()] == ["epoch"]
    assert store.status()["state"] == "finished"


# -- the CLI against real trainer subprocesses -----------------------------------------------------
class Script:
    def __init__(self, run_dir: Path, *args: str) -> None:
        self.run_dir, self.record = run_dir, run_dir.parent / f"{run_dir.name}.jsonl"
        self.log = run_dir.parent / f"{run_dir.name}.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--record", str(self.record), *args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})

    def wait_paused(self, step: int, branch: int) -> None:
        def paused() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the trainer exited ({self.process.returncode}):\n{self.log.read_text()}")
            if not (self.run_dir / "run.db").exists():
                return False
            status = RunStore(self.run_dir).status()
            return (status.get("state"), status.get("step"), status.get("branch")) == ("paused", step, branch)
        wait_for(paused, TIMEOUT, what=f"the pause at step {step} of branch {branch}")

    def finished(self) -> None:
        assert self.process.wait(timeout=TIMEOUT) == 0, self.log.read_text()

    def line(self) -> dict[int, dict[str, Any]]:
        """Each step of the run's final line of descent, as last trained (branch 1 up to the fork, then 2)."""
        rows = [json.loads(line) for line in self.record.read_text().splitlines()]
        fork = min((r["step"] for r in rows if r["branch"] == 2), default=10**9) - 1
        return {r["step"]: r for r in rows if r["branch"] == 2 or r["step"] <= fork}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def scripts() -> Any:
    started: list[Script] = []

    def start(run_dir: Path, *args: str) -> Script:
        started.append(Script(run_dir, *args))
        return started[-1]
    yield start
    for script in started:
        script.kill()


def cli(run_dir: Path, *args: str) -> str:
    result = babysit_cli(*args, "--run-dir", str(run_dir), "--wait", "--timeout", str(TIMEOUT), timeout=TIMEOUT + 30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_rollback_to_a_periodic_checkpoint_then_kill_9_then_restart_is_bit_identical(tmp_path: Path, scripts: Any) -> None:
    """One epoch of 2,000 steps, a checkpoint every 200, driven by the CLI: paused at step 700,
    rolled back to #3 (step 600); on the new branch paused at 1,100 and killed with SIGKILL; started
    again, it resumes from the periodic checkpoint of step 1,000 and ends the epoch. Every step's
    loss and weights, and the final weights, are those of a run given the same commands and never
    killed."""
    reference = scripts(tmp_path / "reference", "--pause-at", "1:700")
    reference.wait_paused(700, branch=1)
    cli(reference.run_dir, "rollback", "3")
    reference.finished()

    run = scripts(tmp_path / "run", "--pause-at", "1:700", "--pause-at", "2:1100")
    run.wait_paused(700, branch=1)
    status = babysit_cli("status", "--run-dir", str(run.run_dir), check=True).stdout
    assert "cadence      every 200 steps (next at step 800)" in status
    assert re.search(r"#3 +epoch 1 +step 600 +branch 1 .*\(periodic; the newest\)", status), status
    cli(run.run_dir, "rollback", "3")
    run.wait_paused(1100, branch=2)
    run.process.send_signal(signal.SIGKILL)
    run.process.wait(timeout=30)
    store = RunStore(run.run_dir)
    assert [c["step"] for c in store.checkpoints() if c["branch"] == 2] == [800, 1000]
    again = scripts(run.run_dir)
    again.finished()

    periodic = [(c["branch"], c["step"]) for c in RunStore(reference.run_dir).checkpoints(include_deleted=True)]
    assert periodic == [(1, 200), (1, 400), (1, 600)] + [(2, s) for s in range(800, 2001, 200)]
    expected, got = reference.line(), again.line()
    assert sorted(got) == sorted(expected) == list(range(1, 2001))
    assert [s for s in expected if (got[s]["loss"], got[s]["weights"]) != (expected[s]["loss"], expected[s]["weights"])] == []
    final = [read_verified(d / c["file"], c["sha256"])[KEY_MODEL]
             for d, c in ((reference.run_dir, RunStore(reference.run_dir).checkpoints()[-1]),
                          (run.run_dir, RunStore(run.run_dir).checkpoints()[-1]))]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
