"""Pure builders: a RunView in, a Plotly figure (a plain JSON-ready dict) out.

Four panels share one x axis (step, epoch or wall time): losses (raw per step, faint; smoothed by
an exponentially weighted average; validation per epoch), other metrics, lr (log axis) and
momentum. Each branch has its own colour; the current branch is drawn last, on top, and thicker;
points a crash superseded are grey and dotted. Nudges and rollbacks are marked where they
happened, with before → after on hover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..downsample import ewma
from ..store import PER_EPOCH
from .data import Marker, RunView, SeriesWindow, series_by_kind, steps_to_epochs

X_STEP, X_EPOCH, X_WALL = "step", "epoch", "wall"
X_AXES = (X_STEP, X_EPOCH, X_WALL)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b",
           "#bcbd22", "#7f7f7f")
SUPERSEDED_COLOUR = "#9a9a9a"
UIREVISION = "babysit"  # constant per run and x axis: the chart keeps the user's zoom across updates

# Panel domains (fractions of the figure height), top to bottom.
_PANELS = {"loss": ("y", (0.47, 1.0)), "metric": ("y2", (0.31, 0.43)),
           "lr": ("y3", (0.155, 0.275)), "momentum": ("y4", (0.0, 0.12))}


@dataclass(frozen=True)
class ChartOptions:
    x_axis: str = X_STEP
    smoothing: float = 0.95  # β of the exponentially weighted average; 0 draws no smoothed line
    log_loss: bool = False

    def __post_init__(self) -> None:
        if self.x_axis not in X_AXES:
            raise ValueError(f"x_axis must be one of {', '.join(X_AXES)}, got {self.x_axis!r}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be >= 0 and < 1, got {self.smoothing!r}")


def branch_colour(branch: int) -> str:
    return PALETTE[(branch - 1) % len(PALETTE)]


def _x(steps: np.ndarray, walls: np.ndarray | None, window_branch: int, view: RunView, options: ChartOptions) -> list[Any]:
    if options.x_axis == X_EPOCH:
        line = view.epochs.get(window_branch, [])
        per_epoch = view.steps_per_epoch if window_branch == view.current_branch else None
        return _list(steps_to_epochs(np.asarray(steps), line, per_epoch))
    if options.x_axis == X_WALL and walls is not None:
        return _list(np.asarray(walls) * 1000.0)  # ms since the epoch: a date axis
    return _list(steps)


def _list(values: np.ndarray) -> list[Any]:
    """JSON-safe: NaN and infinities become None (a gap), numpy scalars become floats."""
    array = np.asarray(values, dtype=float)
    if np.isfinite(array).all():
        return array.tolist()
    return [v if math.isfinite(v) else None for v in array.tolist()]


def _trace(window: SeriesWindow, panel: str, x: list[Any], y: list[Any], *, name: str, colour: str,
           width: float, opacity: float, mode: str = "lines", dash: str = "solid", shape: str = "linear",
           show_legend: bool = True, hover: str | None = None) -> dict[str, Any]:
    trace: dict[str, Any] = {
        "type": "scattergl" if len(x) > 1000 else "scatter",
        "mode": mode, "x": x, "y": y, "name": name, "yaxis": _PANELS[panel][0], "xaxis": "x",
        "line": {"color": colour, "width": width, "dash": dash, "shape": shape},
        "marker": {"color": colour, "size": 6}, "opacity": opacity,
        "legendgroup": f"{window.name}-b{window.branch}-s{window.info.segment}", "showlegend": show_legend,
        "meta": {"series": window.info.id, "branch": window.branch, "superseded": window.superseded},
    }
    if hover:
        trace["hovertemplate"] = hover
    return trace


def build_figure(view: RunView, options: ChartOptions = ChartOptions(), *, height: int = 760) -> dict[str, Any]:
    """The learning-curve figure for ``view``; a dict ``{"data": [...], "layout": {...}}``."""
    groups = series_by_kind(view.windows)
    current = view.current_branch
    # Current branch last, so it is drawn on top; superseded pieces first, underneath everything.
    order = lambda w: (not w.superseded, w.branch == current, w.branch)  # noqa: E731
    traces: list[dict[str, Any]] = []
    for panel in ("loss", "metric", "lr", "momentum"):
        for window in sorted(groups[panel], key=order):
            traces += _series_traces(window, panel, view, options)
    traces += _marker_traces(view, options)
    return {"data": traces, "layout": _layout(view, options, height)}


def _series_traces(window: SeriesWindow, panel: str, view: RunView, options: ChartOptions) -> list[dict[str, Any]]:
    is_current = window.branch == view.current_branch
    colour = SUPERSEDED_COLOUR if window.superseded else branch_colour(window.branch)
    label = f"{window.name} · branch {window.branch}" + (" · superseded" if window.superseded else "")
    x = _x(window.steps, window.walls, window.branch, view, options)
    y = _list(window.values)
    width = 2.2 if is_current else 1.2
    dash = "dot" if window.superseded else "solid"
    if panel in ("lr", "momentum"):
        # A stepwise value holds until the branch's last logged step: draw it out to there.
        end = view.branch_ends.get((window.branch, window.info.segment))
        if end is not None and len(window.steps) and end > window.steps[-1]:
            x = x + _x(np.array([end]), np.array([window.walls[-1]]) if options.x_axis == X_WALL else None,
                       window.branch, view, options)
            y = y + [y[-1]]
        return [_trace(window, panel, x, y, name=label, colour=colour, width=width, opacity=1.0 if is_current else 0.6,
                       shape="hv", dash=dash, hover=f"{window.name} %{{y:.4g}}<extra>branch {window.branch}</extra>")]
    if window.info.per == PER_EPOCH:
        return [_trace(window, panel, x, y, name=label, colour=colour, width=width, mode="lines+markers",
                       opacity=0.35 if window.superseded else (1.0 if is_current else 0.65), dash="dash" if not window.superseded else "dot",
                       hover=f"{window.name} %{{y:.4g}}<extra>branch {window.branch}</extra>")]
    if window.superseded:
        return [_trace(window, panel, x, y, name=label, colour=colour, width=1.0, opacity=0.35, dash="dot",
                       hover=f"superseded {window.name} %{{y:.4g}}<extra>branch {window.branch}</extra>")]
    traces = [_trace(window, panel, x, y, name=f"{label} (raw)", colour=colour, width=1.0,
                     opacity=0.22 if is_current else 0.12, show_legend=options.smoothing == 0,
                     hover=f"{window.name} %{{y:.4g}}<extra>raw · branch {window.branch}</extra>")]
    if options.smoothing > 0 and len(window.mean_steps):
        smooth_y = ewma(window.mean_steps, window.mean_values, options.smoothing)
        smooth_x = _x(window.mean_steps, np.interp(window.mean_steps, window.steps, window.walls) if len(window.steps) else None,
                      window.branch, view, options)
        traces.append(_trace(window, panel, smooth_x, _list(smooth_y), name=f"{label} (smoothed)", colour=colour,
                             width=width, opacity=1.0 if is_current else 0.6,
                             hover=f"{window.name} (smoothed) %{{y:.4g}}<extra>branch {window.branch}</extra>"))
    return traces


def _marker_x(marker: Marker, view: RunView, options: ChartOptions) -> Any:
    steps = np.array([marker.step])
    walls = np.array([marker.wall]) if marker.wall is not None else None
    return _x(steps, walls, marker.branch, view, options)[0]


def _marker_traces(view: RunView, options: ChartOptions) -> list[dict[str, Any]]:
    traces = []
    for kind, panel, symbol in (("lr", "lr", "triangle-up"), ("momentum", "momentum", "triangle-up"),
                                ("rollback", "loss", "x")):
        chosen = [m for m in view.markers if m.kind == kind]
        if not chosen:
            continue
        traces.append({
            "type": "scatter", "mode": "markers", "name": {"lr": "lr nudges", "momentum": "momentum nudges",
                                                           "rollback": "rollbacks"}[kind],
            "x": [_marker_x(m, view, options) for m in chosen],
            "y": [m.value for m in chosen] if kind != "rollback" else [_rollback_y(m, view) for m in chosen],
            "yaxis": _PANELS[panel][0], "xaxis": "x",
            "marker": {"symbol": symbol, "size": 11, "color": [branch_colour(m.branch) for m in chosen],
                       "line": {"width": 1, "color": "#222"}},
            "text": [m.text for m in chosen], "hovertemplate": "%{text}<extra></extra>",
            "meta": {"markers": kind},
        })
    return traces


def _rollback_y(marker: Marker, view: RunView) -> float | None:
    """Put a rollback's marker on its new branch's loss curve where that branch starts."""
    for window in view.windows:
        if window.branch == marker.branch and window.name == "loss" and not window.superseded and len(window.values):
            finite = window.values[np.isfinite(window.values)]
            return float(finite[0]) if len(finite) else None
    return None


def _layout(view: RunView, options: ChartOptions, height: int) -> dict[str, Any]:
    shapes = []
    for m in view.markers:
        shapes.append({
            "type": "line", "xref": "x", "yref": "paper", "x0": _marker_x(m, view, options),
            "x1": _marker_x(m, view, options), "y0": 0, "y1": 1,
            "line": {"color": branch_colour(m.branch), "width": 1, "dash": "dot"}, "opacity": 0.5,
        })
    axis_title = {X_STEP: "step", X_EPOCH: "epoch", X_WALL: "wall time"}[options.x_axis]
    layout: dict[str, Any] = {
        "height": height, "uirevision": f"{UIREVISION}-{options.x_axis}", "hovermode": "closest",
        "margin": {"l": 60, "r": 20, "t": 30, "b": 40},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0, "font": {"size": 11}},
        "xaxis": {"title": {"text": axis_title}, "type": "date" if options.x_axis == X_WALL else "linear",
                  "anchor": "y4", "showspikes": True, "spikemode": "across", "spikethickness": 1},
        "shapes": shapes,
        "plot_bgcolor": "#ffffff", "paper_bgcolor": "#ffffff",
    }
    titles = {"loss": "loss", "metric": "metrics", "lr": "lr (log)", "momentum": "momentum"}
    for panel, (axis, domain) in _PANELS.items():
        key = "yaxis" if axis == "y" else f"yaxis{axis[1:]}"
        layout[key] = {"domain": list(domain), "anchor": "x", "title": {"text": titles[panel]},
                       "gridcolor": "#eeeeee", "zeroline": False}
    layout["yaxis"]["type"] = "log" if options.log_loss else "linear"
    layout["yaxis3"]["type"] = "log"
    return layout
