"""The page's click → command protocol: every click queues one command in the store, says so at
once (a toast, and a refusal that stays on screen), and then follows that command's fate as the
trainer acknowledges it. Everything it keeps between reruns lives under the session-state keys below.

Every click counts, and counts once. Streamlit 1.67 can deliver one click of an ``st.button``
twice when the page is busy (a trigger that rides on a fragment's automatic rerun), and it folds
two quick clicks into one rerun; the server cannot tell the two apart, nor see the second of two
folded clicks. So in the browser a click on a command button is caught before Streamlit sees it
(a small component, :func:`counted_clicks`, one per part of the page): it numbers the click and
reports the page's recent clicks, numbered, as the component's state. The server carries out each
number once (:func:`new_clicks`): a delivery repeated is the same number, a second click a new one,
and two clicks folded into one rerun are both in the report. Without the component (Streamlit's
AppTest, or a click before it is mounted) the button's own ``on_click`` sends, one command a click.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import streamlit as st

from .. import commands as cmd
from ..store import RunStore
from .text import plain

# Session-state keys of the protocol.
FLASHES = "_flashes"            # the latest clicks' Flashes, newest last: what to toast, a refusal to keep showing
FLASH_SERIAL = "_flash_serial"  # counts clicks, so each flash is toasted exactly once
FLASH_SHOWN = "_flash_shown"    # the serial of the flash last toasted
LAST_COMMANDS = "_last_commands"  # (id, when) of the commands the latest clicks queued: their fate is shown
CLICK_TARGETS = "_click_targets"  # per button key: the (store, kind, args) its click sends
CLICKS_DONE = "_clicks_done"      # per page (a browser's page load): the highest click number carried out
_SCOPE = "_click_scope"           # the keys of the command buttons drawn in the part being drawn

FLASHES_KEPT = 8
# Clicks this close together are one burst: the fate box shows each of its commands (× 2 × 2: both).
BURST_S = 10.0
BURST_SHOWN = 3
CLICKS_REPORTED = 32  # how many of its latest clicks the browser reports (more than land in one rerun)

# The browser side: on a click (or Enter/Space) on a button whose element key is one of this
# part's command buttons, stop the event before Streamlit's button sees it, number it, and report
# the page's latest clicks. Numbers count up for the whole page load; the page id tells a new load.
# One list for the page, whichever part caught a click: every report carries the clicks before it,
# so the server, which carries out the numbers above the highest done, never skips an earlier one.
_CLICKS_JS = f"""
const PAGE = Math.random().toString(36).slice(2) + Date.now().toString(36);
const latest = [];
let counted = 0;
const catchers = new Map();

function buttonKey(button) {{
  const holder = button.closest('[class*="st-key-"]');
  if (!holder) return null;
  const name = Array.from(holder.classList).find((c) => c.startsWith("st-key-"));
  return name ? name.slice("st-key-".length) : null;
}}

export default function (component) {{
  const {{ data, parentElement }} = component;
  let catcher = catchers.get(parentElement);
  if (!catcher) {{
    catcher = {{ keys: new Set() }};
    catcher.listener = (event) => {{
      const button = event.target instanceof Element ? event.target.closest("button") : null;
      if (!button || button.disabled) return;
      const key = buttonKey(button);
      if (key === null || !catcher.keys.has(key)) return;
      event.stopImmediatePropagation();
      event.preventDefault();
      counted += 1;
      latest.push([key, counted]);
      if (latest.length > {CLICKS_REPORTED}) latest.shift();
      catcher.component.setStateValue("clicks", {{ page: PAGE, clicks: latest.slice() }});
      parentElement.dataset.counted = String(counted); // what a test (or a person in devtools) reads
    }};
    document.addEventListener("click", catcher.listener, true);
    catchers.set(parentElement, catcher);
  }}
  catcher.component = component; // the newest setStateValue (its fragment id may change)
  catcher.keys = new Set(data.keys);
  return () => {{
    if (!parentElement.isConnected) {{
      document.removeEventListener("click", catcher.listener, true);
      catchers.delete(parentElement);
    }}
  }};
}}
"""
_catcher = st.components.v2.component("babysit.clicks", js=_CLICKS_JS, isolate_styles=False)


@dataclass(frozen=True)
class Flash:
    kind: str     # "sent" or "error"
    text: str
    serial: int


def send(store: RunStore, kind: str, args: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
         *, key: str) -> None:
    """Queue a command from the page and acknowledge it (or show why it was refused).

    ``args`` may be a function, called here so that a value read at click time (the lr the run
    will have for × 2) is checked like any other.
    """
    state = st.session_state
    serial = state.get(FLASH_SERIAL, 0) + 1
    state[FLASH_SERIAL] = serial
    try:
        args = args() if callable(args) else args
        command_id = store.enqueue_command(kind, args or {}, source="dashboard")
    except cmd.CommandError as error:
        _flash(Flash("error", f"Not sent: {error}", serial))
        return
    text = cmd.describe(kind, cmd.validate(kind, args).args)
    _flash(Flash("sent", f"Sent #{command_id}: {text}", serial))
    now = time.time()
    burst = [c for c in state.get(LAST_COMMANDS, []) if now - c[1] < BURST_S]
    state[LAST_COMMANDS] = (burst + [(command_id, now)])[-BURST_SHOWN:]


def _flash(flash: Flash) -> None:
    st.session_state[FLASHES] = (st.session_state.get(FLASHES, []) + [flash])[-FLASHES_KEPT:]


def command_button(column: Any, label: str, key: str, store: RunStore, kind: str,
                   args: dict[str, Any] | Callable[[], dict[str, Any]] | None = None, **options: Any) -> None:
    """A button that sends one command per click (see the module's docstring)."""
    st.session_state.setdefault(CLICK_TARGETS, {})[key] = (store, kind, args)
    scope = st.session_state.get(_SCOPE)
    if scope is not None:
        scope.append(key)
    column.button(label, key=key, on_click=send, args=(store, kind, args), kwargs={"key": key}, **options)


@contextmanager
def counted_clicks(name: str) -> Iterator[None]:
    """Wrap a part of the page that has command buttons: its clicks are caught and numbered in
    the browser (the component is placed after them, hidden: ``st-key-babysit_clicks_<name>``)."""
    keys: list[str] = []
    st.session_state[_SCOPE] = keys
    try:
        yield
    finally:
        st.session_state.pop(_SCOPE, None)
    catcher = f"babysit_clicks_{name}"
    _catcher(key=catcher, data={"keys": keys}, on_clicks_change=functools.partial(_carry_out, catcher))


def _carry_out(catcher: str) -> None:
    """The browser reported clicks: send each one not sent yet."""
    state = st.session_state.get(catcher)
    report = state.get("clicks") if isinstance(state, Mapping) else None
    targets = st.session_state.get(CLICK_TARGETS, {})
    for key in new_clicks(report, st.session_state.setdefault(CLICKS_DONE, {})):
        if key in targets:
            store, kind, args = targets[key]
            send(store, kind, args, key=key)


def new_clicks(report: Any, done: dict[str, int]) -> list[str]:
    """The button keys of the clicks in ``report`` (``{"page": id, "clicks": [[key, number], ...]}``)
    not carried out yet, oldest first; ``done`` (page id → highest number carried out) is updated.
    A report that is not of that shape gives nothing."""
    if not isinstance(report, Mapping) or not isinstance(report.get("page"), str):
        return []
    clicks = report.get("clicks")
    if not isinstance(clicks, list):
        return []
    page = report["page"]
    last = done.get(page, 0)
    fresh = sorted((c[1], c[0]) for c in clicks
                   if isinstance(c, list) and len(c) == 2 and isinstance(c[0], str)
                   and isinstance(c[1], int) and not isinstance(c[1], bool) and c[1] > last)
    if fresh:
        done[page] = fresh[-1][0]
    return [key for _, key in fresh]


def toast_flash() -> None:
    """The latest clicks' toasts, each once. Every part of the page with buttons calls this first:
    the part that was clicked reruns at once, so a toast does not wait for the next live refresh."""
    shown = st.session_state.get(FLASH_SHOWN, 0)
    for flash in st.session_state.get(FLASHES, []):
        if flash.serial > shown:
            st.session_state[FLASH_SHOWN] = flash.serial
            st.toast(flash.text, icon=":material/block:" if flash.kind == "error" else ":material/send:")


def show_flash() -> None:
    """The toasts, and the latest click's refusal, which stays on screen until the next click."""
    toast_flash()
    flashes = st.session_state.get(FLASHES, [])
    if flashes and flashes[-1].kind == "error":
        st.error(plain(flashes[-1].text), icon=":material/block:")


def last_command_fate(store: RunStore) -> None:
    """The fate of the commands the latest clicks queued (one, or each of a quick burst): pending,
    applied (and what it changed), refused."""
    rows = [row for command_id, _ in st.session_state.get(LAST_COMMANDS, [])
            if (row := store.command(command_id)) is not None]
    if not rows:
        return
    text = "  \n".join(plain(f"#{row['id']} {cmd.describe(row['kind'], row['args'])}: {fate(row)}") for row in rows)
    states = {row["state"] for row in rows}
    if states - {cmd.APPLIED, cmd.PENDING}:
        st.error(text, icon=":material/block:")
    elif cmd.PENDING in states:
        st.info(text, icon=":material/hourglass_top:")
    else:
        st.success(text, icon=":material/check_circle:")


def fate(row: dict[str, Any]) -> str:
    return cmd.outcome(row, number=short_number)


def short_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
