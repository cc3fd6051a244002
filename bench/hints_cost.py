"""What the page's hints cost on a long run: ``read_hints`` (the page's hints area calls it every
couple of seconds) on a run of a million steps: 1,000 epochs of 1,000 steps, a checkpoint and a
validation loss per epoch, written with the store's own writes.

    python -m bench.hints_cost [--steps 1000000] [--per-epoch 1000] [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from babysit.instruments.hints import read_hints
from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore


def build(run_dir: Path, steps: int, per_epoch: int) -> RunStore:
    store = RunStore(run_dir, create=True)
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    x = np.arange(1, steps + 1)
    losses = 2 * np.exp(-x / (0.3 * steps)) + 0.3 + 0.05 * np.random.default_rng(0).standard_normal(steps)
    walls = time.time() - steps * 0.01 + x * 0.01
    epochs = steps // per_epoch
    ends = np.arange(1, epochs + 1) * per_epoch
    val = 1.0 / np.arange(1, epochs + 1)
    with store.transaction():
        loss_id = store.series_id("loss", branch, PER_STEP)
        store.write_chunks([(loss_id, x[i:i + CHUNK_POINTS], losses[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                            for i in range(0, steps, CHUNK_POINTS)])
        val_id = store.series_id("val_loss", branch, PER_EPOCH)
        store.write_chunks([(val_id, ends[i:i + CHUNK_POINTS], val[i:i + CHUNK_POINTS],
                             walls[ends[i:i + CHUNK_POINTS] - 1]) for i in range(0, epochs, CHUNK_POINTS)])
        for epoch, end in enumerate(ends.tolist(), start=1):
            store.add_epoch(branch, epoch, end)
            store.add_checkpoint(branch=branch, epoch=epoch, step=end, step_in_epoch=per_epoch, file=f"e{epoch}.pt",
                                 sha256="0" * 64, size=1, hparams={"lr": 0.1, "momentum": 0.9},
                                 metrics={"val_loss": float(val[epoch - 1])}, reason="epoch")
    store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), heartbeat=time.time(),
                       epoch=epochs, step=steps, steps_per_epoch=per_epoch, branch=branch, lr=0.1, momentum=0.9)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hints_cost")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--per-epoch", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        store = build(Path(root) / "run", args.steps, args.per_epoch)
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            found = read_hints(store)
            times.append((time.perf_counter() - start) * 1000)
        store.close()
    print(f"read_hints on {args.steps:,} steps ({args.steps // args.per_epoch:,} epochs): median "
          f"{statistics.median(times):.1f} ms, max {max(times):.1f} ms over {args.calls} calls; "
          f"hints: {', '.join(h.id for h in found) or 'none'}")


if __name__ == "__main__":
    main()
