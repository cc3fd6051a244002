"""Helpers the trial drivers share: start a training script as its own process and drive it only
through babysit's CLI (`python -m babysit status --json`, `set`, `rollback`, ...), as a person does.

The babysit imported is this checkout's (PYTHONPATH is set to the repository root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))
PY = sys.executable


def workdir() -> Path:
    """Where the run directories and logs go: the first argument, or /tmp/babysit-trials."""
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/babysit-trials")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run one babysit CLI command; print it with its exit status and output."""
    done = subprocess.run([PY, "-m", "babysit", *args], env=ENV, capture_output=True, text=True, timeout=180)
    print(f"$ python -m babysit {' '.join(args)}  -> rc {done.returncode}\n{done.stdout}{done.stderr}", flush=True)
    return done


def status(run_dir: Path) -> dict[str, Any]:
    done = subprocess.run([PY, "-m", "babysit", "status", "--run-dir", str(run_dir), "--json"], env=ENV,
                          capture_output=True, text=True, timeout=180)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {}


def wait(run_dir: Path, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 600) -> dict[str, Any]:
    """Poll `status --json` until ``condition`` holds (the trainer's speed varies with the machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = status(run_dir)
        if now and now.get("step") is not None and condition(now):
            return now
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}: {status(run_dir)}")


def start(script: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start ``script`` (a file of this folder) with ``args``; its output goes to ``log``."""
    return subprocess.Popen([PY, str(HERE / script), *args], env=ENV, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
