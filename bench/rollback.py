"""4. Rollback latency: from the commit of a ``rollback`` command to the end of the first step
trained on the restored weights, against a plain ``torch.load`` of the same checkpoint file +
``load_state_dict`` (model and optimizer) + one step.

The trainer (this process) trains under ``run.epochs`` / ``run.batches``; epoch 1 is short and
ends with checkpoint #1, after which epochs never end on their own. When the trainer is ready it
first times the plain baseline on its own thread, then tells the other process (``bench.enqueue
rollback``) to queue a rollback to checkpoint #1; that process waits a random fraction of a step,
so the commit lands anywhere inside a step, queues it, and records the commit time. babysit
applies it at the next step boundary (reading and verifying the file), ends the epoch, restores
the state, starts a new branch, and the loop goes on; the first step seen on the new branch ends
the measurement. Then the next round begins.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Iterator

from .common import REPO, Scratch, Workload, mono, now_ns, summarize
from .nudge import _env


def measure(work: Workload, scratch: Scratch, *, reps: int, label: str, settle_steps: int = 20,
            timeout_s: float = 600.0) -> dict[str, Any]:
    import torch

    from babysit import Run

    work.reset()
    model, optimizer, step = work.model, work.optimizer, work.step
    batches = work.batches
    run_dir = scratch.fresh(f"rollback-{label}")
    out = run_dir.parent / f"{run_dir.name}-commands.json"
    run = Run(run_dir, model, optimizer, config={"bench": "rollback"})
    step_ms_guess = 1.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.enqueue", "rollback", str(run_dir), str(out)],
        cwd=REPO, env=_env(), stdin=subprocess.PIPE, text=True,
    )

    def forever() -> Iterator[Any]:
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    baseline: list[dict[str, float]] = []
    firsts: list[dict[str, Any]] = []     # the first step of each new branch
    checkpoint: dict[str, Any] | None = None
    waiting_since: float | None = None
    steps_on_branch = 0
    deadline = time.monotonic() + timeout_s
    step_ms: list[float] = []

    def plain_baseline(path: Any) -> dict[str, float]:
        t0 = now_ns()
        state = torch.load(path, map_location="cpu", weights_only=True)
        t1 = now_ns()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        t2 = now_ns()
        step(batches[0])
        t3 = now_ns()
        return {"load_ms": (t1 - t0) / 1e6, "load_state_dict_ms": (t2 - t1) / 1e6, "step_ms": (t3 - t2) / 1e6,
                "total_ms": (t3 - t0) / 1e6}

    done = False
    for epoch in run.epochs(10**9):
        loader = batches[:4] if epoch == 1 and run.branch == 1 else forever()
        for b in run.batches(loader):
            if steps_on_branch == 0 and waiting_since is not None:
                t_first_start = mono()
            t0 = now_ns()
            run.log(loss=step(b))
            t1 = now_ns()
            step_ms.append((t1 - t0) / 1e6)
            if steps_on_branch == 0 and waiting_since is not None:
                firsts.append({"branch": run.branch, "t_start": t_first_start, "t_end": mono(),
                               "epoch": run.epoch, "step": run.step})
                waiting_since = None
            steps_on_branch += 1
            if epoch == 1 or waiting_since is not None:
                continue
            if checkpoint is None:
                run.checkpointer.wait()
                found = run.store.checkpoints()
                checkpoint = found[0]
                step_ms_guess = summarize(step_ms[-20:])["median"]
            if len(firsts) >= reps or time.monotonic() > deadline:
                done = True
                break
            if steps_on_branch >= settle_steps:
                # Baseline first (on this thread, between two steps), then the rollback.
                baseline.append(plain_baseline(run_dir / checkpoint["file"]))
                assert proc.stdin is not None
                proc.stdin.write(f"go {checkpoint['id']} {step_ms_guess:.3f}\n")
                proc.stdin.flush()
                waiting_since = mono()
        if done:
            break
        steps_on_branch = 0
    assert proc.stdin is not None
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    proc.wait(timeout=30)
    run.close()
    records = json.loads(out.read_text()) if out.exists() else []
    commands = {c["id"]: c for c in run.store.commands()}
    rows = []
    for rec, first in zip(records, firsts):
        row = {
            "ms_commit_to_first_step_end": (first["t_end"] - rec["t_commit"]) * 1e3,
            "ms_commit_to_first_step_start": (first["t_start"] - rec["t_commit"]) * 1e3,
            "ms_first_step": (first["t_end"] - first["t_start"]) * 1e3,
            "new_branch": first["branch"],
            "state": commands.get(rec["id"], {}).get("state"),
            "restored_step": first["step"] - 1,
            "t_commit": rec["t_commit"], "t_end": first["t_end"],
        }
        rows.append(row)
    base_total = [b["total_ms"] for b in baseline]
    latency = [r["ms_commit_to_first_step_end"] for r in rows]
    return {
        "label": label,
        "workload": work.description,
        "state_mb": work.state_bytes / 1e6,
        "checkpoint_file_mb": checkpoint["size"] / 1e6 if checkpoint else None,
        "reps": len(rows),
        "applied": sum(1 for r in rows if r["state"] == "applied"),
        "restored_to_checkpoint_step": sum(1 for r in rows if checkpoint and r["restored_step"] == checkpoint["step"]),
        "ms_rollback": summarize(latency),
        "ms_commit_to_first_step_start": summarize([r["ms_commit_to_first_step_start"] for r in rows]),
        "ms_plain_load_plus_step": summarize(base_total),
        "ms_plain_parts": {k: summarize([b[k] for b in baseline]) for k in ("load_ms", "load_state_dict_ms", "step_ms")},
        "ratio_rollback_over_plain": summarize([a / b for a, b in zip(latency, base_total)]),
        "step_ms": summarize(step_ms),
        "step_ms_guess": step_ms_guess,
        "rows": rows,
        "baseline": baseline,
    }
