"""Shared helpers: a tiny deterministic training job and a way to drive babysit's CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent
# Debian's Chromium, driven by Playwright (which cannot download a browser here). Without the
# background-networking flags it keeps trying to reach Google's hosts on a closed network.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000, timeout_s: float = 45.0,
                  args: list[str] | None = None) -> Iterator[tuple[Any, list[str]]]:
    """A page in a fresh headless Chromium (``args``: its command line, CHROMIUM_ARGS by default),
    and the list its uncaught errors are collected in."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args or CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page, errors
        finally:
            browser.close()


def tiny_data(seed: int = 0, n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def tiny_job(run_dir: Path, *, epochs: int, optimizer: str = "sgd", seed: int = 0, scheduler: bool = False,
             on_step: Callable[[Any, int], None] | None = None, on_epoch_end: Callable[[Any, int], None] | None = None,
             batch_size: int = 8, **run_kwargs: Any) -> tuple[Any, nn.Module]:
    """A deterministic 8-steps-per-epoch job written against the public API, like a user's loop."""
    import babysit

    torch.manual_seed(seed)
    data = tiny_data(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler else None
    run = babysit.Run(run_dir, model, opt, sched, config={"seed": seed}, **run_kwargs)
    for _epoch in run.epochs(epochs):
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(loss=loss)
            if on_step is not None:
                on_step(run, run.step)
        if sched is not None:
            sched.step()
        run.log_epoch(val_loss=float(loss.detach()))
        if on_epoch_end is not None:
            on_epoch_end(run, run.epoch)
    run.close()
    return run, model


def babysit_cli(*args: str, timeout: float = 120, check: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m babysit ARGS`` and return the finished process (text output)."""
    result = subprocess.run([sys.executable, "-m", "babysit", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=cwd or REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"babysit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """``babysit.cli.main(ARGS)`` in this process, its output captured as ``babysit_cli`` returns it.

    The same parser, validation and messages as ``python -m babysit``, without a Python start-up
    (about a second on a busy machine): for the many cases where what is checked is the CLI's
    answer, not the process around it. A few cases per command still run the real subprocess.
    """
    import contextlib
    import io

    from babysit import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["babysit", *args], code, out.getvalue(), err.getvalue())


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Trainer:
    """A real ``python -m babysit train`` subprocess on a run directory."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        self.run_dir = run_dir
        self.log_path = run_dir.parent / f"{run_dir.name}-trainer.log"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "babysit", "train", "--run-dir", str(run_dir), *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_running(self, min_step: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        from babysit.store import RunStore

        def ready() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"trainer exited early ({self.process.returncode}):\n{self.output()}")
            if not (self.run_dir / "run.db").exists():
                return None
            status = RunStore(self.run_dir).status()
            return status if status.get("alive") and (status.get("step") or 0) >= min_step else None

        return wait_for(ready, timeout, what=f"trainer running past step {min_step}")

    def wait_exit(self, timeout: float = 120.0) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture
def trainers() -> Any:
    """Start trainers with ``trainers(run_dir, *args)``; all are killed at the end of the test."""
    started: list[Trainer] = []

    def start(run_dir: Path, *args: str) -> Trainer:
        trainer = Trainer(run_dir, *args)
        started.append(trainer)
        return trainer

    yield start
    for trainer in started:
        trainer.kill()


def in_thread(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Wait until the Streamlit server at ``url`` answers its health check; fail with its log if
    the process exits or the time runs out first."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit at {url} did not come up (exit {process.poll()}):\n{log.read_text()}")
        time.sleep(0.1)


@contextmanager
def dashboard_of(run_dir: Path, root: Path, timeout: float = 60.0) -> Iterator[str]:
    """A real Streamlit server of app.py on 127.0.0.1 for the runs under ``root``, opened on
    ``run_dir``; yields its URL once healthy, and stops it after (its log: root/streamlit.log)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = root / "streamlit.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.address", "127.0.0.1",
             "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none", "--", "--root", str(root), "--run", str(run_dir)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, server, log_path, timeout)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=20)
