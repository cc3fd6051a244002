"""babysit.lightning end to end: a real Lightning trainer subprocess (tests/lightning_script.py: 20
steps an epoch, 3 epochs, SGD with momentum, a per-step LambdaLR) driven only through the CLI.

One babysat run goes through every command — pause, set lr / set momentum (read back from what
the optimizer holds as the next step trains), checkpoint now, a rollback to a mid-epoch checkpoint,
a kill -9 and a restart, a stop — and is compared with an untouched run of the same script: the
new branch and the restarted trainer must train the very same batches with the very same weights.
"""

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
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from babysit.checkpoint import KEY_MODEL, KEY_OPTIMIZER, read_verified
from babysit.lightning import BabysitCallback
from babysit.store import RunStore, optimizers_of
from tests.conftest import REPO, babysit_cli, wait_for
from tests.lightning_script import weights_fingerprint

SCRIPT = REPO / "tests" / "lightning_script.py"
STEPS = 20     # per epoch
EPOCHS = 3
TIMEOUT = 240  # seconds for anything a trainer on a busy machine has to reach


class Script:
    """tests/lightning_script.py in a subprocess, recording its steps into ``<run>.jsonl``."""

    def __init__(self, run_dir: Path, *args: str, package: str = "pytorch_lightning") -> None:
        self.run_dir, self.record = run_dir, run_dir.parent / f"{run_dir.name}.jsonl"
        self.log = run_dir.parent / f"{run_dir.name}.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--record", str(self.record),
                 "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS), *args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                     "BABYSIT_LIGHTNING_PACKAGE": package})

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.record.read_text().splitlines()] if self.record.exists() else []

    def store(self) -> RunStore:
        return wait_for(lambda: (self.run_dir / "run.db").exists() and RunStore(self.run_dir), TIMEOUT,
                        what="the run store")

    def wait_paused(self, step: int, branch: int) -> dict[str, Any]:
        def paused() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"the trainer exited ({self.process.returncode}):\n{self.log.read_text()}")
            status = self.store().status()
            return status if (status.get("state"), status.get("step"), status.get("branch")) == ("paused", step, branch) else None
        return wait_for(paused, TIMEOUT, what=f"the pause at step {step} of branch {branch}")

    def exit_code(self) -> int:
        try:
            return self.process.wait(timeout=TIMEOUT)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def cli(run_dir: Path, *args: str) -> str:
    result = babysit_cli(*args, "--run-dir", str(run_dir), "--wait", "--timeout", str(TIMEOUT), timeout=TIMEOUT + 30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def checkpoint_state(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    return read_verified(run_dir / record["file"], record["sha256"])


def by_step(rows: list[dict[str, Any]], branch: int) -> dict[int, dict[str, Any]]:
    """The last record of each step on ``branch`` (a restarted trainer trains a step again)."""
    return {row["step"]: row for row in rows if row["branch"] == branch}


TRAINED = ("batch", "weights", "lr", "momentum", "epoch", "batch_idx", "global_step")


def same_training(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[key] == b[key] for key in TRAINED)


@pytest.fixture
def scripts() -> Any:
    started: list[Script] = []

    def start(run_dir: Path, *args: str, **options: str) -> Script:
        started.append(Script(run_dir, *args, **options))
        return started[-1]

    yield start
    for script in started:
        script.kill()


def test_a_lightning_run_obeys_every_command_and_replays_exactly_after_rollback_and_kill_9(tmp_path: Path,
                                                                                           scripts: Any) -> None:
    straight = scripts(tmp_path / "straight")  # the same script, untouched, alongside
    run_dir = tmp_path / "run"
    # The run pauses itself after step 10 (inside epoch 1) and after step 45 (inside epoch 3), on
    # any branch, whatever this machine's speed.
    first = scripts(run_dir, "--pause-at-step", "10", "--pause-at-step", "45")
    store = first.store()

    # -- paused at step 10: one "checkpoint now", then nudges applied at the next boundary ---------
    first.wait_paused(10, branch=1)
    assert cli(run_dir, "checkpoint").strip().endswith("(checkpoint 1)")
    mid_epoch = store.checkpoints()
    assert [(c["id"], c["reason"], c["step"], c["step_in_epoch"]) for c in mid_epoch] == [(1, "command", 10, 10)]
    scheduled_lr = mid_epoch[0]["hparams"]["lr"]
    assert scheduled_lr == pytest.approx(0.05 / 1.10)  # LambdaLR after 10 steps
    assert re.search(r"set lr 0.02: applied at step 10 \(after 0.02\)", cli(run_dir, "set", "lr", "0.02"))
    assert re.search(r"set momentum 0.5: applied at step 10 \(after 0.5\)", cli(run_dir, "set", "momentum", "0.5"))
    assert max(row["step"] for row in first.rows()) == 10  # nothing trained while paused
    cli(run_dir, "resume")

    # -- paused at step 45 (epoch 3): the nudged lr survived the schedule; roll back to step 10 ----
    first.wait_paused(45, branch=1)
    nudged = by_step(first.rows(), branch=1)
    assert (nudged[11]["lr"], nudged[11]["momentum"]) == (0.02, 0.5)  # what the optimizer held at step 11
    for step in (12, 30, 45):  # the LambdaLR decay goes on from the nudged value instead of undoing it
        assert nudged[step]["lr"] == pytest.approx(0.02 * 1.10 / (1 + 0.01 * (step - 1)))
        assert nudged[step]["momentum"] == 0.5
    # The epochs' own checkpoints are the only others (written in the background: waited for).
    wait_for(lambda: [c["step"] for c in store.checkpoints()] == [10, 20, 40], TIMEOUT, what="epoch checkpoints")
    cli(run_dir, "rollback", "1")
    # The new branch starts from the checkpoint, with its weights and hparams, and pauses at 45 again.
    first.wait_paused(45, branch=2)
    branch = store.branch(2)
    assert (branch["from_checkpoint"], branch["start_step"]) == (1, 10)
    rolled = by_step(first.rows(), branch=2)
    assert min(rolled) == 11 and rolled[11]["weights"] == weights_fingerprint(
        checkpoint_state(run_dir, mid_epoch[0])[KEY_MODEL])
    assert (rolled[11]["lr"], rolled[11]["momentum"]) == (scheduled_lr, 0.9)
    assert (rolled[11]["epoch"], rolled[11]["batch_idx"], rolled[11]["global_step"]) == (0, 10, 10)

    # -- kill -9 after a checkpoint at step 45 of branch 2, then restart the same script ----------
    cli(run_dir, "checkpoint")
    first.process.kill()
    first.exit_code()
    second = scripts(run_dir, "--pause-at-step", "50")
    second.wait_paused(50, branch=2)
    resume = [e for e in store.events() if e["kind"] == "resume"]
    assert len(resume) == 1 and re.search(r"resumed from checkpoint #\d+ \(epoch 3, step 45\)", resume[0]["message"])
    # -- stop: the run ends with a final checkpoint of its last step --------------------------------
    cli(run_dir, "stop")
    assert second.exit_code() == 0, second.log.read_text()
    assert store.status()["state"] == "stopped"
    last = store.checkpoints()[-1]
    assert (last["reason"], last["branch"], last["step"]) == ("stop", 2, 50)
    saved = checkpoint_state(run_dir, last)
    assert saved[KEY_OPTIMIZER]["param_groups"][0]["momentum"] == 0.9

    # Branch 2 and the restarted trainer trained exactly what the untouched run trained: the same
    # batches in the same order, the same weights, lr and momentum, the same Lightning counters.
    assert straight.exit_code() == 0, straight.log.read_text()
    reference = by_step(straight.rows(), branch=1)
    assert len(reference) == EPOCHS * STEPS
    replayed = by_step(first.rows() + second.rows(), branch=2)
    assert sorted(replayed) == list(range(11, 51))
    mismatched = [step for step in replayed if not same_training(replayed[step], reference[step])]
    assert mismatched == []
    # ...and the curve shows the loss and what the module logged, per step, on both branches.
    names = {(s.name, s.branch) for s in store.series()}
    assert {("loss", 1), ("loss", 2), ("train_loss", 1), ("train_loss", 2)} <= names
    reference_store = RunStore(tmp_path / "straight")
    assert [c["metrics"]["val_loss"] for c in reference_store.checkpoints()][0] == pytest.approx(
        next(c for c in store.checkpoints() if (c["branch"], c["step"]) == (2, 20))["metrics"]["val_loss"])


def test_the_guard_rolls_a_lightning_run_back_by_itself_and_sigterm_stops_it_with_a_checkpoint(tmp_path: Path, scripts: Any) -> None:
    """The loss goes NaN at step 25 (epoch 2) on the first branch; the guard, allowed one automatic
    remedy, rolls back to the last healthy checkpoint (epoch 1's) with the lr halved, and the new
    branch trains with finite weights until a SIGTERM stops it with a final checkpoint."""
    run_dir = tmp_path / "run"
    script = scripts(run_dir, "--nan-at-step", "25", "--guard-auto-remedy", "1", "--pause-at-step", "22")
    # Paused at step 22 until epoch 1's checkpoint is listed (it is written in the background), so
    # that the guard has a healthy checkpoint to go back to whatever this machine's speed.
    script.wait_paused(22, branch=1)
    store = script.store()
    wait_for(lambda: len(store.checkpoints()) == 1, TIMEOUT, what="epoch 1's checkpoint")
    cli(run_dir, "resume")
    script.wait_paused(22, branch=2)  # the script's own pause, again on the guard's new branch
    # SIGTERM (a scheduler ending the job) stops even a paused trainer, with a final checkpoint;
    # Lightning then ends the process with its SIGTERMException (a SystemExit), as without babysit.
    script.process.send_signal(signal.SIGTERM)
    assert script.exit_code() == 0 and "lightning_script:" not in script.log.read_text()
    assert store.status()["state"] == "stopped" and "signal SIGTERM" in store.status()["message"]
    assert (store.checkpoints()[-1]["reason"], store.checkpoints()[-1]["step"]) == ("stop", 22)
    divergence = [e for e in store.events() if e["kind"] == "divergence"]
    assert len(divergence) == 1 and "rolling back to checkpoint #1" in divergence[0]["message"]
    guard_rollback = next(c for c in store.commands() if c["kind"] == "rollback")
    assert (guard_rollback["source"], guard_rollback["state"], guard_rollback["result"]["branch"]) == ("guard", "applied", 2)
    branch = store.branch(2)
    assert (branch["from_checkpoint"], branch["start_step"]) == (1, 20)
    rows = by_step(script.rows(), branch=2)
    halved = guard_rollback["args"]["lr"]
    # half the lr of the healthy checkpoint it goes back to (babysit.instruments.remedy_offer), not
    # of the lr that diverged
    assert halved == pytest.approx(store.checkpoints()[0]["hparams"]["lr"] / 2)
    assert sorted(rows) == [21, 22] and rows[21]["lr"] == halved
    assert rows[21]["weights"] == weights_fingerprint(checkpoint_state(run_dir, store.checkpoints()[0])[KEY_MODEL])
    final = checkpoint_state(run_dir, store.checkpoints()[-1])[KEY_MODEL]
    assert store.checkpoints()[-1]["branch"] == 2 and all(torch.isfinite(t).all() for t in final.values())


@pytest.fixture(scope="module")
def untouched(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, dict[str, Any]], dict[str, torch.Tensor]]:
    """The script's steps and final weights, trained from start to end without a signal."""
    script = Script(tmp_path_factory.mktemp("untouched") / "run")
    assert script.exit_code() == 0, script.log.read_text()
    final = RunStore(script.run_dir).checkpoints()[-1]
    return by_step(script.rows(), branch=1), checkpoint_state(script.run_dir, final)[KEY_MODEL]


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_sigterm_under_either_lightning_package_stops_where_it_lands_and_resumes_exactly(
        tmp_path: Path, scripts: Any, untouched: Any, package: str) -> None:
    """A preemption: SIGTERM lands as step 27 ends (mid-epoch 2). The run stops with a final
    checkpoint there (not "crashed"); the script started again resumes from it and trains the same
    steps, with the same weights, as a run that was never signalled."""
    run_dir = tmp_path / "run"
    assert scripts(run_dir, "--sigterm-at-step", "27", package=package).exit_code() == 0
    store = RunStore(run_dir)
    status = store.status()
    assert (status["state"], status["message"]) == ("stopped", "stopped at step 27 (signal SIGTERM) with a final checkpoint")
    final = store.checkpoints()[-1]
    assert (final["reason"], final["step"]) == ("stop", 27)
    assert "babysit: stopped at step 27 (signal SIGTERM); the final checkpoint took " in (
        run_dir.parent / "run.log").read_text()  # what the grace period must leave room for
    again = scripts(run_dir, package=package)
    assert again.exit_code() == 0, again.log.read_text()
    assert store.status()["state"] == "finished"
    steps, weights = untouched
    rows = by_step(again.rows(), branch=1)
    assert sorted(rows) == sorted(steps) == list(range(1, STEPS * EPOCHS + 1))
    assert [step for step in steps if not same_training(rows[step], steps[step])] == []
    resumed = checkpoint_state(run_dir, store.checkpoints()[-1])[KEY_MODEL]
    assert all(torch.equal(resumed[name], weights[name]) for name in weights)


def test_bad_arguments_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"run_dir must be a directory path, got ''"):
        BabysitCallback("")
    with pytest.raises(ValueError, match=r"state must be a dict without the key '_lightning', got \{'_lightning': 1\}"):
        BabysitCallback("checkpoints/x", state={"_lightning": 1})


# -- the example of docs/frameworks.md (the README shows its babysit lines) ------------------------
def readme_example() -> str:
    section = (REPO / "docs" / "frameworks.md").read_text().split("## PyTorch Lightning\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_trains_resumes_and_obeys(tmp_path: Path) -> None:
    code = readme_example()
    assert "max_epochs=50" in code and code.count("# babysit") == 2  # the import and the callback
    script = tmp_path / "train.py"
    script.write_text("import sys\n" + code.replace("max_epochs=50", "max_epochs=int(sys.argv[1])"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.run([sys.executable, str(script), "2"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=TIMEOUT, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = tmp_path / "checkpoints" / "my-lightning-run"
    store = RunStore(run_dir)
    assert store.status()["state"] == "finished"
    assert [(c["epoch"], c["step"]) for c in store.checkpoints()] == [(1, 28), (2, 56)]
    assert all(c["metrics"]["val_loss"] > 0 for c in store.checkpoints())

    # The same script again, for more epochs: it resumes at epoch 3, takes a nudge, stops.
    log = open(tmp_path / "again.log", "wb")
    again = subprocess.Popen([sys.executable, str(script), "400"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                             env=env)
    try:
        wait_for(lambda: store.status().get("alive") and store.status()["epoch"] >= 3, TIMEOUT, what="the resumed run")
        assert re.search(r"set lr 0.005: applied at step \d+ \(after 0.005\)", cli(run_dir, "set", "lr", "0.005"))
        cli(run_dir, "stop")
        assert again.wait(timeout=TIMEOUT) == 0, (tmp_path / "again.log").read_text()
    finally:
        if again.poll() is None:
            again.kill()
        log.close()
    assert store.status()["state"] == "stopped"
    assert [e["kind"] for e in store.events()].count("resume") == 1
    last = store.checkpoints()[-1]
    # The nudge, then the example's own StepLR halving it every 10 epochs (a slow machine may cross one).
    assert last["reason"] in ("stop", "epoch") and last["step"] > 56
    assert last["hparams"]["lr"] in [0.005 * 0.5 ** k for k in range(8)]


# -- several optimizers, manual optimization (in this process: no command has to reach it live) --
class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (a GAN's shape): two optimizer steps per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        for net, optimizer in zip((self.a, self.b), self.optimizers()):
            loss = net(x).pow(2).mean()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def configure_optimizers(self) -> Any:
        return (torch.optim.SGD(self.a.parameters(), lr=0.1, momentum=0.9),
                torch.optim.Adam(self.b.parameters(), lr=0.01))


def fit_two_optimizers(run_dir: Path, epochs: int, *callbacks: pl.Callback) -> pl.Trainer:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8, shuffle=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*callbacks, BabysitCallback(run_dir, flush_interval=0.05)])
    trainer.fit(TwoOptimizers(), loader)
    return trainer


class LookAtTheStart(pl.Callback):
    """What the trainer holds once babysit has resumed the run (its on_fit_start is done)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.global_step = trainer.global_step
        self.adam = [state["exp_avg"].clone() for state in trainer.optimizers[1].state.values()]


def test_with_two_optimizers_babysit_names_them_by_place_nudges_either_and_restores_both(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    first = fit_two_optimizers(run_dir, 1)
    assert first.global_step == 16  # 8 batches, two optimizer steps each
    saved_adam = [state["exp_avg"].clone() for state in first.optimizers[1].state.values()]
    assert list(optimizers_of(RunStore(run_dir).status())) == ["0", "1"]
    # A nudge queued while no trainer runs is applied at the resumed run's first step boundary.
    command = RunStore(run_dir).enqueue_command("set_lr", {"value": 0.05}, source="test", require_live=False)
    second_one = RunStore(run_dir).enqueue_command("set_momentum", {"value": 0.8, "optimizer": "1"}, source="test",
                                                   require_live=False)

    look = LookAtTheStart()
    second = fit_two_optimizers(run_dir, 2, look)
    assert (look.global_step, second.global_step) == (16, 32)
    assert len(look.adam) == 2 and all(torch.equal(a, b) for a, b in zip(look.adam, saved_adam))
    store = RunStore(run_dir)
    assert (store.command(command)["state"], store.command(command)["result"]["after"]) == ("applied", 0.05)
    assert [o.param_groups[0]["lr"] for o in second.optimizers] == [0.05, 0.01]  # the first only
    assert store.command(second_one)["result"]["optimizer"] == "1"
    assert second.optimizers[1].param_groups[0]["betas"][0] == 0.8 and second.optimizers[0].param_groups[0][
        "momentum"] == 0.9
    assert [(c["epoch"], c["step"]) for c in store.checkpoints()] == [(1, 8), (2, 16)]


def scored(lightning: Any) -> Any:
    """A regression with a training metric logged per epoch only (torchmetrics' usual way) and a
    validation loss a ModelCheckpoint monitors, as a module of the ``lightning`` package given."""

    class Scored(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_mae", (self.net(x) - y).abs().mean(), on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Scored()


class RollBackAt(pl.Callback):
    """Queue a rollback to epoch 1's checkpoint, with a tiny lr, at branch 1's step ``step``; note
    each validation's loss by branch."""

    def __init__(self, run_dir: Path, step: int) -> None:
        self.run_dir, self.step, self.babysat = run_dir, step, None
        self.val_losses: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        run = self.babysat.run
        if (run.branch, run.step + 1) == (1, self.step):
            wait_for(lambda: RunStore(self.run_dir).checkpoints(), timeout=60, what="epoch 1's checkpoint listed")
            first = RunStore(self.run_dir).checkpoints()[0]
            RunStore(self.run_dir).enqueue_command("rollback", {"checkpoint": first["id"], "hparams": "current",
                                                                "lr": 1e-6}, source="test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_losses.setdefault(self.babysat.run.branch, []).append(float(trainer.callback_metrics["val_loss"]))


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_model_checkpoint_forgets_the_abandoned_branch_and_epoch_metrics_reach_the_chart(tmp_path: Path,
                                                                                           package: str) -> None:
    """Branch 1 trains 3 epochs well (ModelCheckpoint's best: epoch 3's); a rollback to epoch 1's
    checkpoint goes on with an lr too small to learn. The best and the top-k are then branch 2's
    files, never the weights rolled away from; per-epoch training metrics are on the chart."""
    import importlib

    lightning = importlib.import_module(package)
    callbacks = importlib.import_module(f"{package}.callbacks")
    torch.set_num_threads(1)
    run_dir, saved = tmp_path / "run", tmp_path / "lightning-checkpoints"
    torch.manual_seed(0)
    x = torch.randn(96, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    best = callbacks.ModelCheckpoint(dirpath=saved, monitor="val_loss", save_top_k=2)
    babysat = BabysitCallback(run_dir, flush_interval=0.05)
    rollback = RollBackAt(run_dir, step=28)
    rollback.babysat = babysat
    trainer = lightning.Trainer(max_epochs=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[babysat, rollback, best])
    trainer.fit(scored(lightning), train, val)

    assert sorted(rollback.val_losses) == [1, 2] and len(rollback.val_losses[2]) == 4
    assert min(rollback.val_losses[1]) < min(rollback.val_losses[2])  # the abandoned branch scored better
    assert float(best.best_model_score) == pytest.approx(min(rollback.val_losses[2]))
    assert set(best.best_k_models) <= {str(p) for p in saved.glob("*.ckpt")}
    assert sorted(float(v) for v in best.best_k_models.values()) == pytest.approx(sorted(rollback.val_losses[2])[:2])
    # trainer.test(ckpt_path="best") would load branch 2's weights: its best file holds them.
    best_weights = torch.load(best.best_model_path, weights_only=False)["state_dict"]
    store = RunStore(run_dir)
    branch_2 = [c for c in store.checkpoints() if c["branch"] == 2]
    assert any(torch.equal(best_weights["net.weight"], read_verified(run_dir / c["file"], c["sha256"])[KEY_MODEL]["net.weight"])
               for c in branch_2)

    # The per-epoch training metric: one point per trained epoch, at its last step.
    series = {(s.branch, s.per): s for s in store.series() if s.name == "train_mae"}
    steps, values, _ = store.chunk_points(series[(1, "epoch")].id)
    assert steps.tolist() == [8, 16, 24] and all(v > 0 for v in values.tolist())
    steps, _, _ = store.chunk_points(series[(2, "epoch")].id)
    assert steps.tolist() == [16, 24, 32, 40]
    assert "train_mae" in store.checkpoints()[0]["metrics"]


@pytest.mark.parametrize("seed, warned", [(None, True), (0, False)])
def test_a_script_that_never_seeded_torch_is_told_what_to_add(tmp_path: Path, monkeypatch: Any, seed: int | None,
                                                              warned: bool) -> None:
    """torch.initial_seed() is a 64-bit pick of torch's own when the script seeds nothing."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(2**40 + 12345 if seed is None else seed)  # what an unseeded process holds
    x = torch.randn(32, 4)
    train = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[BabysitCallback(tmp_path / "run", flush_interval=0.05)])
    trainer.fit(scored(pl), train)
    events = [e for e in RunStore(tmp_path / "run").events() if e["kind"] == "exactness"]
    assert bool(events) is warned
    if warned:
        assert "torch was not seeded" in events[0]["message"] and "pl.seed_everything(0)" in events[0]["message"]
