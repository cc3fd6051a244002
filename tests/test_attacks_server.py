"""Issue 11, items 1 and 5, against a real ``python -m babysit dashboard`` and its Streamlit server:
garbage websocket frames must not freeze it, and a page served from another host name (DNS
rebinding) must get nothing from it. Listed in tests/test_attacks.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import expect

from babysit.store import RunStore
from tests.conftest import CHROMIUM_ARGS, REPO, chromium_page, wait_for
from tests.raw_websocket import RawWebSocket
from tests.test_access import free_port, keep_heartbeat
from tests.test_app import fake_trainer

TOKEN = "9f1c2b7e4a6d8035c1e2"  # 20 characters, 14 different: strong enough
# Each refused frame costs the server one 377-byte log record: 250 of them are ~94 KB, well past
# the 64 KiB a pipe holds.
GARBAGE_FRAMES = 250


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator:
    """Start ``python -m babysit dashboard`` whose own output is piped and never read past its
    first line, as a service manager or a test harness would."""
    servers: list[subprocess.Popen[str]] = []

    def start(*args: str, address: str = "127.0.0.1") -> int:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "babysit", "dashboard", "--root", str(tmp_path),
                                    "--port", str(port), "--address", address, *args], cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env={k: v for k, v in os.environ.items() if k != "BABYSIT_TOKEN"})
        servers.append(process)
        line = process.stdout.readline() if process.stdout else ""
        assert "babysit: dashboard at" in line, line + (process.stdout.read() if process.stdout else "")
        return port

    yield start
    for process in servers:
        process.terminate()
        process.wait(timeout=30)


def healthy(port: int, address: str = "127.0.0.1", timeout: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/_stcore/health", timeout=timeout) as reply:
            return reply.status == 200 and reply.read() == b"ok"
    except OSError:
        return False


def test_item1_garbage_websocket_frames_do_not_freeze_the_dashboard(dashboard, tmp_path: Path) -> None:
    store = fake_trainer(tmp_path / "run")
    stop = threading.Event()
    threading.Thread(target=keep_heartbeat, args=(RunStore(tmp_path / "run"), stop), daemon=True).start()
    port = dashboard()
    try:
        for _ in range(GARBAGE_FRAMES):
            socket_ = RawWebSocket(port, f"127.0.0.1:{port}", timeout=30)
            try:
                assert socket_.accepted, socket_.status_line
                socket_.send(b"\xff\x00 not a BackMsg")
                assert socket_.receive()[0] == 0x8  # the server refuses the frame and closes
            except TimeoutError:
                break  # frozen: the health check below says so
            finally:
                socket_.close()
        # Before the fix the server blocked writing its log to a full pipe: health timed out.
        assert healthy(port, timeout=20), "the dashboard stopped answering after the garbage frames"
        with chromium_page(timeout_s=60) as (page, errors):
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            expect(page.locator('[data-testid="stMetric"]').first).to_be_visible(timeout=60_000)
            page.locator(".st-key-pause button").click()
            wait_for(lambda: store.commands(), timeout=60, what="the pause sent from the page")
        assert errors == []
    finally:
        stop.set()
    assert [(c["kind"], c["source"]) for c in store.commands()] == [("pause", "dashboard")]


def test_item5_a_websocket_for_another_host_name_is_refused(dashboard, tmp_path: Path) -> None:
    fake_trainer(tmp_path / "run")
    port = dashboard()
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        accepted = RawWebSocket(port, host, origin=f"http://{host}")
        assert accepted.accepted, (host, accepted.status_line)
        accepted.close()
    # A page from a name that resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host.
    rebound = RawWebSocket(port, f"attacker.example:{port}", origin=f"http://attacker.example:{port}")
    assert not rebound.accepted, rebound.status_line
    rebound.close()


def test_item5_the_address_and_names_given_are_answered_and_other_names_are_not(dashboard, tmp_path: Path) -> None:
    fake_trainer(tmp_path / "run")
    port = dashboard("--allow-host", "gpu-box.test", address="127.0.0.2")
    for host in ("127.0.0.2", "gpu-box.test"):
        accepted = RawWebSocket(port, f"{host}:{port}", address="127.0.0.2")
        assert accepted.accepted, (host, accepted.status_line)
        accepted.close()
    rebound = RawWebSocket(port, f"attacker.example:{port}", address="127.0.0.2")
    assert not rebound.accepted, rebound.status_line
    rebound.close()


def test_item5_dns_rebinding_in_chromium_reads_nothing_and_sends_nothing(dashboard, tmp_path: Path) -> None:
    """Chromium resolves attacker.example to 127.0.0.1, as a rebinding DNS server would make it."""
    store = fake_trainer(tmp_path / "run")
    stop = threading.Event()
    threading.Thread(target=keep_heartbeat, args=(RunStore(tmp_path / "run"), stop), daemon=True).start()
    port = dashboard()
    args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP attacker.example 127.0.0.1"]
    try:
        with chromium_page(timeout_s=60, args=args) as (page, _errors):
            refused: list[str] = []
            page.on("websocket", lambda socket_: socket_.on("close", lambda closed: refused.append(closed.url)))
            page.goto(f"http://attacker.example:{port}/", timeout=60_000)
            # The page's script loads (static files carry nothing of the run) but its websocket is
            # refused, again and again: no metric, no button, ever.
            deadline = time.monotonic() + 60
            while len(refused) < 2 and time.monotonic() < deadline:
                page.wait_for_timeout(200)  # lets Playwright deliver the websocket events
            assert len(refused) >= 2, f"expected two refused websocket connections, saw {refused}"
            assert all(url.startswith(f"ws://attacker.example:{port}/") for url in refused), refused
            assert page.locator('[data-testid="stMetric"]').count() == 0
            assert page.locator(".st-key-pause button").count() == 0
            for name in ("localhost", "127.0.0.1"):
                page.goto(f"http://{name}:{port}/", timeout=60_000)
                expect(page.locator('[data-testid="stMetric"]').first).to_be_visible(timeout=60_000)
    finally:
        stop.set()
    assert store.commands() == []


def test_item5_item8_serving_beyond_loopback_needs_a_strong_token_and_none_may_be_weak(tmp_path: Path) -> None:
    from tests.conftest import babysit_cli, cli_here

    port = str(free_port())
    # The first through a real `python -m babysit`, the others through cli.main in this process
    # (refused before anything starts: the same parser and checks, no Python start-up each).
    for token, cli in (("open-sesame", babysit_cli), ("a", cli_here), ("aaaaaaaaaaaaaaaaaaaa", cli_here),
                       (" ", cli_here), ("", cli_here)):
        result = cli("dashboard", "--root", str(tmp_path), "--address", "0.0.0.0", "--port", port, "--token", token)
        assert result.returncode == 2, (token, result.stdout, result.stderr)
        assert "a token must have at least 16 characters, at least 8 of them different, and no spaces" in result.stderr
        assert len(token) < 5 or token not in result.stderr  # a secret is never echoed
    blank = cli_here("dashboard", "--root", str(tmp_path), "--port", port, "--token", "")
    assert blank.returncode == 2 and "the access token (--token or BABYSIT_TOKEN) is blank" in blank.stderr
    weak = cli_here("demo", "--run-dir", str(tmp_path / "demo"), "--port", port, "--token", "a")
    assert weak.returncode == 2 and "the access token given is too weak (1 characters, 1 different)" in weak.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything started
    wildcard = cli_here("dashboard", "--root", str(tmp_path), "--port", port, "--allow-host", "*")
    assert wildcard.returncode == 2 and "--allow-host must be a host name or an address" in wildcard.stderr
