"""Bench-only prototypes of fixes suggested for babysit (never imported by babysit itself).

Each function here is a drop-in replacement that a what-if measurement patches onto one object
(an instance, or a copy of a database), to estimate the gain of a change before anyone makes it
in ``babysit/``. They keep babysit's observable behaviour (same chunks, same guard decisions,
same error reports) so that the comparison is fair.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np


def fast_flush_locked(self: Any) -> None:
    """``MetricsWriter._flush_locked`` with the per-value work cut down.

    - tensors become floats with ``.item()`` (``to_float`` calls ``.detach().float().item()``:
      two extra tensor ops, ~2 µs each on this machine, for a one-element tensor);
    - the chunk of a (name, branch, per) is looked up once per flush, not found again and added
      to a set for every value;
    - the divergence guard is fed through a local fast path (see :func:`fast_guard_feed`).
    """
    import torch

    from babysit.store import CHUNK_POINTS
    from babysit.writer import _OpenChunk

    queue = self.queue
    pop = queue.popleft
    items = [pop() for _ in range(len(queue))]
    guard = self._guard
    guard_name = guard.config.metric if guard is not None and guard.config.enabled else None
    feed = fast_guard_feed
    open_chunks = self._open
    touched: dict[tuple[str, int, str], Any] = {}
    divergences = []
    tensor = torch.Tensor
    for per, branch, step, wall, metrics in items:
        for name, raw in metrics.items():
            if type(raw) is not float:
                try:
                    raw = raw.item() if isinstance(raw, tensor) else float(raw)
                    raw = float(raw)
                except (TypeError, ValueError, RuntimeError):
                    self._report_bad_value(name, raw, branch, step)
                    continue
            key = (name, branch, per)
            chunk = touched.get(key)
            if chunk is None:
                chunk = open_chunks.get(key)
                if chunk is None:
                    chunk = open_chunks[key] = _OpenChunk()
                touched[key] = chunk
            chunk.steps.append(step)
            chunk.vals.append(raw)
            chunk.walls.append(wall)
            if name == guard_name and per == "step":
                found = feed(guard, step, raw)
                if found is not None:
                    divergences.append((found, branch))
    pending = []
    for key, chunk in touched.items():
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.store.series_id(key[0], key[1], key[2])
        pending.append((series, np.array(chunk.steps, dtype=np.int64), np.array(chunk.vals, dtype=np.float64),
                        np.array(chunk.walls, dtype=np.float64)))
        if len(chunk.steps) >= CHUNK_POINTS:
            del open_chunks[key]
    connection = self.store.conn()
    connection.execute("BEGIN IMMEDIATE")
    try:
        self.store.write_chunks(pending)
        self.store.write_status(**self._status(), heartbeat=time.time())
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    if self._on_divergence is not None:
        for found, branch in divergences:
            self._on_divergence(found, branch)


def fast_guard_feed(guard: Any, step: int, value: float) -> Any:
    """``DivergenceGuard.feed`` with the config read into locals; the same arithmetic."""
    if guard.tripped:
        return None
    config = guard.config
    if not math.isfinite(value):
        return guard.feed(step, value)
    count = guard._count + 1
    sb, lb = config.short_beta, config.long_beta
    short_acc = sb * guard._short + (1 - sb) * value
    long_acc = lb * guard._long + (1 - lb) * value
    short = short_acc / (1 - sb ** count)
    long = long_acc / (1 - lb ** count)
    gap = short - long
    limit = config.spike_factor * long
    if count > config.warmup_steps and long > 0 and short > limit:
        # Rare: let the real method decide (and record) with the state as it was before.
        return guard.feed(step, value)
    guard._count, guard._short, guard._long = count, short_acc, long_acc
    if short <= limit:
        guard._gap_square = lb * guard._gap_square + (1 - lb) * gap * gap
        guard._gap_weight = lb * guard._gap_weight + (1 - lb)
    return None


SUMMARY_INDEX = (
    "CREATE INDEX IF NOT EXISTS chunks_summary ON chunks (series, first_step, last_step, n, vmin, vmax, vsum,"
    " min_step, max_step, first_wall, last_wall)"
)


def columnar_flush_locked(self: Any) -> None:
    """``MetricsWriter._flush_locked`` reorganised by column: the queued tuples are transposed
    with ``zip`` (C speed), each metric's values are gathered with one comprehension, converted
    in one go (floats by ``np.fromiter``; tensors by ``.item()``) and appended to its chunk with
    ``list.extend``; only the guard's metric is walked value by value. Falls back to
    :func:`fast_flush_locked` when the queue mixes branches, per-step and per-epoch rows, or
    metric names (rare: a rollback, an epoch end, a new metric)."""
    import torch

    from babysit.store import CHUNK_POINTS
    from babysit.writer import _OpenChunk

    queue = self.queue
    n = len(queue)
    if n == 0:
        return fast_flush_locked(self)
    first = queue[0]
    names = tuple(first[4])
    same = all(item[0] == first[0] and item[1] == first[1] and tuple(item[4]) == names for item in queue)
    if not same:
        return fast_flush_locked(self)
    pop = queue.popleft
    items = [pop() for _ in range(n)]
    per, branch = first[0], first[1]
    _, _, steps, walls, metrics = zip(*items)
    guard = self._guard
    guard_name = guard.config.metric if guard is not None and guard.config.enabled else None
    tensor = torch.Tensor
    divergences = []
    touched = {}
    for name in names:
        raw = [m[name] for m in metrics]
        try:
            if all(type(v) is float for v in raw):
                values = raw
            else:
                values = [float(v.item()) if isinstance(v, tensor) else float(v) for v in raw]
        except (TypeError, ValueError, RuntimeError):
            # Put the rows back and let the value-by-value path report the bad value.
            queue.extendleft(reversed(items))
            return fast_flush_locked(self)
        key = (name, branch, per)
        chunk = self._open.get(key)
        if chunk is None:
            chunk = self._open[key] = _OpenChunk()
        chunk.steps.extend(steps)
        chunk.vals.extend(values)
        chunk.walls.extend(walls)
        touched[key] = chunk
        if name == guard_name and per == "step":
            for s, v in zip(steps, values):
                found = fast_guard_feed(guard, s, v)
                if found is not None:
                    divergences.append((found, branch))
    pending = []
    for key, chunk in touched.items():
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.store.series_id(key[0], key[1], key[2])
        pending.append((series, np.array(chunk.steps, dtype=np.int64), np.array(chunk.vals, dtype=np.float64),
                        np.array(chunk.walls, dtype=np.float64)))
        if len(chunk.steps) >= CHUNK_POINTS:
            del self._open[key]
    connection = self.store.conn()
    connection.execute("BEGIN IMMEDIATE")
    try:
        self.store.write_chunks(pending)
        self.store.write_status(**self._status(), heartbeat=time.time())
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    if self._on_divergence is not None:
        for found, branch in divergences:
            self._on_divergence(found, branch)
