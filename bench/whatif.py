"""Profiling and what-if measurements for the targets that the suite finds missed.

Each one either takes a target's time apart (timing wrappers around babysit's own functions,
installed only for that measurement) or measures a prototype fix from ``bench/prototypes.py``
side by side with the code as it is, interleaved like everything else. Nothing in ``babysit/``
is changed: prototypes are patched onto single instances or run against a copy of a database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator

from .common import Scratch, Workload, interleave, now_ns, summarize


@contextlib.contextmanager
def timed_calls(targets: list[tuple[Any, str, str]]) -> Iterator[dict[str, list[float]]]:
    """Wrap ``getattr(owner, attr)`` to record each call's duration (ms) under ``label``."""
    times: dict[str, list[float]] = {label: [] for _, _, label in targets}
    saved = []
    for owner, attr, label in targets:
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        saved.append((owner, attr, original))
        func = original.__func__ if isinstance(original, staticmethod) else original

        def wrapper(*args: Any, __f: Callable[..., Any] = func, __l: str = label, **kwargs: Any) -> Any:
            t0 = now_ns()
            try:
                return __f(*args, **kwargs)
            finally:
                times[__l].append((now_ns() - t0) / 1e6)

        setattr(owner, attr, staticmethod(wrapper) if isinstance(original, staticmethod) else wrapper)
    try:
        yield times
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


# -- W1, W2: the metrics writer ------------------------------------------------------------------
def writer_flush(scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    """µs per logged step (3 metrics, one a fresh 0-d tensor) spent in ``MetricsWriter.flush``,
    for the writer as it is and for the two prototypes, ``steps`` steps per flush."""
    import torch

    from babysit import Run

    from .prototypes import columnar_flush_locked, fast_flush_locked

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    group = optimizer.param_groups[0]
    patches = {"current": None, "prototype_fast": fast_flush_locked, "prototype_columnar": columnar_flush_locked}
    runs = {}
    for name, patch in patches.items():
        run = Run(scratch.fresh("flush"), model, optimizer, config={}, flush_interval=3600)
        if patch is not None:
            run.writer._flush_locked = types.MethodType(patch, run.writer)
        runs[name] = run

    def block(name: str) -> Callable[[int], float]:
        run = runs[name]

        def go(_: int) -> float:
            for _i in range(steps):
                run.step += 1
                run.log(loss=torch.tensor(2.3) * 1.0, lr=group["lr"], momentum=group["momentum"])
            t0 = now_ns()
            run.writer.flush()
            return (now_ns() - t0) / steps / 1e3
        return go

    raw = interleave({name: block(name) for name in runs}, rounds=rounds)
    same = len({tuple(sorted((s.name, r.store.series_extent(s.id)) for s in r.store.series())) for r in runs.values()}) == 1
    for run in runs.values():
        run.close()
    return {"us_per_step": {name: summarize(v) for name, v in raw.items()}, "steps_per_flush": steps,
            "rounds": rounds, "same_store_content": same}


def step_with_prototype_writer(work: Workload, scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    """The reference step bare, babysat as it is, and babysat with the columnar writer."""
    from babysit import Run

    from .prototypes import columnar_flush_locked
    from .step_overhead import _analyse, _row, cpu_ns

    group = work.optimizer.param_groups[0]
    data = [work.batches[i % len(work.batches)] for i in range(steps)]
    step = work.step

    def bare(_: int) -> dict[str, float]:
        work.reset()
        c0, t0 = cpu_ns(), now_ns()
        for b in data:
            step(b)
        t1 = now_ns()
        return _row(steps, t0, t1, t1, c0, cpu_ns())

    def babysat(patch: Any) -> Callable[[int], dict[str, float]]:
        def go(_: int) -> dict[str, float]:
            work.reset()
            run_dir = scratch.fresh("wi")
            run = Run(run_dir, work.model, work.optimizer, config={})
            if patch is not None:
                run.writer._flush_locked = types.MethodType(patch, run.writer)
            c0, t0 = cpu_ns(), now_ns()
            for b in run.batches(data):
                loss = step(b)
                run.log(loss=loss, lr=group["lr"], momentum=group["momentum"])
            t1 = now_ns()
            run.writer.flush()
            t2 = now_ns()
            c2 = cpu_ns()
            run.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            return _row(steps, t0, t1, t2, c0, c2)
        return go

    raw = interleave({"bare": bare, "babysit": babysat(None), "babysit_prototype_writer": babysat(columnar_flush_locked)},
                     rounds=rounds)
    result = _analyse(raw)
    result.pop("raw")
    result.update(steps_per_block=steps, rounds=rounds)
    return result


# -- W3: the checkpoint stall, taken apart ------------------------------------------------------
def stall_anatomy(work: Workload, scratch: Scratch, *, epochs: int) -> dict[str, Any]:
    """Time babysit's pieces of an epoch-end boundary, and the stall when the background writer
    cannot start until 50 ms after the snapshot (to show what its competition for the GIL costs)."""
    from babysit import Run
    from babysit import checkpoint as ckpt
    from babysit import run as run_module
    from babysit import store as store_module

    out: dict[str, Any] = {}
    for mode in ("as_is", "writer_delayed_50ms", "as_is_again", "writer_delayed_50ms_again"):
        work.reset()
        targets = [(run_module, "rng_state", "rng_state"), (run_module.Run, "_snapshot", "_snapshot"),
                   (run_module.Run, "_end_epoch", "_end_epoch"), (run_module, "clone_tree", "clone_tree"),
                   (store_module.RunStore, "add_epoch", "store.add_epoch"),
                   (store_module.RunStore, "pending_commands", "store.pending_commands")]
        original_write = ckpt.AsyncCheckpointer._write
        if mode.startswith("writer_delayed"):
            def delayed_write(self: Any, job: Any, __w: Any = original_write) -> None:
                time.sleep(0.05)  # sleeping holds no GIL: the boundary runs alone
                __w(self, job)
            ckpt.AsyncCheckpointer._write = delayed_write  # type: ignore[method-assign]
        try:
            with timed_calls(targets) as times:
                run = Run(scratch.fresh("anat"), work.model, work.optimizer, config={}, keep_last=2)
                batch = work.batches[0]
                stalls = []
                t_end = None
                for epoch in run.epochs(epochs + 2):
                    t_start = now_ns()
                    if t_end is not None and epoch >= 3:
                        stalls.append((t_start - t_end) / 1e6)
                    time.sleep(0.06)
                    run.checkpointer.wait()
                    for b in run.batches([batch]):
                        run.log(loss=work.step(b))
                    run.writer.flush()
                    t_end = now_ns()
                run.close()
        finally:
            ckpt.AsyncCheckpointer._write = original_write  # type: ignore[method-assign]
        # Per boundary (the first two epochs are warm-up).
        skip = 2
        out[mode] = {"stall_ms": summarize(stalls),
                     "parts_ms": {k: summarize(v[skip:]) for k, v in times.items()},
                     "calls_per_boundary": {k: len(v) / (epochs + 2) for k, v in times.items()}}
    return out


# -- W4: rollback, taken apart ----------------------------------------------------------------
def rollback_anatomy(work: Workload, scratch: Scratch, *, reps: int) -> dict[str, Any]:
    from babysit import checkpoint as ckpt
    from babysit import run as run_module
    from babysit import store as store_module
    from babysit import writer as writer_module

    from . import rollback

    S, R = store_module.RunStore, run_module.Run
    targets = [
        (run_module, "read_verified", "read_verified (read file + sha256 + torch.load)"),
        (R, "_load_state", "Run._load_state (load_state_dict, RNG)"),
        (R, "_finish_rollback", "Run._finish_rollback (all of it)"),
        (R, "_apply", "Run._apply (validate + read_verified)"),
        (ckpt.AsyncCheckpointer, "wait", "checkpointer.wait"),
        (writer_module.MetricsWriter, "forget_branch", "writer.forget_branch (a flush)"),
        (S, "new_branch", "store.new_branch"), (S, "write_status", "store.write_status"),
        (S, "add_event", "store.add_event"), (S, "finish_command", "store.finish_command"),
        (S, "checkpoint", "store.checkpoint (lookup)"), (S, "pending_commands", "store.pending_commands"),
        (run_module, "rng_state", "rng_state"),
    ]
    with timed_calls(targets) as times:
        result = rollback.measure(work, scratch, reps=reps, label="anatomy")
    n = max(1, result["reps"])
    per_rollback = {k: sum(v) / n for k, v in times.items()}
    return {"reps": result["reps"], "ms_rollback": result["ms_rollback"],
            "ms_plain_load_plus_step": result["ms_plain_load_plus_step"],
            "ms_plain_parts": result["ms_plain_parts"],
            "ms_per_rollback": per_rollback,
            "note": "sums per rollback include the calls made by the trainer's ordinary steps and by the writer "
                    "thread (write_status on every flush), so the small store entries overcount slightly"}


# -- W5: dashboard read with a covering index ---------------------------------------------------
def summary_index(out: Path, n_steps: int, *, rounds: int) -> dict[str, Any]:
    """``chunk_summaries`` of the three series on the run database as babysit builds it, and on
    a copy with a covering index over the summary columns (so SQLite reads the index's small
    rows instead of the table's, whose rows carry the three blobs of every chunk)."""
    from babysit.store import RunStore

    from . import dashboard
    from .prototypes import SUMMARY_INDEX

    source = dashboard.db_dir(out / "dash-cache", n_steps)
    if not (source / "bench-data.json").exists():
        dashboard.build_db(out / "dash-cache", n_steps)
    copy = Path(tempfile.mkdtemp(prefix="idx-", dir=out))
    try:
        for f in source.iterdir():
            if f.is_file() and f.suffix not in (".lock",):
                shutil.copy2(f, copy / f.name)
        with sqlite3.connect(copy / "run.db") as connection:
            connection.execute(SUMMARY_INDEX)
        stores = {"as_is": RunStore(source), "covering_index": RunStore(copy)}
        ids = {name: [s.id for s in st.series()] for name, st in stores.items()}

        def block(name: str, full: bool) -> Callable[[int], float]:
            def go(_: int) -> float:
                store = stores[name]
                t0 = now_ns()
                for sid in ids[name]:
                    if full:
                        dashboard.bench_read_window(store, sid, None, None, dashboard.MAX_POINTS)
                    else:
                        store.chunk_summaries(sid)
                return (now_ns() - t0) / 1e6
            return go

        raw = interleave({"summaries_as_is": block("as_is", False), "summaries_covering_index": block("covering_index", False),
                          "full_view_read_as_is": block("as_is", True),
                          "full_view_read_covering_index": block("covering_index", True)}, rounds=rounds)
        plan = stores["covering_index"].conn().execute(
            "EXPLAIN QUERY PLAN SELECT first_step, last_step, n, vmin, vmax, vsum, min_step, max_step, first_wall,"
            " last_wall FROM chunks WHERE series = ? AND first_step >= ? AND first_step <= ? ORDER BY first_step",
            (1, 0, 2**62)).fetchall()
        size_as_is = (source / "run.db").stat().st_size
        size_index = (copy / "run.db").stat().st_size
        for st in stores.values():
            st.close()
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {"n_steps": n_steps, "ms_three_series": {k: summarize(v) for k, v in raw.items()},
            "query_plan_with_index": [str(row[-1]) for row in plan],
            "db_mb_as_is": size_as_is / 1e6, "db_mb_with_index": size_index / 1e6, "rounds": rounds}


# -- W6: the commit → signal window of a command -------------------------------------------------
def ring_cost(scratch: Scratch, *, reps: int) -> dict[str, Any]:
    """``CommandSignal.ring`` (open, write 8 random bytes, close) against a write to a file
    descriptor kept open: the window during which a committed command is not yet signalled."""
    from babysit.store import CommandSignal

    path = scratch.fresh("ring") / "commands.signal"
    path.write_bytes(b"\0" * 8)
    fd = os.open(path, os.O_WRONLY)

    def ring(_: int) -> float:
        t0 = now_ns()
        CommandSignal.ring(path)
        return (now_ns() - t0) / 1e3

    def pwrite(_: int) -> float:
        t0 = now_ns()
        os.pwrite(fd, os.urandom(8), 0)
        return (now_ns() - t0) / 1e3

    raw = interleave({"ring_as_is": ring, "pwrite_open_fd": pwrite}, rounds=reps)
    os.close(fd)
    return {"us": {k: summarize(v) for k, v in raw.items()}, "reps": reps}
