"""``dashboard`` and ``demo``: serving the Streamlit page, and starting a trainer detached."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from .. import rundir, serving
from ..errors import CliError
from ..serving import TOKEN_ENV
from ..store import DB_NAME, LOG_NAME, RunStore, StoreError
from .train import parse_cadence


# -- dashboard and demo ------------------------------------------------------------------------
def app_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "app.py"
    if not path.is_file():
        raise CliError(f"the dashboard script {path} is missing; install babysit from a clone with `pip install -e .`")
    return path


def check_serving(address: str, port: int, token: str | None) -> None:
    """Refuse to serve off loopback without a token, with a weak token, or on a busy port (before
    starting anything)."""
    problem = serving.token_problem(token, address)
    if problem:
        raise CliError(problem)
    if _port_in_use(address, port):
        raise CliError(f"port {port} on {address} is already in use; pass --port with a free port")


def serve_dashboard(*, root: str, run: str | None, address: str, port: int, token: str | None,
                    allow_hosts: Sequence[str] = ()) -> int:
    """Run the Streamlit dashboard in the foreground until Ctrl-C. ``allow_hosts``: more names it
    answers to (besides loopback and ``address``), such as the machine's DNS name."""
    check_serving(address, port, token)
    for host in allow_hosts:
        problem = serving.host_name_problem(host)
        if problem:
            raise CliError(problem)
    env = dict(os.environ)
    if token:
        env[TOKEN_ENV] = token
    hosts = [arg for host in serving.allowed_hosts(address, allow_hosts) for arg in ("--server.allowedHosts", host)]
    command = [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", address, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.enableXsrfProtection", "true",
        "--server.enableCORS", "true", "--server.fileWatcherType", "none", "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal", *hosts,
        "--", "--root", root,
    ] + (["--run", run] if run else [])
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", preexec_fn=_die_with_parent)
    output = serving.OutputPump(server.stdout)  # read for as long as it runs: a full pipe freezes it
    # SIGTERM (a service manager, `kill`) ends the server with us instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    url = f"http://{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:{port}"
    try:
        if not _wait_healthy(url, server, timeout=60):
            if server.poll() is not None:
                output.join(timeout=5)
            raise CliError(f"the dashboard did not start:\n{output.text()}")
        print(f"babysit: dashboard at {url}" + ("  (token required)" if token else ""), flush=True)
        output.forward()
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _die_with_parent() -> None:
    """In the server's process: ask Linux to end it if the babysit process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C and SIGTERM are still handled by the parent


def _port_in_use(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return True
    return False


def _wait_healthy(url: str, server: subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def start_trainer(run_dir: str, extra: Sequence[str] = ()) -> int:
    """Start ``python -m babysit train`` detached (its own session), logging to the run directory."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    log = rundir.open_file(Path(run_dir) / LOG_NAME, "ab")  # a planted link is refused, never appended to
    process = subprocess.Popen(
        [sys.executable, "-m", "babysit", "train", "--run-dir", run_dir, *extra],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    return process.pid


def demo_command(args: argparse.Namespace) -> int:
    run_dir = args.run_dir
    check_serving(args.address, args.port, args.token)
    parse_cadence(args)  # a bad value is refused here, in one line, not in the trainer's log
    existing = RunStore(run_dir).status() if (Path(run_dir) / DB_NAME).exists() else {"alive": False}
    if existing.get("alive"):
        pid = existing.get("pid")
        print(f"babysit: demo trainer already running in {run_dir} (pid {pid})")
    else:
        extra = (["--job", args.job] if args.job else []) + (["--epochs", str(args.epochs)] if args.epochs else [])
        extra += [arg for flag, value in (("--checkpoint-every-steps", args.checkpoint_every_steps),
                                          ("--checkpoint-every-minutes", args.checkpoint_every_minutes))
                  if value is not None for arg in (flag, str(value))]
        pid = start_trainer(run_dir, extra)
        _wait_for_trainer(run_dir, pid)
        print(f"babysit: demo trainer started in {run_dir} (pid {pid}, log {Path(run_dir) / LOG_NAME})")
    print("babysit: stopping the dashboard (Ctrl-C) leaves the trainer training, so the run outlives the page; "
          f"stop the trainer with `python -m babysit stop --run-dir {run_dir}`", flush=True)
    root = str(Path(run_dir).parent)
    code = serve_dashboard(root=root, run=run_dir, address=args.address, port=args.port, token=args.token,
                           allow_hosts=args.allow_host)
    print("\nbabysit: dashboard stopped; " + trainer_now(run_dir, pid), flush=True)
    return code


def trainer_now(run_dir: str, pid: int | None) -> str:
    """What the trainer is doing now, from its status row (it may have stopped while the page was open)."""
    try:
        status = RunStore(run_dir).status()
    except StoreError as error:
        return f"the trainer's state in {run_dir} cannot be read ({error})"
    if status.get("alive"):
        return (f"the trainer (pid {status.get('pid') or pid}) keeps training in {run_dir}. Stop it with "
                f"`python -m babysit stop --run-dir {run_dir}`")
    state = status.get("effective_state") or status.get("state") or "gone"
    message = status.get("message")
    return f"the trainer in {run_dir} is {state}" + (f": {message}" if message else "") + (
        f"; `python -m babysit demo --run-dir {run_dir}` resumes it" if state != "finished" else "")


def _wait_for_trainer(run_dir: str, pid: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if (Path(run_dir) / DB_NAME).exists():
            try:
                status = RunStore(run_dir).status()
            except StoreError:
                status = {}
            if status.get("alive") and status.get("pid") == pid:
                return
        time.sleep(0.2)
    log = Path(run_dir) / LOG_NAME
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise CliError(f"the demo trainer did not start; the end of {log}:\n{tail}")
