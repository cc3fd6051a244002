"""What the dashboard reads from the run store, shaped for drawing: windows of series, markers.

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
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import commands as cmd
from ..store import PER_EPOCH, PER_STEP, RunStore, SeriesInfo

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


@dataclass
class SeriesWindow:
    """Points of one series (a metric on one branch, or a superseded piece of it) in a window."""

    info: SeriesInfo
    steps: np.ndarray
    values: np.ndarray
    walls: np.ndarray
    mean_steps: np.ndarray  # bucket means, for smoothing a downsampled view
    mean_values: np.ndarray
    raw_count: int  # points of the series inside the window before downsampling
    downsampled: bool

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def branch(self) -> int:
        return self.info.branch

    @property
    def superseded(self) -> bool:
        return self.info.segment > 0


class SummaryCache:
    """The chunk summaries of whole series already read, per run database.

    A chunk is rewritten only while the trainer fills it (the same first step, more points), so
    a refresh re-reads the last chunk it knows and any newer ones, not the thousands before: at a
    million steps that is most of a refresh's reading. Older chunks change only when a crash's
    points are moved to a new superseded series, so a new series in the run drops what is cached
    for it. Shared by every browser session of the server (hence the lock).
    """

    def __init__(self, max_runs: int = 16) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, int], tuple[frozenset[int], dict[int, np.ndarray]]] = {}
        self._max_runs = max_runs

    def read(self, store: RunStore, series: int) -> np.ndarray:
        key = (str(store.db_path.resolve()), store.db_path.stat().st_ino)
        ids = frozenset(info.id for info in store.series())
        with self._lock:
            known_ids, cached = self._runs.get(key, (None, {}))
            if known_ids != ids:  # a new branch or superseded piece: start afresh
                cached = {}
                if len(self._runs) >= self._max_runs:
                    self._runs.clear()
                self._runs[key] = (ids, cached)
            rows = cached.get(series)
        if rows is None or len(rows) == 0:
            rows = store.chunk_summaries(series)
        else:
            tail = store.chunk_summaries(series, rows[-1, _FIRST], None)
            if len(tail) == 0 or tail[0, _FIRST] != rows[-1, _FIRST]:
                rows = store.chunk_summaries(series)  # not the chunks we knew: read them all
            else:
                rows = np.concatenate([rows[:-1], tail])
        with self._lock:
            cached[series] = rows
        return rows


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
            return SeriesWindow(info, steps, values, walls, steps, values, raw_count, False)
        kept_steps, kept_values = aligned_minmax(steps, values, max_points)
        kept_walls = np.interp(kept_steps, steps, walls)
        mean_steps, mean_values = aligned_means(steps, values, MEAN_BUCKETS)
        return SeriesWindow(info, kept_steps, kept_values, kept_walls, mean_steps, mean_values, raw_count, True)
    return _from_summaries(info, summaries, max_points)


def _from_summaries(info: SeriesInfo, rows: np.ndarray, max_points: int) -> SeriesWindow:
    """Each chunk's min and max (at their own steps), in step order, thinned by :func:`aligned_minmax`."""
    rows_ok = rows[~np.isnan(rows[:, _VMIN])]
    low_first = rows_ok[:, _MIN_STEP] <= rows_ok[:, _MAX_STEP]
    candidates_x = np.empty(2 * len(rows_ok))
    candidates_y = np.empty(2 * len(rows_ok))
    candidates_x[0::2] = np.where(low_first, rows_ok[:, _MIN_STEP], rows_ok[:, _MAX_STEP])
    candidates_y[0::2] = np.where(low_first, rows_ok[:, _VMIN], rows_ok[:, _VMAX])
    candidates_x[1::2] = np.where(low_first, rows_ok[:, _MAX_STEP], rows_ok[:, _MIN_STEP])
    candidates_y[1::2] = np.where(low_first, rows_ok[:, _VMAX], rows_ok[:, _VMIN])
    steps, values = aligned_minmax(candidates_x, candidates_y, max_points)
    # Wall time of a point: interpolated inside the chunk's own first/last wall times.
    knots_steps = np.column_stack([rows[:, _FIRST], rows[:, _LAST]]).ravel()
    knots_walls = np.column_stack([rows[:, _FIRST_WALL], rows[:, _LAST_WALL]]).ravel()
    walls = np.interp(steps, knots_steps, knots_walls)
    mean_steps = (rows_ok[:, _FIRST] + rows_ok[:, _LAST]) / 2
    mean_values = rows_ok[:, _VSUM] / np.maximum(rows_ok[:, _N], 1)
    if len(mean_steps) > MEAN_BUCKETS:
        mean_steps, mean_values = aligned_means(mean_steps, mean_values, MEAN_BUCKETS)
    return SeriesWindow(info, steps, values, walls, mean_steps, mean_values, int(rows[:, _N].sum()), True)


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
    windows: list[SeriesWindow]
    markers: list[Marker]
    branches: list[dict[str, Any]]
    epochs: dict[int, list[tuple[int, int]]]  # branch -> [(epoch, end_step)] along its line
    current_branch: int | None
    steps_per_epoch: int | None
    extent: tuple[int, int] | None  # (first, last) step over all series
    branch_ends: dict[tuple[int, int], int] = field(default_factory=dict)  # (branch, segment) -> last step


def read_view(store: RunStore, status: dict[str, Any], lo: float | None = None, hi: float | None = None,
              max_points: int = MAX_POINTS, hidden_branches: frozenset[int] = frozenset()) -> RunView:
    """Every series in [lo, hi] (but those of ``hidden_branches``), the nudge and rollback
    markers, branches and epoch boundaries."""
    windows = []
    first = last = None
    for info in store.series():
        if info.branch in hidden_branches:
            continue
        window = read_window(store, info, lo, hi, max_points)
        if len(window.steps):
            windows.append(window)
            first = int(window.steps[0]) if first is None else min(first, int(window.steps[0]))
            last = int(window.steps[-1]) if last is None else max(last, int(window.steps[-1]))
    branches = store.branches()
    ends: dict[tuple[int, int], int] = {}
    for window in windows:
        key = (window.branch, window.info.segment)
        ends[key] = max(ends.get(key, 0), int(window.steps[-1]))
    if status.get("branch") is not None and status.get("step") is not None:
        key = (status["branch"], 0)
        ends[key] = max(ends.get(key, 0), int(status["step"]))
    return RunView(
        windows=windows,
        markers=markers(store, branches),
        branches=branches,
        epochs=epoch_lines(store.epochs(), branches),
        current_branch=status.get("branch"),
        steps_per_epoch=status.get("steps_per_epoch"),
        extent=(first, last) if first is not None else None,
        branch_ends=ends,
    )


# Marker kinds: a person's nudges (commands), lr/momentum changes no command made (a scheduler,
# the loop itself: "hparams" events), rollbacks, and the run's lifecycle (stops, crashes,
# restarts) and divergences.
NUDGE_KINDS = ("lr", "momentum")
AUTO_KINDS = ("auto_lr", "auto_momentum")
LIFECYCLE_KINDS = ("rollback", "stop", "crash", "restart", "divergence")
_ENDS = ("stopped", "finished")
MARKER_EVENTS = ("rollback", "hparams", "stopped", "finished", "error", "start", "resume", "divergence")


def markers(store: RunStore, branches: list[dict[str, Any]]) -> list[Marker]:
    """Every marker of the run, from its applied commands and its events (in the order they happened)."""
    out = []
    for row in store.commands(kinds=(cmd.SET_LR, cmd.SET_MOMENTUM)):  # the newest 10,000 nudges
        if row["state"] != cmd.APPLIED:
            continue
        result = row.get("result") or {}
        if row["kind"] in (cmd.SET_LR, cmd.SET_MOMENTUM):
            what = "lr" if row["kind"] == cmd.SET_LR else "momentum"
            before, after = result.get("before"), result.get("after")
            text = f"{what} {_fmt(before)} → {_fmt(after)} at step {row['step']} (#{row['id']}, {row['source']})"
            out.append(Marker(what, row["branch"], row["step"], text, after, row.get("done_at")))
    by_id = {b["id"]: b for b in branches}
    ended = True  # the previous process ended cleanly (or there was none): its restart is no crash
    for event in store.events(kinds=MARKER_EVENTS):  # the newest 10,000 of them
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
                  and i.name not in ("lr", "momentum")]  # lr and momentum are logged only when they change
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


def epoch_lines(epochs: list[tuple[int, int, int]], branches: list[dict[str, Any]]) -> dict[int, list[tuple[int, int]]]:
    """For each branch, the (epoch, end step) of the epochs on its line of descent."""
    own: dict[int, list[tuple[int, int]]] = {}
    for branch, epoch, end_step in epochs:
        own.setdefault(branch, []).append((epoch, end_step))
    by_id = {b["id"]: b for b in branches}
    lines: dict[int, list[tuple[int, int]]] = {}
    for b in branches:
        line: list[tuple[int, int]] = list(own.get(b["id"], []))
        child, parent = b, by_id.get(b["parent"]) if b["parent"] else None
        while parent is not None:
            line += [(e, s) for e, s in own.get(parent["id"], []) if s <= child["start_step"]]
            child, parent = parent, by_id.get(parent["parent"]) if parent["parent"] else None
        lines[b["id"]] = sorted(set(line), key=lambda item: item[1])
    return lines


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


def series_by_kind(windows: list[SeriesWindow]) -> dict[str, list[SeriesWindow]]:
    """Group windows: 'loss' (per-step losses and per-epoch losses), 'metric' (other per-epoch
    and per-step values), 'lr', 'momentum'."""
    groups: dict[str, list[SeriesWindow]] = {"loss": [], "metric": [], "lr": [], "momentum": []}
    for window in windows:
        if window.name in ("lr", "momentum") and window.info.per == PER_STEP:
            groups[window.name].append(window)
        elif "loss" in window.name:
            groups["loss"].append(window)
        else:
            groups["metric"].append(window)
    return groups


__all__ = ["SeriesWindow", "RunView", "Marker", "NUDGE_KINDS", "AUTO_KINDS", "LIFECYCLE_KINDS", "read_window", "read_view", "markers", "epoch_lines",
           "steps_to_epochs", "epochs_to_steps", "series_by_kind", "Throughput", "throughput", "MAX_POINTS", "PER_EPOCH", "PER_STEP"]
