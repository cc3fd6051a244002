"""Pure builders for the instruments' charts: rows of the store → a DataFrame → a Plotly figure
(a plain JSON-ready dict, as babysit/ui/figures.py makes them), tested without Streamlit.

- The aligned overlay: chosen branches on one x axis, steps since each branch's fork, so a
  rollback, its parent and a probe set read side by side from the point they split (x = 0).
- The lr sweep: loss against lr on a log x axis, as the course notes tune lr, with the steepest
  descent, the divergence and the suggested lr marked.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..downsample import ewma
from ..instruments.compare import KIND_PROBE, KIND_SWEEP, BranchRow, describe_change
from ..instruments.sweep import SweepReading
from ..store import PER_STEP, RunStore
from .data import read_window
from .figures import OTHER_COLOURS, _list, lr_ticks

ALIGNED_COLUMNS = ["branch", "label", "kind", "since_fork", "value"]
# Enough points per branch for a panel a third of the page wide.
ALIGNED_MAX_POINTS = 1500
BRANCH_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", *OTHER_COLOURS)
SWEEP_MARKS = {  # reading field -> (label, colour, symbol)
    "steepest_lr": ("steepest descent", "#2ca02c", "triangle-down"),
    "divergence_lr": ("divergence", "#d62728", "x"),
    "suggested_lr": ("suggested", "#1f77b4", "star"),
}


def branch_label(row: BranchRow) -> str:
    """"branch 4 · probe #1 · lr 0.1 → 0.2" (what a person needs to tell the curves apart)."""
    parts = [f"branch {row.branch}"]
    if row.kind in (KIND_PROBE, KIND_SWEEP):
        parts.append(f"{row.kind} #{row.excursion}")
    elif row.from_checkpoint:
        parts.append(f"from #{row.from_checkpoint}")
    change = describe_change(row.changed)
    if change:
        parts.append(change)
    return " · ".join(parts)


def aligned_frame(store: RunStore, rows: Iterable[BranchRow], metric: str, *, span: int | None = None,
                  max_points: int = ALIGNED_MAX_POINTS) -> pd.DataFrame:
    """The points of ``metric`` on each branch of ``rows`` after its fork, x = step − fork step
    (up to ``span`` steps since the fork when given), at most ``max_points`` per branch."""
    infos = {s.branch: s for s in store.series() if s.name == metric and s.per == PER_STEP and s.segment == 0}
    frames = []
    for row in rows:
        info = infos.get(row.branch)
        if info is None:
            continue
        hi = None if span is None else row.fork_step + span
        window = read_window(store, info, row.fork_step + 1, hi, max_points)
        keep = window.steps > row.fork_step  # read_window keeps the point before the window too
        steps, values = window.steps[keep], window.values[keep]
        if not len(steps):
            continue
        frames.append(pd.DataFrame({"branch": row.branch, "label": branch_label(row), "kind": row.kind,
                                    "since_fork": steps - row.fork_step, "value": values}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("since_fork", "value") else object)
                             for c in ALIGNED_COLUMNS})
    return pd.concat(frames, ignore_index=True)[ALIGNED_COLUMNS]


def build_aligned_figure(frame: pd.DataFrame, *, metric: str = "loss", smoothing: float = 0.9,
                         highlight: int | None = None, height: int = 360) -> dict[str, Any]:
    """Each branch of ``frame`` (see :func:`aligned_frame`): its raw points faint and their EWMA
    (β ``smoothing``) bold, in one colour per branch; ``highlight`` (a winner) drawn thicker."""
    traces: list[dict[str, Any]] = []
    for i, (branch, points) in enumerate(frame.groupby("branch", sort=True)):
        colour = BRANCH_COLOURS[i % len(BRANCH_COLOURS)]
        points = points.sort_values("since_fork")
        x, y = points["since_fork"].to_numpy(dtype=float), points["value"].to_numpy(dtype=float)
        label = str(points["label"].iloc[0]) + (" · winner" if branch == highlight else "")
        meta = {"branch": int(branch)}
        traces.append({"type": "scatter", "mode": "lines", "x": _list(x), "y": _list(y), "name": f"{label} (raw)",
                       "line": {"color": colour, "width": 1 if smoothing > 0 else 2}, "opacity": 0.25 if smoothing > 0
                       else 1.0, "showlegend": smoothing == 0,
                       "legendgroup": f"b{branch}", "meta": {**meta, "raw": True},
                       "hovertemplate": f"{metric} %{{y:.4g}} at +%{{x}} steps<extra>branch {branch}</extra>"})
        if smoothing > 0:
            traces.append({"type": "scatter", "mode": "lines", "x": _list(x), "y": _list(ewma(x, y, smoothing)),
                           "name": label, "line": {"color": colour, "width": 3.2 if branch == highlight else 2},
                           "legendgroup": f"b{branch}", "meta": {**meta, "raw": False},
                           "hovertemplate": f"{metric} (smoothed) %{{y:.4g}} at +%{{x}} steps"
                                            f"<extra>branch {branch}</extra>"})
    layout = {
        "height": height, "uirevision": "babysit-aligned", "hovermode": "closest",
        "margin": {"l": 56, "r": 12, "t": 8, "b": 40},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0, "font": {"size": 10}},
        "xaxis": {"title": {"text": "steps since the fork"}, "rangemode": "tozero", "gridcolor": "#eeeeee"},
        "yaxis": {"title": {"text": metric}, "gridcolor": "#eeeeee", "zeroline": False},
        "plot_bgcolor": "#ffffff", "paper_bgcolor": "#ffffff",
    }
    return {"data": traces, "layout": layout}


def sweep_frame(reading: SweepReading) -> pd.DataFrame:
    """The sweep's points: lr, loss and smoothed loss, in the order trained."""
    return pd.DataFrame({"lr": np.asarray(reading.lrs, dtype=float), "loss": np.asarray(reading.losses, dtype=float),
                         "smoothed": np.asarray(reading.smoothed, dtype=float)})


def build_sweep_figure(frame: pd.DataFrame, reading: SweepReading, *, height: int = 320) -> dict[str, Any]:
    """Loss against lr (log x): the raw loss faint, the smoothed one bold, and a marker with a
    dotted line at the steepest descent, the divergence and the suggested lr."""
    lrs, smoothed = frame["lr"].to_numpy(dtype=float), frame["smoothed"].to_numpy(dtype=float)
    traces: list[dict[str, Any]] = [
        {"type": "scatter", "mode": "lines", "x": _list(lrs), "y": _list(frame["loss"].to_numpy(dtype=float)),
         "name": "loss", "line": {"color": "#1f77b4", "width": 1}, "opacity": 0.3, "meta": {"sweep": "raw"},
         "hovertemplate": "loss %{y:.4g} at lr %{x:.3g}<extra></extra>"},
        {"type": "scatter", "mode": "lines", "x": _list(lrs), "y": _list(smoothed), "name": "loss (smoothed)",
         "line": {"color": "#1f77b4", "width": 2.2}, "meta": {"sweep": "smoothed"},
         "hovertemplate": "smoothed loss %{y:.4g} at lr %{x:.3g}<extra></extra>"},
    ]
    shapes = []
    for field_name, (label, colour, symbol) in SWEEP_MARKS.items():
        lr = getattr(reading, field_name)
        if lr is None or not len(lrs):
            continue
        at = int(np.argmin(np.abs(np.log(lrs) - math.log(lr))))
        y = smoothed[at] if math.isfinite(smoothed[at]) else None
        traces.append({"type": "scatter", "mode": "markers", "x": [lr], "y": [y], "name": f"{label}: lr {lr:.3g}",
                       "marker": {"color": colour, "symbol": symbol, "size": 13, "line": {"width": 1, "color": "#222"}},
                       "meta": {"sweep": field_name}, "hovertemplate": f"{label}: lr {lr:.4g}<extra></extra>"})
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": lr, "x1": lr, "y0": 0, "y1": 1,
                       "line": {"color": colour, "width": 1, "dash": "dot"}})
    xaxis: dict[str, Any] = {"title": {"text": "lr (log)"}, "type": "log", "gridcolor": "#eeeeee"}
    ticks = lr_ticks(lrs.tolist())
    if ticks:
        xaxis.update(tickmode="array", tickvals=ticks[0], ticktext=ticks[1], range=ticks[2])
    finite = smoothed[np.isfinite(smoothed)]
    yaxis: dict[str, Any] = {"title": {"text": "loss"}, "gridcolor": "#eeeeee", "zeroline": False}
    if len(finite):
        # The diverged tail would squash the part worth reading: show from the start of the sweep
        # up to the divergence threshold (4× the lowest smoothed loss), not the blow-up past it.
        low, high = float(finite.min()), float(finite.max())
        top = min(high, max(float(finite[0]), 4 * low))
        if top > low:
            yaxis["range"] = [low - 0.05 * (top - low), top + 0.05 * (top - low)]
    return {"data": traces, "layout": {
        "height": height, "uirevision": "babysit-sweep", "hovermode": "closest", "shapes": shapes,
        "margin": {"l": 56, "r": 12, "t": 8, "b": 40},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0, "font": {"size": 10}},
        "xaxis": xaxis, "yaxis": yaxis, "plot_bgcolor": "#ffffff", "paper_bgcolor": "#ffffff"}}
