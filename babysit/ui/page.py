"""The dashboard's Streamlit sections. app.py calls them top to bottom.

Every control validates its value with the same functions as the CLI and the trainer, queues a
command row, and says so at once (a toast plus the command history, which shows the command's
fate as the trainer acknowledges it; babysit/ui/clicks.py). The page never talks to the trainer any
other way.
"""

from __future__ import annotations

import argparse
import hmac
import math
import os
import re
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from .. import commands as cmd
from ..instruments.hints import read_hints
from ..instruments.keeping import read_keeping
from ..instruments.remedy_offer import read_offer
from ..errors import SettingsError
from ..instruments import journal
from ..serving import TOKEN_ENV
from ..store import DB_NAME, LIVE_STATES, NEW, RunStore, StoreError, list_runs, optimizers_of
from ..store.liveness import process_stopped, stopped_message
from .clicks import command_button, fate, last_command_fate, short_number, show_flash, toast_flash  # noqa: F401 (app.py calls them here)
from . import curve
from .data import throughput
from .text import code_span, plain
from .figures import X_AXES, ChartOptions, is_loss_like

# Streamlit's own icon font: it renders everywhere, unlike emoji.
STATE_BADGES = {
    "running": ("green", ":material/play_circle:", "running"),
    "paused": ("orange", ":material/pause_circle:", "paused"),
    "finished": ("blue", ":material/flag:", "finished"),
    "stopped": ("gray", ":material/stop_circle:", "stopped"),
    "crashed": ("red", ":material/error:", "crashed"),
    "not responding": ("red", ":material/heart_broken:", "not responding"),
    NEW: ("gray", ":material/hourglass_empty:", "not started"),
}
# The page shows the newest of these, so that a run with thousands of them loads as fast as a new one.
CHECKPOINTS_SHOWN = 100
COMMANDS_SHOWN = 200
ALERT_EVENTS = 50
PLANNED_LR_READ = 20  # the newest `set lr` commands read for the lr a click on × 2 builds on
_NICE = (1, 2, 3, 5)  # a log scale with round numbers: 1, 2, 3, 5, 10, 20, ...
# lr on a log scale from 1e-6 to 1000 (the trainer takes any finite lr > 0; the exact value reaches
# the rest), plus the trainer's own lr, so the slider's label is the real lr.
LR_CHOICES = [round(m * 10.0 ** e, 12) for e in range(-6, 3) for m in _NICE] + [1000.0]
# Momentum moved as 1-β on a log scale (1 down to 1e-4), as the course notes advise.
ONE_MINUS_BETA_CHOICES = sorted({round(m * 10.0 ** e, 12) for e in range(-4, 0) for m in _NICE} | {0.5, 1.0},
                                reverse=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py")
    parser.add_argument("--root", default="checkpoints")
    parser.add_argument("--run", default=None)
    return parser.parse_known_args(argv)[0]


# -- the cockpit's shape ---------------------------------------------------------------------------
# Streamlit's spacing is made for reading pages; a cockpit must show the curve and its controls on
# one laptop screen (1366×768), so the top padding, the gaps and the metric font are tightened; the
# transparent header lets clicks through to the chart under it (its legend and mode bar) but on its buttons.
COMPACT_CSS = """<style>
[data-testid="stHeader"] { height: 2.25rem; background: transparent; }
[data-testid="stHeader"], [data-testid="stToolbar"] { pointer-events: none; }
[data-testid="stHeader"] button, [data-testid="stHeader"] a { pointer-events: auto; }
[data-testid="stMainBlockContainer"] { padding: 2.25rem 1.2rem 1rem 1.2rem; }
[data-testid="stMainBlockContainer"] [data-testid="stVerticalBlock"] { gap: 0.45rem; }
[data-testid="stMetric"] { padding: 0; }
[data-testid="stMetricValue"] { font-size: 1.2rem; }
[data-testid="stMetricLabel"] p { font-size: 0.8rem; }
.st-key-cockpit_controls [data-testid="stWidgetLabel"] p { font-size: 0.85rem; }
.st-key-cockpit_controls hr { margin: 0.15rem 0; }
.st-key-babysit_plotly_preload, .st-key-babysit_forget_token, [class*="st-key-babysit_clicks_"] { display: none; }
[class*="st-key-hint-"][data-testid="stVerticalBlock"] { padding: 0.4rem 0.6rem; gap: 0.3rem; }
.st-key-cockpit_side { container-type: inline-size; }
.st-key-cockpit_side [data-testid="stAlertContainer"] { padding: 0.4rem 0.7rem; }
.st-key-cockpit_side [data-testid="stAlertContainer"] p { font-size: 0.9rem; }
.st-key-cockpit_side [data-testid^="stBaseButton"] { padding-left: 0.5rem; padding-right: 0.5rem; }
@container (max-width: 440px) {
  .st-key-cockpit_controls [data-testid^="stBaseButton"] span:has(> [data-testid="stIconMaterial"]) { display: none; }
}
[data-testid="stToastContainer"] { top: auto; right: auto; bottom: 0.5rem; left: 0.5rem; }
.st-key-rollback_skip [data-testid="stWidgetLabel"] { min-height: 0; margin-bottom: 0.1rem; }
.st-key-rollback_skip [data-testid="stWidgetLabel"] p { font-size: 0.75rem; line-height: 1.1; white-space: nowrap; }
.st-key-rollback_skip [data-testid="stNumberInputContainer"], .st-key-rollback_skip [data-baseweb="input"] {
  height: 2rem; min-height: 0; }
.st-key-optimizer_choice [data-testid="stRadioGroup"] { min-height: 0; }
</style>"""


def compact_style() -> None:
    st.html(COMPACT_CSS)


# -- access ---------------------------------------------------------------------------------------
# Once accepted, the token leaves the address bar by history.replaceState, which leaves no history
# entry, bookmark or Referer header holding it; the session stays authorised in its session state.
# Only then is it taken out of Streamlit's query parameters: done first, Streamlit would push a new
# history entry and leave the one with the token behind it. A reload is a new session and asks for
# the token again (typed in the page, never put in the address).
_FORGET_TOKEN_JS = """
export default function (component) {
  const url = new URL(window.location.href);
  if (url.searchParams.has("token")) {
    url.searchParams.delete("token");
    window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
  }
  component.setStateValue("gone", true);
}
"""
_forget_token = st.components.v2.component("babysit.forget_token", js=_FORGET_TOKEN_JS, isolate_styles=False)
FORGET_TOKEN_KEY = "babysit_forget_token"


def access_granted() -> bool:
    """With BABYSIT_TOKEN set (required off localhost), nothing of the run shows without it."""
    expected = os.environ.get(TOKEN_ENV)
    if not expected:
        return True
    if not st.session_state.get("_token_ok"):
        given = st.query_params.get("token") or st.session_state.get("_token_input", "")
        if not (given and hmac.compare_digest(str(given).encode(), expected.encode())):
            st.title("babysit")
            st.text_input("Access token", type="password", key="_token_input")
            if given:
                st.error("That access token is not the one this dashboard was started with.")
            else:
                st.info("This dashboard needs the access token it was started with.")
            return False
        st.session_state["_token_ok"] = True
    forget_token_in_url()
    return True


def forget_token_in_url() -> None:
    """Take an accepted token out of the address bar, then out of the query parameters."""
    if "token" not in st.query_params:
        return
    gone = st.session_state.get(FORGET_TOKEN_KEY)
    if isinstance(gone, Mapping) and gone.get("gone"):
        del st.query_params["token"]  # the address bar has none now: Streamlit adds no history entry
        return
    _forget_token(key=FORGET_TOKEN_KEY, data={}, on_gone_change=_nothing)


def _nothing() -> None:
    """Streamlit reports a component's state only to a callback; the next run reads it."""


# -- run picker -----------------------------------------------------------------------------------
def pick_run(root: str, preferred: str | None) -> tuple[RunStore | None, int]:
    """The run to show (the one asked for, else the one with the freshest heartbeat, or the
    person's choice among the runs under ``root``), and how many runs there are to choose from."""
    runs = list_runs(root)
    if preferred and not Path(preferred, DB_NAME).exists():
        found = ", ".join(str(r) for r in runs[:8]) or "none"
        st.error(plain(f"{preferred!r} is not a babysit run (it has no run.db); runs found: {found}"))
        return None, len(runs)
    if preferred and Path(preferred).resolve() not in [r.resolve() for r in runs]:
        runs.insert(0, Path(preferred))
    if not runs:
        st.title("babysit")
        st.info(f"No run under {code_span(root)} yet. Start one with `python -m babysit demo`, or babysit your own loop "
                "with `babysit.Run(...)` (see the README).")
        return None, len(runs)
    names = [str(r) for r in runs]
    if preferred:
        resolved = [str(r.resolve()) for r in runs]
        target = str(Path(preferred).resolve())
        default = resolved.index(target) if target in resolved else 0
    elif "run_choice" not in st.session_state:  # opening the page: the run being trained
        default = freshest(runs)
    else:
        default = 0  # the picker keeps the person's choice
    chosen = st.sidebar.selectbox("Run", names, index=default, key="run_choice") if len(runs) > 1 else names[0]
    try:
        store = RunStore(chosen)
        store.status()  # a database damaged past its first page fails here, not mid-page
        return store, len(runs)
    except StoreError as error:
        st.error(plain(error))
    except sqlite3.DatabaseError as error:
        st.error(plain(f"{str(Path(chosen) / DB_NAME)!r} is not a readable babysit run database ({error}); restore "
                       "it from a backup or start a new run in another directory"))
    return None, len(runs)


def freshest(runs: list[Path]) -> int:
    """The index of the run whose trainer's heartbeat is the newest: the one being trained."""
    def heartbeat(run: Path) -> float:
        try:
            store = RunStore(run)
            try:
                return float(store.status().get("heartbeat") or 0.0)
            finally:
                store.close()
        except (StoreError, sqlite3.DatabaseError):
            return 0.0

    beats = [heartbeat(r) for r in runs]
    return max(range(len(runs)), key=lambda i: beats[i]) if runs else 0


DEFAULT_CHART = (ChartOptions(), False, 1.0)  # what chart_options gives before anyone touched it


def opening() -> bool:
    """True in a browser session's first run only."""
    if st.session_state.get("_opened"):
        return False
    st.session_state["_opened"] = True
    return True


def chart_options(store: RunStore) -> tuple[ChartOptions, bool, float]:
    st.sidebar.subheader("Chart")
    x_axis = st.sidebar.radio("x axis", X_AXES, horizontal=True, key="x_axis")
    beta = st.sidebar.select_slider(
        "Smoothing β (exponentially weighted average)", options=[0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999],
        value=0.95, key="smoothing", format_func=lambda b: f"{b:g}" + (f" (~{1 / (1 - b):.0f} steps)" if b else " (off)"),
    )
    log_loss = st.sidebar.toggle("Log-scale loss", key="log_loss")
    frozen = st.sidebar.toggle("Freeze (stop refreshing)", key="frozen",
                               help="Stops the chart's live refresh so you can inspect it; the status, the controls "
                               "and the fate of every command stay live.")
    every = st.sidebar.select_slider("Refresh every", options=[0.5, 1.0, 2.0, 5.0], value=1.0, key="refresh",
                                     format_func=lambda s: f"{s:g} s")
    losses = sorted({info.name for info in store.series() if is_loss_like(info.name)})
    if "exp_of" in st.session_state:  # another run may not have the metrics chosen before
        st.session_state["exp_of"] = [n for n in st.session_state["exp_of"] if n in losses]
    exp_of = st.sidebar.multiselect("Show exp() (perplexity) of", losses, key="exp_of",
                                    help="Draws exp(loss) in the metrics panel: the perplexity of a "
                                    "cross-entropy loss, the number a language model is judged by.")
    options = ChartOptions(x_axis=x_axis, smoothing=beta, log_loss=log_loss, exp_of=tuple(exp_of))
    return options, frozen, every


# -- the live part -----------------------------------------------------------------------------
def header(store: RunStore, status: dict[str, Any], runs: int = 1, *, message: bool = True) -> None:
    """The run's name and state, its numbers, epoch progress and throughput, in little height
    (``message``: False leaves out the trainer's status message, when an alert says it already)."""
    colour, icon, label = STATE_BADGES.get(status.get("effective_state", NEW),
                                           ("gray", ":material/help:", status.get("effective_state")))
    picker = f" · {runs} runs: pick another in the sidebar (›)" if runs > 1 else ""
    st.markdown(f"{code_span(store.run_dir.name)} :{colour}-badge[{icon} {label}]{picker}")
    if message and status.get("message"):
        st.caption(plain(status["message"]))
    cols = st.columns(4)
    cols[0].metric("epoch", f"{status.get('epoch') or 0} / {status.get('max_epochs') or '?'}")
    cols[1].metric("step", f"{status.get('step') or 0:,}")
    cols[2].metric("lr", f"{status['lr']:.4g}" if status.get("lr") is not None else "–")
    momentum = status.get("momentum")
    # No help icon: beside it the label would not fit a narrow column (its window is on the β slider).
    cols[3].metric("momentum", f"{momentum:.4g}" if momentum is not None else "–")
    per_epoch, done = status.get("steps_per_epoch"), status.get("step_in_epoch") or 0
    facts = [f"branch {status.get('branch') or '–'}"]
    if status.get("effective_state") == "running":
        facts.append(throughput_text(store, status))
    if per_epoch:
        st.progress(min(1.0, done / per_epoch), text=f"epoch {status.get('epoch')}: {done} / {per_epoch} steps · "
                    + " · ".join(facts))
    else:
        st.caption(" · ".join(facts))


def throughput_text(store: RunStore, status: dict[str, Any]) -> str:
    """"41.2 steps/s · 1,318 samples/s" (items only when the loop gave its batch size)."""
    rate = throughput(store, status)
    if rate is None:
        return "– steps/s"
    text = f"{rate.steps_per_s:,.3g} steps/s"
    if rate.items_per_s is not None:
        text += f" · {rate.items_per_s:,.0f} {rate.item_unit}/s"
    return text


def open_divergence(store: RunStore) -> dict[str, Any] | None:
    """The latest divergence event, unless a rollback or a resume has answered it."""
    events = store.events(kinds=("divergence", "rollback", "resume"), limit=ALERT_EVENTS)
    open_alert = None
    for event in events:
        if event["kind"] == "divergence":
            open_alert = event
        elif event["kind"] in ("rollback", "resume") and open_alert is not None:
            open_alert = None
    commands = store.commands(kinds=(cmd.RESUME,), limit=ALERT_EVENTS)
    if open_alert is not None and any(c["kind"] == cmd.RESUME and c["state"] == cmd.APPLIED
                                      and (c["done_at"] or 0) > open_alert["wall"] for c in commands):
        open_alert = None
    return open_alert


def divergence_alert(store: RunStore, status: dict[str, Any], open_alert: dict[str, Any] | None) -> None:
    """The open divergence (:func:`open_divergence`), with its remedy one click away."""
    if open_alert is None:
        return
    data = open_alert["data"]
    # The remedy is offered as it stands now (a nudge since changes it), so the trainer's message
    # is shown without the remedy it named then.
    what = data.get("what") if isinstance(data.get("what"), str) else None
    paused = "; the run is paused" if status.get("effective_state") == "paused" else ""
    st.error(f"**Divergence:** {plain(what)}{paused}." if what else f"**Divergence.** {plain(open_alert['message'])}",
             icon=":material/warning:")
    checkpoint = data.get("checkpoint")
    offer = read_offer(store, checkpoint) if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) else None
    if offer is not None and status.get("alive"):
        # The label says both numbers, and the click sends what the label says.
        command_button(st, f"Roll back to #{offer.checkpoint} with {offer.describe()}", "remedy", store,
                       cmd.ROLLBACK, offer.command_args(), type="primary", icon=":material/undo:", width="stretch")


def other_alerts(store: RunStore) -> None:
    for event in store.events(kinds=("checkpoint_failed", "checkpoint_refused", "error"), limit=ALERT_EVENTS):
        if time.time() - event["wall"] < 3600:
            st.warning(f"{event['kind'].replace('_', ' ')} at step {event['step']}: {plain(event['message'])}")


def chart(store: RunStore, status: dict[str, Any], options: ChartOptions, reported: dict[str, Any] | None,
          render: Callable[[dict[str, Any]], Any]) -> None:
    """The learning curve (babysit/ui/curve.py); ``reported``: what the chart reported (its zoom)."""
    curve.chart(store, status, options, reported, render)


def command_history(store: RunStore) -> None:
    rows = store.commands(limit=COMMANDS_SHOWN)
    if not rows:
        st.caption("No commands yet.")
        return
    table = pd.DataFrame([{
        "#": r["id"], "sent": time.strftime("%H:%M:%S", time.localtime(r["created"])), "from": r["source"],
        "command": cmd.describe(r["kind"], r["args"]), "fate": fate(r),
    } for r in reversed(rows)])
    st.dataframe(table, hide_index=True, width="stretch", height=min(36 * (len(table) + 1), 280))


# -- controls ----------------------------------------------------------------------------------
def trainer_hint(store: RunStore, status: dict[str, Any]) -> None:
    """Say up front why the controls will refuse, rather than only after a click."""
    if status.get("alive"):
        return
    state = status.get("effective_state", NEW)
    if status.get("state") in LIVE_STATES and process_stopped(status):
        st.warning(f"No trainer is answering: {plain(stopped_message(status))}. Commands are refused until it runs.",
                   icon=":material/pause_circle:")
        return
    config = store.get_meta("config", {})
    if isinstance(config, dict) and config.get("job"):  # one of babysit's jobs: `train` resumes it
        how = f"Resume it with {code_span(f'python -m babysit train --run-dir {store.run_dir}')}."
    else:  # `train` refuses a run some script made: that script resumes it
        how = "Resume it by running its training script again (it resumes from the latest checkpoint)."
    st.info(f"No trainer is running this run ({state}), so commands are refused until one is. {how}",
            icon=":material/info:")


def optimizer_picker(status: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A run with several optimizers: which one the lr and momentum controls nudge (the first by
    default). Returns its name (None with one optimizer) and the status with its lr and momentum."""
    several = optimizers_of(status)
    if not several:
        return None, status
    names = list(several)
    if st.session_state.get("optimizer_choice") not in names:
        st.session_state["optimizer_choice"] = names[0]
    # One line that also says each one's lr, in place of the lr slider's label (lr_controls): the
    # cockpit must still fit 1366×768 with it.
    def option(n: str) -> str:
        lr = several[n].get("lr")
        return f"{n} ({several[n].get('type') or '?'}" + (f", lr {lr:.4g})" if isinstance(lr, (int, float)) else ")")
    name = st.radio("Optimizer", names, key="optimizer_choice", horizontal=True, label_visibility="collapsed",
                    format_func=option,
                    help="The run has several optimizers; the controls below nudge this one (the chart draws "
                         "lr for the first, lr/NAME for the others).")
    return name, {**status, "lr": several[name].get("lr"), "momentum": several[name].get("momentum")}


def lr_controls(store: RunStore, status: dict[str, Any], optimizer: str | None = None) -> None:
    lr = status.get("lr")
    which = {"optimizer": optimizer} if optimizer is not None else {}  # several optimizers: the one picked
    cols = st.columns([1, 1, 2.2, 1], vertical_alignment="bottom")
    # Halve or double the lr the run will have, read at the click: × 2 then × 2 is × 4 however
    # fast, the second click building on the first's command even before the trainer applied it.
    command_button(cols[0], "× ½", "lr_half", store, cmd.SET_LR,
                   lambda: {"value": _times(planned_lr(store, optimizer), 0.5), **which},
                   disabled=lr is None, width="stretch")
    command_button(cols[1], "× 2", "lr_double", store, cmd.SET_LR,
                   lambda: {"value": _times(planned_lr(store, optimizer), 2), **which},
                   disabled=lr is None, width="stretch")
    cols[2].text_input("Exact lr", key="lr_exact", placeholder="exact lr, e.g. 0.003", label_visibility="collapsed")
    choices = lr_choices(lr, st.session_state.get("lr_choice"))
    follow_trainer("lr_choice", choices, lr)
    # Read at the click, from the session: a value typed and the click that commits it arrive together.
    command_button(cols[3], "Set lr", "lr_set", store, cmd.SET_LR,
                   lambda: {"value": _typed("lr_exact") or st.session_state["lr_choice"], **which},
                   width="stretch", type="primary", help="Sends the exact value when one is typed, else the slider's.")
    st.select_slider("Learning rate" + (f" of {optimizer}" if optimizer else "")
                     + (f" — now {lr:.4g}" if lr is not None else "") + " (log scale)",
                     options=choices, key="lr_choice", format_func=lambda v: f"{v:.4g}",
                     # several optimizers: the picker's line above says whose lr it is and what it is now
                     label_visibility="collapsed" if optimizer else "visible")


def planned_lr(store: RunStore, optimizer: str | None = None) -> float | None:
    """The lr the run will have once its queue is applied: the newest `set lr` still pending, or
    applied since the trainer last wrote its status (which it writes with its heartbeat); else
    the lr of the status. ``optimizer``: of that one of several (None: the first)."""
    status = store.status()
    several = optimizers_of(status)
    first = next(iter(several), None)
    for row in reversed(store.commands(kinds=(cmd.SET_LR,), limit=PLANNED_LR_READ)):
        args = row["args"] if isinstance(row["args"], dict) else {}
        if (args.get("optimizer") or first) != (optimizer or first):
            continue  # another optimizer's
        if row["state"] == cmd.PENDING:
            return args.get("value")
        if row["state"] == cmd.APPLIED:
            after = (row["result"] or {}).get("after") if isinstance(row["result"], dict) else None
            done, beat = row["done_at"], status.get("heartbeat")
            if isinstance(after, (int, float)) and isinstance(done, (int, float)) and isinstance(beat, (int, float)) \
                    and done > beat:
                return after
            break
    if optimizer is not None and optimizer in several:
        return several[optimizer].get("lr")
    return status.get("lr")


def _times(lr: Any, factor: float) -> Any:
    """``lr × factor``, or ``lr`` itself when it is not a number (validation then names it)."""
    return lr * factor if isinstance(lr, (int, float)) and not isinstance(lr, bool) else lr


def _typed(key: str) -> str:
    """What is typed in the text input ``key`` now ("" for nothing but spaces)."""
    text = st.session_state.get(key)
    return text if isinstance(text, str) and text.strip() else ""


def lr_choices(lr: float | None, chosen: Any = None) -> list[float]:
    """The slider's stops: round numbers on a log scale, the trainer's lr, and the person's choice."""
    extra = {v for v in (lr, chosen) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}
    return sorted(set(LR_CHOICES) | extra)


def momentum_controls(store: RunStore, status: dict[str, Any], optimizer: str | None = None) -> None:
    momentum = status.get("momentum")
    if momentum is None and status.get("effective_state") != NEW:
        st.caption("This optimizer has no momentum to nudge.")
        return
    now = f" — now {momentum:.4g}" if momentum is not None else ""
    follow_trainer("one_minus_beta", ONE_MINUS_BETA_CHOICES, 1 - momentum if momentum is not None else None)
    st.select_slider(
        f"Momentum β{now}, moved as 1 − β (log scale)", options=ONE_MINUS_BETA_CHOICES, key="one_minus_beta",
        format_func=lambda v: f"β {1 - v:.4g} · window ≈ {1 / v:.0f} steps",
    )
    cols = st.columns([3.2, 1], vertical_alignment="bottom")
    cols[0].text_input("Exact momentum", key="momentum_exact", placeholder="exact β, e.g. 0.95 (empty: the slider's)",
                       label_visibility="collapsed")
    chosen = lambda: _typed("momentum_exact") or round(1 - st.session_state["one_minus_beta"], 12)  # noqa: E731
    which = {"optimizer": optimizer} if optimizer is not None else {}
    command_button(cols[1], "Set β", "momentum_set", store, cmd.SET_MOMENTUM, lambda: {"value": chosen(), **which},
                   width="stretch", type="primary")


def run_controls(store: RunStore, status: dict[str, Any]) -> None:
    paused = status.get("effective_state") == "paused"
    cols = st.columns(3)
    if paused:
        command_button(cols[0], "Resume", "resume", store, cmd.RESUME, icon=":material/play_arrow:", width="stretch")
    else:
        command_button(cols[0], "Pause", "pause", store, cmd.PAUSE, icon=":material/pause:", width="stretch")
    command_button(cols[1], "Checkpoint", "checkpoint", store, cmd.CHECKPOINT, icon=":material/save:",
                   width="stretch")
    command_button(cols[2], "Stop", "stop", store, cmd.STOP, icon=":material/stop:", width="stretch",
                   help="Writes a final checkpoint and ends the trainer; `python -m babysit train` resumes it.")


def nearest_choice(choices: list[float], value: float) -> float:
    """The choice closest to ``value`` on a log scale."""
    target = math.log10(max(value, min(choices)))
    return min(choices, key=lambda v: abs(math.log10(v) - target))


def follow_trainer(key: str, choices: list[float], value: float | None) -> None:
    """Keep a slider on the trainer's value when that changes (a nudge from the CLI, a scheduler),
    unless the person has moved the slider since: then their choice waits for them to send it."""
    if value is None:
        return
    now = nearest_choice(choices, value)
    shown = st.session_state.get(f"_{key}_synced")
    if key not in st.session_state or (shown != now and st.session_state[key] == shown):
        st.session_state[key] = now
    st.session_state[f"_{key}_synced"] = now


# -- checkpoints and rollback -------------------------------------------------------------------
def checkpoint_table(store: RunStore) -> None:
    """The newest checkpoints with their hyperparameters and metrics, newest first."""
    listed = store.checkpoints(limit=CHECKPOINTS_SHOWN)
    if not listed:
        st.caption("No checkpoint yet: the first one is written at the end of epoch 1.")
        return
    rows = []
    keeping = read_keeping(store)
    for c in reversed(listed):
        row = {"id": c["id"], "epoch": c["epoch"], "step": c["step"], "branch": c["branch"],
               "lr": c["hparams"].get("lr"), "momentum": c["hparams"].get("momentum")}
        row.update({k: v for k, v in c["metrics"].items() if isinstance(v, (int, float))})
        row["reason"] = c["reason"]
        row["kept"] = keeping.kept.get(c["id"], "")
        row["written"] = time.strftime("%H:%M:%S", time.localtime(c["created"]))
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", height=min(36 * (len(rows) + 1), 320))
    st.caption(plain(f"Kept on disk: {keeping.retention}."
                     + (f" Periodic checkpoints: {keeping.cadence}." if keeping.cadence else "")))
    if len(listed) == CHECKPOINTS_SHOWN and (total := store.checkpoint_count()) > CHECKPOINTS_SHOWN:
        st.caption(f"The newest {CHECKPOINTS_SHOWN} of {total:,} checkpoints; roll back to an older one by id with "
                   "`python -m babysit rollback ID`.")
    journal_download(store, listed)


def journal_download(store: RunStore, listed: list[dict[str, Any]]) -> None:
    """The panda journal of the checkpoint chosen in "Roll back to" (else the newest), as a file.
    Built when asked for, not at every rerun; then offered as a plain download (a file generated
    on click could be dropped by the page's next refresh before the browser fetched it)."""
    ids = [c["id"] for c in listed]
    chosen = st.session_state.get("rollback_target")
    target = chosen if chosen in ids else ids[-1]
    name = f"{store.run_dir.name}-journal-to-{target}.json"
    ready = st.session_state.get("journal_file")
    cols = st.columns([1, 1.6], vertical_alignment="center")
    if cols[0].button(f"Journal to #{target}", key="journal_build", icon=":material/history_edu:",
                      help=f"The decisions (nudges, rollbacks, probes) that led to checkpoint #{target}, as JSON; "
                           "a new run replays them with `python -m babysit train --replay FILE`. Pick another "
                           "checkpoint in \"Roll back to\"."):
        try:
            ready = (str(store.run_dir), name, journal.to_json(journal.export_journal(store, target)))
        except SettingsError as error:
            st.toast(str(error))
            ready = None
        st.session_state["journal_file"] = ready
    if ready and ready[0] == str(store.run_dir):
        cols[1].download_button(f"Download {ready[1]}", data=ready[2], file_name=ready[1], mime="application/json",
                                on_click="ignore", icon=":material/download:", key="journal_download")


def rollback_controls(store: RunStore, status: dict[str, Any]) -> None:
    """Roll back to a checkpoint (newest first), with its hyperparameters or the current ones."""
    listed = store.checkpoints(limit=CHECKPOINTS_SHOWN)
    if not listed:
        st.caption("Roll back: no checkpoint yet (the first is written at the end of epoch 1).")
        return
    by_id = {c["id"]: c for c in listed}
    ids = [c["id"] for c in reversed(listed)]
    # The newest checkpoint, as new ones arrive, until a person picks another (then theirs stays).
    # Told apart by value, not by a change callback: new options alone can fire one.
    chosen_id = st.session_state.get("rollback_target")
    if chosen_id not in ids or chosen_id == st.session_state.get("rollback_default"):
        st.session_state["rollback_target"] = ids[0]
    st.session_state["rollback_default"] = ids[0]
    # The select's label is left out on screen (its options say what they are, the button beside
    # it what it does), so that the whole cockpit fits a laptop screen.
    cols = st.columns([2.6, 1], vertical_alignment="bottom")
    target = cols[0].selectbox("Roll back to", ids, key="rollback_target", label_visibility="collapsed",
                               format_func=lambda i: _checkpoint_label(by_id[i]))
    chosen = by_id[target]
    command_button(cols[1], "Roll back", "rollback", store, cmd.ROLLBACK, lambda: rollback_args(target),
                   icon=":material/undo:", type="primary", width="stretch")
    # Fixed labels, the numbers in captions under them: the browser resets a radio whose option
    # labels change (with the chosen checkpoint, or a nudge), and would forget the person's choice.
    if st.session_state.get("rollback_hparams") not in cmd.HPARAMS_CHOICES:
        st.session_state["rollback_hparams"] = cmd.HPARAMS_CHECKPOINT
    numbers = {cmd.HPARAMS_CHECKPOINT: ("checkpoint's", chosen["hparams"].get("lr"), chosen["hparams"].get("momentum")),
               cmd.HPARAMS_CURRENT: ("current", status.get("lr"), status.get("momentum"))}
    cols = st.columns([2.6, 1], vertical_alignment="bottom")
    cols[0].radio("Hyperparameters after the rollback", cmd.HPARAMS_CHOICES, key="rollback_hparams", horizontal=True,
                  label_visibility="collapsed", format_func=lambda h: numbers[h][0],
                  captions=[f"lr {short_number(numbers[h][1])}, β {short_number(numbers[h][2])}"
                            for h in cmd.HPARAMS_CHOICES])
    # The data skip of a loss spike's remedy (roll back ~100 steps before it, leave out the batches
    # that came next); 0, the default, replays the same data.
    cols[1].number_input("skip next N batches", min_value=0, max_value=cmd.SKIP_BATCHES_MAX, value=0, step=1,
                         key="rollback_skip", help="After the rollback, leave out the next N batches of the data "
                         "order (as `python -m babysit rollback ID --skip-batches N`); 0 replays the same data.")
    keeping = read_keeping(store)
    if keeping.cadence:
        st.caption(plain(f"Rollback points: {keeping.cadence}, and each epoch's end"),
                   help=plain(f"Kept on disk: {keeping.retention}."))


def rollback_args(target: int) -> dict[str, Any]:
    """What "Roll back" sends: the checkpoint, whose hyperparameters, and the data skip if any."""
    args: dict[str, Any] = {"checkpoint": target,
                            "hparams": st.session_state.get("rollback_hparams", cmd.HPARAMS_CHECKPOINT)}
    skip = st.session_state.get("rollback_skip")
    if isinstance(skip, int) and skip > 0:
        args["skip_batches"] = skip
    return args


def _checkpoint_label(c: dict[str, Any]) -> str:
    metrics = " ".join(f"{k} {v:.3g}" for k, v in c["metrics"].items() if isinstance(v, (int, float)))
    return (f"#{c['id']} · epoch {c['epoch']} · step {c['step']} · branch {c['branch']} · "
            f"lr {short_number(c['hparams'].get('lr'))} {metrics}")


# -- hints from the notes -------------------------------------------------------------------------
def hints_panel(store: RunStore, status: dict[str, Any]) -> None:
    """The current branch's hints (babysit/instruments/hints.py), each with the numbers it saw, its
    action buttons (queued like every other button) and a dismiss. Never applied by themselves."""
    for hint in read_hints(store, status):
        slug = re.sub(r"[^A-Za-z0-9_-]", "-", hint.id)
        with st.container(border=True, key=f"hint-{slug}"):
            st.markdown(f":material/lightbulb: **{plain(hint.title)}** :small[{plain(hint.text)}]")
            cols = st.columns(len(hint.actions) + 1)
            for i, action in enumerate(hint.actions):
                command_button(cols[i], action.label, f"hint-{slug}-{i}", store, action.kind, action.args,
                               width="stretch", help=f"Sends: {action.describe()}")
            # Dismissing writes to the run store (a row in dismissed_hints): the page's one write
            # besides commands, so that it holds after a reload, in other browsers and in the CLI.
            cols[-1].button("Dismiss", key=f"dismiss-{slug}", on_click=dismiss_hint, args=(store, hint.id),
                            width="stretch", help=f"Hide this hint ({hint.id}); a later occurrence shows again.")


def dismiss_hint(store: RunStore, hint_id: str) -> None:
    """Record a dismissal; a database that refuses it (a full disk) says so and changes nothing."""
    try:
        store.dismiss_hint(hint_id)
    except sqlite3.DatabaseError as error:
        st.toast(plain(f"Not dismissed: {error}"), icon=":material/block:")
