"""A Hugging Face Trainer script as people write them, babysat: a tiny GPT-2 (built from a config,
nothing downloaded) learns to continue counting sequences; AdamW, a linear warmup/decay schedule,
an evaluation per epoch.

For the end-to-end tests it can also record what the optimizer holds before every step and what
the Trainer logs (``--record``), save the weights before chosen steps (``--dump-at``), and pause
itself at chosen steps with a real pause command (``--pause-at BRANCH:STEP,...``), so the moment a
test acts at does not depend on this machine's speed.

    python tests/hf_script.py --run-dir checkpoints/hf-demo [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed

import babysit.hf
from babysit import commands as cmd
from babysit.store import RunStore

VOCAB, LENGTH = 32, 16
WARMUP_STEPS = 4


def counting_sequences(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences start, start+step, start+2·step, … (mod VOCAB): learnable, made here."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (count,), generator=generator)
    steps = torch.randint(1, 4, (count,), generator=generator)
    rows = (starts[:, None] + steps[:, None] * torch.arange(LENGTH)[None, :]) % VOCAB
    return [{"input_ids": row, "labels": row} for row in rows]


class ForTheTests(TrainerCallback):
    """What the tests read: the optimizer's lr and β1 before each step, the logged losses, weights."""

    def __init__(self, babysat: babysit.hf.BabysitCallback, record: Path, dump_at: set[int],
                 pause_at: set[tuple[int, int]]) -> None:
        self.babysat, self.dump_at, self.pause_at = babysat, dump_at, pause_at
        self.rank = int(os.environ.get("RANK", "0"))  # under torchrun: each rank keeps its own record
        if self.rank:
            record = record.with_name(f"{record.stem}-rank{self.rank}{record.suffix}")
        self.record = open(record, "a")
        self.weights_stem = str(record.with_suffix(""))

    def _write(self, **row: object) -> None:
        self.record.write(json.dumps(row) + "\n")
        self.record.flush()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        run = self.babysat.run
        self._write(event="train_begin", branch=run.branch, step=state.global_step)
        torch.save(model.state_dict(), f"{self.weights_stem}-b{run.branch}-begin-s{state.global_step}.pt")

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        run, step = self.babysat.run, state.global_step + 1
        group = optimizer.param_groups[0]
        self._write(event="step", branch=run.branch, step=step, lr=group["lr"], beta1=group["betas"][0])
        if step in self.dump_at:
            torch.save(model.state_dict(), f"{self.weights_stem}-b{run.branch}-s{step}.pt")
        if (run.branch, step) in self.pause_at:  # applied at this step's boundary, like a person's click
            self.pause_at.discard((run.branch, step))
            if self.rank == 0:  # one person, one click
                RunStore(run.run_dir).enqueue_command(cmd.PAUSE, {"reason": f"the script, at step {step}"}, source="script")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._write(event="loss", branch=self.babysat.run.branch, step=state.global_step, loss=logs["loss"])


class StepLength(TrainerCallback):
    """Each step lasts at least ``seconds``, as a real model's does: under torchrun the ranks' sync
    steps (babysit.ranks, about 20 ms apart) are then a step or two apart, so a pause queued at a
    step lands before the epoch's end whatever this machine's speed."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - self.started)))


def make_trainer(run_dir: str, *, epochs: int, record: Path | None = None, dump_at: set[int] = frozenset(),
                 pause_at: set[tuple[int, int]] = frozenset(), extra: list[TrainerCallback] = (),
                 accumulation: int = 1, **arguments: object) -> tuple[Trainer, babysit.hf.BabysitCallback]:
    """The script's Trainer; ``arguments`` override its TrainingArguments (save_strategy=...)."""
    set_seed(0)  # before the model is made: its initial weights are drawn
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    settings = dict(
        output_dir=os.path.join(run_dir, "hf-output"), num_train_epochs=epochs,
        per_device_train_batch_size=4, per_device_eval_batch_size=16, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=WARMUP_STEPS, optim="adamw_torch", logging_steps=1,
        eval_strategy="epoch", save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, gradient_accumulation_steps=accumulation,
    )
    args = TrainingArguments(**{**settings, **arguments})
    babysat = babysit.hf.BabysitCallback(run_dir)
    callbacks = [babysat, *extra]
    if record is not None:
        callbacks.append(ForTheTests(babysat, record, set(dump_at), set(pause_at)))
    trainer = Trainer(model=model, args=args, train_dataset=counting_sequences(64, seed=1),
                      eval_dataset=counting_sequences(16, seed=2), callbacks=callbacks)
    return trainer, babysat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--record", type=Path, help="a JSON-lines file; weights are saved beside it")
    parser.add_argument("--dump-at", default="", help="steps before which the weights are saved: 12,44")
    parser.add_argument("--pause-at", default="", help="BRANCH:STEP pairs at which the script pauses itself")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="each step lasts at least this long")
    options = parser.parse_args()
    torch.set_num_threads(1)
    trainer, _ = make_trainer(
        options.run_dir, epochs=options.epochs, record=options.record,
        dump_at={int(step) for step in options.dump_at.split(",") if step},
        pause_at={tuple(int(x) for x in pair.split(":")) for pair in options.pause_at.split(",") if pair},
        extra=[StepLength(options.step_seconds)] if options.step_seconds else [],
    )
    babysit.hf.train(trainer)


if __name__ == "__main__":
    main()
