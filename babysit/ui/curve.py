"""The learning curve on the page: what the chart reported (its x window, whether that window
follows new points, the branches a person clicked to see in full) read and drawn.

The chart's JavaScript owns the view (babysit/ui/live_chart/live_chart.js); this module turns what
it reports into the window of steps to read (babysit/ui/data.py: read_view, bounded) and the figure
(babysit/ui/figures.py). A zoom that follows new points is read to the newest step, whatever its
right edge said when it was reported. What the browser reports is checked like any input: a
malformed value reads as "nothing asked".
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import streamlit as st

from ..instruments.compare import excursion_side_branches
from ..store import RunStore
from ..store.lineage import read_branches
from .data import LIMITS, MAX_FULL_BRANCHES, EpochLines, epochs_to_steps, read_view
from .figures import X_EPOCH, X_WALL, ChartOptions, build_figure
from .live_chart import forget_sent

CHART_KEY = "curve"


def chart(store: RunStore, status: dict[str, Any], options: ChartOptions, reported: dict[str, Any] | list | None,
          render: Callable[[dict[str, Any]], Any]) -> None:
    """Draw the learning curve with ``render`` (the live chart), denser inside a zoomed window.

    ``reported``: what the chart last reported (``live_chart_view``), or an x range alone.
    """
    asked = reported if isinstance(reported, dict) else {"x_range": reported}
    lo, hi = step_window(store, status, options, asked.get("x_range"), follow=asked.get("follow") is True)
    # Probe and sweep branches are drawn in their own panel, from their fork: on the curve they
    # would pass for the run's own line (and a sweep's blow-up would take the loss axis).
    view = read_view(store, status, lo, hi, hidden_branches=excursion_side_branches(store),
                     full_branches=branches_asked(asked.get("full")))
    if not view.windows and not view.abandoned and lo is None:
        for note in view.notes:
            st.warning(note)
        st.info("Waiting for the first logged values…")
        forget_sent(CHART_KEY)  # the chart is not on the page: its next figure goes whole
        return
    figure = build_figure(view, options)
    figure["layout"]["uirevision"] += f"-{store.run_dir.resolve()}"  # a new run starts unzoomed
    render(figure)


def branches_asked(value: Any) -> list[int]:
    """The branch ids the browser asked to see in full: whole numbers only, at most a few."""
    if not isinstance(value, list):
        return []
    ids = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return ids[-MAX_FULL_BRANCHES:]


def step_window(store: RunStore, status: dict[str, Any], options: ChartOptions, x_range: Any,
                follow: bool = False) -> tuple[float | None, float | None]:
    """The step range behind a zoomed x range (with a margin, so a small pan still finds data);
    a zoom that follows the newest point reads to the end."""
    if not x_range or options.x_axis == X_WALL:
        return None, None
    try:
        lo, hi = float(x_range[0]), float(x_range[1])
    except (TypeError, ValueError, IndexError):
        return None, None
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        return None, None
    if options.x_axis == X_EPOCH:
        branch = status.get("branch")
        rows, _ = read_branches(store)
        line = EpochLines(store.epochs(limit=LIMITS.epochs), rows).get(branch, []) if isinstance(branch, int) else []
        lo, hi = (float(v) for v in epochs_to_steps(np.array([lo, hi]), line, status.get("steps_per_epoch")))
    margin = 0.05 * (hi - lo)
    return lo - margin, None if follow else hi + margin
