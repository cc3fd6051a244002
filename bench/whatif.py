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
import threading
import types
from pathlib import Path
from typing import Any, Callable, Iterator

from .common import Scratch, Workload, interleave, mono, now_ns, summarize


@contextlib.contextmanager
def timed_calls(targets: list[tuple[Any, str, str]]) -> Iterator[dict[str, list[tuple[float, float, bool]]]]:
    """Wrap ``getattr(owner, attr)`` to record each call as (start on CLOCK_MONOTONIC, duration in
    ms, made on the main thread?) under ``label``."""
    times: dict[str, list[tuple[float, float, bool]]] = {label: [] for _, _, label in targets}
    main = threading.main_thread()
    saved = []
    for owner, attr, label in targets:
        if attr not in (owner.__dict__ if isinstance(owner, type) else vars(owner)):
            continue  # babysit changed: this function is gone (its row stays empty)
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        saved.append((owner, attr, original))
        func = original.__func__ if isinstance(original, staticmethod) else original

        def wrapper(*args: Any, __f: Callable[..., Any] = func, __l: str = label, **kwargs: Any) -> Any:
            start, t0 = mono(), now_ns()
            try:
                return __f(*args, **kwargs)
            finally:
                times[__l].append((start, (now_ns() - t0) / 1e6, threading.current_thread() is main))

        setattr(owner, attr, staticmethod(wrapper) if isinstance(original, staticmethod) else wrapper)
    try:
        yield times
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


# -- W1, W2: the metrics writer ------------------------------------------------------------------
def writer_flush(scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    """µs per logged step (3 metrics, one a fresh 0-d tensor) spent in ``MetricsWriter.flush``:
    the writer as it is; with the prototype ``to_float`` (``bench/prototypes.py: fast_to_float``,
    patched into ``babysit.writer`` during its own blocks only); and with the loss logged as a
    float (``loss.item()`` on the training thread, not timed here: ≈ 0.5 µs)."""
    import torch

    from babysit import Run
    from babysit import writer as writer_module

    from .prototypes import fast_to_float

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    group = optimizer.param_groups[0]
    original = writer_module.to_float
    variants = {"current": (original, False), "prototype to_float (.item())": (fast_to_float, False),
                "current, loss logged as loss.item()": (original, True)}
    runs = {name: Run(scratch.fresh("flush"), model, optimizer, config={}, flush_interval=3600) for name in variants}

    def block(name: str) -> Callable[[int], float]:
        run = runs[name]
        convert, as_float = variants[name]

        def go(_: int) -> float:
            for _i in range(steps):
                run.position.step += 1
                loss = torch.tensor(2.3) * 1.0
                run.log(loss=loss.item() if as_float else loss, lr=group["lr"], momentum=group["momentum"])
            writer_module.to_float = convert
            try:
                t0 = now_ns()
                run.writer.flush()
                return (now_ns() - t0) / steps / 1e3
            finally:
                writer_module.to_float = original
        return go

    try:
        raw = interleave({name: block(name) for name in runs}, rounds=rounds)
    finally:
        writer_module.to_float = original
    same = len({tuple(sorted((s.name, r.store.series_extent(s.id)) for s in r.store.series())) for r in runs.values()}) == 1
    for run in runs.values():
        run.close()
    return {"us_per_step": {name: summarize(v) for name, v in raw.items()}, "steps_per_flush": steps,
            "rounds": rounds, "same_store_content": same}


def step_with_prototype_writer(work: Workload, scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    """The reference step bare, babysat as it is, and babysat with the prototype ``to_float``
    (same block design as section 1; the patch is in place only during its own blocks)."""
    from babysit import writer as writer_module

    from .prototypes import fast_to_float
    from .step_overhead import Babysat, _analyse, _row, babysit_block, cpu_ns

    group = work.optimizer.param_groups[0]
    data = [work.batches[i % len(work.batches)] for i in range(steps)]
    step = work.step
    original = writer_module.to_float

    def log3(run: Any, loss: Any) -> None:
        run.log(loss=loss, lr=group["lr"], momentum=group["momentum"])

    def bare(_: int) -> dict[str, float]:
        work.reset()
        marks: list[int] = []
        c0, t0 = cpu_ns(), now_ns()
        for b in data:
            marks.append(now_ns())
            step(b)
        t1 = now_ns()
        return _row(steps, t0, t1, t1, c0, cpu_ns(), marks)

    tools = [Babysat(scratch, work.model, work.optimizer), Babysat(scratch, work.model, work.optimizer)]

    def babysat(tool: Any, convert: Any) -> Callable[[int], dict[str, float]]:
        def go(_: int) -> dict[str, float]:
            work.reset()
            writer_module.to_float = convert
            try:
                return babysit_block(tool, data, step, steps, log3)
            finally:
                writer_module.to_float = original
        return go

    try:
        raw = interleave({"bare": bare, "babysit": babysat(tools[0], original),
                          "babysit_prototype_writer": babysat(tools[1], fast_to_float)}, rounds=rounds)
    finally:
        writer_module.to_float = original
        for tool in tools:
            tool.close()
    result = _analyse(raw)
    result.pop("raw")
    result.update(steps_per_block=steps, rounds=rounds)
    return result


# -- W3: the checkpoint stall, taken apart ------------------------------------------------------
def stall_anatomy(work: Workload, scratch: Scratch, *, epochs: int) -> dict[str, Any]:
    """Time babysit's pieces of an epoch-end boundary (training thread only).

    The boundary once called ``rng_state()`` a second time for the next epoch, right after the
    snapshot had woken the writer thread, and lost up to a 5 ms GIL switch interval there; the next
    epoch now starts from the snapshot's own RNG state. This shows what is left.
    """
    from babysit import Run
    from babysit import snapshots as snapshots_module
    from babysit import store as store_module

    targets = [(snapshots_module, "rng_state", "rng_state"), (snapshots_module.Snapshots, "take", "Snapshots.take"),
               (snapshots_module.Snapshots, "end_epoch", "Snapshots.end_epoch"),
               (snapshots_module, "clone_tree", "clone_tree"),
               (store_module.RunStore, "add_epoch", "store.add_epoch"),
               (store_module.RunStore, "pending_commands", "store.pending_commands")]
    work.reset()
    stalls: list[float] = []
    windows: list[tuple[float, float]] = []
    with timed_calls(targets) as times:
        run = Run(scratch.fresh("anat"), work.model, work.optimizer, config={}, keep_last=2)
        batch = work.batches[0]
        t_end = m_end = None
        for epoch in run.epochs(epochs + 2):
            t_start, m_start = now_ns(), mono()
            if t_end is not None and epoch >= 3:
                stalls.append((t_start - t_end) / 1e6)
                windows.append((m_end, m_start))
            while run.checkpointer._queue.unfinished_tasks:   # train while the snapshot is written
                work.step(batch)
            run.checkpointer.wait()
            for b in run.batches([batch]):
                run.log(loss=work.step(b))
            run.writer.flush()
            t_end, m_end = now_ns(), mono()
        run.close()
    parts: dict[str, list[float]] = {}
    for label, rows in times.items():
        parts[label] = [ms for start, ms, is_main in rows if is_main and any(a <= start <= b for a, b in windows)]
    n = max(1, len(windows))
    return {"as_is": {"stall_ms": summarize(stalls), "parts_ms": {k: summarize(v) for k, v in parts.items()},
                      "calls_per_boundary": {k: len(v) / n for k, v in parts.items()}}}


# -- W4: rollback, taken apart ----------------------------------------------------------------
def rollback_anatomy(work: Workload, scratch: Scratch, *, reps: int) -> dict[str, Any]:
    from babysit import checkpoint as ckpt
    from babysit import run as run_module
    from babysit import store as store_module
    from babysit import writer as writer_module

    from . import rollback

    S, R = store_module.RunStore, run_module.Run
    targets = [
        (run_module, "read_verified", "read_verified (SHA-256 + torch.load of the file)"),
        (R, "_load_state", "Run._load_state (load_state_dict, RNG)"),
        (R, "_finish_rollback", "Run._finish_rollback (all of it)"),
        (R, "_apply", "Run._apply (validate + read_verified)"),
        (writer_module.MetricsWriter, "flush", "writer.flush"),
        (S, "new_branch", "store.new_branch"), (S, "write_status", "store.write_status"),
        (S, "add_event", "store.add_event"), (S, "finish_command", "store.finish_command"),
        (S, "checkpoint", "store.checkpoint (lookup)"), (S, "pending_commands", "store.pending_commands"),
        (run_module, "rng_state", "rng_state"),
    ]
    with timed_calls(targets) as times:
        result = rollback.measure(work, scratch, reps=reps, label="anatomy")
    windows = [(r["t_commit"], r["t_end"]) for r in result["rows"]]
    per_rollback: dict[str, Any] = {}
    for label, rows in times.items():
        totals = [sum(ms for start, ms, is_main in rows if is_main and a <= start <= b) for a, b in windows]
        per_rollback[label] = summarize(totals)
    return {"reps": result["reps"], "ms_rollback": result["ms_rollback"],
            "ms_plain_load_plus_step": result["ms_plain_load_plus_step"],
            "ms_plain_parts": result["ms_plain_parts"],
            "ms_per_rollback": per_rollback,
            "note": "training-thread time per rollback spent in each function, between the commit and the end of "
                    "the first restored step; the functions nest, so the lines overlap"}


# -- W5: dashboard read with a covering index ---------------------------------------------------
def summary_index(out: Path, n_steps: int, *, rounds: int) -> dict[str, Any]:
    """``chunk_summaries`` of the three series on the run database as babysit builds it, and on
    a copy with a covering index over the summary columns (so SQLite reads the index's small
    rows instead of the table's, whose rows carry the three blobs of every chunk)."""
    from babysit.store import RunStore

    from . import dashboard
    from .prototypes import SUMMARY_INDEX, sql_bucket_window

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

        def block(name: str, how: str) -> Callable[[int], float]:
            def go(_: int) -> float:
                store = stores[name]
                t0 = now_ns()
                for sid in ids[name]:
                    if how == "full":
                        dashboard.bench_read_window(store, sid, None, None, dashboard.MAX_POINTS)
                    elif how == "sql":
                        sql_bucket_window(store, sid, None, None, dashboard.MAX_POINTS)
                    else:
                        store.chunk_summaries(sid)
                return (now_ns() - t0) / 1e6
            return go

        raw = interleave({"summaries_as_is": block("as_is", "summaries"),
                          "summaries_covering_index": block("covering_index", "summaries"),
                          "full_view_read_as_is": block("as_is", "full"),
                          "full_view_read_covering_index": block("covering_index", "full"),
                          "full_view_sql_buckets_covering_index": block("covering_index", "sql")}, rounds=rounds)
        # The SQL-bucket view must keep the same extremes as the bench's own downsampler.
        same_extremes = True
        for sid in ids["covering_index"]:
            a_steps, a_vals = dashboard.bench_read_window(stores["as_is"], sid, None, None, dashboard.MAX_POINTS)
            b_steps, b_vals = sql_bucket_window(stores["covering_index"], sid, None, None, dashboard.MAX_POINTS)
            same_extremes &= bool(len(b_vals) <= dashboard.MAX_POINTS and a_vals.max() == b_vals.max()
                                  and a_vals.min() == b_vals.min())
            if sid == ids["covering_index"][0]:
                points_sql = int(len(b_steps))
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
            "sql_buckets_same_extremes": same_extremes, "sql_buckets_points_first_series": points_sql,
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


# -- W7: loading a large checkpoint ---------------------------------------------------------------
def checkpoint_load(work: Workload, scratch: Scratch, *, reps: int) -> dict[str, Any]:
    """The ways to load the large model's checkpoint file, interleaved: babysit's ``read_verified``
    (hash and decode, see babysit/checkpoint.py), a plain ``torch.load`` of the path, the same with
    ``mmap=True`` (lazy: pages are read when the tensors are used), and the hash alone."""
    import hashlib

    import torch

    from babysit.checkpoint import FORMAT, KEY_FORMAT, read_verified, rng_state, write_atomic

    path = scratch.fresh("load") / "big.pt"
    sha, size = write_atomic(path, {KEY_FORMAT: FORMAT, "model": work.model.state_dict(),
                                    "optimizer": work.optimizer.state_dict(), "rng": rng_state()})

    def timed(fn: Callable[[], Any]) -> Callable[[int], float]:
        def go(_: int) -> float:
            t0 = now_ns()
            result = fn()
            elapsed = (now_ns() - t0) / 1e6
            del result
            return elapsed
        return go

    def sha256_file() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    raw = interleave({
        "read_verified (babysit)": timed(lambda: read_verified(path, sha)),
        "torch.load(path)": timed(lambda: torch.load(path, map_location="cpu", weights_only=True)),
        "torch.load(path, mmap=True)": timed(lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=True)),
        "sha256 of the file alone": timed(sha256_file),
        "read the file into memory": timed(path.read_bytes),
    }, rounds=reps)
    path.unlink(missing_ok=True)
    return {"file_mb": size / 1e6, "ms": {k: summarize(v) for k, v in raw.items()}, "reps": reps}
