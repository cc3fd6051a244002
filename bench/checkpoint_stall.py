"""3. Checkpoint stall: how long the training thread is blocked by an end-of-epoch checkpoint.

A babysat loop runs epochs of one step each. The stall is the time from the end of an epoch's
last step to the start of the next epoch's body, which is everything ``run.epochs`` does at the
boundary: record the epoch, snapshot model + optimizer + RNG states (``Run._snapshot``:
``clone_tree`` of the state dicts) and hand the snapshot to the background writer. Inside each
epoch, in an order rotated every epoch, the same state is also

- saved with a plain synchronous ``torch.save({model, optimizer, rng}, path)`` (what a loop
  without babysit would block on; no fsync), and
- copied in memory: ``clone_tree`` of both state dicts plus ``rng_state()`` (the least a
  consistent snapshot can cost), and, for reference, ``clone()`` of the tensors alone.

The background write then competes with training for the CPU and the GIL. That cost is reported
separately: the extra time of the steps taken while the write was in flight, against steps taken
after it finished.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .common import Scratch, Workload, now_ns, summarize


def _tensors(obj: Any, out: list[Any]) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, out)
    return out


def measure(work: Workload, scratch: Scratch, *, reps: int, label: str, max_concurrent_steps: int = 200) -> dict[str, Any]:
    import torch

    from babysit import Run
    from babysit.checkpoint import clone_tree, rng_state

    work.reset()
    model, optimizer, step = work.model, work.optimizer, work.step
    batch = work.batches[0]
    run_dir = scratch.fresh(f"ckpt-{label}")
    plain_path = run_dir.parent / f"{run_dir.name}-plain.pt"
    run = Run(run_dir, model, optimizer, config={"bench": "checkpoint"}, keep_last=2)

    def plain_save() -> float:
        t0 = now_ns()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}, plain_path)
        return (now_ns() - t0) / 1e6

    def state_copy() -> float:
        t0 = now_ns()
        clone_tree({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        rng_state()
        return (now_ns() - t0) / 1e6

    def raw_clone() -> float:
        tensors = _tensors({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, [])
        t0 = now_ns()
        copies = [t.clone() for t in tensors]
        elapsed = (now_ns() - t0) / 1e6
        del copies
        return elapsed

    variants: dict[str, Callable[[], float]] = {"torch_save": plain_save, "state_copy": state_copy, "tensor_clone": raw_clone}
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    results.update(stall=[], write_ms=[], steps_during_write=[], extra_ms_during_write=[], step_ms_quiet=[])
    queue = run.checkpointer._queue  # read-only peek: is a snapshot still being written?
    t_end: int | None = None
    for epoch in run.epochs(reps + 2):
        t_start = now_ns()
        measured = epoch >= 3  # epoch 2's boundary is the first snapshot: warm-up
        if t_end is not None and measured:
            results["stall"].append((t_start - t_end) / 1e6)
        # Train while the snapshot is written in the background; then the same number of steps
        # (at least 3) with nothing in the background, as the reference step time.
        during = []
        while queue.unfinished_tasks and len(during) < max_concurrent_steps:
            t0 = now_ns()
            step(batch)
            during.append((now_ns() - t0) / 1e6)
        run.checkpointer.wait()
        write_ms = (now_ns() - t_start) / 1e6
        quiet = []
        for _ in range(max(3, len(during))):
            t0 = now_ns()
            step(batch)
            quiet.append((now_ns() - t0) / 1e6)
        if epoch >= 2:
            k = epoch % len(names)
            for name in names[k:] + names[:k]:
                results[name].append(variants[name]())
        if measured:
            quiet_median = summarize(quiet)["median"]
            results["write_ms"].append(write_ms)
            results["steps_during_write"].append(len(during))
            results["extra_ms_during_write"].append(sum(d - quiet_median for d in during))
            results["step_ms_quiet"].append(quiet_median)
        for b in run.batches([batch]):
            run.log(loss=step(b))
        run.writer.flush()  # keep the writer thread's periodic flush out of the boundary below
        t_end = now_ns()
    run.close()
    sizes = [c["size"] for c in run.store.checkpoints(include_deleted=True)]
    plain_size = plain_path.stat().st_size if plain_path.exists() else None
    plain_path.unlink(missing_ok=True)
    # Drop the epoch-2 copies of the variants so every list pairs with a measured stall.
    for name in names:
        results[name] = results[name][1:]
    stall = results["stall"]
    out: dict[str, Any] = {
        "label": label,
        "workload": work.description,
        "state_mb": work.state_bytes / 1e6,
        "checkpoint_file_mb": (sizes[-1] / 1e6) if sizes else None,
        "plain_file_mb": plain_size / 1e6 if plain_size else None,
        "reps": len(stall),
        "ms": {name: summarize(values) for name, values in results.items()},
        "stall_over_state_copy": summarize([s / c for s, c in zip(stall, results["state_copy"])]),
        "stall_over_tensor_clone": summarize([s / c for s, c in zip(stall, results["tensor_clone"])]),
        "stall_over_torch_save": summarize([s / c for s, c in zip(stall, results["torch_save"])]),
        "raw": results,
    }
    return out


def disk_free_gb(path: os.PathLike[str] | str) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 1e9

