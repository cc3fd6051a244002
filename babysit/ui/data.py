"""What the dashboard reads from the run store, shaped for drawing: windows of series, markers.

A run with many rollbacks is read as the chart draws it (see :func:`read_view`): the *live line*
(the trainer's branch and the stretch of each ancestor up to the step its child forked at, found
by babysit.store.lineage's bounded walk) as one window per metric; every other branch, and what an
ancestor did after its child forked, as one coarse window of its main loss ("abandoned", a faint
curve); a few branches in full when a person asks. Each refresh reads the summaries of every
series it needs in one query and their raw points in another, so its cost follows what is drawn,
not the number of branches; and it is bounded (:class:`RefreshLimits`) whatever a run directory
holds.

A series window never holds more than ``max_points`` points, however long the run: below that
many raw points it returns them as they are; up to ``RAW_CHUNK_BUDGET`` chunks it reads the raw
points and keeps the min and max of each bucket; beyond that it draws from the per-chunk min/max
summaries the trainer stored, without reading a single raw point. Memory and time per refresh
depend on the window, not on the length of the run.

Buckets are aligned to a fixed grid of steps whose width is a power of two: as the run grows, the
points already drawn stay exactly the same and only the last bucket changes (until the run doubles
in length and the grid coarsens), so a refresh can send what changed rather than the whole curve.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import commands as cmd
from ..store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore, SeriesInfo
from ..store.lineage import MAX_BRANCH_ROWS, Line, ancestry, line_of, parents_of, read_branches

MAX_POINTS = 5000
# Reading raw points of this many chunks (256 points each) stays well under the refresh budget.
RAW_CHUNK_BUDGET = 256
MEAN_BUCKETS = 1000

# Summary columns (see RunStore.chunk_summaries).
_FIRST, _LAST, _N, _VMIN, _VMAX, _VSUM, _MIN_STEP, _MAX_STEP, _FIRST_WALL, _LAST_WALL = range(10)


def _grid(x: np.ndarray, buckets: int) -> np.ndarray:
    """Each x's bucket on an aligned grid: width the power of two that gives at most ``buckets``."""
    span = float(x[-1] - x[0]) + 1.0
    width = 2.0 ** math.ceil(math.log2(max(span / max(buckets - 1, 1), 1.0)))
    return np.floor_divide(np.asarray(x, dtype=float), width)


def _group_starts(groups: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])


def aligned_minmax(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of (x, y) (x sorted): per bucket of an aligned step grid, the
    lowest and the highest point, in x order, so a spike is always kept. Non-finite values are never
    chosen over finite ones; a bucket with no finite value keeps its first point (a gap)."""
    n = len(x)
    if n <= max_points:
        return x, y
    groups = _grid(x, max(1, max_points // 2))
    starts = _group_starts(groups)
    index = np.cumsum(np.r_[False, groups[1:] != groups[:-1]])  # the group of each point
    finite = np.isfinite(y)
    picked = []
    for fill, reduce in ((np.inf, np.minimum), (-np.inf, np.maximum)):
        masked = np.where(finite, y, fill)
        extreme = reduce.reduceat(masked, starts)
        hits = np.flatnonzero(masked == extreme[index])
        _, first = np.unique(index[hits], return_index=True)
        picked.append(hits[first])
    keep = np.unique(np.concatenate(picked))
    return x[keep], y[keep]


def aligned_means(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean x, mean of the finite y) per bucket of an aligned step grid (x sorted)."""
    if len(x) <= buckets:
        finite = np.isfinite(y)
        return x[finite].astype(float), y[finite]
    groups = _grid(x, buckets)
    starts = _group_starts(groups)
    counts = np.diff(np.r_[starts, len(x)])
    finite = np.isfinite(y)
    n_finite = np.add.reduceat(finite.astype(np.int64), starts)
    sums = np.add.reduceat(np.where(finite, y, 0.0), starts)
    xs = np.add.reduceat(np.asarray(x, dtype=float), starts) / counts
    keep = n_finite > 0
    return xs[keep], sums[keep] / n_finite[keep]


_NO_ROWS = np.empty((0, 10))
# What a window's points are on the chart (see read_view).
LIVE = "live"            # the live line: the trainer's branch and the stretches it descends from
ABANDONED = "abandoned"  # what no longer leads to the trainer's branch: faint, one legend entry
FULL = "full"            # a branch a person asked to see in full
SUPERSEDED = "superseded"  # points a crash superseded


@dataclass
class SeriesWindow:
    """Points of one series in a window: a metric on one branch, a superseded piece of it, or (for
    the live line) the stretches of several branches joined in step order."""

    info: SeriesInfo
    steps: np.ndarray
    values: np.ndarray
    walls: np.ndarray
    mean_steps: np.ndarray  # bucket means, for smoothing a downsampled view
    mean_values: np.ndarray
    raw_count: int  # points of the series inside the window before downsampling
    downsampled: bool
    role: str = LIVE
    # Along a live line: (branch, index of its first point here), one per stretch drawn.
    pieces: tuple[tuple[int, int], ...] = ()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def branch(self) -> int:
        return self.info.branch

    @property
    def superseded(self) -> bool:
        return self.info.segment > 0

    @property
    def branches(self) -> tuple[int, ...]:
        """The branches whose points this window holds."""
        return tuple(b for b, _ in self.pieces) or (self.branch,)


@dataclass
class _RunSummaries:
    ids: frozenset[int]                       # the run's series when this was read
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    growing: frozenset[int] = frozenset()     # the series the trainer was writing, last time
    generation: int = 0                       # changes whenever a series not growing got new rows


class SummaryCache:
    """The chunk summaries of whole series already read, per run database.

    A chunk is rewritten only while the trainer fills it (the same first step, more points), so a
    refresh re-reads the last chunk it knows of each series it asks about and any newer ones, not
    the thousands before, and does so for all of them in one query. Only the trainer's branch
    grows: :meth:`read_many` with ``growing`` re-reads only those series (and every series once
    when the trainer moves to another branch, which catches a last write to the branch it left).
    Older chunks change only when a crash's points are moved to a new superseded series, so a new
    series in the run drops what is cached for it. Shared by every browser session of the server
    (hence the lock).
    """

    def __init__(self, max_runs: int = 16) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, int], _RunSummaries] = {}
        self._max_runs = max_runs

    def read(self, store: RunStore, series: int) -> np.ndarray:
        return self.read_many(store, [series])[series]

    def read_many(self, store: RunStore, wanted: Iterable[int], every: frozenset[int] | None = None,
                  limit: int | None = None, growing: frozenset[int] | None = None) -> dict[int, np.ndarray]:
        """The summary rows of each series in ``wanted``; ``every``: the ids of all the run's
        series (read by the caller already), else read here. At most ``limit`` rows are read (the
        first series' first); what is cut is not cached. ``growing``: the only series that may
        have grown since the last read (None: any)."""
        return self.read_for_refresh(store, wanted, every, limit, growing)[0]

    def read_for_refresh(self, store: RunStore, wanted: Iterable[int], every: frozenset[int] | None = None,
                         limit: int | None = None, growing: frozenset[int] | None = None
                         ) -> tuple[dict[int, np.ndarray], tuple[Any, ...]]:
        """:meth:`read_many`, and a token that changes whenever rows of a series outside
        ``growing`` changed (what a reader keeps of finished branches stays valid while it holds)."""
        key = (str(store.db_path.resolve()), store.db_path.stat().st_ino)
        ids = every if every is not None else frozenset(info.id for info in store.series())
        wanted = list(dict.fromkeys(wanted))
        with self._lock:
            run = self._runs.get(key)
            if run is None or run.ids != ids:  # a new branch or superseded piece: start afresh
                if run is None and len(self._runs) >= self._max_runs:
                    self._runs.clear()
                run = self._runs[key] = _RunSummaries(ids, generation=(run.generation + 1) if run else 0)
            moved = growing is None or growing != run.growing
            known = {series: run.rows.get(series) for series in wanted}
        # Ask about what may have grown and what was never read; the rest is as it was.
        asked = [(series, int(rows[-1, _FIRST]) if rows is not None and len(rows) else None)
                 for series, rows in known.items() if rows is None or moved or series in growing]
        tails = store.chunk_summaries_since(asked, limit) if asked else {}
        cut = limit is not None and sum(len(t) for t in tails.values()) >= limit
        found = {series: rows for series, rows in known.items() if rows is not None}
        again = []
        changed = False
        for series, first in asked:
            rows, tail = known[series], tails[series]
            if first is None:
                found[series] = tail
            elif len(tail) == 0 or tail[0, _FIRST] != first:
                again.append((series, None))  # not the chunks we knew: read them all
            elif len(tail) > 1 or not np.array_equal(tail[0], rows[-1], equal_nan=True):
                found[series] = np.concatenate([rows[:-1], tail])
            else:
                continue
            changed = changed or (growing is not None and series not in growing and first is not None)
        if again:
            found.update(store.chunk_summaries_since(again, limit))
            changed = changed or any(growing is None or series not in growing for series, _ in again)
        with self._lock:
            if not cut:  # a read cut short holds only some series' rows
                run.rows.update(found)
            if growing is not None:
                run.growing = growing
            if changed or growing is None:
                run.generation += 1
            token = (key, id(run), run.generation)
        return found, token


SUMMARIES = SummaryCache()


def read_window(
    store: RunStore, info: SeriesInfo, lo: float | None = None, hi: float | None = None,
    max_points: int = MAX_POINTS,
) -> SeriesWindow:
    """The points of ``info`` with steps in [lo, hi] (all when None), at most ``max_points``.

    The last point before ``lo`` is kept too, so a stepwise series (lr, momentum) is drawn from
    the left edge of the window.
    """
    summaries = SUMMARIES.read(store, info.id) if lo is None and hi is None else store.chunk_summaries(info.id, lo, hi)
    if len(summaries) == 0:
        empty = np.empty(0)
        return SeriesWindow(info, empty, empty, empty, empty, empty, 0, False)
    if len(summaries) <= RAW_CHUNK_BUDGET:
        steps, values, walls = store.chunk_points(info.id, lo, hi)
        return _from_points(info, steps, values, walls, lo, hi, max_points)
    return _from_summaries(info, summaries, max_points)


def _from_points(info: SeriesInfo, steps: np.ndarray, values: np.ndarray, walls: np.ndarray, lo: float | None,
                 hi: float | None, max_points: int, role: str = LIVE) -> SeriesWindow:
    """A window of raw points (steps sorted): those in [lo, hi] and the last one before ``lo``,
    thinned to ``max_points`` by :func:`aligned_minmax` when there are more."""
    inside = np.ones(len(steps), dtype=bool)
    if lo is not None:
        inside &= steps >= lo
        before = np.flatnonzero(steps < lo)
        if len(before):
            inside[before[-1]] = True
    if hi is not None:
        inside &= steps <= hi
    steps, values, walls = steps[inside], values[inside], walls[inside]
    raw_count = len(steps)
    if raw_count <= max_points:
        # Every point is drawn; the smoothed line is drawn from at most MEAN_BUCKETS bucket means
        # (the same curve, babysit/downsample.py: ewma), fewer points for the browser to redraw.
        mean_steps, mean_values = (aligned_means(steps, values, MEAN_BUCKETS) if raw_count > MEAN_BUCKETS
                                   else (steps, values))
        return SeriesWindow(info, steps, values, walls, mean_steps, mean_values, raw_count, False, role)
    kept_steps, kept_values = aligned_minmax(steps, values, max_points)
    kept_walls = np.interp(kept_steps, steps, walls)
    mean_steps, mean_values = aligned_means(steps, values, MEAN_BUCKETS)
    return SeriesWindow(info, kept_steps, kept_values, kept_walls, mean_steps, mean_values, raw_count, True, role)


def _from_summaries(info: SeriesInfo, rows: np.ndarray, max_points: int,
                    extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, role: str = LIVE) -> SeriesWindow:
    """Each chunk's min and max (at their own steps), in step order, thinned by :func:`aligned_minmax`;
    ``extra``: raw points (steps, values, walls) to draw among them (a chunk cut at a fork)."""
    rows_ok = rows[~np.isnan(rows[:, _VMIN])]
    low_first = rows_ok[:, _MIN_STEP] <= rows_ok[:, _MAX_STEP]
    candidates_x = np.empty(2 * len(rows_ok))
    candidates_y = np.empty(2 * len(rows_ok))
    candidates_x[0::2] = np.where(low_first, rows_ok[:, _MIN_STEP], rows_ok[:, _MAX_STEP])
    candidates_y[0::2] = np.where(low_first, rows_ok[:, _VMIN], rows_ok[:, _VMAX])
    candidates_x[1::2] = np.where(low_first, rows_ok[:, _MAX_STEP], rows_ok[:, _MIN_STEP])
    candidates_y[1::2] = np.where(low_first, rows_ok[:, _VMAX], rows_ok[:, _VMIN])
    # Wall time of a point: interpolated inside the chunk's own first/last wall times.
    knots_steps = np.column_stack([rows[:, _FIRST], rows[:, _LAST]]).ravel()
    knots_walls = np.column_stack([rows[:, _FIRST_WALL], rows[:, _LAST_WALL]]).ravel()
    mean_steps = (rows_ok[:, _FIRST] + rows_ok[:, _LAST]) / 2
    mean_values = rows_ok[:, _VSUM] / np.maximum(rows_ok[:, _N], 1)
    raw_count = int(rows[:, _N].sum())
    if extra is not None and len(extra[0]):
        x, y, w = (np.asarray(a, dtype=float) for a in extra)
        candidates_x, candidates_y = np.r_[candidates_x, x], np.r_[candidates_y, y]
        knots_steps, knots_walls = np.r_[knots_steps, x], np.r_[knots_walls, w]
        finite = np.isfinite(y)
        if finite.any():
            mean_steps, mean_values = np.r_[mean_steps, x[finite].mean()], np.r_[mean_values, y[finite].mean()]
        raw_count += len(x)
        order = np.argsort(candidates_x, kind="stable")
        candidates_x, candidates_y = candidates_x[order], candidates_y[order]
        order = np.argsort(knots_steps, kind="stable")
        knots_steps, knots_walls = knots_steps[order], knots_walls[order]
        order = np.argsort(mean_steps, kind="stable")
        mean_steps, mean_values = mean_steps[order], mean_values[order]
    steps, values = aligned_minmax(candidates_x, candidates_y, max_points)
    walls = np.interp(steps, knots_steps, knots_walls) if len(knots_steps) else np.full(len(steps), np.nan)
    if len(mean_steps) > MEAN_BUCKETS:
        mean_steps, mean_values = aligned_means(mean_steps, mean_values, MEAN_BUCKETS)
    return SeriesWindow(info, steps, values, walls, mean_steps, mean_values, raw_count, True, role)


# -- what one refresh may cost ------------------------------------------------------------------
@dataclass(frozen=True)
class RefreshLimits:
    """What one chart refresh may read and build, whatever a run directory holds (a forged one
    may hold millions of rows): past a bound it reads the newest rows only, and says so; past
    ``seconds`` it stops reading and draws what it has, with a message."""

    seconds: float = 8.0
    series: int = 5_000            # series rows read (the newest)
    branches: int = MAX_BRANCH_ROWS  # branch rows read (the newest)
    raw_points: int = 1_500_000    # raw points read, all windows together (~36 MB): then summaries
    summary_rows: int = 500_000    # chunk summaries read (~40 MB: 128 million steps of points)
    metrics: int = 16              # metrics drawn (losses first)
    epochs: int = 200_000          # epoch rows read
    superseded: int = 64           # superseded pieces drawn


LIMITS = RefreshLimits()


class CutShort(Exception):
    """A refresh went past its time: what is read so far is drawn."""


class _Budget:
    def __init__(self, limits: RefreshLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.raw_left = limits.raw_points
        self.notes: list[str] = []

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def check(self) -> None:
        if self.expired():
            raise CutShort

    def take_raw(self, points: int) -> bool:
        if points <= self.raw_left:
            self.raw_left -= points
            return True
        self.note(f"More raw points than one refresh reads ({self.limits.raw_points:,}): some curves are drawn "
                  "from their chunk summaries; zoom in for every point.")
        return False

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    @contextmanager
    def guard(self, store: RunStore) -> Iterator[None]:
        """SQLite stops a query that runs past the deadline (its progress handler), which then
        reads as :class:`CutShort`."""
        connection = store.conn()
        connection.set_progress_handler(self.expired, 10_000)
        try:
            yield
        except sqlite3.OperationalError as error:
            if "interrupted" in str(error) and self.expired():
                raise CutShort from None
            raise
        finally:
            connection.set_progress_handler(None, 0)


# -- the whole picture of a run -----------------------------------------------------------------
@dataclass
class Marker:
    """A nudge or a rollback, drawn on the curve with its before -> after."""

    kind: str
    branch: int
    step: int
    text: str
    value: float | None = None
    wall: float | None = None


@dataclass
class RunView:
    windows: list[SeriesWindow]  # drawn as curves: the live line's, branches in full, superseded pieces
    markers: list[Marker]
    branches: list[dict[str, Any]]
    epochs: dict[int, list[tuple[int, int]]] | EpochLines  # branch -> [(epoch, end_step)] along its line
    current_branch: int | None
    steps_per_epoch: int | None
    extent: tuple[int, int] | None  # (first, last) step over all series drawn
    branch_ends: dict[tuple[int, int], int] = field(default_factory=dict)  # (branch, segment) -> last step
    abandoned: list[SeriesWindow] = field(default_factory=list)  # one faint curve each (bucket means)
    line: Line | None = None  # the live line: the trainer's branch and the stretches it descends from
    full: tuple[int, ...] = ()  # branches drawn in full, as asked
    notes: list[str] = field(default_factory=list)  # a damaged run, a refresh cut short or capped
    newest: int | None = None  # the newest step on the live line
    abandoned_count: int = 0  # branches with an abandoned stretch (sketched or not)

    def drawn_branches(self) -> set[int]:
        """Every branch with points on the chart."""
        return {b for w in self.windows + self.abandoned for b in w.branches}


# The live line holds at most this many branches' stretches (a longer line draws its newest).
MAX_LINE_STRETCHES = 2_000
MAX_FULL_BRANCHES = 6
# The faint curves of the abandoned branches: this many points together, at least a few each.
ABANDONED_POINTS = 3_000
ABANDONED_MIN_POINTS = 24
# An abandoned stretch this short is drawn from its raw points (bucket means), else from its chunks'.
ABANDONED_RAW_POINTS = 16 * CHUNK_POINTS


def read_view(store: RunStore, status: dict[str, Any], lo: float | None = None, hi: float | None = None,
              max_points: int = MAX_POINTS, hidden_branches: frozenset[int] = frozenset(),
              full_branches: Iterable[int] = (), limits: RefreshLimits = LIMITS) -> RunView:
    """The run as the chart draws it, for steps in [lo, hi] (all when None).

    The live line (the trainer's branch and the stretch of each ancestor up to where its child
    forked) is one window per metric; every other branch, and what each ancestor went on to do
    after the fork, is "abandoned": one coarse window of its main loss each, for a faint curve.
    ``full_branches`` (at most six) are read in full as well; ``hidden_branches`` (probe and
    sweep branches) not at all. Bounded by ``limits``; a damaged line of descent, a refresh cut
    short or a bound reached is said in ``notes``.
    """
    budget = _Budget(limits)
    view = RunView(windows=[], markers=[], branches=[], epochs={}, current_branch=None,
                   steps_per_epoch=status.get("steps_per_epoch"), extent=None)
    try:
        with budget.guard(store):
            _fill(view, store, status, lo, hi, max_points, hidden_branches, full_branches, budget)
    except CutShort:
        budget.note(f"This refresh was cut short after {limits.seconds:g} s (the run's database is too large or too "
                    "slow to read in time); the chart shows what was read by then.")
    view.notes = budget.notes
    drawn = view.windows + view.abandoned
    firsts = [int(w.steps[0]) for w in drawn if len(w.steps)]
    lasts = [int(w.steps[-1]) for w in drawn if len(w.steps)]
    view.extent = (min(firsts), max(lasts)) if firsts else None
    for window in view.windows:
        if len(window.steps):
            key = (window.branch, window.info.segment)
            view.branch_ends[key] = max(view.branch_ends.get(key, 0), int(window.steps[-1]))
    step = status.get("step")
    if view.current_branch is not None and status.get("branch") == view.current_branch and isinstance(step, int):
        key = (view.current_branch, 0)
        view.branch_ends[key] = max(view.branch_ends.get(key, 0), step)
    live_ends = [int(w.steps[-1]) for w in view.windows if w.role == LIVE and len(w.steps)]
    if view.current_branch is not None and (live_ends or (view.current_branch, 0) in view.branch_ends):
        view.newest = max(live_ends + [view.branch_ends.get((view.current_branch, 0), 0)])
    return view


def _fill(view: RunView, store: RunStore, status: dict[str, Any], lo: float | None, hi: float | None,
          max_points: int, hidden: frozenset[int], full_branches: Iterable[int], budget: _Budget) -> None:
    limits = budget.limits
    series, rows, total = _ROWS.read(store, limits)
    if len(series) == limits.series:
        budget.note(f"This run has more than {limits.series:,} series; the chart reads the newest {limits.series:,}.")
    if total > len(rows):
        budget.note(f"This run has {total:,} branches; the chart reads the newest {len(rows):,}.")
    view.branches = rows
    by_id = {b["id"]: b for b in rows}
    own: dict[int, list[SeriesInfo]] = {}
    for info in series:
        own.setdefault(info.branch, []).append(info)
    current = _current_branch(status, by_id, own, hidden)
    view.current_branch = current
    line = line_of(by_id, current) if current is not None else Line(-1, ())
    if line.damage:
        budget.note(f"Damaged run: {line.damage}. The chart draws branch {current}'s line of descent up to there.")
    if len(line.stretches) > MAX_LINE_STRETCHES:
        budget.note(f"Branch {current} descends from {len(line.stretches) - 1:,} branches; the chart draws the newest "
                    f"{MAX_LINE_STRETCHES:,} of its line.")
        line = Line(line.branch, line.stretches[-MAX_LINE_STRETCHES:], line.damage)
    view.line = line
    on_line = set(line.branches)
    known = set(by_id) | set(own)
    full = tuple(dict.fromkeys(b for b in full_branches if b in known and b != current and b not in hidden))
    view.full = full[-MAX_FULL_BRANCHES:]
    budget.check()

    # Which series each drawing needs.
    metrics = _metric_keys([i for b in on_line | set(view.full) for i in own.get(b, []) if i.segment == 0],
                           limits.metrics, budget)
    plans: list[tuple[str, SeriesInfo, list[tuple[int, SeriesInfo, int | None]]]] = []
    for key in metrics:
        parts = [(s.branch, info, s.until) for s in line.stretches for info in own.get(s.branch, [])
                 if (info.name, info.per) == key and info.segment == 0]
        if parts:
            last = parts[-1][1]
            plans.append((LIVE, SeriesInfo(last.id, last.name, line.branch, last.per, 0), parts))
    for branch in view.full:
        for info in own.get(branch, []):
            if info.segment == 0 and (info.name, info.per) in metrics:
                plans.append((FULL, info, [(branch, info, None)]))
    superseded = [i for b in on_line | set(view.full) for i in own.get(b, []) if i.segment > 0
                  and (i.name, i.per) in metrics]
    if len(superseded) > limits.superseded:
        budget.note(f"{len(superseded):,} pieces superseded by crashes; the chart draws the newest {limits.superseded}.")
        superseded = sorted(superseded, key=lambda i: i.id)[-limits.superseded:]
    stretch_of = {s.branch: s for s in line.stretches}
    plans += [(SUPERSEDED, info, [(info.branch, info, stretch_of[info.branch].until if info.branch in stretch_of
                                   and info.branch not in view.full else None)]) for info in superseded]
    abandoned = _abandoned_stretches(line, by_id, own, hidden | set(view.full), known)
    view.abandoned_count = len({branch for branch, _ in abandoned})
    most = ABANDONED_POINTS // ABANDONED_MIN_POINTS
    if len(abandoned) > most:
        budget.note(f"{len(abandoned):,} abandoned stretches; the chart sketches the newest {most}.")
        abandoned = abandoned[-most:]
    main = _main_loss(series)
    abandoned_series = [(info, after) for branch, after in abandoned for info in own.get(branch, [])
                        if main is not None and (info.name, info.per, info.segment) == (main, PER_STEP, 0)]

    # One read of the summaries of everything needed, one of the raw points.
    needed = {info.id for _, _, parts in plans for _, info, _ in parts} | {info.id for info, _ in abandoned_series}
    # The live line's series first (the trainer's branch's before its ancestors'), so that a run
    # past the bound still shows where the trainer is.
    order = [info.id for role, _, parts in plans if role == LIVE for _, info, _ in reversed(parts)]
    growing = frozenset(i.id for i in own.get(current, []) if i.segment == 0) if current is not None else None
    summaries, generation = SUMMARIES.read_for_refresh(
        store, list(dict.fromkeys(order + sorted(needed))), frozenset(i.id for i in series), limit=limits.summary_rows,
        growing=growing)
    if sum(len(rows) for rows in summaries.values()) >= limits.summary_rows:
        budget.note(f"This run has more than {limits.summary_rows:,} chunks to draw; the chart draws the first "
                    f"{limits.summary_rows:,} of them.")
    budget.check()
    requests: list[tuple[int, int, int]] = []
    run = (str(store.db_path), store.db_path.stat().st_ino)
    drafts = [_plan_window(role, info, parts, summaries, lo, hi, budget, requests,
                           (run, info.name, info.per) if role == LIVE else None, generation) for role, info, parts in plans]
    sketches = _plan_abandoned(store, abandoned_series, summaries, budget, requests)
    points = store.chunk_points_of(requests) if requests else []
    budget.check()
    view.windows = [w for w in (_assemble(d, points, lo, hi, max_points) for d in drafts) if len(w.steps)]
    view.abandoned = [w for w in (_sketch(s, points) for s in sketches) if len(w.steps)]
    budget.check()
    view.markers = markers(store, rows)
    needed = on_line | set(view.full) | {w.branch for w in view.abandoned}
    view.epochs = EpochLines(lambda: store.epochs(needed if len(needed) <= 2_000 else None, limit=limits.epochs), rows)


class _SeriesAndBranches:
    """The run's series and branch rows, read again only when there are new ones: rows of both
    are only ever added (a crash's superseded points go to a new series), so one small query a
    refresh tells whether the list a refresh read before still holds."""

    def __init__(self, max_runs: int = 16) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}
        self._max_runs = max_runs

    def read(self, store: RunStore, limits: RefreshLimits) -> tuple[list[SeriesInfo], list[dict[str, Any]], int]:
        key = (str(store.db_path.resolve()), store.db_path.stat().st_ino, limits.series, limits.branches)
        seen = tuple(store.conn().execute(
            "SELECT (SELECT count(*) FROM series), (SELECT max(id) FROM series),"
            " (SELECT count(*) FROM branches), (SELECT max(id) FROM branches)").fetchone())
        with self._lock:
            kept = self._runs.get(key)
        if kept is not None and kept[0] == seen:
            return kept[1]
        rows, total = read_branches(store, limits.branches, hparams=False)
        found = (store.series(limit=limits.series), rows, total)
        with self._lock:
            if key not in self._runs and len(self._runs) >= self._max_runs:
                self._runs.clear()
            self._runs[key] = (seen, found)
        return found


_ROWS = _SeriesAndBranches()


def _current_branch(status: dict[str, Any], by_id: dict[int, dict[str, Any]], own: dict[int, list[SeriesInfo]],
                    hidden: frozenset[int]) -> int | None:
    """The trainer's branch; else the newest one. On a probe or sweep leg (hidden from the main
    curve), the branch it left, whose line the curve keeps drawing."""
    branch = status.get("branch")
    if not isinstance(branch, int) or (branch not in by_id and branch not in own):
        candidates = [b for b in (by_id or own) if b not in hidden]
        branch = max(candidates) if candidates else None
    if branch is not None and branch in hidden:
        walk = ancestry(parents_of(by_id), branch)
        branch = next((b for b in walk.chain if b not in hidden), None)
    return branch


def _metric_keys(infos: list[SeriesInfo], cap: int, budget: _Budget) -> list[tuple[str, str]]:
    """The (name, per) of the metrics to draw: losses first, then lr and momentum, then the rest
    as they came; at most ``cap`` of them."""
    keys = list(dict.fromkeys((i.name, i.per) for i in sorted(infos, key=lambda i: i.id)))
    keys.sort(key=lambda k: (0 if "loss" in k[0] else 1 if hparam_of(k[0]) else 2))
    if len(keys) > cap:
        budget.note(f"This run logs {len(keys)} metrics; the chart draws {cap} of them.")
    return keys[:cap]


def _main_loss(series: list[SeriesInfo]) -> str | None:
    """The per-step series an abandoned branch is drawn by: "loss", else the first loss-like one."""
    names = [i.name for i in series if i.per == PER_STEP and i.segment == 0 and "loss" in i.name]
    return "loss" if "loss" in names else (names[0] if names else None)


def _abandoned_stretches(line: Line, by_id: dict[int, dict[str, Any]], own: dict[int, list[SeriesInfo]],
                         left_out: set[int] | frozenset[int], known: set[int]) -> list[tuple[int, int | None]]:
    """(branch, the step after which it is abandoned; None: all of it): every branch off the live
    line, and what each ancestor on it did after its child forked."""
    on_line = {s.branch: s for s in line.stretches}
    out: list[tuple[int, int | None]] = []
    for branch in sorted(known):
        if branch in left_out:
            continue
        stretch = on_line.get(branch)
        if stretch is None:
            out.append((branch, None))
        elif stretch.until is not None:
            out.append((branch, stretch.until))
    return out


def _rows_in(rows: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """The summary rows of the chunks that overlap [lo, hi] (and the one just before ``lo``)."""
    if not len(rows) or (lo is None and hi is None):
        return rows
    first = rows[:, _FIRST]
    start = 0 if lo is None else max(0, int(first.searchsorted(lo, side="right")) - 1)
    stop = len(rows) if hi is None else int(first.searchsorted(hi, side="right"))
    return rows[start:stop]


Points = tuple[np.ndarray, np.ndarray, np.ndarray]  # steps, values, walls
_EMPTY_POINTS: Points = (np.empty(0, dtype=np.int64), np.empty(0), np.empty(0))


def _join(pieces: list[Points]) -> Points:
    pieces = [p for p in pieces if len(p[0])]
    if not pieces:
        return _EMPTY_POINTS
    if len(pieces) == 1:
        return pieces[0]
    return tuple(np.concatenate([p[k] for p in pieces]) for k in range(3))  # type: ignore[return-value]


@dataclass
class _Prefix:
    """The stretches of a window that end at a fork (the live line's ancestors): they do not
    change, so the live line keeps them from one refresh to the next, with what was read of them."""

    parts: list[tuple[int, SeriesInfo, int, np.ndarray]]  # branch, series, fork step, its chunks here
    chunks: int
    points: int
    firsts: list[tuple[int, float]]  # (branch, its first step here)
    raw: Points | None = None        # every raw point, cut at the forks
    rows: np.ndarray | None = None   # the chunk summaries, without the chunks a fork cuts
    cut: Points | None = None        # the raw points of those, up to the fork


def _prefix_of(parts: list[tuple[int, SeriesInfo, int]], summaries: dict[int, np.ndarray], lo: float | None,
               hi: float | None) -> _Prefix:
    chosen = []
    for branch, info, until in parts:
        top = until if hi is None else min(hi, until)
        rows = _rows_in(summaries.get(info.id, _NO_ROWS), lo, top)
        if len(rows):
            chosen.append((branch, info, until, rows))
    return _Prefix(chosen, sum(len(r) for *_, r in chosen), int(sum(r[:, _N].sum() for *_, r in chosen)),
                   [(b, float(r[0, _FIRST])) for b, _, _, r in chosen])


# The live line's prefix per run and metric: the latest one only (a new window or line replaces it).
_PREFIXES: dict[tuple[Any, ...], tuple[tuple[Any, ...], _Prefix]] = {}
_PREFIXES_LOCK = threading.Lock()
_PREFIXES_MAX = 256


@dataclass
class _Draft:
    """One window being read: the stretches that end at a fork (``prefix``) and those that do not
    (``tips``: a branch's own to its newest point), as all their raw points (``raw``) or as chunk
    summaries with the raw points of each chunk a fork cuts."""

    role: str
    info: SeriesInfo
    prefix: _Prefix | None
    tips: list[tuple[int, SeriesInfo, np.ndarray, int | None]]  # branch, series, chunks, request (raw)
    raw: bool
    prefix_requests: list[int] | None = None  # what the prefix still needs from this refresh's read
    prefix_cut: list[int] = field(default_factory=list)  # its parts whose last chunk a fork cuts


def _plan_window(role: str, info: SeriesInfo, parts: list[tuple[int, SeriesInfo, int | None]],
                 summaries: dict[int, np.ndarray], lo: float | None, hi: float | None, budget: _Budget,
                 requests: list[tuple[int, int, int]], cache_key: tuple[Any, ...] | None,
                 generation: tuple[Any, ...] = ()) -> _Draft:
    ancestors = [(b, i, u) for b, i, u in parts if u is not None]
    prefix = None
    if ancestors:
        # The ancestors' rows are the same for as long as the summaries' generation holds.
        key = (lo, hi, tuple((b, i.id, u) for b, i, u in ancestors), generation)
        with _PREFIXES_LOCK:
            kept = _PREFIXES.get(cache_key) if cache_key is not None else None
        prefix = kept[1] if kept is not None and kept[0] == key else _prefix_of(ancestors, summaries, lo, hi)
        if cache_key is not None and (kept is None or kept[1] is not prefix):
            with _PREFIXES_LOCK:
                if len(_PREFIXES) >= _PREFIXES_MAX:
                    _PREFIXES.clear()
                _PREFIXES[cache_key] = (key, prefix)
    tips = []
    for branch, part, until in parts:
        if until is None:
            rows = _rows_in(summaries.get(part.id, _NO_ROWS), lo, hi)
            if len(rows):
                tips.append((branch, part, rows, None))
    chunks = (prefix.chunks if prefix else 0) + sum(len(rows) for _, _, rows, _ in tips)
    points = (prefix.points if prefix else 0) + int(sum(rows[:, _N].sum() for _, _, rows, _ in tips))
    raw = chunks <= RAW_CHUNK_BUDGET and budget.take_raw(points)
    draft = _Draft(role, info, prefix, tips, raw)
    if raw:
        draft.tips = [(b, i, rows, _request(requests, i.id, rows)) for b, i, rows, _ in tips]
        if prefix is not None and prefix.raw is None:
            draft.prefix_requests = [_request(requests, i.id, rows) for _, i, _, rows in prefix.parts]
    elif prefix is not None and prefix.rows is None:
        # The chunk each fork cuts: its raw points up to the fork, not its min and max (which may
        # be what the branch did after the fork).
        draft.prefix_cut = [k for k, (_, _, until, rows) in enumerate(prefix.parts)
                            if rows[-1, _LAST] > until and budget.take_raw(int(rows[-1, _N]))]
        draft.prefix_requests = [_request(requests, prefix.parts[k][1].id, prefix.parts[k][3][-1:])
                                 for k in draft.prefix_cut]
    return draft


def _request(requests: list[tuple[int, int, int]], series: int, rows: np.ndarray) -> int:
    """Ask this refresh's one read of raw points for the chunks ``rows`` of ``series``."""
    requests.append((series, int(rows[0, _FIRST]), int(rows[-1, _FIRST])))
    return len(requests) - 1


def _cut(points: Points, until: int) -> Points:
    keep = points[0] <= until
    return points[0][keep], points[1][keep], points[2][keep]


def _assemble(draft: _Draft, points: list[Points], lo: float | None, hi: float | None, max_points: int) -> SeriesWindow:
    """The window of a draft, once the raw points it asked for are read: the stretches joined in
    step order, each cut at its fork."""
    prefix = draft.prefix
    if prefix is not None and draft.prefix_requests is not None:
        if draft.raw:
            prefix.raw = _join([_cut(points[r], until) for (_, _, until, _), r in zip(prefix.parts, draft.prefix_requests)])
        else:
            cut = set(draft.prefix_cut)
            prefix.cut = _join([_cut(points[r], prefix.parts[k][2]) for k, r in zip(draft.prefix_cut, draft.prefix_requests)])
            prefix.rows = np.concatenate([rows[:-1] if k in cut else rows for k, (*_, rows) in enumerate(prefix.parts)]) \
                if prefix.parts else _NO_ROWS
    firsts = list(prefix.firsts) if prefix is not None else []
    firsts += [(b, float(rows[0, _FIRST])) for b, _, rows, _ in draft.tips]
    if draft.raw:
        joined = _join(([prefix.raw] if prefix is not None and prefix.raw is not None else [])
                       + [points[r] for *_, r in draft.tips if r is not None])
    else:
        joined = prefix.cut if prefix is not None and prefix.cut is not None else _EMPTY_POINTS
    if len(joined[0]) > 1 and (np.diff(joined[0]) < 0).any():  # forged or overlapping stretches
        order = np.argsort(joined[0], kind="stable")
        joined = (joined[0][order], joined[1][order], joined[2][order])
    if draft.raw:
        window = _from_points(draft.info, *joined, lo, hi, max_points, draft.role)
    else:
        rows = [prefix.rows] if prefix is not None and prefix.rows is not None and len(prefix.rows) else []
        rows += [rows_ for _, _, rows_, _ in draft.tips]
        window = _from_summaries(draft.info, np.concatenate(rows) if rows else _NO_ROWS, max_points, joined, draft.role)
    if draft.role == LIVE:
        # Where each branch's points begin (a branch cut off by the window's left edge starts at 0).
        starts = window.steps.searchsorted([first for _, first in firsts], side="left").tolist()
        pieces = [(branch, start) for (branch, _), start in zip(firsts, starts) if start < len(window.steps)]
        window.pieces = tuple(p for p, after in zip(pieces, pieces[1:] + [(None, -1)]) if after[1] != p[1])
        if firsts and not window.pieces and len(window.steps):
            window.pieces = ((firsts[-1][0], 0),)
    return window


@dataclass
class _Sketch:
    info: SeriesInfo
    after: int | None
    buckets: int
    rows: np.ndarray
    request: int | None
    cache_key: tuple[Any, ...]
    done: SeriesWindow | None = None


# Abandoned branches do not change: their faint curves are kept, per run, series and stretch.
_SKETCHES: dict[tuple[Any, ...], SeriesWindow] = {}
_SKETCHES_LOCK = threading.Lock()
_SKETCHES_MAX = 20_000


def _plan_abandoned(store: RunStore, wanted: list[tuple[SeriesInfo, int | None]], summaries: dict[int, np.ndarray],
                    budget: _Budget, requests: list[tuple[int, int, int]]) -> list[_Sketch]:
    if not wanted:
        return []
    buckets = max(ABANDONED_MIN_POINTS, ABANDONED_POINTS // len(wanted))
    run = (str(store.db_path), store.db_path.stat().st_ino)
    sketches = []
    for info, after in wanted:
        rows = summaries.get(info.id, np.empty((0, 10)))
        if after is not None and len(rows):
            rows = rows[rows[:, _LAST] > after]
        if not len(rows):
            continue
        key = (run, info.id, after, buckets, len(rows), tuple(rows[-1].tolist()))
        with _SKETCHES_LOCK:
            done = _SKETCHES.get(key)
        request = None
        if done is None and rows[:, _N].sum() <= ABANDONED_RAW_POINTS and budget.take_raw(int(rows[:, _N].sum())):
            request = len(requests)
            requests.append((info.id, int(rows[0, _FIRST]), int(rows[-1, _FIRST])))
        sketches.append(_Sketch(info, after, buckets, rows, request, key, done))
    return sketches


def _sketch(sketch: _Sketch, points: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> SeriesWindow:
    """An abandoned stretch as a few bucket means: of its raw points when they are few, else of
    its chunks' means."""
    if sketch.done is not None:
        return sketch.done
    if sketch.request is not None:
        steps, values, walls = points[sketch.request]
        if sketch.after is not None:
            keep = steps > sketch.after
            steps, values, walls = steps[keep], values[keep], walls[keep]
        count = len(steps)
    else:
        rows = sketch.rows
        if sketch.after is not None:
            rows = rows[rows[:, _FIRST] > sketch.after]  # a chunk cut by the fork: left out
        rows = rows[~np.isnan(rows[:, _VMIN])]
        steps = (rows[:, _FIRST] + rows[:, _LAST]) / 2
        values = rows[:, _VSUM] / np.maximum(rows[:, _N], 1)
        walls = (rows[:, _FIRST_WALL] + rows[:, _LAST_WALL]) / 2
        count = int(rows[:, _N].sum())
    mean_steps, mean_values = aligned_means(steps, values, sketch.buckets)
    mean_walls = np.interp(mean_steps, steps, walls) if len(steps) else np.empty(0)
    window = SeriesWindow(sketch.info, mean_steps, mean_values, mean_walls, mean_steps, mean_values, count, True,
                          ABANDONED)
    with _SKETCHES_LOCK:
        if len(_SKETCHES) >= _SKETCHES_MAX:
            _SKETCHES.clear()
        _SKETCHES[sketch.cache_key] = window
    return window


# Marker kinds: a person's nudges (commands), lr/momentum changes no command made (a scheduler,
# the loop itself: "hparams" events), rollbacks, and the run's lifecycle (stops, crashes,
# restarts) and divergences.
NUDGE_KINDS = ("lr", "momentum")
AUTO_KINDS = ("auto_lr", "auto_momentum")
LIFECYCLE_KINDS = ("rollback", "stop", "crash", "restart", "divergence")
_ENDS = ("stopped", "finished")
MARKER_EVENTS = ("rollback", "hparams", "stopped", "finished", "error", "start", "resume", "divergence")


class _MarkerRows:
    """The rows markers are made of, read a little at a time per run: events are only ever added,
    and a command once applied, rejected or expired does not change, so a refresh reads only the
    events since the last one it saw and the commands from the oldest still pending (the newest
    10,000 of each are kept, as before). Shared by every browser session (hence the lock)."""

    KEPT = 10_000

    def __init__(self, max_runs: int = 16) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, int], tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]] = {}
        self._max_runs = max_runs

    def read(self, store: RunStore) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        key = (str(store.db_path.resolve()), store.db_path.stat().st_ino)
        with self._lock:
            events, commands = self._runs.get(key, ([], {}))
        pending = [i for i, c in commands.items() if c["state"] == cmd.PENDING]
        since = min(pending) - 1 if pending else max(commands, default=0)
        events = (events + store.events(since_id=events[-1]["id"] if events else 0, kinds=MARKER_EVENTS))[-self.KEPT:]
        commands = {**commands, **{c["id"]: c for c in store.commands(since_id=since, kinds=(cmd.SET_LR, cmd.SET_MOMENTUM))}}
        if len(commands) > self.KEPT:
            commands = {i: commands[i] for i in sorted(commands)[-self.KEPT:]}
        with self._lock:
            if key not in self._runs and len(self._runs) >= self._max_runs:
                self._runs.clear()
            self._runs[key] = (events, commands)
        return events, [commands[i] for i in sorted(commands)]


_MARKER_ROWS = _MarkerRows()


_MARKERS: dict[tuple[Any, ...], tuple[tuple[Any, ...], list[Marker]]] = {}  # the markers of the rows last seen, per run
_MARKERS_LOCK = threading.Lock()


def markers(store: RunStore, branches: list[dict[str, Any]]) -> list[Marker]:
    """Every marker of the run, from its applied commands and its events (in the order they happened)."""
    events, nudges = _MARKER_ROWS.read(store)
    run = (str(store.db_path), store.db_path.stat().st_ino)
    seen = (events[-1]["id"] if events else 0, len(events), tuple((c["id"], c["state"]) for c in nudges),
            len(branches), branches[-1]["id"] if branches else 0)
    with _MARKERS_LOCK:
        kept = _MARKERS.get(run)
    if kept is not None and kept[0] == seen:
        return list(kept[1])
    found = _markers(events, nudges, branches)
    with _MARKERS_LOCK:
        if run not in _MARKERS and len(_MARKERS) >= 64:
            _MARKERS.clear()
        _MARKERS[run] = (seen, found)
    return list(found)


def _markers(events: list[dict[str, Any]], nudges: list[dict[str, Any]], branches: list[dict[str, Any]]) -> list[Marker]:
    out = []
    for row in nudges:  # the newest 10,000 nudges
        if row["state"] != cmd.APPLIED:
            continue
        result = row.get("result") or {}
        if row["kind"] in (cmd.SET_LR, cmd.SET_MOMENTUM):
            what = "lr" if row["kind"] == cmd.SET_LR else "momentum"
            before, after = result.get("before"), result.get("after")
            which = f" of optimizer {result['optimizer']}" if isinstance(result.get("optimizer"), str) else ""
            text = (f"{what}{which} {_fmt(before)} → {_fmt(after)} at step {row['step']} (#{row['id']}, "
                    f"{row['source']})")
            out.append(Marker(what, row["branch"], row["step"], text, after, row.get("done_at")))
    by_id = {b["id"]: b for b in branches}
    ended = True  # the previous process ended cleanly (or there was none): its restart is no crash
    for event in events:  # the newest 10,000 of them
        kind, data, step = event["kind"], event["data"], event["step"] or 0
        if kind == "rollback":
            before, after = data.get("before", {}), data.get("after", {})
            branch = by_id.get(event["branch"], {})
            text = (f"rollback from step {data.get('from_step')} (branch {data.get('from_branch')}) to checkpoint "
                    f"#{data.get('checkpoint')} at step {event['step']}: branch {event['branch']} starts; "
                    f"lr {_fmt(before.get('lr'))} → {_fmt(after.get('lr'))}, "
                    f"momentum {_fmt(before.get('momentum'))} → {_fmt(after.get('momentum'))}"
                    + (f"; the next {data['skip_batches']} batches skipped" if data.get("skip_batches") else ""))
            start = int(branch.get("start_step", step))
            out.append(Marker("rollback", event["branch"], start, text, after.get("lr"), event["wall"]))
        elif kind == "hparams":
            out += _auto_markers(event)
        elif kind in _ENDS or kind == "error":
            ended = True
            what = "crash" if kind == "error" else "stop"
            out.append(Marker(what, event["branch"], step, f"{kind} at step {step}: {event['message']}",
                              wall=event["wall"]))
        elif kind in ("start", "resume"):
            if kind == "resume":
                # A resume that no stop, finish or error came before: the trainer died without a word.
                what, why = ("restart", "") if ended else ("crash", "the trainer died; ")
                out.append(Marker(what, event["branch"], step, f"{why}{event['message']}", wall=event["wall"]))
            ended = False
        elif kind == "divergence":
            out.append(Marker("divergence", event["branch"], step, event["message"], wall=event["wall"]))
    return out


def _auto_markers(event: dict[str, Any]) -> list[Marker]:
    """lr and momentum changes that no command made, with who made them (``data["by"]``)."""
    data = event["data"]
    before, after = data.get("before") or {}, data.get("after") or {}
    by = data.get("by") or "the loop"
    out = []
    for what in ("lr", "momentum"):
        if after.get(what) is not None and after.get(what) != before.get(what):
            text = f"{what} {_fmt(before.get(what))} → {_fmt(after.get(what))} at step {event['step']} (by {by}, no command)"
            out.append(Marker(f"auto_{what}", event["branch"], event["step"] or 0, text, after[what], event["wall"]))
    return out


# Throughput is measured over the last points logged, at most this far back.
RATE_WINDOW_S = 30.0
RATE_WINDOW_STEPS = 2048


@dataclass
class Throughput:
    steps_per_s: float
    items_per_s: float | None = None  # samples or tokens a second, when the loop gave its batch size
    item_unit: str | None = None


def throughput(store: RunStore, status: dict[str, Any]) -> Throughput | None:
    """Steps a second on the current branch, from the steps and wall times of its last logged
    points (so it is right on the first refresh, and the same in every browser); items a second
    when the status has the loop's ``items_per_step``."""
    branch, step = status.get("branch"), status.get("step")
    if branch is None or step is None:
        return None
    candidates = [i for i in store.series() if i.branch == branch and i.segment == 0 and i.per == PER_STEP
                  and not hparam_of(i.name)]  # lr and momentum are logged only when they change
    if not candidates:
        return None
    info = next((i for i in candidates if i.name == "loss"), candidates[0])
    steps, _, walls = store.chunk_points(info.id, max(0, step - RATE_WINDOW_STEPS), None)
    if len(steps) < 2:
        return None
    recent = walls >= walls[-1] - RATE_WINDOW_S
    steps, walls = steps[recent], walls[recent]
    if len(steps) < 2 or walls[-1] <= walls[0]:
        return None
    rate = float(steps[-1] - steps[0]) / float(walls[-1] - walls[0])
    per_step = status.get("items_per_step")
    if isinstance(per_step, (int, float)) and per_step > 0:
        return Throughput(rate, rate * per_step, status.get("item_unit") or "samples")
    return Throughput(rate)


def epoch_lines(epochs: list[tuple[int, int, int]], branches: list[dict[str, Any]],
                wanted: Iterable[int] | None = None) -> dict[int, list[tuple[int, int]]]:
    """For each branch (of ``wanted``, else every one), the (epoch, end step) of the epochs on its
    line of descent (babysit.store.lineage: bounded, and a cycle of parents ends the line)."""
    own: dict[int, list[tuple[int, int]]] = {}
    for branch, epoch, end_step in epochs:
        own.setdefault(branch, []).append((epoch, end_step))
    by_id = {b["id"]: b for b in branches}
    parents = parents_of(by_id)
    lines: dict[int, list[tuple[int, int]]] = {}
    for branch in (wanted if wanted is not None else by_id):
        line: list[tuple[int, int]] = []
        for stretch in line_of(by_id, branch, parents=parents).stretches:
            line += [(e, s) for e, s in own.get(stretch.branch, []) if stretch.holds(s)]
        lines[branch] = sorted(set(line), key=lambda item: item[1])
    return lines


class EpochLines:
    """:func:`epoch_lines` per branch, worked out when a branch's line is first asked for (only
    an epoch x axis asks); ``epochs`` may be a function that reads them then."""

    def __init__(self, epochs: list[tuple[int, int, int]] | Callable[[], list[tuple[int, int, int]]],
                 branches: list[dict[str, Any]]) -> None:
        self._epochs, self._branches = epochs, branches
        self._lines: dict[int, list[tuple[int, int]]] = {}

    def get(self, branch: int, default: Any = None) -> Any:
        if branch not in self._lines:
            if callable(self._epochs):
                self._epochs = self._epochs()
            self._lines.update(epoch_lines(self._epochs, self._branches, wanted=[branch]))
        return self._lines.get(branch, default)

    def __getitem__(self, branch: int) -> list[tuple[int, int]]:
        return self.get(branch, [])


def _epoch_knots(line: list[tuple[int, int]], steps_per_epoch: int | None, beyond: float) -> tuple[list[float], list[float]]:
    """(steps, epochs) knots: epoch e ends at its recorded end step; past the last finished
    epoch, ``steps_per_epoch`` (or the last epoch's length) extrapolates up to ``beyond``."""
    knots_steps = [0.0] + [float(s) for _, s in line]
    knots_epochs = [0.0] + [float(e) for e, _ in line]
    if len(line) >= 1:
        length = steps_per_epoch or (knots_steps[-1] - knots_steps[-2]) or 1.0
    else:
        length = steps_per_epoch or 1.0
    far = max(beyond, knots_steps[-1]) + length
    knots_epochs.append(knots_epochs[-1] + (far - knots_steps[-1]) / length)
    knots_steps.append(far)
    return knots_steps, knots_epochs


def steps_to_epochs(steps: np.ndarray, line: list[tuple[int, int]], steps_per_epoch: int | None) -> np.ndarray:
    """Fractional epochs for steps along a branch's line of epochs."""
    steps = np.asarray(steps, dtype=float)
    knots_steps, knots_epochs = _epoch_knots(line, steps_per_epoch, float(steps.max()) if len(steps) else 0.0)
    return np.interp(steps, knots_steps, knots_epochs)


def epochs_to_steps(epochs: np.ndarray, line: list[tuple[int, int]], steps_per_epoch: int | None) -> np.ndarray:
    """The inverse of :func:`steps_to_epochs` (for turning a zoomed epoch range into steps)."""
    epochs = np.asarray(epochs, dtype=float)
    length = steps_per_epoch or 1
    beyond = (float(epochs.max()) + 1) * length * 4 if len(epochs) else 0.0
    knots_steps, knots_epochs = _epoch_knots(line, steps_per_epoch, beyond)
    return np.interp(epochs, knots_epochs, knots_steps)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def hparam_of(name: str) -> str | None:
    """'lr' or 'momentum' for an optimizer's series (``lr``; ``lr/G`` of a run's optimizer G), else None."""
    hparam = name.split("/", 1)[0]
    return hparam if hparam in ("lr", "momentum") else None


def series_by_kind(windows: list[SeriesWindow]) -> dict[str, list[SeriesWindow]]:
    """Group windows: 'loss' (per-step losses and per-epoch losses), 'metric' (other per-epoch
    and per-step values), 'lr', 'momentum'."""
    groups: dict[str, list[SeriesWindow]] = {"loss": [], "metric": [], "lr": [], "momentum": []}
    for window in windows:
        hparam = hparam_of(window.name)
        if hparam is not None and window.info.per == PER_STEP:
            groups[hparam].append(window)
        elif "loss" in window.name:
            groups["loss"].append(window)
        else:
            groups["metric"].append(window)
    return groups


__all__ = ["SeriesWindow", "RunView", "Marker", "RefreshLimits", "LIMITS", "LIVE", "ABANDONED", "FULL", "SUPERSEDED",
           "MAX_FULL_BRANCHES", "EpochLines", "NUDGE_KINDS", "AUTO_KINDS", "LIFECYCLE_KINDS", "read_window", "read_view", "markers", "epoch_lines",
           "steps_to_epochs", "epochs_to_steps", "series_by_kind", "hparam_of", "Throughput", "throughput", "MAX_POINTS", "PER_EPOCH", "PER_STEP"]
