"""A tiny app for tests/test_live_chart_browser.py: a loss curve that grows every second.

Like the real dashboard it draws the whole run thinned (every 10th step) and, once the chart
reports a zoomed x range, adds every step inside that window (read with live_chart_view, so in the
same rerun the zoom caused). It prints what live_chart returned, how
often it ran and how far the "run" has got, as one JSON line the test reads.
"""

from __future__ import annotations

import json

import numpy as np
import streamlit as st
from plotly.subplots import make_subplots

from babysit.ui.live_chart import live_chart, live_chart_view

REFRESH_S = 1.0
FIRST_STEPS = 300
STEPS_PER_REFRESH = 25
THIN = 10


def figure(steps: int, x_range: list[float] | None) -> dict:
    """Loss (top) and learning rate (bottom, log) sharing the step axis."""
    all_steps = np.arange(steps)
    x = all_steps[::THIN]
    if x_range is not None:
        lo, hi = x_range
        x = np.union1d(x, all_steps[(all_steps >= np.floor(lo)) & (all_steps <= np.ceil(hi))])
    loss = 0.05 + np.exp(-x / 400.0) * (1.0 + 0.1 * np.sin(x / 3.0))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3])
    fig.add_scatter(x=x, y=loss, name="train loss", row=1, col=1)
    fig.add_scatter(x=x, y=loss * 1.1 + 0.02, name="val loss", row=1, col=1)
    fig.add_scatter(x=x, y=0.1 * 0.999**x, name="lr", row=2, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_layout(uirevision="test-run", title_text=f"step {steps - 1}")
    return fig.to_plotly_json()


@st.fragment(run_every=REFRESH_S)
def live() -> None:
    st.session_state.runs = st.session_state.get("runs", 0) + 1
    steps = FIRST_STEPS + STEPS_PER_REFRESH * st.session_state.runs
    # The window the user looks at decides how dense this run's figure is.
    before = live_chart_view("loss")
    view = live_chart(figure(steps, before["x_range"] if before else None), key="loss", height=520)
    assert view == before, (view, before)  # live_chart_view must not lag a run behind
    st.text(json.dumps({"view": view, "runs": st.session_state.runs, "steps": steps}))


live()
