"""What the "Compare branches" panel and the instruments cost the page, on a long synthetic run.

A run store of BRANCHES branches of STEPS steps each (loss per step, val_loss per 1,000 steps),
written with the store's own chunk writes. Timed, best of several rounds on this machine:

- ``excursion_side_branches``: what every refresh of the curve pays for the instruments when the
  run has no excursion (one small query);
- ``compare_branches``: the table, what the open panel computes once per refresh;
- ``aligned_frame`` + ``build_aligned_figure``: the overlay of all the branches.

    python -m bench.compare_panel [--branches 10] [--steps 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from babysit.instruments.compare import compare_branches, excursion_side_branches
from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore
from babysit.ui.instrument_figures import aligned_frame, build_aligned_figure


def fill(run_dir: Path, branches: int, steps: int) -> RunStore:
    store = RunStore(run_dir, create=True)
    rng = np.random.default_rng(0)
    for b in range(branches):
        start = b * 5000
        branch = store.new_branch(parent=None if b == 0 else 1, from_checkpoint=None, start_step=start,
                                  start_epoch=0, hparams={"lr": 0.1 / (b + 1)})
        x = np.arange(start + 1, start + steps + 1)
        y = np.exp(-x / 3e4) + 0.1 * rng.random(steps)
        series = store.series_id("loss", branch, PER_STEP)
        store.write_chunks([(series, x[i:i + CHUNK_POINTS], y[i:i + CHUNK_POINTS], x[i:i + CHUNK_POINTS].astype(float))
                            for i in range(0, steps, CHUNK_POINTS)])
        ends = np.arange(start + 1000, start + steps + 1, 1000)
        store.write_chunks([(store.series_id("val_loss", branch, PER_EPOCH), ends, rng.random(len(ends)),
                             ends.astype(float))])
    return store


def best_ms(work: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare_panel")
    parser.add_argument("--branches", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        store = fill(Path(root) / "run", args.branches, args.steps)
        rows = compare_branches(store).rows
        print(f"{args.branches} branches x {args.steps:,} steps")
        print(f"excursion_side_branches, no excursion: {best_ms(lambda: excursion_side_branches(store), 50):.3f} ms")
        print(f"compare_branches (the table):         {best_ms(lambda: compare_branches(store), 5):.1f} ms")
        print(f"aligned overlay (frame + figure):     "
              f"{best_ms(lambda: build_aligned_figure(aligned_frame(store, rows, 'loss')), 5):.1f} ms")
        store.close()


if __name__ == "__main__":
    main()
