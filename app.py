"""babysit's dashboard: the live learning curve of one run, and the controls that nudge it.

Started by `python -m babysit demo` or `python -m babysit dashboard` (which bind 127.0.0.1 and
turn usage statistics off). It reads the run directory and writes only command rows (and the
hints a person dismissed); it never imports the trainer.

A cockpit: the curve on the left, the status, the controls and the fate of the last command on the
right, all on one laptop screen (1366×768); checkpoints and the command history below.
"""

import sys

import streamlit as st
from streamlit import config

from babysit.ui import instruments_panel, page
from babysit.ui.clicks import counted_clicks
from babysit.ui.live_chart import live_chart, live_chart_view, preload_plotly

# Streamlit runs gc.collect(2) after every script run by default: 60 % of the server's CPU at a
# refresh a second on a long run, for garbage this script does not make (it holds no cycles).
config.set_option("runner.postScriptGC", False)

args = page.parse_args(sys.argv[1:])
st.set_page_config(page_title="babysit", page_icon="🍼", layout="wide", initial_sidebar_state="collapsed")
page.compact_style()
preload_plotly()  # plotly.js loads in the browser while the rest of the page is built
if not page.access_granted():
    st.stop()

store, runs = page.pick_run(args.root, args.run)
if store is None:
    st.stop()
# A session's first run draws the curve (and the status) alone and reruns at once for the rest:
# the browser starts the chart's script only once it has rendered what came before it.
opening = page.opening()
options, frozen, refresh_every = page.chart_options(store) if not opening else page.DEFAULT_CHART
slow_every = max(2.0, refresh_every)
chart_column, controls_column = st.columns([0.63, 0.37], gap="small")


# The curve first, so its figure (and plotly.js) is on the way before the rest of the page is
# built. Refreshed unless "Freeze" is on; it updates in place (zoom survives refreshes) and
# reports the zoomed x range back, which reruns it for a denser view.
@st.fragment(run_every=None if frozen else refresh_every)
def curve() -> None:
    status = store.status()
    zoom = live_chart_view("curve")
    page.chart(store, status, options, zoom,
               render=lambda figure: live_chart(figure, key="curve", height=1000, fit_viewport=True))


with chart_column:
    curve()


# Live: status, throughput and alerts (a divergence with its remedy), refreshed every second,
# frozen chart or not.
@st.fragment(run_every=refresh_every)
def live_status() -> None:
    status = store.status()
    divergence = page.open_divergence(store)
    page.header(store, status, runs, message=divergence is None)  # the alert below says it
    with counted_clicks("live"):
        page.divergence_alert(store, status, divergence)
    page.other_alerts(store)


# Nudges: lr first, momentum second, as the course notes rank them; then pause/resume and the
# rollback. Refreshed, so "now" is now.
@st.fragment(run_every=slow_every)
def nudges() -> None:
    page.toast_flash()
    status = store.status()
    page.trainer_hint(store, status)
    with counted_clicks("nudges"):
        optimizer, nudged = page.optimizer_picker(status)  # several optimizers: the one the controls nudge
        page.lr_controls(store, nudged, optimizer)
        page.momentum_controls(store, nudged, optimizer)
        page.run_controls(store, status)
        page.rollback_controls(store, status)


# The fate of the latest clicks (or why one was refused), refreshed every second so that it
# always shows; below the buttons, so that it never moves one under a second quick click.
@st.fragment(run_every=refresh_every)
def fates() -> None:
    page.show_flash()
    page.last_command_fate(store)


# Hints from the notes (a plateau, an lr too high, overfitting, a long momentum window), below the
# controls so they never push them off the screen; each acts through a button, never by itself.
@st.fragment(run_every=slow_every)
def hints() -> None:
    page.toast_flash()
    with counted_clicks("hints"):
        page.hints_panel(store, store.status())


with controls_column, st.container(key="cockpit_side"):
    live_status()
    if opening:
        st.rerun()
    with st.container(key="cockpit_controls"):
        nudges()
    fates()
    hints()


# Below the cockpit, folded until opened: probe the lr, sweep it, compare branches.
@st.fragment(run_every=slow_every)
def instruments() -> None:
    with counted_clicks("instruments"):
        instruments_panel.instruments(store, store.status())


instruments()


# Below the cockpit: every checkpoint, and what happened to every command.
@st.fragment(run_every=slow_every)
def history() -> None:
    page.toast_flash()
    checkpoints, commands = st.columns(2)
    with checkpoints:
        st.subheader("Checkpoints")
        page.checkpoint_table(store)
    with commands:
        st.subheader("Commands")
        page.command_history(store)


history()
