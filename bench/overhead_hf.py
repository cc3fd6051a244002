"""Per-step overhead of ``babysit.hf.BabysitCallback`` in a Hugging Face Trainer run.

The same Trainer run (tests/hf_script.py's tiny GPT-2, one epoch of ``--steps`` optimizer steps,
``logging_steps=1``, no evaluation, no HF checkpoints) with and without the callback, side by side
in one process: paired rounds, the order of the two shuffled every round, one warm-up round. The
figure is the whole loop — from ``on_train_begin`` (after the Run is made) to the end of the last
step (after babysit's step boundary) — divided by the steps: a mean, so the writer thread's bursts
count in full. Overheads are medians of the per-round differences; the median step inside the loop
is a secondary figure. The end of training (the Trainer's own, babysit's epoch checkpoint, the
values stored, the run closed) is a one-off, reported apart in ms.

    python -m bench.overhead_hf [--rounds 20] [--steps 100]     # writes bench/HF.md
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from babysit.hf import BabysitCallback  # noqa: E402
from tests import hf_script  # noqa: E402


class Clock(TrainerCallback):
    """Last in the callback list: its on_train_begin runs after babysit's (the Run is made), its
    on_train_end after babysit's (the checkpoint written, the store up to date)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter_ns()]
        self.cpu = [time.process_time_ns()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter_ns())
        if state.global_step == state.max_steps:
            self.cpu.append(time.process_time_ns())

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = time.perf_counter_ns()


class TimedBabysitCallback(BabysitCallback):
    """The callback, with the time spent in its per-step hooks summed (the training thread's
    direct cost, without the writer thread's share of the machine)."""

    inside_ns = 0

    def on_step_begin(self, *args, **kwargs):
        t0 = time.perf_counter_ns()
        super().on_step_begin(*args, **kwargs)
        self.inside_ns += time.perf_counter_ns() - t0

    def on_step_end(self, *args, **kwargs):
        t0 = time.perf_counter_ns()
        super().on_step_end(*args, **kwargs)
        self.inside_ns += time.perf_counter_ns() - t0

    def on_log(self, *args, **kwargs):
        t0 = time.perf_counter_ns()
        super().on_log(*args, **kwargs)
        self.inside_ns += time.perf_counter_ns() - t0


def one_run(steps: int, babysat: bool, scratch: Path, round_: int) -> dict[str, float]:
    hf_script.set_seed(0)
    model = hf_script.GPT2LMHeadModel(hf_script.GPT2Config(
        vocab_size=hf_script.VOCAB, n_positions=hf_script.LENGTH, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0))
    run_dir = scratch / f"{'babysit' if babysat else 'bare'}-{round_}"
    args = TrainingArguments(
        output_dir=str(run_dir / "hf-output"), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=4, optim="adamw_torch", logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    clock = Clock()
    babysit_callback = TimedBabysitCallback(run_dir)
    callbacks: list[Any] = ([babysit_callback] if babysat else []) + [clock]
    trainer = Trainer(model=model, args=args, train_dataset=hf_script.counting_sequences(4 * steps, seed=1),
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no printing of every log line, in either variant
    trainer.train()
    marks = clock.marks
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    assert len(gaps) == steps
    return {"loop_us": (marks[-1] - marks[0]) / steps / 1e3, "median_step_us": statistics.median(gaps) / 1e3,
            "end_ms": (clock.ended - marks[-1]) / 1e6, "cpu_us": (clock.cpu[-1] - clock.cpu[0]) / steps / 1e3,
            "hooks_us": babysit_callback.inside_ns / steps / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "HF.md")
    options = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    shuffle = random.Random(0)
    results: dict[str, list[dict[str, float]]] = {"bare": [], "babysit": []}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="babysit-bench-hf-") as folder:
        for round_ in range(options.rounds + 1):
            order = ["bare", "babysit"]
            shuffle.shuffle(order)
            for name in order:
                row = one_run(options.steps, name == "babysit", Path(folder), round_)
                if round_:  # round 0 warms up
                    results[name].append(row)
    elapsed = time.time() - started
    report = _report(results, options, elapsed, load_before)
    options.out.write_text(report)
    print(report)


def _report(results: dict[str, list[dict[str, float]]], options: argparse.Namespace, elapsed: float,
            load_before: float) -> str:
    def per_round(key: str) -> tuple[list[float], list[float]]:
        bare = [r[key] for r in results["bare"]]
        diff = [b[key] - a[key] for a, b in zip(results["bare"], results["babysit"])]
        return bare, diff

    lines = [
        "# babysit in a Hugging Face Trainer: per-step overhead",
        "",
        f"`python -m bench.overhead_hf --rounds {options.rounds} --steps {options.steps}` "
        f"({elapsed:.0f} s; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {os.cpu_count()} CPU cores; 1 torch thread; "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}).",
        "",
        f"The same Trainer run of {options.steps} optimizer steps (tests/hf_script.py's tiny GPT-2, batch 4, "
        "AdamW, linear schedule, `logging_steps=1`, no evaluation) with and without `BabysitCallback`, in one "
        f"process, {options.rounds} paired rounds in shuffled order after one warm-up round. Whole loop: "
        "on_train_begin (the Run made) to the end of the last step, ÷ steps; the end of training apart.",
        "",
        "| | bare step (median of rounds) | babysit − bare, median of paired rounds | mean of paired rounds | share of the step |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("loop_us", "whole loop ÷ steps"), ("median_step_us", "median step in the loop"),
                       ("cpu_us", "process CPU time ÷ steps (all threads)")):
        bare, diff = per_round(key)
        base = statistics.median(bare)
        lines.append(f"| {label} | {base:,.0f} µs | {statistics.median(diff):+,.1f} µs | "
                     f"{statistics.mean(diff):+,.1f} µs | {100 * statistics.median(diff) / base:+.2f} % |")
    bare, diff = per_round("end_ms")
    lines.append(f"| end of training, once (checkpoint, store, close) | {statistics.median(bare):,.1f} ms | "
                 f"{statistics.median(diff):+,.1f} ms | {statistics.mean(diff):+,.1f} ms | |")
    hooks = [r["hooks_us"] for r in results["babysit"]]
    bare_loop = statistics.median([r["loop_us"] for r in results["bare"]])
    lines.append(f"| time inside the callback's per-step hooks (training thread) | | {statistics.median(hooks):,.1f} µs "
                 f"(median of rounds) | {statistics.mean(hooks):,.1f} µs | {100 * statistics.median(hooks) / bare_loop:.2f} % |")
    lines += ["", "Per round (µs per step, whole loop): "
              + ", ".join(f"{a['loop_us']:.0f}→{b['loop_us']:.0f}" for a, b in zip(results["bare"], results["babysit"]))
              + ".", "", "Target: ≤ 2 % of the step.", "",
              "Reading: the bare rounds alone range from "
              f"{min(r['loop_us'] for r in results['bare']):,.0f} to {max(r['loop_us'] for r in results['bare']):,.0f} µs "
              "a step here, so where the machine is shared, a paired whole-loop difference of a few percent is "
              "within its noise, either way. The time spent inside the callback's hooks is the firm figure: "
              f"{statistics.median(hooks):,.0f} µs a step, {100 * statistics.median(hooks) / bare_loop:.2f} % of the "
              "step. Most of it is babysit's step boundary, which records the lr the schedule moves at every step; "
              "the writer thread stores the values a few times a second. The end of training adds babysit's "
              "last epoch checkpoint and the closing of the run, once.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
