"""Who can reach the dashboard: 127.0.0.1 by default; any other address only with a token, and
then the page shows nothing of the run until the token is given (real server, real Chromium)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import expect

from babysit.store import RunStore
from tests.conftest import REPO, babysit_cli, chromium_page, wait_for
from tests.test_app import fake_trainer

TCP_LISTEN = "0A"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a TCP socket listens on for ``port``, read from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == TCP_LISTEN:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "babysit", "dashboard", "--root", str(tmp_path),
                                    "--port", str(port), *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        servers.append(process)
        line = process.stdout.readline() if process.stdout else ""
        assert "babysit: dashboard at" in line, line + (process.stdout.read() if process.stdout else "")
        return process, port

    yield start
    for process in servers:
        process.terminate()
        process.wait(timeout=30)


def test_the_dashboard_listens_on_localhost_only_by_default(serve, tmp_path: Path) -> None:
    fake_trainer(tmp_path / "run")
    _, port = serve()
    assert listening_addresses(port) == {"127.0.0.1"}


def test_another_address_needs_a_token(tmp_path: Path) -> None:
    port = free_port()
    result = babysit_cli("dashboard", "--root", str(tmp_path), "--address", "0.0.0.0", "--port", str(port))
    assert result.returncode == 2
    assert "serving on '0.0.0.0' needs an access token: pass --token T or set BABYSIT_TOKEN" in result.stderr
    assert listening_addresses(port) == set()


def keep_heartbeat(store, stop: threading.Event) -> None:
    """Stand in for a live trainer's heartbeat, so that the page's commands are accepted."""
    while not stop.wait(1.0):
        store.write_status(heartbeat=time.time())


def test_with_a_token_the_page_shows_nothing_until_it_is_given(serve, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    stop = threading.Event()
    threading.Thread(target=keep_heartbeat, args=(RunStore(tmp_path / "run"), stop), daemon=True).start()
    dashboard, port = serve("--address", "0.0.0.0", "--token", "open-sesame-4f9c2a71")
    assert listening_addresses(port) == {"0.0.0.0"}
    # The token reaches the Streamlit server through its environment, not its command line (ps).
    children = Path(f"/proc/{dashboard.pid}/task/{dashboard.pid}/children").read_text().split()
    assert children and all(b"open-sesame-4f9c2a71" not in Path(f"/proc/{c}/cmdline").read_bytes() for c in children)
    with chromium_page(timeout_s=60) as (page, errors):
        try:
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            expect(page.get_by_text("This dashboard needs the access token")).to_be_visible(timeout=60_000)
            assert page.locator('[data-testid="stMetric"]').count() == 0
            assert page.get_by_text("Pause").count() == 0
            page.goto(f"http://127.0.0.1:{port}/?token=wrong", timeout=60_000)
            expect(page.get_by_text("That access token is not the one")).to_be_visible(timeout=60_000)
            assert page.locator('[data-testid="stMetric"]').count() == 0
            page.goto(f"http://127.0.0.1:{port}/?token=open-sesame-4f9c2a71&x=1#top", timeout=60_000)
            expect(page.locator('[data-testid="stMetric"]').first).to_be_visible(timeout=60_000)
            entries = page.evaluate("history.length")
            # Accepted, the token leaves the address bar, replaced in place: no history entry, no
            # Referer keeps it; the rest of the address stays.
            page.wait_for_function("() => !location.search.includes('token')", timeout=60_000)
            assert page.url == f"http://127.0.0.1:{port}/?x=1#top"
            # The session stays authorised: the page's reruns and a click still work.
            page.locator(".st-key-pause button").click()
            wait_for(lambda: store.commands(), what="the pause sent with the token")
            page.locator('[data-testid="stAlert"]').filter(has_text="pause: pending").wait_for(timeout=60_000)
            assert "token" not in page.url and page.evaluate("history.length") == entries
            assert "open-sesame" not in page.evaluate("JSON.stringify(history.state)")
        finally:
            stop.set()
    assert [(c["kind"], c["source"]) for c in store.commands()] == [("pause", "dashboard")]
    assert errors == []
