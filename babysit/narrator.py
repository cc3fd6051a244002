"""The trainer's own account of its run, a line at a time, for its console and trainer.log: a line
per epoch (loss, the epoch's values, lr, momentum, steps per second), each command's fate, and
every event the run records (a guard's pause, a checkpoint that failed, a rollback, the end and
whether a final checkpoint was written).

It tells what the store recorded, the facts the page shows, and it does so on the metrics writer's
thread after each flush: the training thread's share is one append per epoch. Lines go to the
``babysit.narrator`` logger at INFO level; ``python -m babysit train`` (and so ``demo``) sends the
``babysit`` loggers to its output and the run directory's trainer.log, and a loop of your own shows
them after ``logging.basicConfig(level=logging.INFO)``. Nobody listening, it reads nothing.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any

import numpy as np

from . import commands as cmd
from .store import PER_STEP, RunStore

log = logging.getLogger(__name__)


class Narrator:
    """Says what happens to one run, from its store (the leader rank's)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        # What happened before this trainer started was told by the one that did it; commands still
        # pending are this trainer's to apply and tell.
        newest = store.events(limit=1)
        self._event_id = newest[-1]["id"] if newest else 0
        pending = [row["id"] for row in store.pending_commands()]
        self._command_id = min(pending) - 1 if pending else store.last_handled_command_id()
        self._told_commands: set[int] = set()
        self._epochs: collections.deque[dict[str, Any]] = collections.deque()  # from the training thread
        self._waiting: list[dict[str, Any]] = []  # seen at one flush, told at the next: its last values are stored
        self._held: list[tuple[int, int, str]] = []  # (step, order, line) waiting for an epoch's line
        self._last_epoch: dict[int, tuple[int, float]] = {}  # branch -> (step, wall) of its last epoch's end
        self._lock = threading.Lock()

    def epoch_ended(self, *, branch: int, epoch: int, max_epochs: int | None, step: int, wall: float,
                    metrics: dict[str, float], hparams: dict[str, Any]) -> None:
        """The training thread: an epoch ended (one append; told on the writer's thread)."""
        self._epochs.append({"branch": branch, "epoch": epoch, "max_epochs": max_epochs, "step": step,
                             "wall": wall, "metrics": metrics, "hparams": hparams})

    def branch_starts(self, branch: int, step: int, wall: float) -> None:
        """A branch starts at ``step`` (a new run, a resume, a rollback): its first epoch's rate counts from there."""
        self._last_epoch[branch] = (step, wall)

    def tell(self, *, final: bool = False) -> None:
        """After a flush: say what is new, in the order of the steps it happened at. An epoch that
        just ended is told at the next flush (which stores its last values), and what came with
        it waits for it; ``final``: the run is closing, say everything now."""
        if not log.isEnabledFor(logging.INFO):
            self._epochs.clear()
            return
        with self._lock:
            held = self._held
            held += self._new_events() + self._new_commands()
            ready, self._waiting = self._waiting, []
            while self._epochs:
                self._waiting.append(self._epochs.popleft())
            if final:
                ready, self._waiting = ready + self._waiting, []
            held += [(epoch["step"], 0, self.epoch_line(epoch)) for epoch in ready]
            if self._waiting:
                return
            for _step, _order, line in sorted(held, key=lambda told: told[:2]):
                log.info("babysit: %s", line)
            held.clear()

    def _new_events(self) -> list[tuple[int, int, str]]:
        told = []
        for event in self.store.events(since_id=self._event_id):
            self._event_id = max(self._event_id, event["id"])
            step = event["step"] if event.get("step") is not None else -1
            told.append((step, 2, f"{'step ' + str(step) if step >= 0 else 'run'} · {event['kind']}: {event['message']}"))
        return told

    def _new_commands(self) -> list[tuple[int, int, str]]:
        told = []
        for row in self.store.commands(since_id=self._command_id):
            if row["state"] == cmd.PENDING or row["id"] in self._told_commands:
                continue
            self._told_commands.add(row["id"])
            told.append((row["step"] if row.get("step") is not None else -1, 1,
                         f"#{row['id']} {cmd.describe(row['kind'], row['args'])} from {row['source']}: "
                         f"{cmd.outcome(row, number=_number)}"))
        pending = [row["id"] for row in self.store.pending_commands()]
        # Everything below the oldest command still pending is told: look no further back next time.
        floor = min(pending) - 1 if pending else max(self._told_commands, default=self._command_id)
        if floor > self._command_id:
            self._command_id = floor
            self._told_commands = {i for i in self._told_commands if i > floor}
        return told

    def epoch_line(self, epoch: dict[str, Any]) -> str:
        """``epoch 3/100 · step 300 · loss 1.923 · val_loss 1.88 · lr 0.3 · momentum 0.9 · 12.4 steps/s``."""
        branch, step, wall = epoch["branch"], epoch["step"], epoch["wall"]
        start_step, start_wall = self._last_epoch.get(branch, (None, None))
        self._last_epoch[branch] = (step, wall)
        parts = [f"epoch {epoch['epoch']}/{epoch['max_epochs'] or '?'}", f"step {step}"]
        if branch != 1:
            parts.append(f"branch {branch}")
        name, mean = self._mean_loss(branch, start_step, step)
        if mean is not None:
            parts.append(f"{name} {mean:.4g} (epoch mean)")
        parts += [f"{key} {_number(value)}" for key, value in epoch["metrics"].items()]
        for key in ("lr", "momentum"):
            if epoch["hparams"].get(key) is not None:
                parts.append(f"{key} {_number(epoch['hparams'][key])}")
        if start_step is not None and wall > start_wall and step > start_step:
            parts.append(f"{(step - start_step) / (wall - start_wall):.3g} steps/s")
        return " · ".join(parts)

    def _mean_loss(self, branch: int, after_step: int | None, up_to: int) -> tuple[str, float | None]:
        """The mean of the loss the loop logged over the epoch's steps (``loss``, else the first
        per-step value named like a loss)."""
        found = {info.name: info.id for info in self.store.series()
                 if info.branch == branch and info.per == PER_STEP and info.segment == 0 and "loss" in info.name}
        name = "loss" if "loss" in found else min(found, default=None)
        if name is None:
            return "loss", None
        lo = -math.inf if after_step is None else after_step
        steps, values, _ = self.store.chunk_points(found[name], None if after_step is None else after_step + 1, up_to)
        chosen = values[(steps > lo) & (steps <= up_to)]
        chosen = chosen[np.isfinite(chosen)]
        return name, float(chosen.mean()) if len(chosen) else None


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
