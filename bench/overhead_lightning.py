"""Per-step overhead of babysit.lightning.BabysitCallback: the same Lightning run with and without it.

    python -m bench.overhead_lightning                 # ~2.5 minutes on 2 busy cores → bench/LIGHTNING.md figures
    python -m bench.overhead_lightning --rounds 3 --steps 100   # a quick look

Each round fits three fresh Trainers on the same data from the same initial weights — one bare,
one with ``BabysitCallback`` in a fresh run directory, and one with it and babysit's writer thread
kept asleep (it stores the values only when the run closes: what the training thread alone pays)
— in an order shuffled every round (paired rounds). What is timed is the whole training loop as the user pays for it: from the first
``on_train_batch_start`` to the last ``on_train_batch_end`` (every hook, the optimizer step, the
LR-scheduler step, babysit's logging of the loss and the module's ``self.log`` values, its step
boundary, and its writer thread flushing to SQLite at its default pace), divided by the steps.
Setup (Trainer, Run, the first iter of the loader) and the end-of-epoch checkpoint are outside
the timed part; both happen once per run, not per step. The median step inside the loop is kept
too, and so is the time spent inside the callback's two per-step hooks (on the training thread;
a lower bound of the cost, robust to the machine's load: it leaves out the writer thread). The overhead is the paired difference (babysat minus bare of the same round), as µs and as %
of the bare step; mean and median over the rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from babysit.lightning import BabysitCallback


class Mlp(pl.LightningModule):
    """A small MLP regression, stepping a per-step LambdaLR, logging its loss per step."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 1e-4 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class StepTimer(pl.Callback):
    """Wall-clock marks at every batch start, and at the last batch's end."""

    def __init__(self) -> None:
        self.marks: list[int] = []
        self.end = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.marks.append(time.perf_counter_ns())

    def on_train_batch_end(self, *args: Any) -> None:
        self.end = time.perf_counter_ns()


class TimedBabysit(BabysitCallback):
    """The callback, with the time spent inside its per-step hooks added up (training thread only)."""

    def __init__(self, run_dir: Path, flush_interval: float) -> None:
        super().__init__(run_dir, flush_interval=flush_interval)
        self.inside_ns = 0

    def on_train_batch_start(self, *args: Any) -> None:
        t0 = time.perf_counter_ns()
        super().on_train_batch_start(*args)
        self.inside_ns += time.perf_counter_ns() - t0

    def on_train_batch_end(self, *args: Any) -> None:
        t0 = time.perf_counter_ns()
        super().on_train_batch_end(*args)
        self.inside_ns += time.perf_counter_ns() - t0


WRITER_ASLEEP_S = 3600.0   # the writer thread stores nothing during the fit (only when it closes)


def fit_once(variant: str, steps: int, width: int, scratch: Path, round_: int) -> dict[str, float]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 32, 64, generator=generator)
    y = x[:, :1] * 2 + 0.1 * torch.randn(steps * 32, 1, generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]  # first, so its marks enclose every other callback's work
    babysit = None
    if variant != "bare":
        babysit = TimedBabysit(scratch / f"{variant}-{round_}", WRITER_ASLEEP_S if variant == "writer asleep" else 0.25)
    if babysit is not None:
        callbacks.append(babysit)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Mlp(width), loader)
    marks = timer.marks + [timer.end]
    gaps = sorted(b - a for a, b in zip(marks, marks[1:]))
    row = {"loop_us": (timer.end - timer.marks[0]) / (len(marks) - 1) / 1e3, "median_step_us": gaps[len(gaps) // 2] / 1e3}
    if babysit is not None:
        row["inside_hooks_us"] = babysit.inside_ns / (len(marks) - 1) / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=400, help="training steps per fit (one epoch)")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    scratch = Path(tempfile.mkdtemp(prefix="babysit-bench-lightning-"))
    order = ["bare", "babysit", "writer asleep"]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    try:
        for name in order:  # warm-up: imports, first allocations
            fit_once(name, 50, args.width, scratch, -1)
        for round_ in range(args.rounds):
            random.Random(round_).shuffle(order)
            for name in order:
                rows[name].append(fit_once(name, args.steps, args.width, scratch, round_))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, "-m", "bench.overhead_lightning", *sys.argv[1:]]),
                              "rounds": args.rounds, "steps": args.steps, "width": args.width}
    bare_loop = statistics.median(r["loop_us"] for r in rows["bare"])
    for variant in ("babysit", "writer asleep"):
        result[variant] = {}
        for key in ("loop_us", "median_step_us"):
            bare = [r[key] for r in rows["bare"]]
            babysat = [r[key] for r in rows[variant]]
            diff = [b - a for a, b in zip(bare, babysat)]
            pct = [100 * (b - a) / a for a, b in zip(bare, babysat)]
            result[variant][key] = {
                "bare_mean": statistics.fmean(bare), "bare_median": statistics.median(bare),
                "babysit_mean": statistics.fmean(babysat), "babysit_median": statistics.median(babysat),
                "overhead_us_mean": statistics.fmean(diff), "overhead_us_median": statistics.median(diff),
                "overhead_pct_mean": statistics.fmean(pct), "overhead_pct_median": statistics.median(pct),
            }
        inside = [r["inside_hooks_us"] for r in rows[variant]]
        result[variant]["inside_hooks_us"] = {"mean": statistics.fmean(inside), "median": statistics.median(inside),
                                              "pct_of_bare_median_step": 100 * statistics.median(inside) / bare_loop}
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "raw": rows}, indent=1))
    print(f"{result['command']}: {args.rounds} paired rounds of {args.steps} steps")
    for variant in ("babysit", "writer asleep"):
        print(f"{variant}:")
        for key, label in (("loop_us", "whole loop per step"), ("median_step_us", "median step")):
            r = result[variant][key]
            print(f"  {label:20s} bare {r['bare_mean']:8.1f} / {r['bare_median']:8.1f} µs (mean / median), "
                  f"babysat {r['babysit_mean']:8.1f} / {r['babysit_median']:8.1f} µs; overhead "
                  f"{r['overhead_us_mean']:+.1f} / {r['overhead_us_median']:+.1f} µs = "
                  f"{r['overhead_pct_mean']:+.2f} % / {r['overhead_pct_median']:+.2f} %")
        r = result[variant]["inside_hooks_us"]
        print(f"  inside the callback's per-step hooks (training thread): {r['mean']:.1f} / {r['median']:.1f} µs "
              f"(mean / median) = {r['pct_of_bare_median_step']:.2f} % of the bare step (median)")


if __name__ == "__main__":
    main()
