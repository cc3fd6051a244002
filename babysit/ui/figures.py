"""Pure builders: a RunView in, a Plotly figure (a plain JSON-ready dict) out.

Four panels share one x axis (step, epoch or wall time): losses (raw per step, faint; smoothed by
an exponentially weighted average; validation per epoch), other metrics (and the exp() of any
loss-like metric the person asked for: perplexity), lr (log axis, ticks at 1 and 3 of each decade)
and momentum (an axis that fits β). Each metric has its own colour and each branch its own dash,
so both read in the legend; the current branch is drawn last, on top, and thicker; points a crash
superseded are dotted and faint. Nudges, lr/momentum changes no command made, rollbacks, stops,
crashes, restarts and divergences are marked where they happened, with the details on hover.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..downsample import ewma
from ..store import PER_EPOCH
from .data import AUTO_KINDS, Marker, RunView, SeriesWindow, series_by_kind, steps_to_epochs

X_STEP, X_EPOCH, X_WALL = "step", "epoch", "wall"
X_AXES = (X_STEP, X_EPOCH, X_WALL)
# One colour per metric (the common names fixed, others picked by name, stably).
METRIC_COLOURS = {"loss": "#1f77b4", "val_loss": "#ff7f0e", "val_acc": "#2ca02c", "lr": "#9467bd",
                  "momentum": "#8c564b"}
OTHER_COLOURS = ("#d62728", "#17becf", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#98df8a")
# One dash per branch; dotted belongs to superseded points.
BRANCH_DASHES = ("solid", "dash", "dashdot", "longdash", "longdashdot")
SUPERSEDED_DASH = "dot"
EPOCH_MARKERS_MAX = 300
UIREVISION = "babysit"  # constant per run and x axis: the chart keeps the user's zoom across updates
# How each kind of marker looks: (panel, symbol, colour, legend name).
MARKER_STYLES = {
    "lr": ("lr", "triangle-up", "#9467bd", "lr nudges"),
    "momentum": ("momentum", "triangle-up", "#8c564b", "momentum nudges"),
    "auto_lr": ("lr", "circle-open", "#555555", "lr set by scheduler/loop"),
    "auto_momentum": ("momentum", "circle-open", "#555555", "momentum set by scheduler/loop"),
    "rollback": ("loss", "x", "#d62728", "rollbacks"),
    "stop": ("loss", "square", "#444444", "stops"),
    "crash": ("loss", "x-thin-open", "#b00000", "crashes"),
    "restart": ("loss", "triangle-right", "#2a7d2a", "restarts"),
    "divergence": ("loss", "diamond", "#e6550d", "divergences"),
}

# Panels top to bottom: their y axes, and their shares of the figure's height when all are drawn
# (a panel with nothing to draw gives its height to the others).
_PANELS = {"loss": ("y", 4.4), "metric": ("y2", 1.2), "lr": ("y3", 1.2), "momentum": ("y4", 1.0)}
_PANEL_GAP = 0.045


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
    if np.isfinite(array).all():
        return array.tolist()
    return [v if math.isfinite(v) else None for v in array.tolist()]


def _exp(values: np.ndarray) -> np.ndarray:
    """exp(), where an overflow (a diverged loss) becomes inf, drawn as a gap."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(np.asarray(values, dtype=float))


def _trace(window: SeriesWindow, panel: str, x: list[Any], y: list[Any], *, name: str, colour: str,
           width: float, opacity: float, mode: str = "lines", dash: str = "solid", shape: str = "linear",
           show_legend: bool = True, hover: str | None = None) -> dict[str, Any]:
    # SVG, never WebGL: at most a few thousand points a trace, SVG draws them faster the first
    # time, and the chart's small plotly.js build has no WebGL traces.
    trace: dict[str, Any] = {
        "type": "scatter", "mode": mode, "x": x, "y": y, "name": name, "yaxis": _PANELS[panel][0], "xaxis": "x",
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
    # exp() of a loss is a metric of its own scale (perplexity): it moves to the metrics panel.
    moved = [w for w in groups["loss"] if w.name in options.exp_of]
    groups["loss"] = [w for w in groups["loss"] if w.name not in options.exp_of]
    groups["metric"] = moved + groups["metric"]
    current = view.current_branch
    # Current branch last, so it is drawn on top; superseded pieces first, underneath everything.
    order = lambda w: (not w.superseded, w.branch == current, w.branch)  # noqa: E731
    traces: list[dict[str, Any]] = []
    for panel in ("loss", "metric", "lr", "momentum"):
        for window in sorted(groups[panel], key=order):
            traces += _series_traces(window, panel, view, options)
    traces += _marker_traces(view, options)
    drawn = {panel for panel, windows in groups.items() if windows}
    return {"data": traces, "layout": _layout(view, options, height, drawn)}


def _series_traces(window: SeriesWindow, panel: str, view: RunView, options: ChartOptions) -> list[dict[str, Any]]:
    is_current = window.branch == view.current_branch
    exp = window.name in options.exp_of
    shown = f"exp({window.name})" if exp else window.name
    colour = metric_colour(window.name)
    label = f"{shown} · branch {window.branch}" + (" · superseded" if window.superseded else "")
    x = _x(window.steps, window.walls, window.branch, view, options)
    y = _list(_exp(window.values) if exp else window.values)
    width = 2.2 if is_current else 1.3
    dash = SUPERSEDED_DASH if window.superseded else branch_dash(window.branch)
    opacity = 0.5 if window.superseded else (1.0 if is_current else 0.6)
    hover = f"{shown} %{{y:.4g}}<extra>branch {window.branch}{' · superseded' if window.superseded else ''}</extra>"
    if panel in ("lr", "momentum"):
        # A stepwise value holds until the branch's last logged step: draw it out to there.
        end = view.branch_ends.get((window.branch, window.info.segment))
        if end is not None and len(window.steps) and end > window.steps[-1]:
            x = x + _x(np.array([end]), np.array([window.walls[-1]]) if options.x_axis == X_WALL else None,
                       window.branch, view, options)
            y = y + [y[-1]]
        return [_trace(window, panel, x, y, name=label, colour=colour, width=width, opacity=opacity,
                       shape="hv", dash=dash, hover=hover)]
    if window.info.per == PER_EPOCH:
        # A marker per epoch while they are few; past that, SVG markers cost more than they tell.
        mode = "lines+markers" if len(x) <= EPOCH_MARKERS_MAX else "lines"
        return [_trace(window, panel, x, y, name=label, colour=colour, width=width, mode=mode,
                       opacity=opacity, dash=dash, hover=hover)]
    if window.superseded:
        return [_trace(window, panel, x, y, name=label, colour=colour, width=1.4, opacity=opacity, dash=dash,
                       hover=hover)]
    traces = [_trace(window, panel, x, y, name=f"{label} (raw)", colour=colour, width=1.0,
                     opacity=0.25 if is_current else 0.12, show_legend=options.smoothing == 0,
                     hover=f"{shown} %{{y:.4g}}<extra>raw · branch {window.branch}</extra>")]
    if options.smoothing > 0 and len(window.mean_steps):
        smooth_y = ewma(window.mean_steps, window.mean_values, options.smoothing)
        smooth_x = _x(window.mean_steps, np.interp(window.mean_steps, window.steps, window.walls) if len(window.steps) else None,
                      window.branch, view, options)
        traces.append(_trace(window, panel, smooth_x, _list(_exp(smooth_y) if exp else smooth_y),
                             name=f"{label} (smoothed)", colour=colour, width=width, opacity=opacity, dash=dash,
                             hover=f"{shown} (smoothed) %{{y:.4g}}<extra>branch {window.branch}</extra>"))
    return traces


def _marker_x(marker: Marker, view: RunView, options: ChartOptions) -> Any:
    steps = np.array([marker.step])
    walls = np.array([marker.wall]) if marker.wall is not None else None
    return _x(steps, walls, marker.branch, view, options)[0]


def _marker_traces(view: RunView, options: ChartOptions) -> list[dict[str, Any]]:
    traces = []
    for kind, (panel, symbol, colour, name) in MARKER_STYLES.items():
        chosen = [m for m in view.markers if m.kind == kind]
        if panel == "loss":
            ys = [_loss_y(m, view) for m in chosen]
        else:
            ys = [m.value for m in chosen]
        if not chosen:
            continue
        traces.append({
            "type": "scatter", "mode": "markers", "name": name,
            "x": [_marker_x(m, view, options) for m in chosen], "y": ys,
            "yaxis": _PANELS[panel][0], "xaxis": "x",
            "marker": {"symbol": symbol, "size": 11, "color": colour, "line": {"width": 1.5, "color": colour}
                       if symbol.endswith("-open") else {"width": 1, "color": "#222"}},
            "text": [m.text for m in chosen], "hovertemplate": "%{text}<extra></extra>",
            "meta": {"markers": kind},
        })
    return traces


def _loss_y(marker: Marker, view: RunView) -> float | None:
    """Put a marker of the loss panel on its branch's loss curve at its step (the nearest point)."""
    windows = [w for w in view.windows if w.branch == marker.branch and "loss" in w.name and len(w.values)
               and w.info.per != PER_EPOCH]
    windows.sort(key=lambda w: (w.name != "loss", w.superseded))
    for window in windows:
        finite = np.isfinite(window.values)
        if finite.any():
            steps, values = window.steps[finite], window.values[finite]
            return float(values[min(np.searchsorted(steps, marker.step), len(steps) - 1)])
    return None


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


def _panel_values(view: RunView, kind: str) -> list[float]:
    values = [float(v) for w in view.windows if w.name == kind and w.info.per != PER_EPOCH for v in w.values]
    return values + [m.value for m in view.markers if m.kind in (kind, f"auto_{kind}") and m.value is not None]


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


def _layout(view: RunView, options: ChartOptions, height: int, drawn: set[str]) -> dict[str, Any]:
    domains = _domains(drawn)
    shapes = []
    for m in view.markers:
        if m.kind in AUTO_KINDS:  # a scheduler may step every epoch: markers only, no lines
            continue
        x = _marker_x(m, view, options)
        shapes.append({
            "type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
            "line": {"color": MARKER_STYLES[m.kind][2], "width": 1, "dash": "dot"}, "opacity": 0.5,
        })
    axis_title = {X_STEP: "step", X_EPOCH: "epoch", X_WALL: "wall time"}[options.x_axis]
    layout: dict[str, Any] = {
        "height": height, "uirevision": f"{UIREVISION}-{options.x_axis}", "hovermode": "closest",
        "margin": {"l": 60, "r": 12, "t": 8, "b": 36},
        "legend": {"orientation": "h", "y": 1.01, "yanchor": "bottom", "x": 0, "font": {"size": 10}},
        "xaxis": {"title": {"text": axis_title}, "type": "date" if options.x_axis == X_WALL else "linear",
                  "anchor": _PANELS[list(domains)[-1]][0], "showspikes": True, "spikemode": "across", "spikethickness": 1},
        "shapes": shapes,
        "plot_bgcolor": "#ffffff", "paper_bgcolor": "#ffffff",
    }
    titles = {"loss": "loss", "metric": "metrics", "lr": "lr (log)", "momentum": "momentum"}
    for panel, (axis, _) in _PANELS.items():
        key = "yaxis" if axis == "y" else f"yaxis{axis[1:]}"
        layout[key] = {"domain": list(domains.get(panel, (0.0, 0.0))), "anchor": "x", "title": {"text": titles[panel]},
                       "gridcolor": "#eeeeee", "zeroline": False, "visible": panel in domains}
    layout["yaxis"]["type"] = "log" if options.log_loss else "linear"
    layout["yaxis3"]["type"] = "log"
    ticks = lr_ticks(_panel_values(view, "lr"))
    if ticks:
        layout["yaxis3"].update(tickmode="array", tickvals=ticks[0], ticktext=ticks[1], range=ticks[2])
    beta = momentum_range(_panel_values(view, "momentum"))
    if beta:
        layout["yaxis4"].update(range=beta, tickformat=".3~g", nticks=4)
    return layout
