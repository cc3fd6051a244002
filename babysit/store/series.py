"""Metrics in the run database: series of chunks (packed steps, values and wall times with their
summary), how they are written, read for a window, and superseded after a crash."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .rows import SeriesInfo
from .schema import PER_STEP, now

if TYPE_CHECKING:
    import sqlite3


def pack(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def chunk_summary(steps: np.ndarray, vals: np.ndarray) -> tuple[float | None, float | None, float, int | None, int | None]:
    """min, max, sum (of the finite values) and the steps of the min and max."""
    finite = np.isfinite(vals)
    if not finite.any():
        return None, None, 0.0, None, None
    masked_low = np.where(finite, vals, np.inf)
    masked_high = np.where(finite, vals, -np.inf)
    i_min, i_max = int(masked_low.argmin()), int(masked_high.argmax())
    return float(vals[i_min]), float(vals[i_max]), float(vals[finite].sum()), int(steps[i_min]), int(steps[i_max])


def chunk_row(series: int, steps: np.ndarray, vals: np.ndarray, walls: np.ndarray) -> tuple[Any, ...]:
    vmin, vmax, vsum, min_step, max_step = chunk_summary(steps, vals)
    return (
        series, int(steps[0]), int(steps[-1]), len(steps), vmin, vmax, vsum, min_step, max_step,
        float(walls[0]), float(walls[-1]), pack(steps, "<i8"), pack(vals, "<f8"), pack(walls, "<f8"),
    )


class SeriesTables:
    """The metrics part of :class:`~babysit.store.RunStore` (series, chunks, epochs)."""

    def series_id(self, name: str, branch: int, per: str, segment: int = 0) -> int:
        key = (name, branch, per, segment)
        found = self._series_ids.get(key)
        if found is not None:
            return found
        connection = self.conn()
        connection.execute(
            "INSERT OR IGNORE INTO series (name, branch, per, segment) VALUES (?, ?, ?, ?)", key
        )
        found = int(connection.execute(
            "SELECT id FROM series WHERE name = ? AND branch = ? AND per = ? AND segment = ?", key
        ).fetchone()[0])
        self._series_ids[key] = found
        return found

    def series(self, limit: int | None = None) -> list[SeriesInfo]:
        """Every series of the run (with ``limit``: the newest ``limit``), oldest first."""
        rows = self.conn().execute(
            "SELECT * FROM (SELECT id, name, branch, per, segment FROM series ORDER BY id DESC LIMIT ?) ORDER BY id",
            (-1 if limit is None else limit,),
        ).fetchall()
        return [SeriesInfo(*row) for row in rows]

    def write_chunks(self, chunks: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Write (series, steps, values, walls) chunks in one transaction; a chunk with the same
        first step replaces the earlier, shorter write of itself."""
        rows = [chunk_row(*chunk) for chunk in chunks]
        if not rows:
            return
        with self._tx() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )

    def chunk_summaries(self, series: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
        """Rows (first_step, last_step, n, vmin, vmax, vsum, min_step, max_step, first_wall,
        last_wall) of the chunks that overlap [lo, hi], as a float array."""
        start = self._first_chunk_start(series, lo)
        hi_step = int(hi) if hi is not None else 2**62
        rows = self.conn().execute(
            "SELECT first_step, last_step, n, vmin, vmax, vsum, min_step, max_step, first_wall, last_wall"
            " FROM chunks WHERE series = ? AND first_step >= ? AND first_step <= ? ORDER BY first_step",
            (series, start, hi_step),
        ).fetchall()
        return np.array(rows, dtype=float).reshape(-1, 10) if rows else np.empty((0, 10))

    def chunk_points(
        self, series: int, lo: float | None = None, hi: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The raw (steps, values, walls) of the chunks that overlap [lo, hi] (not cut to it)."""
        start = self._first_chunk_start(series, lo)
        hi_step = int(hi) if hi is not None else 2**62
        rows = self.conn().execute(
            "SELECT steps, vals, walls FROM chunks WHERE series = ? AND first_step >= ? AND first_step <= ?"
            " ORDER BY first_step",
            (series, start, hi_step),
        ).fetchall()
        if not rows:
            empty = np.empty(0)
            return empty.astype(np.int64), empty, empty
        return (
            np.frombuffer(b"".join(r[0] for r in rows), dtype="<i8"),
            np.frombuffer(b"".join(r[1] for r in rows), dtype="<f8"),
            np.frombuffer(b"".join(r[2] for r in rows), dtype="<f8"),
        )

    def chunk_summaries_since(self, wanted: Sequence[tuple[int, int | None]],
                              limit: int | None = None) -> dict[int, np.ndarray]:
        """For each (series, since) the summary rows (as :meth:`chunk_summaries`) of its chunks whose
        first step is ``since`` or later (all when None): one query for many series, so that a
        refresh costs a few queries whatever the number of branches. At most ``limit`` rows in all
        (the series listed first get theirs first)."""
        found: list[np.ndarray] = []
        left = -1 if limit is None else limit
        for part in _parts(wanted, 400):
            if left == 0:
                break
            values = ", ".join("(?, ?, ?)" for _ in part)
            params = [x for k, (series, since) in enumerate(part)
                      for x in (k, series, -(2**62) if since is None else int(since))]
            # CROSS JOIN keeps the wanted list outside, so each series is one range of the index.
            rows = self.conn().execute(
                f"WITH wanted(k, series, since) AS (VALUES {values})"
                " SELECT c.series, c.first_step, c.last_step, c.n, c.vmin, c.vmax, c.vsum, c.min_step, c.max_step,"
                " c.first_wall, c.last_wall FROM wanted w CROSS JOIN chunks c"
                " WHERE c.series = w.series AND c.first_step >= w.since ORDER BY w.k, c.first_step LIMIT ?",
                (*params, left),
            ).fetchall()
            if rows:
                found.append(np.array(rows, dtype=float))
            if left > 0:
                left -= len(rows)
        empty = np.empty((0, 10))
        out = {series: empty for series, _ in wanted}
        if found:
            table = np.concatenate(found) if len(found) > 1 else found[0]
            ids, starts = np.unique(table[:, 0], return_index=True)
            order = np.argsort(starts)
            ids, starts = ids[order], starts[order]
            for series, lo, hi in zip(ids.tolist(), starts.tolist(), [*starts[1:].tolist(), len(table)]):
                out[int(series)] = table[lo:hi, 1:]
        return out

    def chunk_points_of(self, wanted: Sequence[tuple[int, int, int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each (series, first, last) the raw (steps, values, walls) of its chunks whose first
        step is in [first, last], in one query. A chunk whose packed arrays do not hold ``n``
        points each (a damaged or forged row) is left out."""
        found: list[list[tuple[bytes, bytes, bytes]]] = [[] for _ in wanted]
        for offset, part in _numbered_parts(wanted, 300):
            values = ", ".join("(?, ?, ?, ?)" for _ in part)
            params = [x for k, (series, first, last) in part for x in (k, series, int(first), int(last))]
            rows = self.conn().execute(
                f"WITH wanted(k, series, first, last) AS (VALUES {values})"
                " SELECT w.k, c.steps, c.vals, c.walls FROM wanted w CROSS JOIN chunks c"
                " WHERE c.series = w.series AND c.first_step BETWEEN w.first AND w.last"
                " AND length(c.steps) = 8 * c.n AND length(c.vals) = 8 * c.n AND length(c.walls) = 8 * c.n"
                " ORDER BY w.k, c.first_step",
                params,
            ).fetchall()
            for k, steps, vals, walls in rows:
                found[k].append((steps, vals, walls))
        out = []
        for rows in found:
            if not rows:
                empty = np.empty(0)
                out.append((empty.astype(np.int64), empty, empty))
                continue
            out.append((np.frombuffer(b"".join(r[0] for r in rows), dtype="<i8"),
                        np.frombuffer(b"".join(r[1] for r in rows), dtype="<f8"),
                        np.frombuffer(b"".join(r[2] for r in rows), dtype="<f8")))
        return out

    def _first_chunk_start(self, series: int, lo: float | None) -> int:
        if lo is None:
            return -(2**62)
        row = self.conn().execute(
            "SELECT max(first_step) FROM chunks WHERE series = ? AND first_step <= ?", (series, int(lo))
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else -(2**62)

    def series_extent(self, series: int) -> tuple[int, int, int] | None:
        """(first step, last step, number of points) of a series, or None when it is empty."""
        row = self.conn().execute(
            "SELECT min(first_step), max(last_step), sum(n) FROM chunks WHERE series = ?", (series,)
        ).fetchone()
        return None if row[0] is None else (int(row[0]), int(row[1]), int(row[2]))

    def starting_mean(self, name: str) -> float | None:
        """The mean of the first stored chunk of ``name`` (per step) on the run's first branch:
        how high the metric was when the run started (the loss before any learning)."""
        row = self.conn().execute(
            "SELECT c.vsum / c.n FROM chunks c JOIN series s ON s.id = c.series"
            " WHERE s.name = ? AND s.per = ? AND s.segment = 0 AND c.n > 0"
            " AND s.branch = (SELECT min(id) FROM branches) ORDER BY c.first_step LIMIT 1",
            (name, PER_STEP),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def supersede_after(self, branch: int, step: int) -> int:
        """Move the points of ``branch`` logged after ``step`` into new superseded series.

        Called when a trainer resumes from a checkpoint at ``step`` after a crash: what the dead
        process logged after its last checkpoint stays in the store, drawn faded, never as live.
        Returns the number of points moved.
        """
        moved = 0
        connection = self.conn()
        live = connection.execute(
            "SELECT id, name, per FROM series WHERE branch = ? AND segment = 0", (branch,)
        ).fetchall()
        segment_row = connection.execute(
            "SELECT coalesce(max(segment), 0) FROM series WHERE branch = ?", (branch,)
        ).fetchone()
        segment = int(segment_row[0]) + 1
        to_write: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        with self._tx():
            for series, name, per in live:
                rows = connection.execute(
                    "SELECT first_step, steps, vals, walls FROM chunks WHERE series = ? AND last_step > ?",
                    (series, step),
                ).fetchall()
                if not rows:
                    continue
                target = None
                for first_step, steps_b, vals_b, walls_b in rows:
                    steps = np.frombuffer(steps_b, dtype="<i8")
                    vals = np.frombuffer(vals_b, dtype="<f8")
                    walls = np.frombuffer(walls_b, dtype="<f8")
                    keep = steps <= step
                    connection.execute("DELETE FROM chunks WHERE series = ? AND first_step = ?", (series, first_step))
                    if keep.any():
                        to_write.append((series, steps[keep], vals[keep], walls[keep]))
                    if target is None:
                        connection.execute(
                            "INSERT OR IGNORE INTO series (name, branch, per, segment) VALUES (?, ?, ?, ?)",
                            (name, branch, per, segment),
                        )
                        target = int(connection.execute(
                            "SELECT id FROM series WHERE name = ? AND branch = ? AND per = ? AND segment = ?",
                            (name, branch, per, segment),
                        ).fetchone()[0])
                    gone = ~keep
                    moved += int(gone.sum())
                    to_write.append((target, steps[gone], vals[gone], walls[gone]))
            self.write_chunks(to_write)  # nested: joins this transaction
            connection.execute("DELETE FROM epochs WHERE branch = ? AND end_step > ?", (branch, step))
        return moved

    def add_epoch(self, branch: int, epoch: int, end_step: int) -> None:
        self.conn().execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?)", (branch, epoch, end_step, now()))

    def epochs(self, branches: Iterable[int] | None = None, limit: int | None = None) -> list[tuple[int, int, int]]:
        """(branch, epoch, end_step) of every finished epoch, of ``branches`` only when given (at
        most a few thousand), and at most ``limit`` rows (a reader's bound)."""
        where, params = "", []
        if branches is not None:
            ids = sorted({int(b) for b in branches})
            where = f" WHERE branch IN ({', '.join('?' * len(ids))})" if ids else " WHERE 0"
            params = ids
        return [tuple(r) for r in self.conn().execute(
            f"SELECT branch, epoch, end_step FROM epochs{where} ORDER BY branch, epoch LIMIT ?",
            (*params, -1 if limit is None else limit),
        ).fetchall()]


def _parts(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """``items`` in slices of ``size`` (SQLite bounds the parameters of one statement)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _numbered_parts(items: Sequence[Any], size: int) -> Iterable[tuple[int, list[tuple[int, Any]]]]:
    for start in range(0, len(items), size):
        yield start, list(enumerate(items[start:start + size], start=start))
