"""What it takes to serve the dashboard safely: the token rule, the names the server answers to,
and reading the Streamlit server's output so that it can never block on it.
"""

from __future__ import annotations

import collections
import ipaddress
import re
import sys
import threading
from typing import IO, Sequence

TOKEN_MIN_LENGTH = 16
TOKEN_MIN_DISTINCT = 8
TOKEN_RULE = (f"at least {TOKEN_MIN_LENGTH} characters, at least {TOKEN_MIN_DISTINCT} of them different, and no "
              "spaces (for example `openssl rand -hex 16`)")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")

TOKEN_ENV = "BABYSIT_TOKEN"  # where the CLI hands the dashboard its access token


def is_loopback(address: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if address.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def token_problem(token: str | None, address: str) -> str | None:
    """Why ``token`` will not do for serving on ``address`` (None when it will).

    Off loopback a token is required; any token given, even on loopback, must be of real
    strength: a guessable one only looks like protection. The message never repeats the token.
    """
    if token is None:
        if is_loopback(address):
            return None
        return (f"serving on {address!r} needs an access token: pass --token T or set BABYSIT_TOKEN, "
                f"{TOKEN_RULE}; without one, serve on 127.0.0.1 and reach it through an SSH tunnel")
    if not token.strip():
        return f"the access token (--token or BABYSIT_TOKEN) is blank; a token must have {TOKEN_RULE}"
    if len(token) < TOKEN_MIN_LENGTH or len(set(token)) < TOKEN_MIN_DISTINCT or any(c.isspace() for c in token):
        return (f"the access token given is too weak ({len(token)} characters, {len(set(token))} different); "
                f"a token must have {TOKEN_RULE}")
    return None


def allowed_hosts(address: str, extra: Sequence[str] = ()) -> list[str]:
    """The host names the server's websocket answers to (Streamlit's ``server.allowedHosts``):
    loopback, ``address`` and ``extra``.

    A page served from any other name is refused, even when that name resolves to this machine
    (DNS rebinding). Served on every interface, the names it is reached by cannot be known; the
    required token guards it then.
    """
    if address in WILDCARDS:
        return ["*"]
    hosts = list(LOOPBACK_NAMES)
    for host in (address, *extra):
        if host.strip("[]") not in hosts:
            hosts.append(host.strip("[]"))
    return hosts


def host_name_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or address for --allow-host (None when it is)."""
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?\.?|\[?[0-9A-Fa-f:.]+\]?", host or ""):
        return (f"--allow-host must be a host name or an address such as gpu-box.example.org or 10.0.0.5 "
                f"(no wildcard, port or scheme), got {host!r}")
    return None


class OutputPump:
    """Reads a child's output for as long as it runs and passes it on to ``sink``.

    A pipe nobody reads fills up after 64 KiB, and the Streamlit server then blocks in its next
    log write, for good (its main thread included). The reader here never waits for anything but
    the pipe; lines go to ``sink`` from a second thread through a bounded buffer, so a sink that
    blocks (a terminal on hold, a pipe of its own nobody reads) costs old lines, never the server.
    The last lines are kept for an error message.
    """

    def __init__(self, stream: IO[str], sink: IO[str] | None = None, *, buffered_lines: int = 1000,
                 tail_lines: int = 60) -> None:
        self._stream = stream
        self._sink = sink if sink is not None else sys.stderr
        self._buffer: collections.deque[str] = collections.deque(maxlen=buffered_lines)
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.dropped = 0
        self._ready = threading.Condition()
        self._forwarding = False
        self._ended = False
        self._reader = threading.Thread(target=self._read, name="babysit-server-output", daemon=True)
        self._writer = threading.Thread(target=self._write, name="babysit-server-output-sink", daemon=True)
        self._reader.start()
        self._writer.start()

    def forward(self) -> None:
        """Start passing lines on to the sink (before this, they are only kept in the tail)."""
        with self._ready:
            self._forwarding = True
            self._ready.notify()

    def text(self) -> str:
        return "".join(self.tail)

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)

    def _read(self) -> None:
        try:
            for line in self._stream:
                self.tail.append(line)
                with self._ready:
                    if self._forwarding:
                        if len(self._buffer) == self._buffer.maxlen:
                            self.dropped += 1
                        self._buffer.append(line)
                        self._ready.notify()
        except (OSError, ValueError):
            pass
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify()

    def _write(self) -> None:
        while True:
            with self._ready:
                while not self._buffer and not self._ended:
                    self._ready.wait()
                if not self._buffer:
                    return
                lines = list(self._buffer)
                self._buffer.clear()
                dropped, self.dropped = self.dropped, 0
            try:
                if dropped:
                    self._sink.write(f"babysit: {dropped} lines of dashboard server output dropped\n")
                self._sink.write("".join(lines))
                self._sink.flush()
            except (OSError, ValueError):
                pass  # the sink is gone: keep draining the pipe regardless
