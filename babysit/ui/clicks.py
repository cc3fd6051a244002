"""The page's click → command protocol: a click queues one command in the store, says so at once
(a toast, and a refusal that stays on screen), and then follows that command's fate as the trainer
acknowledges it. Everything it keeps between reruns lives under the session-state keys below.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import streamlit as st

from .. import commands as cmd
from ..store import RunStore
from .text import plain

# Session-state keys of the protocol.
FLASH = "_flash"                # the latest click's Flash: what to toast, and a refusal to keep showing
FLASH_SERIAL = "_flash_serial"  # counts clicks, so each flash is toasted exactly once
FLASH_SHOWN = "_flash_shown"    # the serial of the flash last toasted
LAST_COMMAND = "_last_command"  # the id of the command the last click queued: its fate is shown
FIRED = "_fired_{key}"          # per button: (kind, args, time) of its last command, against double fires

# Streamlit 1.67 can deliver one click twice when the page is busy (the click's trigger also rides
# on a fragment's automatic rerun): the same button sending the same command again this soon is
# that, not a person ("× 2" twice would make it × 4; "Roll back" twice, two branches).
DOUBLE_FIRE_S = 1.5


@dataclass(frozen=True)
class Flash:
    kind: str     # "sent" or "error"
    text: str
    serial: int


def send(store: RunStore, kind: str, args: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
         *, key: str) -> None:
    """Queue a command from the page and acknowledge it (or show why it was refused).

    ``args`` may be a function, called here so that a value read at click time (the trainer's
    current lr for × 2) is checked like any other.
    """
    state = st.session_state
    serial = state.get(FLASH_SERIAL, 0) + 1
    try:
        args = args() if callable(args) else args
        fired = (kind, repr(args), time.monotonic())
        last = state.get(FIRED.format(key=key))
        if last is not None and last[:2] == fired[:2] and fired[2] - last[2] < DOUBLE_FIRE_S:
            return
        state[FIRED.format(key=key)] = fired
        state[FLASH_SERIAL] = serial
        command_id = store.enqueue_command(kind, args or {}, source="dashboard")
    except cmd.CommandError as error:
        state[FLASH_SERIAL] = serial
        state[FLASH] = Flash("error", f"Not sent: {error}", serial)
        return
    text = cmd.describe(kind, cmd.validate(kind, args).args)
    state[FLASH] = Flash("sent", f"Sent #{command_id}: {text}", serial)
    state[LAST_COMMAND] = command_id


def command_button(column: Any, label: str, key: str, store: RunStore, kind: str,
                   args: dict[str, Any] | Callable[[], dict[str, Any]] | None = None, **options: Any) -> None:
    """A button that sends one command when clicked."""
    column.button(label, key=key, on_click=send, args=(store, kind, args), kwargs={"key": key}, **options)


def toast_flash() -> None:
    """The latest click's toast, once. Every part of the page with buttons calls this first: the
    part that was clicked reruns at once, so the toast does not wait for the next live refresh."""
    flash = st.session_state.get(FLASH)
    if flash is None:
        return
    if st.session_state.get(FLASH_SHOWN) != flash.serial:
        st.session_state[FLASH_SHOWN] = flash.serial
        st.toast(flash.text, icon=":material/block:" if flash.kind == "error" else ":material/send:")


def show_flash() -> None:
    """The toast, and a refused command's message, which stays on screen until the next click."""
    toast_flash()
    flash = st.session_state.get(FLASH)
    if flash is not None and flash.kind == "error":
        st.error(plain(flash.text), icon=":material/block:")


def last_command_fate(store: RunStore) -> None:
    """The fate of the command the last click queued: pending, applied (and what it changed), refused."""
    command_id = st.session_state.get(LAST_COMMAND)
    row = store.command(command_id) if command_id else None
    if row is None:
        return
    text = f"#{row['id']} {cmd.describe(row['kind'], row['args'])}: {fate(row)}"
    if row["state"] == cmd.APPLIED:
        st.success(text, icon=":material/check_circle:")
    elif row["state"] == cmd.PENDING:
        st.info(text, icon=":material/hourglass_top:")
    else:
        st.error(text, icon=":material/block:")


def fate(row: dict[str, Any]) -> str:
    return cmd.outcome(row, number=short_number)


def short_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
