"""babysit under torch.distributed (2 CPU processes, gloo), driven only through the CLI: a plain
loop under ``torchrun --nproc_per_node=2`` (tests/ddp_script.py), the Hugging Face Trainer under
torchrun and a Lightning Trainer with its DDP strategy. Every rank applies each command at the same
step, checkpoints hold every rank's RNG and run.state, and a kill -9 of the whole job resumes
bit-identically."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from babysit.checkpoint import KEY_USER_STATE, read_verified
from babysit.ranks import KEY_RANKS, MAX_INTERVAL
from babysit.store import RunStore
from tests.conftest import REPO, babysit_cli, wait_for

SAMPLES_PER_STEP = 16  # each rank's batch


class Job:
    """A real ``torchrun --standalone --nproc_per_node=2 tests/ddp_script.py`` (or another script of
    tests/, on another number of ranks)."""

    def __init__(self, tmp_path: Path, name: str, *args: str, script: str = "ddp_script.py", nproc: int = 2) -> None:
        self.run_dir = tmp_path / name
        self.record = tmp_path / f"{name}-record"
        self.record.mkdir(exist_ok=True)
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 str(REPO / "tests" / script), "--run-dir", str(self.run_dir), "--record", str(self.record),
                 *args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,                 env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
            )

    def store(self) -> RunStore:
        return wait_for(lambda: (self.run_dir / "run.db").exists() and RunStore(self.run_dir), timeout=180,
                        what="the run's store")

    def wait_state(self, state: str, timeout: float = 180) -> dict[str, Any]:
        store = self.store()
        def reached() -> dict[str, Any] | None:
            if self.process.poll() is not None and store.status()["state"] != state:
                raise AssertionError(f"the job exited ({self.process.returncode}):\n{self.log.read_text()}")
            status = store.status()
            return status if status["state"] == state else None
        return wait_for(reached, timeout, what=f"the run {state}")

    def records(self, rank: int) -> list[dict[str, Any]]:
        path = self.record / f"rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def finish(self, timeout: float = 300) -> None:
        code = self.process.wait(timeout=timeout)
        assert code == 0, self.log.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            # The whole job: torchrun starts each rank in a session of its own, so each is killed by pid.
            pids = _with_descendants(self.process.pid)
            for pid in pids:
                _kill_9(pid)
            self.process.wait(timeout=60)
            wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids),
                     what="every rank of the killed job gone")


def _with_descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        queue.extend(int(child) for child in children)
    return found


def _kill_9(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture
def jobs() -> Any:
    started: list[Job] = []

    def start(tmp_path: Path, name: str, *args: str) -> Job:
        started.append(Job(tmp_path, name, *args))
        return started[-1]

    yield start
    for job in started:
        job.kill()


def cli(job: Job, *args: str) -> dict[str, Any]:
    result = babysit_cli(*args, "--run-dir", str(job.run_dir), "--wait", "--timeout", "120", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def used_after(records: list[dict[str, Any]], step: int, branch: int) -> dict[str, Any]:
    return next(r for r in records if r["branch"] == branch and r["step"] == step + 1)


def test_every_rank_obeys_each_cli_command_at_the_same_step(tmp_path: Path, jobs: Any) -> None:
    job = jobs(tmp_path, "run", "--epochs", "10000", "--keep-last", "4", "--pause-at-step", "5")
    store = job.store()
    paused = job.wait_state("paused")["step"]
    assert 5 <= paused <= 5 + MAX_INTERVAL
    assert [job.records(r)[-1]["step"] for r in (0, 1)] == [paused, paused]  # both ranks wait at that step

    cli(job, "set", "lr", "0.02")
    cli(job, "set", "momentum", "0.5")
    before = store.checkpoint_count()
    cli(job, "checkpoint")
    assert store.checkpoint_count() == before + 1
    cut = store.checkpoints()[-1]
    assert (cut["reason"], cut["step"], cut["hparams"]) == ("command", paused, {"lr": 0.02, "momentum": 0.5})
    saved = read_verified(job.run_dir / cut["file"], cut["sha256"])
    assert saved[KEY_RANKS][0] is None and saved[KEY_USER_STATE]["plain"]["seen"] == paused * SAMPLES_PER_STEP
    assert saved[KEY_RANKS][1][KEY_USER_STATE]["plain"]["seen"] == paused * SAMPLES_PER_STEP
    assert not torch.equal(saved[KEY_RANKS][1]["rng"]["torch"], saved["rng"]["torch"])  # each rank's own RNG

    cli(job, "set", "lr", "0.01")
    cli(job, "resume")
    for rank in (0, 1):  # the nudges, as each rank's optimizer used them, from the next step on
        wait_for(lambda: len(job.records(rank)) > paused + 3, what=f"rank {rank} training on")
        assert {(r["lr"], r["momentum"]) for r in job.records(rank)[:paused]} == {(0.05, 0.9)}
        assert (used_after(job.records(rank), paused, 1)["lr"], used_after(job.records(rank), paused, 1)["momentum"]) \
            == (0.01, 0.5)

    cli(job, "pause")
    paused_again = store.status()["step"]
    assert [job.records(r)[-1]["step"] for r in (0, 1)] == [paused_again, paused_again]
    target = store.checkpoints()[-1]  # the newest (older ones go: the job keeps the last 4)
    cli(job, "rollback", str(target["id"]))
    assert store.status()["branch"] == 2
    for rank in (0, 1):  # the checkpoint's lr, momentum and run.state on every rank, from its step on
        wait_for(lambda: any(r["branch"] == 2 for r in job.records(rank)), what=f"rank {rank} on branch 2")
        first = next(r for r in job.records(rank) if r["branch"] == 2)
        assert (first["step"], first["lr"], first["momentum"], first["seen"]) == \
            (target["step"] + 1, target["hparams"]["lr"], 0.5, target["step"] * SAMPLES_PER_STEP)

    cli(job, "stop")  # (a rollback resumes the run)
    job.finish()
    final, status = store.checkpoints()[-1], store.status()
    # A stop that lands at an epoch's last step is answered by that epoch's own checkpoint.
    assert status["state"] == "stopped" and final["step"] == status["step"] and final["reason"] in ("stop", "epoch")
    ends = [json.loads((job.record / f"end-rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["status"] for e in ends] == ["stopped", "stopped"] and [e["branch"] for e in ends] == [2, 2]
    assert [job.records(r)[-1]["step"] for r in (0, 1)] == [final["step"]] * 2


def test_a_kill_9_of_the_job_then_a_restart_resumes_bit_identically_on_every_rank(tmp_path: Path, jobs: Any) -> None:
    straight = jobs(tmp_path, "straight", "--epochs", "3", "--rank0-checkpoint-at", "5")
    straight.finish()
    # run.checkpoint_now() on rank 0 alone: taken by both ranks together at their next meeting.
    asked = [c for c in RunStore(straight.run_dir).checkpoints() if c["reason"] == "command"]
    assert len(asked) == 1 and 5 <= asked[0]["step"] <= 5 + MAX_INTERVAL
    job = jobs(tmp_path, "killed", "--epochs", "3", "--pause-at-step", "20", "--step-seconds", "0.025")  # inside epoch 2 of 16 steps
    store = job.store()
    job.wait_state("paused")
    cli(job, "checkpoint")
    cut = store.checkpoints()[-1]
    assert cut["reason"] == "command" and 0 < cut["step_in_epoch"] < 16
    job.kill()

    again = jobs(tmp_path, "killed", "--epochs", "3")
    again.finish()
    assert any(e["kind"] == "resume" and f"checkpoint #{cut['id']}" in e["message"] for e in store.events())
    for rank in (0, 1):
        resumed = torch.load(job.record / f"final-rank{rank}.pt")
        reference = torch.load(straight.record / f"final-rank{rank}.pt")
        assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
        assert json.loads((job.record / f"end-rank{rank}.json").read_text())["seen"] == 3 * 16 * SAMPLES_PER_STEP
    steps, values, _ = store.chunk_points(next(s for s in store.series() if s.name == "loss" and s.segment == 0).id)
    reference = RunStore(straight.run_dir)
    ref_steps, ref_values, _ = reference.chunk_points(next(s for s in reference.series() if s.name == "loss").id)
    assert steps.tolist() == ref_steps.tolist() and values.tolist() == ref_values.tolist()


def test_a_signal_to_one_rank_stops_the_whole_job_with_a_final_checkpoint(tmp_path: Path, jobs: Any) -> None:
    job = jobs(tmp_path, "run", "--epochs", "10000", "--keep-last", "3", "--signal-at-step", "10")
    job.finish()
    store = job.store()
    status, last = store.status(), store.checkpoints()[-1]
    assert status["state"] == "stopped" and "a stop asked on another rank" in status["message"]
    # (A stop that lands at an epoch's last step is answered by that epoch's own checkpoint.)
    assert last["reason"] in ("stop", "epoch") and 10 <= last["step"] == status["step"] <= 10 + MAX_INTERVAL
    assert [json.loads((job.record / f"end-rank{r}.json").read_text())["status"] for r in (0, 1)] == ["stopped"] * 2


def readme_ddp_example() -> str:
    section = (REPO / "docs" / "frameworks.md").read_text().split("## torchrun and DDP", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_torchrun_example_trains_checkpoints_once_and_resumes(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(readme_ddp_example().replace("run.epochs(20)", "run.epochs(int(sys.argv[1]))")
                      .replace("import torch\n", "import sys\nimport torch\n", 1))

    def torchrun(epochs: int) -> None:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), str(epochs)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    torchrun(2)
    store = RunStore(tmp_path / "checkpoints" / "my-ddp-run")
    assert [c["epoch"] for c in store.checkpoints()] == [1, 2] and store.status()["state"] == "finished"
    torchrun(3)  # resumes after epoch 2 on both ranks, trains epoch 3 only
    assert [c["epoch"] for c in store.checkpoints()] == [1, 2, 3]
    assert [e["kind"] for e in store.events() if e["kind"] in ("start", "resume")] == ["start", "resume"]


def test_the_hugging_face_trainer_under_torchrun_obeys_on_every_rank(tmp_path: Path) -> None:
    """babysit.hf's callback under torchrun (DDP, gloo): the same Run on every rank, so a nudge
    sent while paused reaches both ranks' optimizers at the same step, through the schedule."""
    from transformers import get_linear_schedule_with_warmup

    from tests.hf_script import WARMUP_STEPS

    run_dir, record = tmp_path / "hf", tmp_path / "hf.jsonl"
    with open(tmp_path / "hf.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(REPO / "tests" / "hf_script.py"), "--run-dir", str(run_dir), "--epochs", "2", "--record", str(record),
             "--pause-at", "1:5", "--step-seconds", "0.025"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    try:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), timeout=240, what="the store")
        wait_for(lambda: store.status()["state"] == "paused", timeout=240, what="the pause")
        paused = store.status()["step"]
        result = babysit_cli("set", "lr", "0.001", "--run-dir", str(run_dir), "--wait", "--timeout", "120", timeout=180)
        assert result.returncode == 0, result.stderr
        result = babysit_cli("checkpoint", "--run-dir", str(run_dir), "--wait", "--timeout", "120", timeout=180)
        assert result.returncode == 0, result.stderr
        cut = store.checkpoints()[-1]
        saved = read_verified(run_dir / cut["file"], cut["sha256"])
        assert cut["step"] == paused and saved[KEY_RANKS][1] is not None  # rank 1's own generators in it
        assert babysit_cli("resume", "--run-dir", str(run_dir), "--wait").returncode == 0
        assert process.wait(timeout=300) == 0, (tmp_path / "hf.log").read_text()
    finally:
        if process.poll() is None:
            for pid in _with_descendants(process.pid):
                _kill_9(pid)

    def lrs(path: Path) -> dict[int, float]:
        return {r["step"]: r["lr"] for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "step"}

    rank0, rank1 = lrs(record), lrs(tmp_path / "hf-rank1.jsonl")
    assert rank0 == rank1 and sorted(rank0) == list(range(1, 17))  # 2 epochs of 8 steps per rank
    # The schedule as it would have run, against the nudged one: from the nudge on, the ratio is
    # the nudge's (0.001 over the lr it replaced), so the schedule's next steps did not undo it.
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=3e-3)
    schedule = get_linear_schedule_with_warmup(optimizer, WARMUP_STEPS, 16)
    planned = {}
    for step in range(1, 17):
        planned[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    assert all(rank0[s] == planned[s] for s in range(1, paused + 1))
    ratio = 0.001 / planned[paused + 1]
    assert all(abs(rank0[s] - planned[s] * ratio) <= 1e-12 for s in range(paused + 1, 16))


def test_a_lightning_trainer_with_the_ddp_strategy_obeys_on_every_rank(tmp_path: Path) -> None:
    """babysit.lightning's callback under Lightning's own DDP (2 CPU processes, gloo): nudges,
    a checkpoint with rank 1's share, and a rollback, each at the same step on both ranks.

    A queued pause lands at the next sync step, within MAX_INTERVAL steps (how many depends on the
    machine's speed): epochs of 80 steps keep both pauses (queued after steps 5 and 90) off an
    epoch's last boundary, where a "checkpoint now" would wait for the epoch's own checkpoint."""
    assert 5 + MAX_INTERVAL < 80 and 80 < 90 and 90 + MAX_INTERVAL < 160
    run_dir, record = tmp_path / "pl", tmp_path / "pl.jsonl"
    with open(tmp_path / "pl.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "lightning_script.py"), "--run-dir", str(run_dir), "--devices", "2",
             "--epochs", "3", "--steps-per-epoch", "80", "--record", str(record), "--pause-at-step", "5",
             "--pause-at-step", "90"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})

    def cli_ok(*args: str) -> None:
        done = babysit_cli(*args, "--run-dir", str(run_dir), "--wait", "--timeout", "120", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

    def rows(rank: int) -> list[dict[str, Any]]:
        path = record if rank == 0 else Path(f"{record}.rank{rank}")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    try:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), timeout=240, what="the store")
        wait_for(lambda: store.status()["state"] == "paused", timeout=240, what="the first pause")
        paused = store.status()["step"]
        cli_ok("set", "lr", "0.02")
        cli_ok("set", "momentum", "0.5")
        cli_ok("checkpoint")
        cut = store.checkpoints()[-1]
        assert cut["step"] == paused and read_verified(run_dir / cut["file"], cut["sha256"])[KEY_RANKS][1] is not None
        cli_ok("resume")
        wait_for(lambda: store.status()["state"] == "paused" and store.status()["step"] > paused, timeout=240,
                 what="the second pause")
        cli_ok("rollback", str(cut["id"]))
        wait_for(lambda: all(any(r["branch"] == 2 for r in rows(rank)) for rank in (0, 1)), timeout=240,
                 what="both ranks on branch 2")
        cli_ok("stop")
        assert process.wait(timeout=300) == 0, (tmp_path / "pl.log").read_text()
    finally:
        if process.poll() is None:
            for pid in _with_descendants(process.pid):
                _kill_9(pid)

    by_rank = [rows(0), rows(1)]
    keyed = [{(r["branch"], r["step"]): (r["lr"], r["momentum"], r["weights"]) for r in rank} for rank in by_rank]
    assert keyed[0] == keyed[1]  # every step, on both ranks: the same lr, momentum and weights
    first = {rank: next(r for r in by_rank[rank] if (r["branch"], r["step"]) == (1, paused + 1)) for rank in (0, 1)}
    assert all((first[rank]["lr"], first[rank]["momentum"]) == (0.02, 0.5) for rank in (0, 1))
    again = [next(r for r in rows if r["branch"] == 2) for rows in by_rank]
    # Branch 2 starts from the checkpoint: its step, its weights, its lr and momentum, on both ranks.
    assert all((r["step"], r["weights"], r["lr"], r["momentum"]) == (paused + 1, first[0]["weights"], 0.02, 0.5)
               for r in again)


def test_a_nudge_replayed_after_a_kill_lands_at_its_own_step_on_every_rank(tmp_path: Path, jobs: Any) -> None:
    # The nudge comes after the epoch-2 checkpoint (step 32) and before the kill: the restarted job
    # replays it, and must at the very step where the killed one applied it. The nudge and the pause
    # are applied at sync steps; when both land on the same one, nothing trained after the nudge
    # before the kill: try again with the pause a little later.
    for pause_at in (40, 43, 46):
        name = f"run-{pause_at}"
        job = jobs(tmp_path, name, "--epochs", "3", "--nudge-at-step", "35", "--pause-at-step", str(pause_at),
                   "--step-seconds", "0.025")
        store = job.store()
        paused = job.wait_state("paused")["step"]
        applied = next(c for c in store.commands() if c["kind"] == "set_lr")
        assert applied["state"] == "applied" and 35 <= applied["step"] <= paused
        assert store.checkpoints()[-1]["step"] == 32
        job.kill()
        if applied["step"] < paused:
            break
    else:
        raise AssertionError("each pause landed on the nudge's own step")
    again = jobs(tmp_path, name, "--epochs", "3")
    again.finish()
    for rank in (0, 1):
        rows = job.records(rank)
        killed = {r["step"]: r["lr"] for r in rows[:paused] if r["step"] > 32}  # one row per step until the kill
        resumed = {r["step"]: r["lr"] for r in rows[paused:] if r["step"] in killed}
        assert resumed == killed and len(killed) == paused - 32, rank  # the same lr at every step, both times
        assert resumed[applied["step"] + 1] == 0.01 and resumed[applied["step"]] != 0.01
