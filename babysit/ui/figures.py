"""Pure builders: a RunView in, a Plotly figure (a plain JSON-ready dict) out.

Four panels share one x axis (step, epoch or wall time): losses (raw per step, faint; smoothed by
an exponentially weighted average; validation per epoch), other metrics (and the exp() of any
loss-like metric the person asked for: perplexity), lr (log axis, ticks at 1 and 3 of each decade)
and momentum (an axis that fits β).

What is drawn, however many rollbacks the run has:
- the **live line** (the trainer's branch and the stretches it descends from) as one continuous
  curve per metric, one colour per metric, on top;
- every **abandoned** branch (and what an ancestor did after its child forked) as one faint
  sketch of its loss, all of them one trace with one legend entry ("48 abandoned branches"); a
  click on one asks for it in full (babysit/ui/live_chart/live_chart.js);
- the branches asked for **in full**, each with its own dash and one legend entry;
- points a crash superseded, dotted and faint, one legend entry;
- nudges, lr/momentum changes no command made, rollbacks, stops, crashes, restarts and
  divergences as markers with the details on hover; vertical lines for the newest few only.

The loss axis (and each metrics axis) fits the live line's visible points robustly
(:func:`robust_range`): a blow-up, here or on an abandoned branch, does not squash the curve;
the live points it leaves out are drawn as markers at the edge, with a note that is also the
one-click "show all". The fits travel in ``layout.meta`` for the chart's JavaScript, which owns
the axis ranges (a person's zoom, "show all", following new points). Metrics of very different
scales get an axis each (left and right), or, beyond two scales, are drawn normalised with their
range in their names.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..downsample import ewma
from ..store import PER_EPOCH
from .data import (ABANDONED, AUTO_KINDS, FULL, LIVE, SUPERSEDED, Marker, RunView, SeriesWindow, aligned_minmax,
                   series_by_kind, steps_to_epochs)

X_STEP, X_EPOCH, X_WALL = "step", "epoch", "wall"
X_AXES = (X_STEP, X_EPOCH, X_WALL)
# One colour per metric (the common names fixed, others picked by name, stably).
METRIC_COLOURS = {"loss": "#1f77b4", "val_loss": "#ff7f0e", "val_acc": "#2ca02c", "lr": "#9467bd",
                  "momentum": "#8c564b"}
OTHER_COLOURS = ("#d62728", "#17becf", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#98df8a")
ABANDONED_COLOUR = "#8a9bb5"
# One dash per branch drawn in full; dotted belongs to superseded points.
BRANCH_DASHES = ("dash", "dashdot", "longdash", "longdashdot", "solid")
SUPERSEDED_DASH = "dot"
EPOCH_MARKERS_MAX = 300
UIREVISION = "babysit"  # constant per run and x axis: the chart keeps the user's view across updates
# How each kind of marker looks: (panel, symbol, colour, legend name).
MARKER_STYLES = {
    "lr": ("lr", "triangle-up", "#9467bd", "lr nudges"),
    "momentum": ("momentum", "triangle-up", "#8c564b", "β nudges"),
    "auto_lr": ("lr", "circle-open", "#555555", "lr by scheduler"),
    "auto_momentum": ("momentum", "circle-open", "#555555", "β by scheduler"),
    "rollback": ("loss", "x", "#d62728", "rollbacks"),
    "stop": ("loss", "square", "#444444", "stops"),
    "crash": ("loss", "x-thin-open", "#b00000", "crashes"),
    "restart": ("loss", "triangle-right", "#2a7d2a", "restarts"),
    "divergence": ("loss", "diamond", "#e6550d", "divergences"),
}
# Vertical lines mark only the newest few markers: with fifty rollbacks they would hide the curve.
LINED_MARKERS = 5
# Panels top to bottom: their y axes, and their shares of the figure's height when all are drawn
# (a panel with nothing to draw gives its height to the others).
_PANELS = {"loss": ("y", 5.4), "metric": ("y2", 1.2), "lr": ("y3", 1.0), "momentum": ("y4", 0.8)}
_PANEL_GAP = 0.035
SECOND_METRIC_AXIS = "y5"  # the metrics panel's right-hand axis, for metrics of another scale
# Two metrics whose typical sizes differ by more than this share no axis.
SCALE_RATIO = 20.0
# The robust fit: the bulk of the visible points (these quantiles), widened by as much again to
# keep whatever lies within that reach; what lies beyond is off the scale.
FIT_QUANTILES = (0.01, 0.99)
CLIP_MARKERS_MAX = 200


@dataclass(frozen=True)
class ChartOptions:
    x_axis: str = X_STEP
    smoothing: float = 0.95  # β of the exponentially weighted average; 0 draws no smoothed line
    log_loss: bool = False
    exp_of: tuple[str, ...] = field(default=())  # loss-like metrics drawn as exp() (perplexity)

    def __post_init__(self) -> None:
        if self.x_axis not in X_AXES:
            raise ValueError(f"x_axis must be one of {', '.join(X_AXES)}, got {self.x_axis!r}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be >= 0 and < 1, got {self.smoothing!r}")
        bad = [name for name in self.exp_of if not is_loss_like(name)]
        if bad:
            raise ValueError(f"exp() is for loss-like metrics (a name with 'loss' in it), got {bad[0]!r}")


def is_loss_like(name: str) -> bool:
    """A metric whose exp() means something (a cross-entropy loss: exp is the perplexity)."""
    return "loss" in name


def metric_colour(name: str) -> str:
    return METRIC_COLOURS.get(name) or OTHER_COLOURS[zlib.crc32(name.encode()) % len(OTHER_COLOURS)]


def branch_dash(branch: int) -> str:
    return BRANCH_DASHES[(branch - 1) % len(BRANCH_DASHES)]


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
    finite = np.isfinite(array)
    if finite.all():
        return array.tolist()
    out = array.astype(object)
    out[~finite] = None
    return out.tolist()


def _exp(values: np.ndarray) -> np.ndarray:
    """exp(), where an overflow (a diverged loss) becomes inf, drawn as a gap."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(np.asarray(values, dtype=float))


# -- the y range: fit the live curve, not the worst blow-up ---------------------------------------
def robust_range(values: np.ndarray, log: bool = False) -> tuple[float, float] | None:
    """A y range (data units) for ``values``: the bulk between the 1st and 99th percentiles,
    widened to keep every value within as much again beyond them (a learning curve's early
    descent), padded by 5 %. A blow-up orders of magnitude away is left out. On a log axis the
    same is done with the logarithms of the positive values. None when nothing is finite."""
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    if log:
        array = np.log10(array[array > 0])
    if not len(array):
        return None
    q_lo, q_hi = np.quantile(array, FIT_QUANTILES)
    reach = q_hi - q_lo
    kept = array[(array >= q_lo - reach) & (array <= q_hi + reach)]
    lo, hi = float(kept.min()), float(kept.max())
    if hi > lo:
        pad = 0.05 * (hi - lo)
    else:  # one value: a little around it (a decade's tenth on a log axis)
        pad = 0.1 if log else (0.05 * abs(hi) or 0.5)
    lo, hi = lo - pad, hi + pad
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


def _fit(values: np.ndarray) -> dict[str, list[float]] | None:
    """The robust range on a linear and on a log axis (plotly's units: data, and log10 of data),
    widened to round numbers: a few new points rarely move it, so a refresh rarely redraws the axis."""
    linear, log = robust_range(values), robust_range(values, log=True)
    if linear is None:
        return None
    fit = {"linear": _rounded_out(*linear)}
    fit["log"] = _rounded_out(math.log10(log[0]), math.log10(log[1])) if log else fit["linear"]
    return fit


def _rounded_out(lo: float, hi: float) -> list[float]:
    """[lo, hi] widened to multiples of a fiftieth of its span's decade."""
    span = hi - lo
    if not span > 0 or not math.isfinite(span):
        return [lo, hi]
    step = 10.0 ** math.floor(math.log10(span)) / 50
    return [float(f"{math.floor(lo / step) * step:.12g}"), float(f"{math.ceil(hi / step) * step:.12g}")]


# -- the figure ----------------------------------------------------------------------------------
def build_figure(view: RunView, options: ChartOptions = ChartOptions(), *, height: int = 760) -> dict[str, Any]:
    """The learning-curve figure for ``view``; a dict ``{"data": [...], "layout": {...}}``."""
    groups = series_by_kind(view.windows)
    # exp() of a loss is a metric of its own scale (perplexity): it moves to the metrics panel.
    moved = [w for w in groups["loss"] if w.name in options.exp_of]
    groups["loss"] = [w for w in groups["loss"] if w.name not in options.exp_of]
    groups["metric"] = moved + groups["metric"]
    scales = _metric_scales(groups["metric"], options)
    traces: list[dict[str, Any]] = []
    if view.abandoned:
        traces.append(_abandoned_trace(view, options))
    for panel in ("loss", "metric", "lr", "momentum"):
        superseded = [w for w in groups[panel] if w.role == SUPERSEDED]
        if superseded:  # one legend entry for them all
            trace = _superseded_trace(superseded, panel, view, options, scales)
            trace["showlegend"] = not any(t["meta"].get("role") == SUPERSEDED for t in traces)
            traces.append(trace)
    legend_for = {}  # a branch in full gets one legend entry, on its first trace
    for role in (FULL, LIVE):
        for panel in ("loss", "metric", "lr", "momentum"):
            for window in sorted((w for w in groups[panel] if w.role == role), key=lambda w: (w.branch, w.info.id)):
                for trace in _series_traces(window, panel, view, options, scales):
                    if role == FULL:
                        trace["showlegend"] = window.branch not in legend_for
                        legend_for.setdefault(window.branch, trace)
                    traces.append(trace)
    fits: dict[str, dict[str, list[float]]] = {}
    notes: list[dict[str, Any]] = []
    domains = _domains({panel for panel, windows in groups.items() if windows})
    for axis, panel, values, others in _fit_axes(groups, scales, options, view.abandoned):
        fit = _fit(values)
        if fit is None:
            continue
        fits[_axis_key(axis)] = fit
        traces += _clip_traces(axis, panel, fit, view, options, groups, scales)
        notes += _clip_notes(axis, panel, fit, values, others, domains)
    shown = drawn_markers(view)
    traces += _marker_traces(view, options, shown)
    layout = _layout(view, options, height, domains, scales, shown)
    lr_range = layout["yaxis3"].get("range")
    if lr_range:
        fits["yaxis3"] = {"linear": [10 ** lr_range[0], 10 ** lr_range[1]], "log": list(lr_range)}
    if layout["yaxis4"].get("range"):
        fits["yaxis4"] = {"linear": list(layout["yaxis4"]["range"]), "log": list(layout["yaxis4"]["range"])}
    for axis, fit in fits.items():  # the fit is also the range a figure drawn without the chart's script gets
        if axis in ("yaxis", "yaxis2", "yaxis5"):
            kind = "log" if layout[axis].get("type") == "log" else "linear"
            layout[axis]["range"] = list(fit[kind])
    layout["annotations"] = notes + _view_notes(view, domains)
    layout["meta"] = {"fit": fits, "newest": _newest_x(view, options)}
    return {"data": traces, "layout": layout}


def _axis_key(axis: str) -> str:
    return "yaxis" if axis == "y" else f"yaxis{axis[1:]}"


def _label(window: SeriesWindow, options: ChartOptions) -> str:
    return f"exp({window.name})" if window.name in options.exp_of else window.name


def _trace(window: SeriesWindow, axis: str, x: list[Any], y: list[Any], *, name: str, colour: str,
           width: float, opacity: float, mode: str = "lines", dash: str = "solid", shape: str = "linear",
           show_legend: bool = True, hover: str | None = None, group: str | None = None) -> dict[str, Any]:
    # SVG, never WebGL: at most a few thousand points a trace, SVG draws them faster the first
    # time, and the chart's small plotly.js build has no WebGL traces.
    trace: dict[str, Any] = {
        "type": "scatter", "mode": mode, "x": x, "y": y, "name": name, "yaxis": axis, "xaxis": "x",
        "line": {"color": colour, "width": width, "dash": dash, "shape": shape},
        "marker": {"color": colour, "size": 6}, "opacity": opacity,
        "legendgroup": group or f"{window.name}-{window.role}-b{window.branch}", "showlegend": show_legend,
        "meta": {"series": window.info.id, "name": window.name, "branch": window.branch, "role": window.role,
                 "superseded": window.superseded},
    }
    if window.role == LIVE:
        trace["meta"]["pieces"] = [list(p) for p in window.pieces]
    if hover:
        trace["hovertemplate"] = hover
    return trace


@dataclass(frozen=True)
class _Scale:
    """Where a metric of the metrics panel is drawn: its axis, and (normalised) its range."""

    axis: str
    lo: float | None = None  # set when the metric is drawn normalised to 0–1 over [lo, hi]
    hi: float | None = None

    def apply(self, values: np.ndarray) -> np.ndarray:
        if self.lo is None or self.hi is None:
            return values
        return (np.asarray(values, dtype=float) - self.lo) / ((self.hi - self.lo) or 1.0)


def _metric_scales(windows: list[SeriesWindow], options: ChartOptions) -> dict[str, _Scale]:
    """Each metric's axis: one when their sizes are alike; the left and the right axis for two
    sizes; beyond that each is drawn normalised (0–1 over its own robust range, said in its name)."""
    size: dict[str, float] = {}
    for window in windows:
        if window.role != LIVE:
            continue
        values = np.asarray(_exp(window.values) if window.name in options.exp_of else window.values, dtype=float)
        values = np.abs(values[np.isfinite(values)])
        if len(values):
            size[window.name] = max(float(np.quantile(values, 0.9)), 1e-12)
    groups: list[list[str]] = []
    for name in size:  # in the order the metrics come: the first metric's group takes the left axis
        for group in groups:
            if max(size[name], size[group[0]]) / min(size[name], size[group[0]]) <= SCALE_RATIO:
                group.append(name)
                break
        else:
            groups.append([name])
    if len(groups) <= 2:
        return {name: _Scale("y2" if i == 0 else SECOND_METRIC_AXIS) for i, group in enumerate(groups) for name in group}
    scales = {}
    for window in windows:
        if window.role == LIVE and window.name in size:
            values = _exp(window.values) if window.name in options.exp_of else window.values
            fitted = robust_range(values)
            if fitted is not None:
                scales[window.name] = _Scale("y2", *fitted)
    return scales


def _axis_of(window: SeriesWindow, panel: str, scales: dict[str, _Scale]) -> str:
    if panel == "metric":
        return scales.get(window.name, _Scale("y2")).axis
    return _PANELS[panel][0]


def _values(window: SeriesWindow, panel: str, options: ChartOptions, scales: dict[str, _Scale],
            values: np.ndarray | None = None) -> np.ndarray:
    values = window.values if values is None else values
    values = _exp(values) if window.name in options.exp_of else np.asarray(values, dtype=float)
    return scales[window.name].apply(values) if panel == "metric" and window.name in scales else values


def _shown_name(window: SeriesWindow, panel: str, options: ChartOptions, scales: dict[str, _Scale]) -> str:
    shown = _label(window, options)
    scale = scales.get(window.name) if panel == "metric" else None
    if scale is not None and scale.lo is not None:
        shown += f" ({scale.lo:.3g}–{scale.hi:.3g})"
    return shown


def _series_traces(window: SeriesWindow, panel: str, view: RunView, options: ChartOptions,
                   scales: dict[str, _Scale]) -> list[dict[str, Any]]:
    live = window.role == LIVE
    shown = _shown_name(window, panel, options, scales)
    colour = metric_colour(window.name)
    label = shown if live else f"branch {window.branch}"
    group = None if live else f"branch-{window.branch}"
    where = "live line" if live else f"branch {window.branch}"
    axis = _axis_of(window, panel, scales)
    x = _x(window.steps, window.walls, window.branch, view, options)
    y = _list(_values(window, panel, options, scales))
    normalised = panel == "metric" and scales.get(window.name, _Scale("y2")).lo is not None
    real = (f"{_label(window, options)} %{{text}}" if normalised else f"{_label(window, options)} %{{y:.4g}}")
    width = 2.2 if live else 1.5
    dash = "solid" if live else branch_dash(window.branch)
    opacity = 1.0 if live else 0.75
    click = "" if live else " · click to fold it back"
    hover = f"{real}<extra>{where}{click}</extra>"

    def text_of(values: np.ndarray) -> dict[str, Any]:
        return {"text": [f"{v:.4g}" for v in (_exp(values) if window.name in options.exp_of else values)]} \
            if normalised else {}

    if panel in ("lr", "momentum"):
        # A stepwise value holds until the branch's last logged step: draw it out to there.
        end = view.newest if live else view.branch_ends.get((window.branch, window.info.segment))
        if end is not None and len(window.steps) and end > window.steps[-1]:
            x = x + _x(np.array([end]), np.array([window.walls[-1]]) if options.x_axis == X_WALL else None,
                       window.branch, view, options)
            y = y + [y[-1]]
        return [_trace(window, axis, x, y, name=label, colour=colour, width=width, opacity=opacity, shape="hv",
                       dash=dash, hover=hover, show_legend=not live, group=group)]
    if window.info.per == PER_EPOCH:
        # A marker per epoch while they are few; past that, SVG markers cost more than they tell.
        mode = "lines+markers" if len(x) <= EPOCH_MARKERS_MAX else "lines"
        trace = _trace(window, axis, x, y, name=label, colour=colour, width=width, mode=mode, opacity=opacity,
                       dash=dash, hover=hover, group=group)
        trace.update(text_of(window.values))
        return [trace]
    raw = _trace(window, axis, x, y, name=f"{label} (raw)" if live else label, colour=colour, width=1.0,
                 opacity=(0.25 if live else 0.15), show_legend=options.smoothing == 0,
                 hover=f"{real}<extra>raw · {where}{click}</extra>", group=group)
    raw.update(text_of(window.values))
    traces = [raw]
    if options.smoothing > 0 and len(window.mean_steps):
        smooth = ewma(window.mean_steps, window.mean_values, options.smoothing)
        smooth_x = _x(window.mean_steps, np.interp(window.mean_steps, window.steps, window.walls) if len(window.steps) else None,
                      window.branch, view, options)
        trace = _trace(window, axis, smooth_x, _list(_values(window, panel, options, scales, smooth)), name=label,
                       colour=colour, width=width, opacity=opacity, dash=dash, group=group,
                       hover=f"{real} (smoothed)<extra>{where}{click}</extra>")
        trace.update(text_of(smooth))
        traces.append(trace)
    return traces


def _abandoned_trace(view: RunView, options: ChartOptions) -> dict[str, Any]:
    """Every abandoned stretch's sketch in one faint trace (gaps between them), its branch in
    ``customdata``: one legend entry however many there are, and a click names the branch."""
    windows = sorted(view.abandoned, key=lambda w: (w.branch, float(w.steps[0])))
    gap = np.array([np.nan])
    pieces, at = [], 0
    for window in windows:
        pieces.append([window.branch, at])
        at += len(window.steps) + 1
    if options.x_axis == X_EPOCH:  # each branch its own line of epochs
        xs = [x for w in windows for x in _x(w.steps, w.walls, w.branch, view, options) + [None]]
    else:
        xs = _x(np.concatenate([a for w in windows for a in (w.steps, gap)]),
                np.concatenate([a for w in windows for a in (w.walls, gap)]), -1, view, options)
    ys = _list(np.concatenate([a for w in windows for a in (w.values, gap)]))
    branches = np.concatenate([np.full(len(w.steps) + 1, w.branch) for w in windows]).tolist()
    count = view.abandoned_count or len({w.branch for w in view.abandoned})
    name = f"{count} abandoned branch{'es' if count != 1 else ''}"
    return {
        "type": "scatter", "mode": "lines", "x": xs, "y": ys, "customdata": branches, "name": name,
        "yaxis": "y", "xaxis": "x", "line": {"color": ABANDONED_COLOUR, "width": 1.0}, "opacity": 0.45,
        "legendgroup": "abandoned", "showlegend": True, "connectgaps": False,
        "hovertemplate": "branch %{customdata} %{y:.4g}<extra>abandoned · click to draw it in full</extra>",
        "meta": {"role": ABANDONED, "pieces": pieces, "name": view.abandoned[0].name},
    }


def _superseded_trace(windows: list[SeriesWindow], panel: str, view: RunView, options: ChartOptions,
                      scales: dict[str, _Scale]) -> dict[str, Any]:
    """The points crashes superseded on one panel, one dotted faint trace (one legend entry)."""
    xs: list[Any] = []
    ys: list[Any] = []
    for window in windows:
        xs += _x(window.steps, window.walls, window.branch, view, options) + [None]
        ys += _list(_values(window, panel, options, scales)) + [None]
    return {
        "type": "scatter", "mode": "lines", "x": xs, "y": ys, "name": "superseded by a crash",
        "yaxis": _axis_of(windows[0], panel, scales), "xaxis": "x",
        "line": {"color": metric_colour(windows[0].name), "width": 1.4, "dash": SUPERSEDED_DASH}, "opacity": 0.5,
        "legendgroup": "superseded", "showlegend": True,
        "hovertemplate": "%{y:.4g}<extra>superseded by a crash</extra>",
        "meta": {"role": SUPERSEDED, "branches": sorted({w.branch for w in windows})},
    }


def _fit_axes(groups: dict[str, list[SeriesWindow]], scales: dict[str, _Scale], options: ChartOptions,
              abandoned: list[SeriesWindow]):
    """(axis, panel, the live points it fits, every other point drawn on it) per fitted axis."""
    axes: dict[str, tuple[str, list[np.ndarray], list[np.ndarray]]] = {}
    for panel in ("loss", "metric"):
        for window in groups[panel]:
            axis = _axis_of(window, panel, scales)
            entry = axes.setdefault(axis, (panel, [], []))
            values = _values(window, panel, options, scales)
            (entry[1] if window.role == LIVE else entry[2]).append(values)
    if "y" in axes:  # the abandoned sketches are drawn on the loss axis too
        axes["y"][2].extend(w.values for w in abandoned)
    for axis, (panel, live, others) in axes.items():
        if live:
            yield axis, panel, np.concatenate(live), np.concatenate(others) if others else np.empty(0)


def _clip_traces(axis: str, panel: str, fit: dict[str, list[float]], view: RunView, options: ChartOptions,
                 groups: dict[str, list[SeriesWindow]], scales: dict[str, _Scale]) -> list[dict[str, Any]]:
    """The live points the fit leaves out, as markers at the edge of the range (one trace per
    axis type; the chart shows the one that matches the axis and hides both under "show all")."""
    traces = []
    for kind in ("linear", "log"):
        lo, hi = fit[kind] if kind == "linear" else [10 ** v for v in fit[kind]]
        xs: list[Any] = []
        ys: list[float] = []
        texts: list[str] = []
        for window in groups[panel]:
            if window.role != LIVE or _axis_of(window, panel, scales) != axis:
                continue
            values = _values(window, panel, options, scales)
            real = _exp(window.values) if window.name in options.exp_of else window.values
            finite = np.isfinite(values)
            out = finite & ((values > hi) | (values < lo) | ((values <= 0) if kind == "log" else False))
            if not out.any():
                continue
            where = np.flatnonzero(out)
            steps = window.steps[where].astype(float)
            if len(where) > CLIP_MARKERS_MAX:  # the extremes of each stretch, as the curve keeps them
                kept, _ = aligned_minmax(steps, values[where], CLIP_MARKERS_MAX)
                where = where[np.isin(steps, kept)]
            xs += _x(window.steps[where], window.walls[where], window.branch, view, options)
            ys += [hi if values[i] > hi else lo for i in where]
            texts += [f"{_label(window, options)} {real[i]:.4g} at step {int(window.steps[i]):,}" for i in where]
        if xs:
            traces.append({
                "type": "scatter", "mode": "markers", "x": xs, "y": ys, "text": texts, "name": "off the scale",
                "yaxis": axis, "xaxis": "x", "showlegend": False, "cliponaxis": False,
                "marker": {"symbol": ["triangle-up" if y == hi else "triangle-down" for y in ys], "size": 8,
                           "color": "#d62728", "line": {"width": 0}},
                "hovertemplate": "%{text}<extra>off the scale: show all</extra>",
                "visible": kind == "linear", "meta": {"clip": kind, "axis": _axis_key(axis)},
            })
    return traces


def _clip_notes(axis: str, panel: str, fit: dict[str, list[float]], live: np.ndarray, others: np.ndarray,
                domains: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """Per axis type, the note that says what the fit leaves out; a click on it shows all. And
    the note shown under "show all", whose click fits again. The chart's script shows the one
    that applies (by ``name``)."""
    top = domains.get(panel, (0.0, 1.0))[1]
    x = 0.995 if axis != SECOND_METRIC_AXIS else 0.6
    base = {"xref": "paper", "yref": "paper", "x": x, "y": top, "xanchor": "right", "yanchor": "top",
            "showarrow": False, "captureevents": True, "font": {"size": 10, "color": "#b00000"},
            "bgcolor": "rgba(255,255,255,0.8)", "borderpad": 2}
    notes = []
    every = np.concatenate([live, others]) if len(others) else live
    every = every[np.isfinite(every)]
    for kind in ("linear", "log"):
        lo, hi = fit[kind] if kind == "linear" else [10 ** v for v in fit[kind]]
        out = live[np.isfinite(live) & ((live > hi) | (live < lo) | ((live <= 0) if kind == "log" else False))]
        beyond = every[(every > hi) | (every < lo)]
        if not len(beyond):
            continue
        if len(out):
            text = f"{len(out):,} point{'s' if len(out) != 1 else ''} off the scale (up to {beyond.max():.3g}) · show all"
        else:
            text = f"other branches reach {beyond.max():.3g} · show all"
        notes.append({**base, "text": text, "name": f"babysit-clip-{kind}-{_axis_key(axis)}", "visible": kind == "linear"})
    if notes:
        notes.append({**base, "text": "showing all · fit the live curve", "font": {"size": 10, "color": "#555"},
                      "name": f"babysit-fit-{_axis_key(axis)}", "visible": False})
    return notes


def _view_notes(view: RunView, domains: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """What the refresh has to say (a damaged run, a bound reached, a refresh cut short), at the
    top left of the loss panel."""
    if not view.notes:
        return []
    top = domains.get("loss", (0.0, 1.0))[1]
    return [{"xref": "paper", "yref": "paper", "x": 0.005, "y": top, "xanchor": "left", "yanchor": "top",
             "align": "left", "showarrow": False, "text": "<br>".join(_escape(n) for n in view.notes),
             "font": {"size": 11, "color": "#b00000"}, "bgcolor": "rgba(255,240,240,0.9)", "borderpad": 3,
             "name": "babysit-notes"}]


def _escape(text: str) -> str:
    """Plain text in a plotly label (which reads a little HTML)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _newest_x(view: RunView, options: ChartOptions) -> float | None:
    """The newest step of the live line, in the x axis's units (for a zoom that follows it)."""
    if view.newest is None:
        return None
    if options.x_axis == X_WALL:
        walls = [float(w.walls[-1]) for w in view.windows if w.role == LIVE and len(w.walls)
                 and np.isfinite(w.walls[-1])]
        return max(walls) * 1000.0 if walls else None
    return _x(np.array([view.newest]), None, view.current_branch if view.current_branch is not None else -1,
              view, options)[0]


# -- markers ---------------------------------------------------------------------------------------
def _marker_x(marker: Marker, view: RunView, options: ChartOptions) -> Any:
    steps = np.array([marker.step])
    walls = np.array([marker.wall]) if marker.wall is not None else None
    return _x(steps, walls, marker.branch, view, options)[0]


def _markers_x(markers: list[Marker], view: RunView, options: ChartOptions) -> list[Any]:
    """:func:`_marker_x` of each, in one go where the x axis does not depend on the branch."""
    if options.x_axis == X_STEP or (options.x_axis == X_WALL and all(m.wall is not None for m in markers)):
        values = [m.wall * 1000.0 if options.x_axis == X_WALL else m.step for m in markers]
        return _list(np.array(values, dtype=float))
    return [_marker_x(m, view, options) for m in markers]


def drawn_markers(view: RunView) -> list[Marker]:
    """The markers of what is drawn: the live line's (each on its stretch), the branches in
    full, and every rollback (where a branch, live or abandoned, starts)."""
    line = {s.branch: s for s in view.line.stretches} if view.line is not None else None
    kept = []
    for marker in view.markers:
        if line is None or marker.kind == "rollback" or marker.branch in view.full:
            kept.append(marker)
        elif marker.branch in line and line[marker.branch].holds(marker.step):
            kept.append(marker)
    return kept


def _marker_traces(view: RunView, options: ChartOptions, shown: list[Marker]) -> list[dict[str, Any]]:
    traces = []
    curves = _loss_curves(view)
    for kind, (panel, symbol, colour, name) in MARKER_STYLES.items():
        chosen = [m for m in shown if m.kind == kind]
        if not chosen:
            continue
        ys = [_loss_y(m, curves) for m in chosen] if panel == "loss" else [m.value for m in chosen]
        traces.append({
            "type": "scatter", "mode": "markers", "name": name,
            "x": _markers_x(chosen, view, options), "y": ys,
            "yaxis": _PANELS[panel][0], "xaxis": "x",
            # Rollbacks come by the dozen: smaller and lighter, so the curve stays readable under them.
            "marker": {"symbol": symbol, "size": 8 if kind == "rollback" else 11, "color": colour,
                       "opacity": 0.75 if kind == "rollback" else 1.0,
                       "line": {"width": 1.5, "color": colour} if symbol.endswith("-open") else {"width": 1, "color": "#222"}},
            "text": [m.text for m in chosen], "hovertemplate": "%{text}<extra></extra>",
            "meta": {"markers": kind},
        })
    return traces


def _loss_curves(view: RunView) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Per branch, the (steps, finite values) of the loss curves it is drawn by, the best first:
    the live line's "loss", others of the line or in full, superseded pieces, its abandoned sketch."""
    windows: dict[int, list[SeriesWindow]] = {}
    for window in view.windows:
        if "loss" in window.name and window.info.per != PER_EPOCH and len(window.values):
            for branch in window.branches:
                windows.setdefault(branch, []).append(window)
    for found in windows.values():
        found.sort(key=lambda w: (w.name != "loss", w.superseded, w.role != LIVE))
    for window in view.abandoned:
        if len(window.values):
            windows.setdefault(window.branch, []).append(window)
    finite: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    curves: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for branch, found in windows.items():
        for window in found:
            if id(window) not in finite:
                ok = np.isfinite(window.values)
                finite[id(window)] = (window.steps[ok], window.values[ok])
            if len(finite[id(window)][0]):
                curves.setdefault(branch, []).append(finite[id(window)])
    return curves


def _loss_y(marker: Marker, curves: dict[int, list[tuple[np.ndarray, np.ndarray]]]) -> float | None:
    """Put a marker of the loss panel on the loss curve its branch is drawn by at its step (the
    live line, the branch in full, or its abandoned sketch), at the nearest point."""
    for steps, values in curves.get(marker.branch, [])[:1]:
        return float(values[min(int(steps.searchsorted(marker.step)), len(steps) - 1)])
    return None


# -- axes ------------------------------------------------------------------------------------------
def lr_ticks(values: list[float]) -> tuple[list[float], list[str], list[float]] | None:
    """Ticks a person can read on the log lr axis (1 and 3 of each decade, or decades alone when
    the range is wide), and the axis range (log10 units) around ``values``."""
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not finite:
        return None
    lo, hi = math.log10(min(finite)) - 0.35, math.log10(max(finite)) + 0.35
    mantissas = (1, 3) if hi - lo <= 4 else (1,)
    vals, texts = [], []
    for exponent in range(math.floor(lo), math.ceil(hi) + 1):
        for m in mantissas:
            v = m * 10.0 ** exponent
            if lo <= math.log10(v) <= hi:
                vals.append(float(f"{v:.12g}"))
                texts.append(_tick_text(m, exponent))
    return vals, texts, [lo, hi]


def _tick_text(mantissa: int, exponent: int) -> str:
    if -2 <= exponent <= 2:
        return f"{mantissa * 10.0 ** exponent:g}"
    return f"{mantissa}e{exponent}"


def momentum_range(values: list[float]) -> list[float] | None:
    """A momentum axis that fits β: a little around the values drawn, never below 0 nor above 1."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    pad = max(0.02, 0.15 * (hi - lo))
    return [max(0.0, lo - pad), min(1.0, hi + pad)]


def _panel_values(view: RunView, kind: str, shown: list[Marker]) -> list[float]:
    values = [w.values for w in view.windows if w.name == kind and w.info.per != PER_EPOCH and w.role != SUPERSEDED]
    listed = np.concatenate(values).tolist() if values else []
    return listed + [m.value for m in shown if m.kind in (kind, f"auto_{kind}") and m.value is not None]


def _domains(drawn: set[str]) -> dict[str, tuple[float, float]]:
    """Each drawn panel's share of the height (fractions, top to bottom); others get none."""
    panels = [p for p in _PANELS if p in drawn] or ["loss"]
    total = sum(_PANELS[p][1] for p in panels)
    room = 1.0 - _PANEL_GAP * (len(panels) - 1)
    domains, top = {}, 1.0
    for panel in panels:
        bottom = max(0.0, top - room * _PANELS[panel][1] / total)
        domains[panel] = (round(bottom, 4), round(top, 4))
        top = bottom - _PANEL_GAP
    return domains


def _lined(shown: list[Marker]) -> list[Marker]:
    """The markers that get a vertical line: the newest few (a scheduler's changes never)."""
    candidates = [m for m in shown if m.kind not in AUTO_KINDS]
    candidates.sort(key=lambda m: (m.wall if m.wall is not None else -math.inf, m.step))
    return candidates[-LINED_MARKERS:]


def _layout(view: RunView, options: ChartOptions, height: int, domains: dict[str, tuple[float, float]],
            scales: dict[str, _Scale], shown: list[Marker]) -> dict[str, Any]:
    shapes = []
    for m in _lined(shown):
        x = _marker_x(m, view, options)
        shapes.append({
            "type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
            "line": {"color": MARKER_STYLES[m.kind][2], "width": 1, "dash": "dot"}, "opacity": 0.5,
        })
    right = sorted({name for name, scale in scales.items() if scale.axis == SECOND_METRIC_AXIS})
    axis_title = {X_STEP: "step", X_EPOCH: "epoch", X_WALL: "wall time"}[options.x_axis]
    layout: dict[str, Any] = {
        "height": height, "uirevision": f"{UIREVISION}-{options.x_axis}", "hovermode": "closest",
        "margin": {"l": 60, "r": 56 if right else 12, "t": 8, "b": 36},
        "legend": {"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 0, "font": {"size": 10},
                   "tracegroupgap": 0, "itemwidth": 30},
        "xaxis": {"title": {"text": axis_title, "standoff": 4}, "type": "date" if options.x_axis == X_WALL else "linear",
                  "anchor": _PANELS[list(domains)[-1]][0], "showspikes": True, "spikemode": "across", "spikethickness": 1},
        "shapes": shapes,
        "plot_bgcolor": "#ffffff", "paper_bgcolor": "#ffffff",
    }
    titles = {"loss": "loss", "metric": "metrics", "lr": "lr (log)", "momentum": "momentum"}
    for panel, (axis, _) in _PANELS.items():
        key = _axis_key(axis)
        layout[key] = {"domain": list(domains.get(panel, (0.0, 0.0))), "anchor": "x",
                       "title": {"text": titles[panel], "font": {"size": 11}, "standoff": 4},
                       "gridcolor": "#eeeeee", "zeroline": False, "visible": panel in domains}
    if right:
        left = sorted({name for name, scale in scales.items() if scale.axis == "y2"})
        layout["yaxis2"]["title"]["text"] = ", ".join(left)
        layout[_axis_key(SECOND_METRIC_AXIS)] = {
            "domain": layout["yaxis2"]["domain"], "anchor": "x", "overlaying": "y2", "side": "right",
            "title": {"text": ", ".join(right), "font": {"size": 11}, "standoff": 4}, "showgrid": False,
            "zeroline": False, "visible": "metric" in domains,
        }
    elif any(scale.lo is not None for scale in scales.values()):
        layout["yaxis2"]["title"]["text"] = "metrics (0–1 of each)"
    layout["yaxis"]["type"] = "log" if options.log_loss else "linear"
    layout["yaxis3"]["type"] = "log"
    ticks = lr_ticks(_panel_values(view, "lr", shown))
    if ticks:
        layout["yaxis3"].update(tickmode="array", tickvals=ticks[0], ticktext=ticks[1], range=ticks[2])
    beta = momentum_range(_panel_values(view, "momentum", shown))
    if beta:
        layout["yaxis4"].update(range=beta, tickformat=".3~g", nticks=4)
    return layout
