"""5. Dashboard refresh: server-side time to read a window of a run's series from the store,
downsample it to at most ``max_points`` per trace (min/max per bucket, so spikes survive), and
build and serialise the Plotly figure; and the reading process's memory, for runs of 10 k, 100 k
and 1 M logged steps.

The run databases are built directly with ``RunStore.write_chunks`` (chunks of 256 points, three
per-step series: loss with injected spikes and dips, lr, momentum) and cached under
``<out>/dash-cache``. Each measurement runs in a fresh process (``python -m bench.dashboard
worker ...``) so that its memory is that of one dashboard reading one run; the sizes' processes
are interleaved, round after round.

What is timed is the dashboard's own code, exactly as ``babysit/ui/page.py: chart`` runs it:
``babysit.ui.data.read_view`` (every series, markers, branches, epochs), then
``babysit.ui.figures.build_figure``, then ``babysit.ui.live_chart.figure_json`` (the payload sent
to the browser). :func:`refresh` is the one place that names them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import REPO, summarize

DB_VERSION = 2                  # bump when the generated data changes
MAX_POINTS = 5_000              # per trace, the target
TAIL_STEPS = 10_000             # the "live" view: the last 10 k steps
NEW_ROWS_STEPS = 500            # an incremental refresh: what ~1 s of training adds
SERIES = ("loss", "lr", "momentum")
N_SPIKES, N_DIPS = 20, 10


# -- run databases --------------------------------------------------------------------------------
def db_dir(cache: Path, n_steps: int) -> Path:
    return cache / f"steps-{n_steps}-v{DB_VERSION}"


def build_db(cache: Path, n_steps: int, seed: int = 0) -> dict[str, Any]:
    """Create (or reuse) a run database with ``n_steps`` steps of three series."""
    from babysit.store import CHUNK_POINTS, PER_STEP, RunStore

    path = db_dir(cache, n_steps)
    marker = path / "bench-data.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        info["built_now"] = False
        return info
    if path.exists():
        for f in path.iterdir():
            f.unlink()
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n_steps + 1, dtype=np.int64)
    walls = 1.7e9 + steps * 5e-4
    loss = 2.3 * np.exp(-steps / (0.3 * n_steps)) + 0.1 + 0.05 * rng.standard_normal(n_steps)
    loss = np.abs(loss)
    # Spikes and dips at random, well separated steps (at least n/1200 apart, so two never share
    # a bucket of the 5 000-point view), each value distinct, so a reader can check every one.
    grid = n_steps // 1201
    where = np.sort(rng.choice(np.arange(1, 1201), size=N_SPIKES + N_DIPS, replace=False)) * grid
    spike_at = [int(s) for i, s in enumerate(where) if i % 3 != 2]
    dip_at = [int(s) for i, s in enumerate(where) if i % 3 == 2]
    for i, s in enumerate(spike_at):
        loss[s - 1] = 50.0 + i
    for i, s in enumerate(dip_at):
        loss[s - 1] = -10.0 - i
    lr = np.where(steps < n_steps // 2, 0.05, 0.01)
    momentum = np.full(n_steps, 0.9)
    store = RunStore(path, create=True)
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.write_status(state="finished", epoch=1, step=n_steps, step_in_epoch=n_steps, steps_per_epoch=n_steps,
                       max_epochs=1, branch=branch, lr=float(lr[-1]), momentum=0.9, message="bench data",
                       heartbeat=float(walls[-1]), started=float(walls[0]))
    ids = {name: store.series_id(name, branch, PER_STEP) for name in SERIES}
    batch: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for name, values in (("loss", loss), ("lr", lr), ("momentum", momentum)):
        for k in range(0, n_steps, CHUNK_POINTS):
            batch.append((ids[name], steps[k:k + CHUNK_POINTS], values[k:k + CHUNK_POINTS], walls[k:k + CHUNK_POINTS]))
            if len(batch) >= 512:
                store.write_chunks(batch)
                batch = []
    store.write_chunks(batch)
    store.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    info = {"n_steps": n_steps, "series": ids, "spikes": spike_at, "dips": dip_at,
            "db_mb": (path / "run.db").stat().st_size / 1e6, "build_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(info))
    info["built_now"] = True
    return info


# -- the worker: one dashboard process reading one run ------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    """VmHWM: this process's peak RSS since its exec (ru_maxrss would carry the parent's peak over)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3
    return float("nan")


def refresh(store: Any, lo: float | None, hi: float | None, max_points: int
            ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Callable[[], Any], Callable[[Any], str]]:
    """One refresh of the chart as the page makes it: the traces read (for the checks), and the
    figure builder and serialiser to time after the read."""
    from babysit.ui.data import read_view
    from babysit.ui.figures import ChartOptions, build_figure
    from babysit.ui.live_chart import figure_json

    view = read_view(store, store.status(), lo, hi, max_points)
    traces = {w.name: (w.steps, w.values) for w in view.windows if not w.superseded}
    return traces, lambda: build_figure(view, ChartOptions()), figure_json


def worker(path: Path, reps: int, max_points: int) -> dict[str, Any]:
    # Imported before the baseline, as a dashboard has them: streamlit, the chart component, plotly.
    from babysit.store import RunStore
    from babysit.ui.live_chart import figure_json

    info = json.loads((path / "bench-data.json").read_text())
    n = info["n_steps"]
    figure_json({"data": [{"x": np.arange(3), "y": np.arange(3.0)}], "layout": {}})  # plotly's lazy imports
    rss_base = _rss_mb()
    t_open = time.perf_counter()
    store = RunStore(path)
    ids = {s.name: s.id for s in store.series()}
    open_ms = (time.perf_counter() - t_open) * 1e3
    views = {"full": (None, None), "tail": (max(0, n - TAIL_STEPS), None), "new_rows": (max(0, n - NEW_ROWS_STEPS), None)}
    timings: dict[str, dict[str, list[float]]] = {v: {"read_ms": [], "figure_ms": [], "json_ms": [], "total_ms": []} for v in views}
    cold: dict[str, float] = {}
    points: dict[str, dict[str, int]] = {}
    json_kb: dict[str, float] = {}
    trace_points: dict[str, int] = {}
    spikes_kept: dict[str, Any] = {}
    for rep in range(reps + 1):
        for view, (lo, hi) in views.items():
            t0 = time.perf_counter()
            traces, make_figure, to_json = refresh(store, lo, hi, max_points)
            t1 = time.perf_counter()
            fig = make_figure()
            t2 = time.perf_counter()
            payload = to_json(fig)
            t3 = time.perf_counter()
            if rep == 0:
                cold[view] = (t3 - t0) * 1e3
                points[view] = {name: int(len(traces[name][0])) for name in SERIES if name in traces}
                json_kb[view] = len(payload) / 1e3
                trace_points[view] = max((len(t.get("x") if t.get("x") is not None else []) for t in fig["data"]),
                                         default=0)
                steps, values = traces["loss"]
                # The dashboard's own windows keep the last point before lo (so a stepwise series
                # starts at the left edge); count spikes in the window itself.
                spike_in = [s for s in info["spikes"] if lo is None or s >= lo]
                dip_in = [s for s in info["dips"] if lo is None or s >= lo]
                inside = values if lo is None else values[steps >= lo]
                have = dict(zip(steps.tolist(), values.tolist()))
                spikes_kept[view] = {
                    "spikes": len(spike_in), "spikes_kept": sum(1 for s in spike_in if s in have and have[s] >= 50),
                    "dips": len(dip_in), "dips_kept": sum(1 for s in dip_in if s in have and have[s] <= -10),
                    "max_matches_raw": bool(len(inside) and float(np.max(inside)) == _raw_extreme(store, ids["loss"], lo, np.max)),
                    "min_matches_raw": bool(len(inside) and float(np.min(inside)) == _raw_extreme(store, ids["loss"], lo, np.min)),
                }
                continue
            for key, value in (("read_ms", t1 - t0), ("figure_ms", t2 - t1), ("json_ms", t3 - t2), ("total_ms", t3 - t0)):
                timings[view][key].append(value * 1e3)
    rss_after = _rss_mb()
    return {"n_steps": n, "open_ms": open_ms, "cold_total_ms": cold, "timings": timings, "points": points,
            "json_kb": json_kb, "max_trace_points": trace_points, "spikes": spikes_kept, "rss_base_mb": rss_base, "rss_after_mb": rss_after,
            "rss_peak_mb": _peak_mb(), "db_mb": info["db_mb"]}


def _raw_extreme(store: Any, series: int, lo: float | None, fn: Any) -> float:
    """The true extreme of the raw points (read in pieces; not timed)."""
    best = None
    first = store.series_extent(series)
    if first is None:
        return float("nan")
    start = int(lo) if lo is not None else first[0]
    stop = first[1]
    span = 256 * 256
    for a in range(start, stop + 1, span):
        steps, values, _ = store.chunk_points(series, a, a + span - 1)
        keep = (steps >= a) & (steps <= a + span - 1) & (steps >= start)
        if keep.any():
            v = float(fn(values[keep]))
            best = v if best is None else float(fn([best, v]))
    return best if best is not None else float("nan")


# -- the parent side ----------------------------------------------------------------------------
def measure(out: Path, sizes: list[int], *, rounds: int, reps: int, max_points: int = MAX_POINTS) -> dict[str, Any]:
    cache = out / "dash-cache"
    cache.mkdir(parents=True, exist_ok=True)
    built = {n: build_db(cache, n) for n in sizes}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for r in range(rounds):
        for n in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
            result_path = cache / f"worker-{n}.json"
            proc = subprocess.run(
                [sys.executable, "-m", "bench.dashboard", "worker", str(db_dir(cache, n)), str(result_path),
                 "--reps", str(reps), "--max-points", str(max_points)],
                cwd=REPO, env=env, timeout=600, capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"the dashboard reader failed on {n:,} steps:\n{proc.stderr[-3000:]}")
            runs[n].append(json.loads(result_path.read_text()))
            result_path.unlink()
    sizes_out: dict[str, Any] = {}
    for n in sizes:
        workers = runs[n]
        entry: dict[str, Any] = {
            "db_mb": built[n]["db_mb"], "build_s": built[n]["build_s"] if built[n]["built_now"] else None,
            "points": workers[0]["points"], "json_kb": workers[0]["json_kb"], "spikes": workers[0]["spikes"],
            "max_trace_points": workers[0]["max_trace_points"],
            "rss_base_mb": summarize([w["rss_base_mb"] for w in workers]),
            "rss_after_mb": summarize([w["rss_after_mb"] for w in workers]),
            "rss_growth_mb": summarize([w["rss_after_mb"] - w["rss_base_mb"] for w in workers]),
            "rss_peak_mb": summarize([w["rss_peak_mb"] for w in workers]),
            "cold_total_ms": {v: summarize([w["cold_total_ms"][v] for w in workers]) for v in workers[0]["cold_total_ms"]},
            "views": {},
        }
        for view in workers[0]["timings"]:
            entry["views"][view] = {key: summarize([x for w in workers for x in w["timings"][view][key]])
                                    for key in ("read_ms", "figure_ms", "json_ms", "total_ms")}
        sizes_out[str(n)] = entry
    return {"max_points": max_points, "tail_steps": TAIL_STEPS, "new_rows_steps": NEW_ROWS_STEPS, "rounds": rounds,
            "reps": reps, "sizes": sizes_out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard")
    parser.add_argument("what", choices=("worker",))
    parser.add_argument("db", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--max-points", type=int, default=MAX_POINTS)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(worker(args.db, args.reps, args.max_points)))


if __name__ == "__main__":
    main()
