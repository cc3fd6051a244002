"""Ctrl-C and SIGTERM in a babysat loop: the first stops at the next step boundary with a final
checkpoint, the second aborts at once (KeyboardInterrupt), as a person expects of a long job.

Installed only in the main thread and only over Python's default handlers, so a loop (or a
framework) that handles these signals itself keeps its own behaviour.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_DEFAULTS = (signal.default_int_handler, signal.SIG_DFL, None)


def install_stop_handlers(request_stop: Callable[[str], None], stop_requested: Callable[[], bool]) -> Callable[[], None] | None:
    """Route SIGINT and SIGTERM to ``request_stop``; return the function that puts the previous
    handlers back, or None when nothing was installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous: dict[int, Any] = {}
    owner = os.getpid()

    def handler(signum: int, _frame: Any) -> None:
        if os.getpid() != owner:  # a forked DataLoader worker: the trainer itself handles the stop
            return
        if stop_requested():
            raise KeyboardInterrupt
        print("\nbabysit: stopping at the next step with a final checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)
        request_stop(f"signal {signal.Signals(signum).name}")

    for signum in _SIGNALS:
        current = signal.getsignal(signum)
        if current in _DEFAULTS:
            previous[signum] = current
            signal.signal(signum, handler)
    if not previous:
        return None

    def restore() -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, old in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, old if old is not None else signal.SIG_DFL)

    return restore
