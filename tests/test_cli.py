"""A real trainer subprocess driven through the CLI, as a user at a terminal would."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from babysit.rundir import LOCK_NAME
from babysit.store import RunStore
from tests.conftest import babysit_cli, cli_here, tiny_job, wait_for

FAST = ("--job", "digits", "--epoch-passes", "1", "--batch-size", "64")  # 23 steps per epoch


def status(run_dir: Path) -> dict:
    result = babysit_cli("status", "--run-dir", str(run_dir), "--json", check=True)
    return json.loads(result.stdout)


def test_the_panda_loop_through_the_cli(tmp_path: Path, trainers) -> None:
    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--epochs", "500", *FAST)
    trainer.wait_running(min_step=30)
    d = ("--run-dir", str(run_dir))

    info = status(run_dir)
    assert info["state"] == "running" and info["pid"] == trainer.process.pid
    assert {"state", "pid", "epoch", "step", "branch", "lr", "momentum", "checkpoints", "pending_commands"} <= set(info)
    assert (info["lr"], info["momentum"], info["branch"]) == (0.05, 0.9, 1)

    # lr: applied, and read back from the optimizer.
    result = babysit_cli("set", "lr", "0.02", *d, "--wait")
    assert result.returncode == 0, result.stderr
    assert "set lr 0.02: applied at step" in result.stdout
    wait_for(lambda: RunStore(run_dir).status()["lr"] == 0.02, what="the new lr in the status")
    assert status(run_dir)["lr"] == 0.02

    # A bad value is refused before anything is queued.
    before = len(RunStore(run_dir).commands())
    result = babysit_cli("set", "lr", "-1", *d)
    assert result.returncode == 2
    assert "lr must be a finite number > 0" in result.stderr and "'-1'" in result.stderr
    assert len(RunStore(run_dir).commands()) == before

    # Pause holds the step: a nudge sent while paused is applied by the waiting trainer at the
    # held step (so its loop went round without stepping), then resume lets it go on.
    result = babysit_cli("pause", *d, "--wait")
    assert result.returncode == 0, result.stderr
    held = int(result.stdout.split("applied at step ")[1].split()[0])
    result = babysit_cli("set", "momentum", "0.95", *d, "--wait")
    assert result.returncode == 0, result.stderr
    assert f"set momentum 0.95: applied at step {held}" in result.stdout
    wait_for(lambda: RunStore(run_dir).status()["momentum"] == 0.95, what="the new momentum in the status")
    info = status(run_dir)
    assert (info["state"], info["step"], info["lr"], info["momentum"]) == ("paused", held, 0.02, 0.95)
    assert babysit_cli("resume", *d, "--wait").returncode == 0
    wait_for(lambda: status(run_dir)["step"] > held, what="steps after resume")

    # Checkpoint now.
    result = babysit_cli("checkpoint", *d, "--wait")
    assert result.returncode == 0 and "checkpoint" in result.stdout
    info = wait_for(lambda: (lambda i: i if len([c for c in i["checkpoints"] if c["reason"] == "epoch"]) >= 2 else None)(status(run_dir)),
                    what="two epoch checkpoints")
    # The checkpoint it answers with: its own, or the epoch's when it landed on an epoch's last step.
    answered = next(c for c in RunStore(run_dir).commands() if c["kind"] == "checkpoint")["result"]["checkpoint"]
    assert answered in [c["id"] for c in info["checkpoints"]]
    assert all(Path(c["path"]).is_file() for c in info["checkpoints"])

    # Roll back to the end of epoch 1: a new branch from its step; the old branch stays.
    first = next(c for c in info["checkpoints"] if c["epoch"] == 1 and c["reason"] == "epoch")
    result = babysit_cli("rollback", str(first["id"]), *d, "--wait")
    assert result.returncode == 0, result.stderr
    assert "branch 2" in result.stdout and f"step {first['step']}" in result.stdout
    info = status(run_dir)
    assert info["branch"] == 2 and info["lr"] == first["hparams"]["lr"] == 0.05
    assert info["momentum"] == 0.9  # the checkpoint's own hyperparameters, as asked (the default)
    store = RunStore(run_dir)
    assert {(s.name, s.branch) for s in store.series()} >= {("loss", 1), ("loss", 2)}
    assert [b["from_checkpoint"] for b in store.branches()] == [None, first["id"]]

    # Stop: a final checkpoint and a clean exit. The stop's answer names the final checkpoint, of
    # the step where the run stopped. A stop that lands on an epoch's last step is answered by that
    # epoch's own checkpoint (the same state: no second file of it), so its reason is "epoch" there.
    result = babysit_cli("stop", *d, "--wait")
    assert result.returncode == 0, result.stderr
    assert trainer.wait_exit(timeout=60) == 0
    info = status(run_dir)
    stopped_at = info["checkpoints"][-1]
    stop_row = RunStore(run_dir).command(int(re.search(r"#(\d+)", result.stdout).group(1)))
    assert info["state"] == "stopped" and stop_row["result"]["checkpoint"] == stopped_at["id"]
    assert stopped_at["step"] == info["step"]
    # (That step is an epoch's end whether the stop landed at its last boundary or at the next
    # epoch's first, which shares the step.)
    at_epoch_end = any(end == stopped_at["step"] for _, _, end in RunStore(run_dir).epochs())
    assert stopped_at["reason"] == ("epoch" if at_epoch_end else "stop"), (stopped_at, info)

    # Commands for a run that is not running are refused, and nothing is queued.
    result = babysit_cli("set", "lr", "0.1", *d)
    assert result.returncode == 2 and "is not running" in result.stderr and "trainer is stopped" in result.stderr
    assert status(run_dir)["pending_commands"] == []

    # Running train again resumes from the latest checkpoint, on the same branch.
    again = trainers(run_dir, "--epochs", "500", *FAST)
    resumed = again.wait_running(min_step=stopped_at["step"] + 1)
    assert resumed["branch"] == 2
    assert f"resumed from checkpoint #{stopped_at['id']}" in resumed["message"]
    assert babysit_cli("stop", *d, "--wait").returncode == 0
    assert again.wait_exit(timeout=60) == 0


def test_train_refuses_a_bad_lr_before_making_the_run(tmp_path: Path) -> None:
    # Other misuse (unknown commands, missing values, directories that are not runs) is in
    # tests/test_hostile_input.py.
    result = babysit_cli("train", "--run-dir", str(tmp_path / "t"), "--lr", "0")
    assert result.returncode == 2 and "lr must be a finite number > 0" in result.stderr
    assert not (tmp_path / "t" / "run.db").exists()


def test_train_refuses_a_second_trainer_on_the_same_run(tmp_path: Path) -> None:
    # The first trainer is a loop in this process (holding the run's lock as every trainer does),
    # stopped at its first step boundary while `python -m babysit train` tries the same run.
    run_dir = tmp_path / "run"
    seen: dict[str, object] = {}

    def second_trainer(run: object, step: int) -> None:
        if step == 1:
            seen["result"] = babysit_cli("train", "--run-dir", str(run_dir), *FAST)
            seen["lock"] = (run_dir / LOCK_NAME).read_text()

    run, _ = tiny_job(run_dir, epochs=1, on_step=second_trainer)
    result = seen["result"]
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"already used by another trainer (pid {os.getpid()} on " in result.stderr
    # The refused trainer left the run alone: the lock still names this process, which trained on.
    assert str(seen["lock"]).startswith(f"pid {os.getpid()} on ")
    assert run.status == "finished" and RunStore(run_dir).status()["pid"] == os.getpid()
    assert [c["step"] for c in RunStore(run_dir).checkpoints()] == [8]


# -- the checkpoint cadence of a built-in job (issue 21) -------------------------------------------
def test_train_checkpoints_every_n_steps_and_a_resume_keeps_the_cadence_unless_given_another(tmp_path: Path) -> None:
    for option, value, said in (
            ("--checkpoint-every-steps", "0", "--checkpoint-every-steps '0': give a whole number of steps >= 1"),
            ("--checkpoint-every-steps", "2.5", "--checkpoint-every-steps '2.5': give a whole number of steps >= 1"),
            ("--checkpoint-every-minutes", "-1", "--checkpoint-every-minutes '-1': give a number of minutes > 0"),
            ("--checkpoint-every-minutes", "inf", "--checkpoint-every-minutes 'inf': give a number of minutes > 0")):
        refused = cli_here("train", "--run-dir", str(tmp_path / "bad"), option, value)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
        assert not (tmp_path / "bad").exists()  # refused before anything was made

    run_dir = tmp_path / "run"
    d = ("--run-dir", str(run_dir))
    first = babysit_cli("train", *d, *FAST, "--epochs", "1", "--checkpoint-every-steps", "10",
                        "--checkpoint-every-minutes", "30", check=True)
    assert "; a checkpoint every 10 steps or every 30 min, and at each epoch's end" in first.stdout
    assert [(c["step"], c["reason"]) for c in status(run_dir)["checkpoints"]] == [
        (10, "periodic"), (20, "periodic"), (23, "epoch")]
    shown = babysit_cli("status", *d, check=True).stdout
    # The run finished: its cadence is said, with nothing due.
    assert "cadence      every 10 steps or every 30 min\n" in shown, shown
    # Resumed without the options, it keeps its cadence; given another, it takes that one.
    babysit_cli("train", *d, "--epochs", "2", check=True)
    assert [c["step"] for c in status(run_dir)["checkpoints"]][3:] == [30, 40, 46]
    babysit_cli("train", *d, "--epochs", "3", "--checkpoint-every-steps", "20", check=True)
    assert [c["step"] for c in status(run_dir)["checkpoints"]][6:] == [60, 69]
    assert RunStore(run_dir).get_meta("config")["checkpoint_every_steps"] == 20


# -- choosing the job ----------------------------------------------------------------------------
def test_train_runs_the_character_model_by_default_and_a_resume_keeps_the_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    babysit_cli("train", "--run-dir", str(run_dir), "--epochs", "1", "--steps-per-epoch", "3", check=True)
    store = RunStore(run_dir)
    assert store.get_meta("config")["job"] == "charlm"
    assert [(c["epoch"], c["step"]) for c in store.checkpoints()] == [(1, 3)]
    # Resumed without --job, it stays a character model (and --steps-per-epoch is still its option).
    babysit_cli("train", "--run-dir", str(run_dir), "--epochs", "2", check=True)
    assert [(c["epoch"], c["step"]) for c in RunStore(run_dir).checkpoints()] == [(1, 3), (2, 6)]

    result = babysit_cli("train", "--run-dir", str(run_dir), "--job", "digits", "--epochs", "3")
    assert result.returncode == 2
    assert (f"--job digits: the run in {run_dir} is a charlm run and can only resume as one; pass --job charlm, "
            "or another --run-dir for a new digits run") in result.stderr
    assert len(RunStore(run_dir).checkpoints()) == 2


def test_digits_is_still_a_job_and_each_job_takes_only_its_own_options(tmp_path: Path) -> None:
    run_dir = tmp_path / "digits"
    babysit_cli("train", "--run-dir", str(run_dir), "--epochs", "1", *FAST, check=True)
    store = RunStore(run_dir)
    assert store.get_meta("config")["epoch_passes"] == 1 and "seq_len" not in store.get_meta("config")
    assert [(c["epoch"], c["step"]) for c in store.checkpoints()] == [(1, 23)]

    # In this process (cli.main): each refusal would otherwise start Python and import torch.
    result = cli_here("train", "--run-dir", str(tmp_path / "new"), "--epoch-passes", "2")
    assert result.returncode == 2
    assert ("--epoch-passes is not an option of job charlm (its options: --epochs, --lr, --momentum, --optimizer, "
            "--seed, --batch-size, --seq-len, --steps-per-epoch, --checkpoint-every-steps, --checkpoint-every-minutes)"
            ) in result.stderr
    result = cli_here("train", "--run-dir", str(tmp_path / "new"), "--job", "digits", "--seq-len", "8")
    assert result.returncode == 2 and "--seq-len is not an option of job digits" in result.stderr
    assert not (tmp_path / "new").exists()


def test_an_unknown_job_is_refused_naming_it_and_the_jobs_there_are(tmp_path: Path) -> None:
    result = babysit_cli("train", "--run-dir", str(tmp_path / "run"), "--job", "mnist")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.endswith("argument --job: invalid choice: 'mnist' (choose from 'charlm', 'digits')\n")
    result = babysit_cli("demo", "--run-dir", str(tmp_path / "run"), "--job", "mnist")
    assert result.returncode == 2 and "invalid choice: 'mnist' (choose from 'charlm', 'digits')" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_of_someone_elses_job_is_not_resumed_by_train(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "mine", create=True)
    store.set_meta("config", {"job": "my-gan", "lr": 0.1})
    store.close()
    result = babysit_cli("train", "--run-dir", str(tmp_path / "mine"))
    assert result.returncode == 2
    assert ("the run in {} was started by job 'my-gan', which is not one of babysit's (charlm, digits); resume it "
            "by running its own training script").format(tmp_path / "mine") in result.stderr


def test_train_refuses_a_run_an_own_script_made_in_one_line_saying_to_run_that_script(tmp_path: Path) -> None:
    import torch
    from torch import nn

    import babysit

    for config in ({}, {"hidden": 64}):  # no config, and a config no job has
        run_dir = tmp_path / f"own-{len(config)}"
        model = nn.Linear(2, 1)
        with babysit.Run(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1), config=config) as run:
            for _ in run.epochs(1):
                for _ in run.batches(range(2)):
                    pass
        refused = cli_here("train", "--run-dir", str(run_dir), "--epochs", "3")
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr == (f"babysit: error: the run in {run_dir} was made by its own training script (babysit.Run "
                                  "in a script), not by one of babysit's jobs (charlm, digits); `train` cannot resume "
                                  "it: run that script again and it resumes from the latest checkpoint\n")
        assert [c["epoch"] for c in RunStore(run_dir).checkpoints()] == [1]


def test_dashboard_opens_one_run_by_run_dir_and_refuses_a_directory_that_is_none(tmp_path: Path, monkeypatch) -> None:
    from babysit import cli

    served = []
    monkeypatch.setattr(cli, "serve_dashboard", lambda **kwargs: served.append(kwargs) or 0)
    run_dir = tmp_path / "deep" / "runs" / "a"
    RunStore(run_dir, create=True)
    assert cli_here("dashboard", "--run-dir", str(run_dir)).returncode == 0
    assert (served[-1]["root"], served[-1]["run"]) == (str(run_dir.parent), str(run_dir))
    assert cli_here("dashboard", "--run-dir", str(run_dir), "--root", str(tmp_path)).returncode == 0
    assert (served[-1]["root"], served[-1]["run"]) == (str(tmp_path), str(run_dir))
    assert cli_here("dashboard").returncode == 0 and (served[-1]["root"], served[-1]["run"]) == ("checkpoints", None)
    refused = cli_here("dashboard", "--run-dir", str(tmp_path / "deep"))
    assert refused.returncode == 2 and refused.stderr == (
        f"babysit: error: {str(tmp_path / 'deep')!r} is not a babysit run (it has no run.db)\n")
    assert len(served) == 3
