"""2. Nudge latency: from the commit of a ``set_lr`` command to the step whose optimizer uses it.

The trainer (this process) runs the reference step under ``run.batches``; a second process
(``bench.enqueue``) queues ``set_lr`` commands at random moments, alternating two values, and
records when each was committed. For every step the trainer records when it ended (just before
the step boundary where babysit applies commands) and the lr the optimizer held when the step
ran. A command committed while step k runs is on time if step k+1 (the first step after the next
boundary) uses the new lr.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import time
from typing import Any, Iterator

from .common import REPO, Scratch, Workload, mono, summarize


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure(work: Workload, scratch: Scratch, *, count: int, gap_ms: tuple[float, float], seed: int = 0,
            timeout_s: float = 300.0) -> dict[str, Any]:
    from babysit import Run

    work.reset()
    run_dir = scratch.fresh("nudge")
    out = run_dir.parent / f"{run_dir.name}-commands.json"
    group = work.optimizer.param_groups[0]
    group["lr"] = 0.01
    run = Run(run_dir, work.model, work.optimizer, config={"bench": "nudge"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.enqueue", "nudge", str(run_dir), str(out), "--count", str(count),
         "--gap-ms", str(gap_ms[0]), str(gap_ms[1]), "--seed", str(seed)],
        cwd=REPO, env=_env(),
    )
    batches, step = work.batches, work.step

    def forever() -> Iterator[Any]:
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    t_start: list[float] = []
    t_end: list[float] = []
    lr_used: list[float] = []
    deadline = time.monotonic() + timeout_s
    n = 0
    stop_at: int | None = None
    for b in run.batches(forever()):
        t_start.append(mono())
        lr_used.append(group["lr"])          # the value optimizer.step() below will use
        loss = step(b)
        run.log(loss=loss, lr=group["lr"], momentum=group["momentum"])
        t_end.append(mono())
        n += 1
        if stop_at is None and n % 64 == 0 and (proc.poll() is not None or time.monotonic() > deadline):
            stop_at = n + 8   # a few more boundaries, so the last command is applied too
        if stop_at is not None and n >= stop_at:
            break
    proc.wait(timeout=30)
    run.close()
    applied = {c["id"]: c for c in run.store.commands()}
    records = json.loads(out.read_text())
    return _analyse(records, t_start, t_end, lr_used, applied)


def _analyse(records: list[dict[str, Any]], t_start: list[float], t_end: list[float], lr_used: list[float],
             applied: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per command: k = steps that had ended at the commit, so step k (0-based) ran during it and
    the next boundary is the one after step k; on time means babysit applied it at that boundary,
    i.e. its recorded step (``run.step`` there = steps done) is at most k + 1. The step index that
    babysit records is also the first step that uses the value, which the trainer's own record of
    the lr each step used confirms (unless a later command replaced it at the same boundary, which
    happens when the trainer stalls longer than the gap between two commands)."""
    rows = []
    by_step: dict[int, list[int]] = {}
    for rec in records:
        row = applied.get(rec["id"], {})
        if row.get("state") == "applied" and row.get("step") is not None:
            by_step.setdefault(int(row["step"]), []).append(rec["id"])
    for rec in sorted(records, key=lambda r: r["t_commit"]):
        value = rec["args"]["value"]
        store_row = applied.get(rec["id"], {})
        if store_row.get("state") != "applied" or store_row.get("step") is None:
            rows.append({"id": rec["id"], "applied": False})
            continue
        k = bisect.bisect_right(t_end, rec["t_commit"])
        k_done = bisect.bisect_right(t_end, rec["t_done"])
        j = int(store_row["step"])            # first step (0-based) run after the command was applied
        same_boundary = by_step.get(j, [])
        replaced = same_boundary and same_boundary[-1] != rec["id"]
        rows.append({
            "id": rec["id"], "applied": True,
            "steps_late": j - (k + 1),
            "steps_late_after_return": j - (k_done + 1),
            "ms_commit_to_step_start": (t_start[j] - rec["t_commit"]) * 1e3 if j < len(t_start) else None,
            "ms_enqueue_call": (rec["t_done"] - rec["t_call"]) * 1e3,
            "ms_commit_to_return": (rec["t_done"] - rec["t_commit"]) * 1e3,
            "store_state": store_row.get("state"),
            "used_by_that_step": (j < len(lr_used) and lr_used[j] == value) or bool(replaced),
        })
    ok = [r for r in rows if r["applied"]]
    step_times = [(b - a) * 1e3 for a, b in zip(t_start, t_end)]
    return {
        "commands": len(records),
        "applied": len(ok),
        "on_next_boundary": sum(1 for r in ok if r["steps_late"] <= 0),
        "on_next_boundary_after_return": sum(1 for r in ok if r["steps_late_after_return"] <= 0),
        "steps_late": summarize([r["steps_late"] for r in ok]),
        "steps_late_max": max((r["steps_late"] for r in ok), default=None),
        "ms_commit_to_step_start": summarize([r["ms_commit_to_step_start"] for r in ok
                                              if r["ms_commit_to_step_start"] is not None]),
        "ms_enqueue_call": summarize([r["ms_enqueue_call"] for r in ok]),
        "ms_commit_to_return": summarize([r["ms_commit_to_return"] for r in ok]),
        "store_step_matches": sum(1 for r in ok if r["used_by_that_step"]),
        "store_applied": sum(1 for r in ok if r["store_state"] == "applied"),
        "step_ms": summarize(step_times),
        "steps_run": len(t_start),
        "rows": rows,
    }
