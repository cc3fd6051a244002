"""babysit's dashboard: the live learning curve of one run, and the controls that nudge it.

Started by `python -m babysit demo` or `python -m babysit dashboard` (which bind 127.0.0.1 and
turn usage statistics off). It reads the run directory and writes only command rows; it never
imports the trainer.
"""

import sys

import streamlit as st

from babysit.ui import page
from babysit.ui.live_chart import live_chart, live_chart_view

args = page.parse_args(sys.argv[1:])
st.set_page_config(page_title="babysit", page_icon="🍼", layout="wide")
if not page.access_granted():
    st.stop()

store = page.pick_run(args.root, args.run)
if store is None:
    st.stop()
options, frozen, refresh_every = page.chart_options()
slow_every = max(2.0, refresh_every)


# Live: status, acknowledgements and alerts, refreshed every second, frozen chart or not, so the
# fate of a click always shows.
@st.fragment(run_every=refresh_every)
def live_status() -> None:
    status = store.status()
    page.header(store, status)
    page.show_flash()
    page.last_command_fate(store)
    page.divergence_alert(store, status)
    page.other_alerts(store)


live_status()


# The curve, refreshed with the status unless "Freeze" is on. It updates in place (zoom survives
# refreshes) and reports the zoomed x range back, which reruns it for a denser view.
@st.fragment(run_every=None if frozen else refresh_every)
def curve() -> None:
    status = store.status()
    zoom = live_chart_view("curve")
    page.chart(store, status, options, zoom.get("x_range") if zoom else None,
               render=lambda figure: live_chart(figure, key="curve", height=760))


curve()

# Nudges: lr first, momentum second, as the course notes rank them. Refreshed, so "now" is now.
@st.fragment(run_every=slow_every)
def nudges() -> None:
    page.toast_flash()
    st.subheader("Nudge")
    status = store.status()
    page.trainer_hint(store, status)
    lr_column, momentum_column = st.columns(2)
    with lr_column:
        page.lr_controls(store, status)
    with momentum_column:
        page.momentum_controls(store, status)
    page.run_controls(store, status)


nudges()


# Checkpoints (roll back from here) and what happened to every command.
@st.fragment(run_every=slow_every)
def history() -> None:
    page.toast_flash()
    status = store.status()
    st.subheader("Checkpoints")
    page.checkpoints(store, status)
    st.subheader("Commands")
    page.command_history(store)


history()
