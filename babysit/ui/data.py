"""What the dashboard reads from the run store, shaped for drawing: windows of series, markers.

A series window never holds more than ``max_points`` points, however long the run: below that
many raw points it returns them as they are; up to ``RAW_CHUNK_BUDGET`` chunks it reads the raw
points and keeps the min and max of each bucket; beyond that it draws from the per-chunk min/max
summaries the trainer stored, without reading a single raw point. Memory and time per refresh
depend on the window, not on the length of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import commands as cmd
from ..downsample import bucket_means, minmax
from ..store import PER_EPOCH, PER_STEP, RunStore, SeriesInfo

MAX_POINTS = 5000
# Reading raw points of this many chunks (256 points each) stays well under the refresh budget.
RAW_CHUNK_BUDGET = 256
MEAN_BUCKETS = 1000

# Summary columns (see RunStore.chunk_summaries).
_FIRST, _LAST, _N, _VMIN, _VMAX, _VSUM, _MIN_STEP, _MAX_STEP, _FIRST_WALL, _LAST_WALL = range(10)


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


def read_window(
    store: RunStore, info: SeriesInfo, lo: float | None = None, hi: float | None = None,
    max_points: int = MAX_POINTS,
) -> SeriesWindow:
    """The points of ``info`` with steps in [lo, hi] (all when None), at most ``max_points``.

    The last point before ``lo`` is kept too, so a stepwise series (lr, momentum) is drawn from
    the left edge of the window.
    """
    summaries = store.chunk_summaries(info.id, lo, hi)
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
        kept_steps, kept_values = minmax(steps, values, max_points)
        kept_walls = np.interp(kept_steps, steps, walls)
        mean_steps, mean_values, _ = bucket_means(steps, values, MEAN_BUCKETS)
        return SeriesWindow(info, kept_steps, kept_values, kept_walls, mean_steps, mean_values, raw_count, True)
    return _from_summaries(info, summaries, max_points)


def _from_summaries(info: SeriesInfo, rows: np.ndarray, max_points: int) -> SeriesWindow:
    """Each chunk's min and max (at their own steps), in step order, thinned by :func:`minmax`."""
    rows_ok = rows[~np.isnan(rows[:, _VMIN])]
    low_first = rows_ok[:, _MIN_STEP] <= rows_ok[:, _MAX_STEP]
    candidates_x = np.empty(2 * len(rows_ok))
    candidates_y = np.empty(2 * len(rows_ok))
    candidates_x[0::2] = np.where(low_first, rows_ok[:, _MIN_STEP], rows_ok[:, _MAX_STEP])
    candidates_y[0::2] = np.where(low_first, rows_ok[:, _VMIN], rows_ok[:, _VMAX])
    candidates_x[1::2] = np.where(low_first, rows_ok[:, _MAX_STEP], rows_ok[:, _MIN_STEP])
    candidates_y[1::2] = np.where(low_first, rows_ok[:, _VMAX], rows_ok[:, _VMIN])
    steps, values = minmax(candidates_x, candidates_y, max_points)
    # Wall time of a point: interpolated inside the chunk's own first/last wall times.
    knots_steps = np.column_stack([rows[:, _FIRST], rows[:, _LAST]]).ravel()
    knots_walls = np.column_stack([rows[:, _FIRST_WALL], rows[:, _LAST_WALL]]).ravel()
    walls = np.interp(steps, knots_steps, knots_walls)
    mean_steps = (rows_ok[:, _FIRST] + rows_ok[:, _LAST]) / 2
    mean_values = rows_ok[:, _VSUM] / np.maximum(rows_ok[:, _N], 1)
    if len(mean_steps) > MEAN_BUCKETS:
        mean_steps, mean_values, _ = bucket_means(mean_steps, mean_values, MEAN_BUCKETS)
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
              max_points: int = MAX_POINTS) -> RunView:
    """Every series in [lo, hi], the nudge and rollback markers, branches and epoch boundaries."""
    windows = []
    first = last = None
    for info in store.series():
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


def markers(store: RunStore, branches: list[dict[str, Any]]) -> list[Marker]:
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
    for event in store.events(kinds=("rollback",)):
        data = event["data"]
        before, after = data.get("before", {}), data.get("after", {})
        branch = by_id.get(event["branch"], {})
        text = (f"rollback from step {data.get('from_step')} (branch {data.get('from_branch')}) to checkpoint "
                f"#{data.get('checkpoint')} at step {event['step']}: branch {event['branch']} starts; "
                f"lr {_fmt(before.get('lr'))} → {_fmt(after.get('lr'))}, "
                f"momentum {_fmt(before.get('momentum'))} → {_fmt(after.get('momentum'))}")
        start = int(branch.get("start_step", event["step"] or 0))
        out.append(Marker("rollback", event["branch"], start, text, after.get("lr"), event["wall"]))
    return out


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


__all__ = ["SeriesWindow", "RunView", "Marker", "read_window", "read_view", "markers", "epoch_lines",
           "steps_to_epochs", "epochs_to_steps", "series_by_kind", "MAX_POINTS", "PER_EPOCH", "PER_STEP"]
