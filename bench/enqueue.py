"""The other process of the nudge and rollback benchmarks: it queues commands the way the CLI and
the dashboard do (``RunStore.enqueue_command``) and records, on CLOCK_MONOTONIC (shared by all
processes of the machine), when each was committed.

``RunStore.enqueue_command`` commits the row (SQLite autocommit) and then rings the trainer's
signal file. The benchmark wraps ``CommandSignal.ring`` to read the clock as it is entered, which
is the moment the row has just been committed; ``t_done`` is when the call returned.

    python -m bench.enqueue nudge RUN_DIR OUT.json --count N --gap-ms LO HI --seed S
    python -m bench.enqueue rollback RUN_DIR OUT.json   # one rollback per "go ID" line on stdin
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from babysit import store as store_module
from babysit.commands import ROLLBACK, SET_LR
from babysit.store import RunStore

from .common import mono

_commit_times: list[float] = []
_ring = store_module.CommandSignal.ring


def _timed_ring(path: Path) -> None:
    _commit_times.append(mono())
    _ring(path)


store_module.CommandSignal.ring = staticmethod(_timed_ring)  # type: ignore[method-assign]


def _enqueue(store: RunStore, kind: str, args: dict[str, Any]) -> dict[str, Any]:
    t_call = mono()
    command_id = store.enqueue_command(kind, args, source="bench")
    t_done = mono()
    return {"id": command_id, "args": args, "t_call": t_call, "t_commit": _commit_times[-1], "t_done": t_done}


def _wait_alive(store: RunStore, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not store.status().get("alive"):
        if time.monotonic() > deadline:
            raise SystemExit("the trainer never reported itself alive")
        time.sleep(0.01)


def nudges(run_dir: Path, out: Path, count: int, gap_ms: tuple[float, float], seed: int) -> None:
    rng = random.Random(seed)
    store = RunStore(run_dir)
    _wait_alive(store)
    time.sleep(0.2)
    records = []
    for i in range(count):
        time.sleep(rng.uniform(*gap_ms) / 1e3)
        records.append(_enqueue(store, SET_LR, {"value": 0.02 if i % 2 == 0 else 0.01}))
    out.write_text(json.dumps(records))


def rollbacks(run_dir: Path, out: Path, seed: int, jitter_ms: float) -> None:
    """For each ``go CHECKPOINT_ID [STEP_MS]`` line read on stdin, wait a random part of a step
    (so the commit lands anywhere inside one) and queue a rollback; stop at ``quit``."""
    rng = random.Random(seed)
    store = RunStore(run_dir)
    records = []
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        step_ms = float(words[2]) if len(words) > 2 else jitter_ms
        time.sleep(rng.uniform(0, step_ms) / 1e3)
        records.append(_enqueue(store, ROLLBACK, {"checkpoint": int(words[1]), "hparams": "checkpoint"}))
        out.write_text(json.dumps(records))
    out.write_text(json.dumps(records))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue")
    parser.add_argument("what", choices=("nudge", "rollback"))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--gap-ms", type=float, nargs=2, default=(20.0, 60.0))
    parser.add_argument("--jitter-ms", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "nudge":
        nudges(args.run_dir, args.out, args.count, tuple(args.gap_ms), args.seed)
    else:
        rollbacks(args.run_dir, args.out, args.seed, args.jitter_ms)


if __name__ == "__main__":
    main()
