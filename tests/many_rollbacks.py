"""A run with many rollbacks, written with the store's own writes as a trainer writes them.

Each branch trains a few epochs (loss per step, val_loss and val_acc per epoch, lr and momentum
when they change, a checkpoint per epoch), then a rollback starts the next branch from a
checkpoint of the live line with another lr, as ``python -m babysit rollback`` does; every fifth
abandoned branch blew up first (loss to ~10⁶, a divergence event). The last branch is the
trainer's; :func:`keep_training` appends to it and keeps the heartbeat fresh, as a live trainer
does. Used by the chart's Chromium tests; bench/many_branches.py builds its run with the real
digits job instead.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np

from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore

STEPS_PER_EPOCH = 40
EPOCHS_PER_BRANCH = 3


def _write(store: RunStore, name: str, branch: int, steps: np.ndarray, values: np.ndarray, walls: np.ndarray,
           per: str = PER_STEP) -> None:
    series = store.series_id(name, branch, per)
    store.write_chunks([(series, steps[i:i + CHUNK_POINTS], values[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                        for i in range(0, len(steps), CHUNK_POINTS)])


def _loss(steps: np.ndarray, rng: np.random.Generator, level: float) -> np.ndarray:
    return level * np.exp(-steps / 2000.0) + 0.15 + 0.05 * rng.random(len(steps))


def build(run_dir: Path, rollbacks: int = 50, seed: int = 0) -> RunStore:
    """A run of ``rollbacks + 1`` branches; the newest is the trainer's, running."""
    store = RunStore(run_dir, create=True)
    rng = np.random.default_rng(seed)
    wall = time.time() - 3600.0
    lr, momentum = 0.05, 0.9
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0,
                              hparams={"lr": lr, "momentum": momentum})
    store.add_event("start", "run started", branch=branch, step=0, epoch=0)
    start_step, start_epoch = 0, 0
    checkpoints: dict[int, list[dict]] = {}  # branch -> its checkpoints (id, step, epoch)
    line: list[int] = [branch]
    with store.transaction():
        for k in range(rollbacks + 1):
            last = k == rollbacks
            level = 2.2 * (1.0 + 0.2 * rng.random())
            _write(store, "lr", branch, np.array([start_step]), np.array([lr]), np.array([wall]))
            _write(store, "momentum", branch, np.array([start_step]), np.array([momentum]), np.array([wall]))
            steps = np.arange(start_step + 1, start_step + EPOCHS_PER_BRANCH * STEPS_PER_EPOCH + 1)
            walls = wall + (steps - start_step) * 0.05
            loss = _loss(steps, rng, level)
            blew_up = not last and k % 5 == 4
            if blew_up:  # the last epoch diverges: a blow-up that sets the y axis to millions naively
                tail = steps > steps[-1] - STEPS_PER_EPOCH // 2
                loss[tail] = 10.0 ** rng.uniform(5.5, 6.5, int(tail.sum()))
                store.add_event("divergence", f"divergence: loss above 10^5 at step {int(steps[tail][0])}",
                                branch=branch, step=int(steps[tail][0]))
            _write(store, "loss", branch, steps, loss, walls)
            ends = np.arange(start_step + STEPS_PER_EPOCH, steps[-1] + 1, STEPS_PER_EPOCH)
            _write(store, "val_loss", branch, ends, loss[ends - start_step - 1] * 1.05, walls[ends - start_step - 1],
                   per=PER_EPOCH)
            _write(store, "val_acc", branch, ends, 0.9 - 0.1 * rng.random(len(ends)), walls[ends - start_step - 1],
                   per=PER_EPOCH)
            for epoch, end in enumerate(ends, start=start_epoch + 1):
                store.add_epoch(branch, epoch, int(end))
                checkpoint = store.add_checkpoint(
                    branch=branch, epoch=epoch, step=int(end), step_in_epoch=STEPS_PER_EPOCH,
                    file=f"epoch-{epoch:04d}-step-{int(end):08d}-b{branch}.pt", sha256="0" * 64, size=1,
                    hparams={"lr": lr, "momentum": momentum}, metrics={"val_loss": float(loss[end - start_step - 1])},
                    reason="epoch")
                checkpoints.setdefault(branch, []).append({"id": checkpoint, "step": int(end), "epoch": epoch})
            wall = float(walls[-1])
            if last:
                store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), started=wall - 3600,
                                   heartbeat=time.time(), epoch=start_epoch + EPOCHS_PER_BRANCH + 1, max_epochs=10_000,
                                   step=int(steps[-1]), step_in_epoch=0, steps_per_epoch=STEPS_PER_EPOCH,
                                   branch=branch, lr=lr, momentum=momentum, optimizer="SGD", message="")
                break
            # Roll back to a checkpoint of the live line: the branch's first (its second epoch's end)
            # after a blow-up, else one of the newest on the line.
            mine = checkpoints[branch]
            target = mine[0] if blew_up else mine[int(rng.integers(0, len(mine)))]
            from_step = int(steps[-1])
            new_lr = float(lr * rng.choice([0.5, 0.7, 1.4]))
            parent = branch
            branch = store.new_branch(parent=parent, from_checkpoint=target["id"], start_step=target["step"],
                                      start_epoch=target["epoch"], hparams={"lr": new_lr, "momentum": momentum})
            store.add_event("rollback", f"rolled back to checkpoint #{target['id']}", branch=branch,
                            step=target["step"], data={"checkpoint": target["id"], "from_step": from_step,
                                                       "from_branch": parent, "before": {"lr": lr, "momentum": momentum},
                                                       "after": {"lr": new_lr, "momentum": momentum}})
            lr, start_step, start_epoch = new_lr, target["step"], target["epoch"]
            line.append(branch)
    return store


def keep_training(run_dir: Path, stop: threading.Event, every_s: float = 0.25, steps_per_write: int = 10) -> None:
    """Append steps to the trainer's branch and keep its heartbeat fresh until ``stop``."""
    store = RunStore(run_dir)
    status = store.status()
    branch, step = status["branch"], status["step"]
    rng = np.random.default_rng(1)
    series = store.series_id("loss", branch, PER_STEP)
    while not stop.wait(every_s):
        steps = np.arange(step + 1, step + steps_per_write + 1)
        store.write_chunks([(series, steps, 0.2 + 0.05 * rng.random(len(steps)), time.time() + np.zeros(len(steps)))])
        step += steps_per_write
        store.write_status(heartbeat=time.time(), step=step, step_in_epoch=step % STEPS_PER_EPOCH)
    store.close()
