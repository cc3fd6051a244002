"""The background metrics writer: the training thread appends to a deque, this thread stores.

The training thread's share of ``run.log(loss=...)`` is one ``deque.append`` of a tuple. Several
times a second this thread turns the queued values into floats (a tensor's ``.item()`` happens
here, so a GPU loss never forces a sync on the training thread), packs them into chunks, feeds
the divergence guard and writes chunks and heartbeat in one transaction.

When the store stops taking writes (a disk with no byte left) or run.db is deleted under it, this
thread says so on stderr once and pauses the run with a command held in memory (no command could
reach the trainer through the database then); what could not be stored is kept and written first
once there is room again.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

from .guard import Divergence, DivergenceGuard
from .commands import PAUSE
from .store import CHUNK_POINTS, RunStore, disk_full, disk_full_message

log = logging.getLogger("babysit")
DISK_FULL = "disk full"
DB_LOST = "run.db lost"

# (per, branch, step, wall, {name: value})
LogItem = tuple[str, int, int, float, dict[str, Any]]


def to_float(value: Any) -> float:
    if type(value) is float:
        return value
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


class _OpenChunk:
    __slots__ = ("steps", "vals", "walls")

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.vals: list[float] = []
        self.walls: list[float] = []


class MetricsWriter:
    """Drains logged values into the store every ``interval`` seconds on a thread of its own."""

    def __init__(
        self,
        store: RunStore,
        *,
        queue: collections.deque[LogItem] | None = None,
        status: Callable[[], dict[str, Any]],
        guard: DivergenceGuard | None = None,
        on_divergence: Callable[[Divergence, int], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        interval: float = 0.25,
    ) -> None:
        self.store = store
        self.queue: collections.deque[LogItem] = queue if queue is not None else collections.deque()
        self._status = status
        self._guard = guard
        self._on_divergence = on_divergence
        self._on_tick = on_tick
        self._interval = interval
        self._open: dict[tuple[str, int, str], _OpenChunk] = {}
        self._series: dict[tuple[str, int, str], int] = {}
        self._dirty: set[tuple[str, int, str]] = set()  # open chunks with points not yet stored
        self._full: list[tuple[tuple[str, int, str], _OpenChunk]] = []  # filled up, not yet stored
        self._bad_names: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.last_flush_error: BaseException | None = None
        self._store_trouble: str | None = None  # DISK_FULL or DB_LOST while the store fails
        identity = os.stat(store.db_path)
        self._db_identity = (identity.st_dev, identity.st_ino)
        self._thread = threading.Thread(target=self._loop, name="babysit-writer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        try:
            self.flush()
        except Exception as error:
            if not disk_full(error):
                raise
            unstored = sum(len(chunk.steps) for chunk in self._open.values()) + len(self.queue)
            log.error("babysit: %s: the last %d logged values (and the final status) could not be stored",
                      disk_full_message(self.store.run_dir), unstored)

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self._check_database()
                self.flush()
                if self._on_tick is not None:
                    self._on_tick()
                self.last_flush_error = None
                if self._store_trouble is not None and self._store_trouble != DB_LOST:
                    log.warning("babysit: the run's store takes writes again; what was held is stored")
                    self._store_trouble = None
            except Exception as error:  # a busy or full disk must not kill the writer; retry next tick
                self.last_flush_error = error
                if disk_full(error):
                    self._store_failed(DISK_FULL, f"storing the run's values failed: {disk_full_message(self.store.run_dir)}")
                time.sleep(self._interval)

    def _check_database(self) -> None:
        """Notice run.db deleted or replaced under the trainer (its writes would go nowhere)."""
        try:
            found = os.stat(self.store.db_path)
            same = (found.st_dev, found.st_ino) == self._db_identity
        except OSError:
            same = False
        if not same:
            self._store_failed(DB_LOST, f"{str(self.store.db_path)!r} was deleted or replaced under this trainer: "
                               "nothing it does can be seen or commanded any more; its checkpoint files are kept")

    def _store_failed(self, trouble: str, message: str) -> None:
        """Once per outage: say so where a person looks (the trainer's stderr), and pause the run
        with a command held in memory, since none can reach it through the database now."""
        if self._store_trouble is not None:
            return
        self._store_trouble = trouble
        advice = ("stop the trainer (Ctrl-C, or kill its pid): its checkpoints are kept" if trouble == DB_LOST
                  else "free some space, then resume (`python -m babysit resume`)")
        log.error("babysit: %s; the run pauses at its next step: %s", message, advice)
        reason = ("run.db was deleted or replaced: stop the trainer" if trouble == DB_LOST
                  else "the disk is full, nothing can be recorded: free some space, then resume")
        self.store.hold_command(PAUSE, {"reason": reason}, source="guard")

    def flush(self) -> None:
        """Store everything queued so far, plus the heartbeat."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        queue = self.queue
        items = [queue.popleft() for _ in range(len(queue))]
        divergences: list[tuple[Divergence, int]] = []
        # Work column by column over runs of items that logged the same names (a loop logs the
        # same ones step after step): a few list operations per run instead of per value.
        start = 0
        while start < len(items):
            per, branch, _, _, first = items[start]
            names = first.keys()
            end = start + 1
            while end < len(items) and items[end][0] == per and items[end][1] == branch and items[end][4].keys() == names:
                end += 1
            run = items[start:end]
            steps = [item[2] for item in run]
            walls = [item[3] for item in run]
            for name in names:
                values = self._floats(name, [item[4][name] for item in run], branch, steps)
                self._append((name, branch, per), steps, values, walls)
                guard = self._guard
                if guard is not None and per == "step" and name == guard.config.metric:
                    found = guard.feed_many(steps, values)
                    if found is not None:
                        divergences.append((found, branch))
            start = end
        if self._on_divergence is not None:
            for found, branch in divergences:
                self._on_divergence(found, branch)
        pending = []
        for key, chunk in self._full + [(key, self._open[key]) for key in self._dirty]:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = self.store.series_id(key[0], key[1], key[2])
            pending.append((series, np.array(chunk.steps, dtype=np.int64), np.array(chunk.vals, dtype=np.float64),
                            np.array(chunk.walls, dtype=np.float64)))
        connection = self.store.conn()
        held = self.store.take_held()  # what a full disk refused before: first, in order
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                self.store.write_held(held)
                self.store.write_chunks(pending)
                self.store.write_status(**self._status(), heartbeat=time.time())
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise  # the points stay in their open chunks and are written by the next flush
        except BaseException:
            self.store.restore_held(held)
            raise
        self._full.clear()
        for key in self._dirty:
            if len(self._open[key].steps) >= CHUNK_POINTS:
                del self._open[key]  # full, and now stored for good
        self._dirty.clear()

    def _append(self, key: tuple[str, int, str], steps: list[int], values: list[float | None], walls: list[float]) -> None:
        """Add points to the series' open chunk, starting a new chunk every CHUNK_POINTS points."""
        if None in values:  # values that were not numbers: stored nowhere
            kept = [i for i, v in enumerate(values) if v is not None]
            steps, values, walls = [steps[i] for i in kept], [values[i] for i in kept], [walls[i] for i in kept]
        done = 0
        while done < len(steps):
            chunk = self._open.get(key)
            if chunk is None or len(chunk.steps) >= CHUNK_POINTS:
                if chunk is not None:  # full: stored under its own entry until written
                    self._full.append((key, chunk))
                chunk = self._open[key] = _OpenChunk()
            take = min(len(steps) - done, CHUNK_POINTS - len(chunk.steps))
            chunk.steps.extend(steps[done:done + take])
            chunk.vals.extend(values[done:done + take])
            chunk.walls.extend(walls[done:done + take])
            done += take
            self._dirty.add(key)

    def _floats(self, name: str, raw: list[Any], branch: int, steps: list[int]) -> list[float | None]:
        try:
            return [value if type(value) is float else to_float(value) for value in raw]
        except (TypeError, ValueError, RuntimeError):
            out: list[float | None] = []
            for value, step in zip(raw, steps):
                try:
                    out.append(to_float(value))
                except (TypeError, ValueError, RuntimeError):
                    self._report_bad_value(name, value, branch, step)
                    out.append(None)
            return out

    def _report_bad_value(self, name: str, raw: Any, branch: int, step: int) -> None:
        if name in self._bad_names:
            return
        self._bad_names.add(name)
        self.store.add_event(
            "error", f"metric {name!r}: value {raw!r} is not a number; such values are not stored "
            "(log numbers or one-element tensors)", branch=branch, step=step,
        )
