"""babysit.hf: a real Hugging Face Trainer (tests/hf_script.py, a tiny GPT-2 from a config) driven
only through the CLI — nudges of lr and momentum that its LambdaLR keeps, pause and resume, one
checkpoint per "checkpoint now", kill -9 and a restart that resumes exactly, a rollback that goes on
from the chosen checkpoint as a new branch, a stop with a final checkpoint — plus the guard in
process and the errors a user can meet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from babysit import commands as cmd
from babysit.checkpoint import KEY_MODEL, read_verified
from babysit.store import RunStore
from tests.conftest import REPO, babysit_cli, wait_for

STEPS_PER_EPOCH, EPOCHS, WARMUP, BASE_LR = 16, 3, 4, 3e-3
TOTAL = STEPS_PER_EPOCH * EPOCHS


def schedule(k: int) -> float:
    """The factor of transformers' linear schedule after k scheduler steps."""
    return k / WARMUP if k < WARMUP else max(0.0, (TOTAL - k) / (TOTAL - WARMUP))


def start_script(run_dir: Path, record: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(run_dir.parent / f"{run_dir.name}-{record.stem}.log", "ab")
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "hf_script.py"), "--run-dir", str(run_dir),
                             "--epochs", str(EPOCHS), "--record", str(record), *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})


def rows(record: Path, event: str, branch: int | None = None) -> dict[int, dict[str, Any]]:
    found = [json.loads(line) for line in record.read_text().splitlines()]
    return {r["step"]: r for r in found if r["event"] == event and (branch is None or r["branch"] == branch)}


def paused_at(run_dir: Path, step: int, process: subprocess.Popen[bytes]) -> None:
    def check() -> bool:
        assert process.poll() is None, f"the trainer exited ({process.returncode})"
        status = RunStore(run_dir).status() if (run_dir / "run.db").exists() else {}
        return status.get("state") == "paused" and status.get("step") == step

    wait_for(check, timeout=180, what=f"the trainer paused at step {step}")


def cli(*args: str) -> str:
    return babysit_cli(*args, check=True, timeout=120).stdout


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_trainer_obeys_the_cli_survives_kill_9_and_rolls_back(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    record_a, record_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    store = lambda: RunStore(run_dir)  # noqa: E731  (a fresh reader each time, as the CLI is)

    # -- first trainer: nudges, pause, checkpoint now; killed with SIGKILL at step 44 --------------
    first = start_script(run_dir, record_a, "--pause-at", "1:20,1:40,1:44", "--dump-at", "44")
    try:
        paused_at(run_dir, 20, first)
        assert "applied" in cli("set", "lr", "0.002", "--run-dir", str(run_dir), "--wait")
        assert "applied" in cli("set", "momentum", "0.8", "--run-dir", str(run_dir), "--wait")
        assert "applied" in cli("checkpoint", "--run-dir", str(run_dir), "--wait")
        # Paused means paused: the commands were applied at step 20 and nothing trained since.
        assert store().status()["step"] == 20 and max(rows(record_a, "step")) == 20
        assert [(c["step"], c["reason"]) for c in store().checkpoints()] == [(16, "epoch"), (20, "command")]
        cli("resume", "--run-dir", str(run_dir), "--wait")

        paused_at(run_dir, 40, first)
        cli("checkpoint", "--run-dir", str(run_dir), "--wait")
        cli("resume", "--run-dir", str(run_dir), "--wait")
        paused_at(run_dir, 44, first)
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first.returncode == -9

    steps_a = rows(record_a, "step")
    for step in range(1, 21):   # before the nudges: the schedule as configured
        assert steps_a[step]["lr"] == pytest.approx(BASE_LR * schedule(step - 1), rel=1e-12)
        assert steps_a[step]["beta1"] == 0.9
    for step in range(21, 45):  # after: the nudged lr, scaled by the schedule from there, not undone
        assert steps_a[step]["lr"] == pytest.approx(0.002 * schedule(step - 1) / schedule(20), rel=1e-9), step
        assert steps_a[step]["beta1"] == 0.8
    assert steps_a[21]["lr"] == 0.002
    checkpoints = store().checkpoints()
    assert [(c["step"], c["reason"]) for c in checkpoints] == [(16, "epoch"), (20, "command"), (32, "epoch"),
                                                              (40, "command")]

    # -- the same script again: it resumes from the latest checkpoint (mid-epoch, step 40) ---------
    second = start_script(run_dir, record_b, "--pause-at", "1:46,2:36", "--dump-at", "44")
    try:
        paused_at(run_dir, 46, second)
        latest = checkpoints[-1]
        saved = read_verified(run_dir / latest["file"], latest["sha256"])
        assert same(weights(tmp_path / "b-b1-begin-s40.pt"), saved[KEY_MODEL])
        # Exact: the same batches, the same dropout, the same weights as the run that was killed.
        assert same(weights(tmp_path / "b-b1-s44.pt"), weights(tmp_path / "a-b1-s44.pt"))
        losses_a, losses_b = rows(record_a, "loss"), rows(record_b, "loss", branch=1)
        assert [losses_b[s]["loss"] for s in range(41, 44)] == [losses_a[s]["loss"] for s in range(41, 44)]
        assert rows(record_b, "step", branch=1)[41]["lr"] == steps_a[41]["lr"]
        assert any(e["kind"] == "resume" and "died" in e["message"] for e in store().events())

        # -- roll back to the end of epoch 2: a new branch from that checkpoint's weights --------
        epoch_2 = next(c for c in checkpoints if c["step"] == 32)
        assert "applied" in cli("rollback", str(epoch_2["id"]), "--run-dir", str(run_dir), "--wait")
        paused_at(run_dir, 36, second)
        assert store().status()["branch"] == 2
        origin = read_verified(run_dir / epoch_2["file"], epoch_2["sha256"])
        assert same(weights(tmp_path / "b-b2-begin-s32.pt"), origin[KEY_MODEL])
        # The checkpoint's hyperparameters and position: branch 2 retraces branch 1 from step 32.
        steps_b2, losses_b2 = rows(record_b, "step", branch=2), rows(record_b, "loss", branch=2)
        assert min(steps_b2) == 33
        assert [steps_b2[s]["lr"] for s in range(33, 37)] == [steps_a[s]["lr"] for s in range(33, 37)]
        assert [losses_b2[s]["loss"] for s in range(33, 36)] == [losses_a[s]["loss"] for s in range(33, 36)]
        branch = next(b for b in store().branches() if b["id"] == 2)
        assert branch["from_checkpoint"] == epoch_2["id"] and branch["start_step"] == 32

        # -- stop: the trainer ends with a final checkpoint -------------------------------------
        cli("stop", "--run-dir", str(run_dir), "--wait")
        assert second.wait(timeout=120) == 0
    finally:
        if second.poll() is None:
            second.kill()
    last = store().checkpoints()[-1]
    assert (last["branch"], last["step"], last["reason"]) == (2, 36, "stop")
    assert store().status()["state"] == "stopped"


def test_the_divergence_guard_pauses_a_trainer_whose_loss_turns_nan(tmp_path: Path) -> None:
    """In process: the weights are poisoned after step 6; the Trainer would log the NaN loss as an
    average of the previous ones (logging_nan_inf_filter), so the callback turns that filter off."""
    from transformers import TrainerCallback

    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 6:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            time.sleep(0.05)  # a step as long as a real one: the guard reads the losses a few times a second

    trainer, babysat = hf_script.make_trainer(str(tmp_path / "run"), epochs=3, extra=[Poison()])
    assert trainer.args.logging_nan_inf_filter
    thread = threading.Thread(target=babysit.hf.train, args=(trainer,), daemon=True)
    thread.start()
    store = lambda: RunStore(tmp_path / "run")  # noqa: E731
    wait_for(lambda: (tmp_path / "run" / "run.db").exists() and store().status()["state"] == "paused",
             timeout=120, what="the guard's pause")
    assert not trainer.args.logging_nan_inf_filter
    assert any(e["kind"] == "divergence" for e in store().events())
    assert 7 <= store().status()["step"] < 3 * STEPS_PER_EPOCH
    store().enqueue_command(cmd.STOP, source="test")
    thread.join(timeout=120)
    assert not thread.is_alive() and store().status()["state"] == "stopped"


def test_train_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    from transformers import Trainer

    import babysit.hf
    from tests import hf_script

    trainer, _ = hf_script.make_trainer(str(tmp_path / "run"), epochs=1)
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='x' is not accepted"):
        babysit.hf.train(trainer, resume_from_checkpoint="x")
    bare = Trainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                   eval_dataset=trainer.eval_dataset)
    with pytest.raises(ValueError, match="exactly one BabysitCallback .* it has 0"):
        babysit.hf.train(bare)


def test_a_bare_trainer_train_says_how_to_resume(tmp_path: Path) -> None:
    """trainer.train() cannot move the Trainer's loop to a babysit checkpoint: it says so, and
    babysit.hf.train then resumes the run."""
    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)
    trainer, _ = hf_script.make_trainer(str(tmp_path / "run"), epochs=1)
    trainer.train()
    assert [c["step"] for c in RunStore(tmp_path / "run").checkpoints()] == [16]
    trainer, _ = hf_script.make_trainer(str(tmp_path / "run"), epochs=2)
    with pytest.raises(babysit.hf.RestartNeeded, match=r"resumes .* at step 16 .*babysit\.hf\.train\(trainer\)"):
        trainer.train()
    trainer, _ = hf_script.make_trainer(str(tmp_path / "run"), epochs=2)
    result = babysit.hf.train(trainer)
    assert result.global_step == 32
    assert [c["step"] for c in RunStore(tmp_path / "run").checkpoints()] == [16, 32]


def readme_example() -> str:
    section = (REPO / "docs" / "frameworks.md").read_text().split("## Hugging Face Trainer", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_trains_and_resumes(tmp_path: Path) -> None:
    example = readme_example()
    assert "babysit.hf.BabysitCallback(" in example and "babysit.hf.train(trainer)" in example
    script = tmp_path / "train.py"
    script.write_text("import sys\nimport torch\ntorch.set_num_threads(1)\n"
                      + example.replace("num_train_epochs=20", "num_train_epochs=int(sys.argv[1])"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    for epochs in (1, 2):
        done = subprocess.run([sys.executable, str(script), str(epochs)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    store = RunStore(tmp_path / "checkpoints" / "my-hf-run")
    steps_per_epoch = 448 // 8  # the Trainer's default batch size
    assert [(c["epoch"], c["step"]) for c in store.checkpoints()] == [(1, steps_per_epoch), (2, 2 * steps_per_epoch)]
    assert all("eval_loss" in c["metrics"] for c in store.checkpoints())
    assert store.status()["state"] == "finished"
    assert [e["kind"] for e in store.events()].count("resume") == 1
    losses = next(s for s in store.series() if s.name == "loss")
    steps, _, _ = store.chunk_points(losses.id)
    assert steps.tolist() == list(range(1, 2 * steps_per_epoch + 1))


def test_a_stop_at_an_epochs_last_step_lets_the_epoch_end_and_its_checkpoint_is_the_final_one(tmp_path: Path) -> None:
    """In process: a "checkpoint now" and a stop queued at the last step of epoch 1 are answered
    by the epoch's own checkpoint (taken after its evaluation); the run then resumes at epoch 2."""
    from transformers import TrainerCallback

    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    queued: dict[str, int] = {}

    class AtTheLastStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == STEPS_PER_EPOCH:
                store = RunStore(run_dir)
                queued["checkpoint"] = store.enqueue_command(cmd.CHECKPOINT, source="test")
                queued["stop"] = store.enqueue_command(cmd.STOP, source="test")

    trainer, _ = hf_script.make_trainer(str(run_dir), epochs=3, extra=[AtTheLastStep()])
    result = babysit.hf.train(trainer)
    assert result.global_step == STEPS_PER_EPOCH
    store = RunStore(run_dir)
    [epoch_1] = store.checkpoints()
    assert (epoch_1["step"], epoch_1["reason"]) == (STEPS_PER_EPOCH, "epoch") and "eval_loss" in epoch_1["metrics"]
    for kind in ("checkpoint", "stop"):
        row = store.command(queued[kind])
        assert (row["state"], row["step"], row["result"]["checkpoint"]) == (cmd.APPLIED, STEPS_PER_EPOCH, epoch_1["id"])
    assert store.status()["state"] == "stopped"

    # A stop queued while no trainer runs is applied before the resumed run's first step: not one
    # step is trained after it (the weights are the checkpoint's).
    stop = store.enqueue_command(cmd.STOP, source="test", require_live=False)
    trainer, _ = hf_script.make_trainer(str(run_dir), epochs=3)
    assert babysit.hf.train(trainer).global_step == STEPS_PER_EPOCH
    assert store.command(stop)["state"] == cmd.APPLIED and store.status()["state"] == "stopped"
    saved = read_verified(run_dir / epoch_1["file"], epoch_1["sha256"])[KEY_MODEL]
    assert same(trainer.model.state_dict(), saved)

    trainer, _ = hf_script.make_trainer(str(run_dir), epochs=3)
    assert babysit.hf.train(trainer).global_step == 3 * STEPS_PER_EPOCH
    assert [c["step"] for c in RunStore(run_dir).checkpoints() if c["reason"] == "epoch"] == [16, 32, 48]
    assert RunStore(run_dir).status()["state"] == "finished"


def test_a_resume_inside_an_epoch_with_gradient_accumulation_matches_a_run_never_interrupted(tmp_path: Path) -> None:
    """In process: SIGTERM at step 5 of 8 (two batches a step) stops there with a final
    checkpoint; the resumed run ends with the very weights of a run that was never stopped."""
    import signal

    from transformers import TrainerCallback

    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)

    class TermAt5(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 5:
                signal.raise_signal(signal.SIGTERM)  # as `kill` does: a stop at this step's boundary

    reference, _ = hf_script.make_trainer(str(tmp_path / "reference"), epochs=2, accumulation=2)
    babysit.hf.train(reference)

    run_dir = tmp_path / "run"
    trainer, _ = hf_script.make_trainer(str(run_dir), epochs=2, accumulation=2, extra=[TermAt5()])
    assert babysit.hf.train(trainer).global_step == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back once the run ended
    last = RunStore(run_dir).checkpoints()[-1]
    assert (last["step"], last["step_in_epoch"], last["reason"]) == (5, 5, "stop")
    assert "SIGTERM" in RunStore(run_dir).status()["message"]

    trainer, _ = hf_script.make_trainer(str(run_dir), epochs=2, accumulation=2)
    assert babysit.hf.train(trainer).global_step == 16
    assert same(trainer.model.state_dict(), reference.model.state_dict())


def test_the_trainers_own_saves_go_on_after_a_rollback_and_a_restart(tmp_path: Path) -> None:
    """In process, save_strategy="steps" with save_total_limit: a rollback at step 20 to epoch 1's
    checkpoint, a stop at step 26 of the new branch, and a restart of the script; the Trainer saves
    its own checkpoints all along (its state with its TrainerControl) and keeps two of them."""
    from transformers import TrainerCallback

    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    output = run_dir / "hf-output"
    saving = dict(save_strategy="steps", save_steps=5, save_total_limit=2)

    class RollBackThenStop(TrainerCallback):
        def __init__(self, babysat: babysit.hf.BabysitCallback) -> None:
            self.babysat = babysat

        def on_step_begin(self, args, state, control, **kwargs):
            run, step = self.babysat.run, state.global_step + 1
            if (run.branch, step) == (1, 20):
                wait_for(lambda: RunStore(run_dir).checkpoints(), timeout=60, what="epoch 1's checkpoint listed")
                first = RunStore(run_dir).checkpoints()[0]
                RunStore(run_dir).enqueue_command(cmd.ROLLBACK, {"checkpoint": first["id"]}, source="test")
            if (run.branch, step) == (2, 26):
                RunStore(run_dir).enqueue_command(cmd.STOP, source="test")

    trainer, babysat = hf_script.make_trainer(str(run_dir), epochs=2, **saving)
    trainer.add_callback(RollBackThenStop(babysat))
    assert babysit.hf.train(trainer).global_step == 26
    store = RunStore(run_dir)
    assert [(c["branch"], c["step"], c["reason"]) for c in store.checkpoints()] == [(1, 16, "epoch"), (2, 26, "stop")]
    saved = json.loads((output / "checkpoint-25" / "trainer_state.json").read_text())
    assert saved["global_step"] == 25 and "TrainerControl" in saved["stateful_callbacks"]

    trainer, _ = hf_script.make_trainer(str(run_dir), epochs=2, **saving)
    assert babysit.hf.train(trainer).global_step == 32
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-30", "checkpoint-32"]
    assert RunStore(run_dir).status()["state"] == "finished"


def test_a_script_that_never_seeded_torch_before_the_trainer_is_told_what_to_add(tmp_path: Path) -> None:
    """The Trainer seeds torch itself, but only once made: the data and model drawn before are
    another draw in a restarted process, unless the script seeded them."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)
    torch.manual_seed(2**40 + 12345)  # what an unseeded process holds
    babysat = babysit.hf.BabysitCallback(tmp_path / "run")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=hf_script.VOCAB, n_positions=hf_script.LENGTH, n_embd=16,
                                       n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=hf_script.counting_sequences(8, seed=1),
                      callbacks=[babysat])
    babysit.hf.train(trainer)
    [event] = [e for e in RunStore(tmp_path / "run").events() if e["kind"] == "exactness"]
    assert "torch was not seeded" in event["message"] and "transformers.set_seed(0)" in event["message"]
    # The harness seeds before it builds anything: no warning.
    seeded, _ = hf_script.make_trainer(str(tmp_path / "seeded"), epochs=1, max_steps=2)
    babysit.hf.train(seeded)
    assert not [e for e in RunStore(tmp_path / "seeded").events() if e["kind"] == "exactness"]


def test_the_trainers_best_model_record_survives_a_restart_for_load_best_model_at_end(tmp_path: Path) -> None:
    """The quick tour's load_best_model_at_end: a stop inside epoch 2 and a new Trainer (a new
    process, as after a kill -9) resuming the run must know epoch 1's evaluation as its best so
    far, as the Trainer's own resume from its checkpoint folder does; and a rollback to epoch 1's
    checkpoint puts back the record that checkpoint saw, not one made later on the branch left."""
    from transformers import TrainerCallback

    import babysit.hf
    from tests import hf_script

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    best = dict(save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="eval_loss")
    begins: list[tuple[int, int | None, float | None]] = []

    class Watch(TrainerCallback):
        def __init__(self, babysat: babysit.hf.BabysitCallback, act: bool) -> None:
            self.babysat, self.act = babysat, act

        def on_train_begin(self, args, state, control, **kwargs):
            begins.append((state.global_step, state.best_global_step, state.best_metric))

        def on_step_begin(self, args, state, control, **kwargs):
            run, step = self.babysat.run, state.global_step + 1
            if self.act and (run.branch, step) == (1, 20):
                RunStore(run_dir).enqueue_command(cmd.STOP, source="test")
            if not self.act and (run.branch, step) == (1, 36):
                first = RunStore(run_dir).checkpoints()[0]
                RunStore(run_dir).enqueue_command(cmd.ROLLBACK, {"checkpoint": first["id"]}, source="test")

    trainer, babysat = hf_script.make_trainer(str(run_dir), epochs=3, **best)
    trainer.add_callback(Watch(babysat, act=True))
    babysit.hf.train(trainer)
    epoch_1 = [row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row][0]

    begins.clear()
    trainer, babysat = hf_script.make_trainer(str(run_dir), epochs=3, **best)
    trainer.add_callback(Watch(babysat, act=False))
    babysit.hf.train(trainer)
    # The resumed loop at step 20 and the rolled-back one at step 16 both start from epoch 1's record.
    assert [b for b in begins if b[0]] == [(20, 16, pytest.approx(epoch_1)), (16, 16, pytest.approx(epoch_1))]
    assert trainer.state.best_model_checkpoint is not None and Path(trainer.state.best_model_checkpoint).is_dir()


def test_a_best_record_whose_folder_was_rotated_away_is_dropped_at_a_restart(tmp_path: Path) -> None:
    """The Trainer would keep its metric and forget the folder: a new branch worse than it would
    end with no best model to load. Dropped, the evaluations from the restart on decide."""
    from transformers import TrainerState

    from babysit.hf_state import restart_state

    kept = tmp_path / "checkpoint-16"
    kept.mkdir()
    for folder, expected in ((kept, (0.5, 16, str(kept))), (tmp_path / "checkpoint-8", (None, None, None))):
        best = {"best_metric": 0.5, "best_global_step": 16, "best_model_checkpoint": str(folder)}
        state = restart_state(TrainerState(), [], 20, 16, best)
        assert (state.best_metric, state.best_global_step, state.best_model_checkpoint) == expected
