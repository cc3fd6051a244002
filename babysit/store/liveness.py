"""Is the trainer alive, and is the disk full: what every reader of a status row asks."""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

from .schema import HEARTBEAT_STALE_S, LIVE_STATES, now


def process_gone(status: dict[str, Any]) -> bool:
    """True when the status names a process on this host that no longer exists."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def process_stopped(status: dict[str, Any]) -> bool:
    """True when the status names a process on this host that is stopped (SIGSTOP, Ctrl-Z): it
    exists, so no new trainer may take the run (its lock holds), but it answers nothing."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        stat = Path(f"/proc/{int(status['pid'])}/stat").read_text()
    except (OSError, ValueError):
        return False
    fields = stat.rsplit(")", 1)[-1].split()  # the name before ")" may hold spaces
    return bool(fields) and fields[0] == "T"


def stopped_message(status: dict[str, Any]) -> str:
    """What to do about a stopped trainer (see :func:`process_stopped`); starting another is no
    answer, the run's lock would refuse it."""
    pid = status.get("pid")
    return f"the trainer pid {pid} is stopped; SIGCONT it (`kill -CONT {pid}`, or `fg` in its shell) or kill it"


def trainer_alive(status: dict[str, Any]) -> bool:
    """True when the status row says running/paused and its heartbeat is fresh (and, on this
    host, the process still exists)."""
    if status.get("state") not in LIVE_STATES or status.get("heartbeat") is None:
        return False
    # A heartbeat from the future is not one either (a forged row, or a clock far off).
    if abs(now() - float(status["heartbeat"])) > HEARTBEAT_STALE_S:
        return False
    return not process_gone(status)


def disk_full(error: BaseException | None) -> bool:
    """True when ``error`` (or what caused it) says the disk is full: SQLite's SQLITE_FULL or an
    OSError with ENOSPC / EDQUOT."""
    while error is not None:
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(run_dir: Path) -> str:
    return f"the disk holding {str(run_dir)!r} is full; free some space and try again"
