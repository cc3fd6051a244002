"""The background metrics writer: the training thread appends to a deque, this thread stores.

The training thread's share of ``run.log(loss=...)`` is one ``deque.append`` of a tuple. Several
times a second this thread turns the queued values into floats (a GPU tensor's ``.item()``
happens here, so a GPU loss never forces a sync on the training thread), packs them into chunks,
feeds the divergence guard and writes chunks and heartbeat in one transaction.

Whatever this thread does while it holds the GIL, the training thread waits for: it needs the GIL
back between any two torch calls, so a flush costs the loop about its own CPU time. Hence a flush
does its per-value work in C, with a number of calls that grows with its chunks, not its values
(the queue emptied by ``starmap(popleft)``, the items transposed by ``zip``, each metric's values
gathered by ``itemgetter`` and converted by one ``np.array``, chunks kept as numpy buffers);
``tests/test_writer.py`` counts the Python lines a flush runs to keep it that way.

When the store stops taking writes (a disk with no byte left) or run.db is deleted under it, this
thread says so on stderr once and pauses the run with a command held in memory (no command could
reach the trainer through the database then); what could not be stored is kept and written first
once there is room again.

One value that cannot be a float (a string, a tensor of several elements, an int too large for a
float) never costs the others: it is dropped, with an event naming its metric and step, and the
rest of its flush is stored. The event for bad values is written in the flush's own transaction,
so nothing between taking the values off the queue and keeping them in a chunk touches the store.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from itertools import repeat, starmap
from operator import itemgetter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .guard import Divergence
from .guard_watch import WatchedGuards
from .commands import PAUSE
from .store import CHUNK_POINTS, PER_STEP, RunStore, disk_full, disk_full_message

log = logging.getLogger(__name__)
DISK_FULL = "disk full"
DB_LOST = "run.db lost"

# (per, branch, step, wall, {name: value})
LogItem = tuple[str, int, int, float, dict[str, Any]]
# Values of these types become floats in one np.array call, exactly as float() makes them; any
# other (a GPU tensor, a numpy scalar, something that is not a number) goes value by value.
_PLAIN_NUMBERS = frozenset((float, int))


def to_float(value: Any) -> float:
    if type(value) is float:
        return value
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


class LogQueue:
    """The training thread's share of storing a value: ``put`` is one ``deque.append``. While an
    excursion runs, a tap sits in front of it (it reads each step's loss, then appends). On a
    follower rank (``keep=False``) it keeps nothing: rank 0 logs for the whole job."""

    __slots__ = ("items", "put")

    def __init__(self, keep: bool = True) -> None:
        self.items: collections.deque[LogItem] = collections.deque()
        self.put: Callable[[LogItem], None] = self.items.append if keep else _keep_nothing

    def tap(self, tap: Callable[[LogItem], None]) -> None:
        """Put ``tap`` in front of the queue (it must pass every item on to ``items.append``)."""
        self.put = tap

    def untap(self) -> None:
        self.put = self.items.append


def _keep_nothing(_item: LogItem) -> None:
    """A follower rank's LogQueue.put."""


class _OpenChunk:
    """A chunk being filled: numpy buffers of CHUNK_POINTS points, the first ``n`` of them used."""

    __slots__ = ("steps", "vals", "walls", "n")

    def __init__(self) -> None:
        self.steps = np.empty(CHUNK_POINTS, dtype=np.int64)
        self.vals = np.empty(CHUNK_POINTS, dtype=np.float64)
        self.walls = np.empty(CHUNK_POINTS, dtype=np.float64)
        self.n = 0

    def extend(self, steps: np.ndarray, vals: np.ndarray, walls: np.ndarray) -> None:
        start, end = self.n, self.n + len(steps)
        self.steps[start:end] = steps
        self.vals[start:end] = vals
        self.walls[start:end] = walls
        self.n = end

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.n
        return self.steps[:n], self.vals[:n], self.walls[:n]


class MetricsWriter:
    """Drains logged values into the store every ``interval`` seconds on a thread of its own."""

    def __init__(
        self,
        store: RunStore,
        *,
        queue: collections.deque[LogItem] | None = None,
        status: Callable[[], dict[str, Any]],
        guard: WatchedGuards | None = None,
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
        self._bad_names: set[str] = set()  # metrics whose bad values have had their event
        self._bad_events: list[tuple[str, str, int, int]] = []  # (kind, message, branch, step) for the next commit
        self._lost = 0  # values taken off the queue that no chunk kept (a failure while sorting them)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.last_flush_error: BaseException | None = None
        self._failing_since = 0.0
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
            unstored = sum(chunk.n for chunk in self._open.values()) + len(self.queue)
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
                if self.last_flush_error is not None and not disk_full(self.last_flush_error):
                    self._recovered(self.last_flush_error)
                self.last_flush_error = None
                if self._store_trouble is not None and self._store_trouble != DB_LOST:
                    log.warning("babysit: the run's store takes writes again; what was held is stored")
                    self._store_trouble = None
            except Exception as error:  # a busy or full disk must not kill the writer; retry next tick
                if self.last_flush_error is None and not disk_full(error):  # once per outage (a full disk has its own)
                    self._failing_since = time.time()
                    log.warning("babysit: storing the run's values failed (%s: %s); retrying every %.2g s, the "
                                "values are kept meanwhile", type(error).__name__, error, self._interval)
                self.last_flush_error = error
                if disk_full(error):
                    self._store_failed(DISK_FULL, f"storing the run's values failed: {disk_full_message(self.store.run_dir)}")
                time.sleep(self._interval)

    def _recovered(self, error: BaseException) -> None:
        """The store takes writes again after an outage: say what it was, on the page too."""
        lasted = time.time() - self._failing_since
        lost, self._lost = self._lost, 0
        outcome = ("nothing was lost, they are stored now" if not lost
                   else f"{lost} logged values were lost; the values logged since are stored")
        message = f"storing the run's values failed for {lasted:.0f} s ({type(error).__name__}: {error}); {outcome}"
        log.warning("babysit: %s", message)
        try:
            self.store.add_event("store_trouble", message)
        except Exception:
            log.exception("babysit: the event for the store's outage could not be written")

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
        # Exactly what is queued now (the training thread may append meanwhile), popped in C.
        items = list(starmap(queue.popleft, repeat((), len(queue))))
        divergences = self._keep(items)
        if self._on_divergence is not None:
            for found, branch in divergences:
                self._on_divergence(found, branch)
        pending = []
        for key, chunk in self._full + [(key, self._open[key]) for key in self._dirty]:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = self.store.series_id(key[0], key[1], key[2])
            pending.append((series, *chunk.points()))
        held = self.store.take_held()  # what a full disk refused before: first, in order
        bad_events, self._bad_events = self._bad_events, []
        try:
            with self.store.transaction():  # one commit; on failure the points stay in their open chunks
                self.store.write_held(held)
                self.store.write_chunks(pending)
                for kind, message, branch, step in bad_events:
                    self.store.add_event(kind, message, branch=branch, step=step)
                self.store.write_status(**self._status(), heartbeat=time.time())
        except BaseException:
            self.store.restore_held(held)
            self._bad_events[:0] = bad_events
            raise
        self._full.clear()
        for key in self._dirty:
            if self._open[key].n >= CHUNK_POINTS:
                del self._open[key]  # full, and now stored for good
        self._dirty.clear()

    def _keep(self, items: list[LogItem]) -> list[tuple[Divergence, int]]:
        """Put the values of ``items`` into their open chunks (bad ones dropped and reported), then
        let the guard judge them; the divergences it found. Nothing here touches the store: once
        the items are off the queue, they are kept here or counted as lost, never dropped unsaid."""
        judged: list[tuple[str, int, Sequence[int], Sequence[float | None]]] = []
        guard = self._guard
        kept = 0
        try:
            runs = _runs(items)
            for per, branch, steps, walls, columns in runs:
                step_array = np.array(steps, dtype=np.int64)
                wall_array = np.array(walls, dtype=np.float64)
                for name, raw in columns.items():
                    values, bad = self._floats(name, raw, branch, steps)
                    if bad is None:
                        self._append((name, branch, per), step_array, values, wall_array)
                    else:  # values that were not numbers: stored nowhere
                        good = np.ones(len(values), dtype=bool)
                        good[bad] = False
                        self._append((name, branch, per), step_array[good], values[good], wall_array[good])
                    kept += len(raw)
                    if guard is not None and per == PER_STEP and guard.watches(name):
                        seen: Sequence[float | None] = values
                        if bad is not None:  # the guard skips a None
                            seen = values.tolist()
                            for i in bad:
                                seen[i] = None
                        judged.append((name, branch, steps, seen))
        except BaseException as error:
            lost = sum(map(len, (item[4] for item in items))) - kept
            self._lost += lost
            log.error("babysit: %d logged values could not be stored (%s: %s)", lost, type(error).__name__, error)
            raise
        divergences = []
        if guard is not None:
            for name, branch, steps, seen in judged:
                found = guard.feed_many(name, steps, seen)
                if found is not None:
                    divergences.append((found, branch))
            for per, branch, steps, _, columns in runs:
                warning = guard.nothing_watched(list(columns), steps) if per == PER_STEP else None
                if warning is not None:
                    log.warning("babysit: %s", warning)
                    self._bad_events.append(("guard", warning, branch, steps[-1]))
        return divergences

    def _append(self, key: tuple[str, int, str], steps: np.ndarray, values: np.ndarray, walls: np.ndarray) -> None:
        """Add points to the series' open chunk, starting a new chunk every CHUNK_POINTS points."""
        done, total = 0, len(steps)
        while done < total:
            chunk = self._open.get(key)
            if chunk is None or chunk.n >= CHUNK_POINTS:
                if chunk is not None:  # full: stored under its own entry until written
                    self._full.append((key, chunk))
                chunk = self._open[key] = _OpenChunk()
            end = done + min(total - done, CHUNK_POINTS - chunk.n)
            chunk.extend(steps[done:end], values[done:end], walls[done:end])
            done = end
            self._dirty.add(key)

    def _floats(self, name: str, raw: list[Any], branch: int, steps: Sequence[int]) -> tuple[np.ndarray, list[int] | None]:
        """The values as floats, and the positions of those that cannot be one (NaN in the array,
        reported once per metric), or None when all can."""
        if set(map(type, raw)) <= _PLAIN_NUMBERS:
            try:
                return np.array(raw, dtype=np.float64), None
            except OverflowError:  # an int too large for a float: the value-by-value path decides
                pass
        out = np.empty(len(raw), dtype=np.float64)
        bad = []
        for i, value in enumerate(raw):
            try:
                out[i] = to_float(value)
            except Exception as error:  # whatever float() of it raises: a string, a big int, a tensor of many
                self._report_bad_value(name, value, error, branch, steps[i])
                out[i] = np.nan
                bad.append(i)
        return out, bad or None

    def _report_bad_value(self, name: str, raw: Any, error: Exception, branch: int, step: int) -> None:
        if name in self._bad_names:
            return
        self._bad_names.add(name)
        if isinstance(error, OverflowError):
            why = "is too large for a float"
        elif isinstance(raw, torch.Tensor) and raw.numel() != 1:
            why = f"is a tensor of {raw.numel()} elements (shape {tuple(raw.shape)}), not one number"
        else:
            why = "is not a number"
        message = (f"metric {name!r} at step {step}: value {shown(raw)} {why}; such values are not stored "
                   "(log numbers or one-element tensors)")
        log.warning("babysit: %s", message)
        self._bad_events.append(("error", message, branch, step))


def shown(value: Any) -> str:
    """``value`` as a message shows it: short, whatever it is (a repr can be huge, or fail)."""
    if type(value) is int and value.bit_length() > 160:  # str() of a huge int is slow, or refused
        return f"(an int of about {int(value.bit_length() * 0.30103) + 1} digits)"
    try:
        text = repr(value)
    except Exception:
        return f"of type {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


_LogRun = tuple[str, int, tuple[int, ...], tuple[float, ...], dict[str, list[Any]]]  # see _runs


def _runs(items: list[LogItem]) -> list[_LogRun]:
    """The items as runs that logged the same names at the same per and branch: (per, branch,
    steps, walls, {name: its values}). A loop logs the same names step after step, so usually
    all the items are one run, recognised and gathered with a few calls in C; otherwise they are
    split into runs first."""
    if not items:
        return []
    pers, branches, steps, walls, dicts = zip(*items)
    n = len(items)
    names = dicts[0].keys()
    if pers.count(pers[0]) == n and branches.count(branches[0]) == n and sum(map(len, dicts)) == n * len(names):
        # As many names in all as the first item's times the items: one run if every item has
        # each of the first item's names, which gathering them checks (a KeyError otherwise).
        try:
            return [(pers[0], branches[0], steps, walls, {name: list(map(itemgetter(name), dicts)) for name in names})]
        except KeyError:
            pass
    runs = []
    start = 0
    for end in range(1, n + 1):
        if end == n or pers[end] != pers[start] or branches[end] != branches[start] or dicts[end].keys() != dicts[start].keys():
            run = dicts[start:end]
            runs.append((pers[start], branches[start], steps[start:end], walls[start:end],
                         {name: list(map(itemgetter(name), run)) for name in dicts[start]}))
            start = end
    return runs
