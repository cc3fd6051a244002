"""Fifty rollbacks later: the chart on a real run with many branches, before → after, in one run.

    python -m bench.many_branches [--rollbacks 50] [--baseline dec3ec3] [--rounds 30]
                                  [--browser-rounds 3] [--browser-seconds 30] [--single 1000000 10000000]
                                  [--out bench/MANY_BRANCHES.md]

1. **The run**: `python -m babysit train --job digits` (23 steps an epoch, a checkpoint each) and,
   from this process, ``--rollbacks`` real rollbacks through the store's command queue
   (``RunStore.enqueue_command``, as the dashboard and the CLI queue them): each branch trains two
   epochs, is nudged (lr ×½ or ×2, also queued), then rolled back to one of its two newest
   checkpoints. The time from queueing a rollback to its acknowledgement is recorded. The trainer
   then keeps training (it is live during every measurement below).
2. **Server refresh** (what one chart refresh of the page costs the server: ``ui.data.read_view`` →
   ``ui.figures.build_figure`` → the figure's JSON), this checkout against ``--baseline`` imported
   beside it (bench/step_overhead.py: ``package_at``), in interleaved rounds, on the 50-rollback run
   and on a run of one branch holding the same points (every branch's points laid end to end):
   the whole run, and a zoom to its last 2,000 steps. Plus the figure's traces, points and legend
   entries.
3. **The browser**: app.py of this checkout and of the baseline (`git archive`), each served on the
   same live run, opened in a fresh headless Chromium at 1366×768 per round: the loss panel's
   height, the legend's rows, then long tasks (> 50 ms, PerformanceObserver) over
   ``--browser-seconds`` of live refreshes, then a zoom to the last 2,000 steps (``Plotly.relayout``,
   and until the denser data the zoom asked for is drawn), median of 3 zooms.
4. **One branch, long** (the figures of bench/DASHBOARD.md must hold): bench/dashboard.py's runs of
   ``--single`` steps, refreshed whole and zoomed to the last 1,000 steps (which must come back as
   every raw point), before → after.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from plotly.io.json import to_json_plotly

from babysit import commands as cmd
from babysit.store import CHUNK_POINTS, PER_EPOCH, RunStore

from .common import REPO, load_average, summarize

OUT = REPO / "bench" / "out"
ZOOM_STEPS = 2_000
TRAIN_ARGS = ("--job", "digits", "--epoch-passes", "1", "--batch-size", "64", "--epochs", "1000000")


# -- 1. a real run with many rollbacks -----------------------------------------------------------
def _until(what: str, check: Callable[[], Any], timeout: float = 300.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def _applied(store: RunStore, command: int) -> dict[str, Any] | None:
    row = next((c for c in store.commands(since_id=command - 1, limit=50) if c["id"] == command), None)
    if row is not None and row["state"] == cmd.REJECTED:
        raise RuntimeError(f"command #{command} was rejected: {row['reason']}")
    return row if row is not None and row["state"] == cmd.APPLIED else None


def build_run(run_dir: Path, rollbacks: int, seed: int = 0) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start the digits trainer on ``run_dir`` and roll it back ``rollbacks`` times; it keeps training."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = (run_dir.parent / f"{run_dir.name}-trainer.log").open("w")
    trainer = subprocess.Popen([sys.executable, "-m", "babysit", "train", "--run-dir", str(run_dir), *TRAIN_ARGS],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    _until("the trainer", lambda: (run_dir / "run.db").exists() and RunStore(run_dir).status().get("alive"))
    store = RunStore(run_dir)
    rng = random.Random(seed)
    latencies = []
    started = time.monotonic()
    for k in range(rollbacks):
        branch = store.status()["branch"]
        start = (store.branch(branch) or {}).get("start_step", 0)

        def two_checkpoints() -> list[dict[str, Any]] | None:
            own = [c for c in store.checkpoints(limit=20) if c["branch"] == branch and c["step"] > start]
            return own[-2:] if len(own) >= 2 else None

        own = _until(f"two checkpoints on branch {branch}", two_checkpoints)
        lr = store.status()["lr"]
        nudge = store.enqueue_command(cmd.SET_LR, {"value": lr * rng.choice((0.5, 2.0))}, source="cli")
        _until(f"the nudge #{nudge}", lambda: _applied(store, nudge))
        target = rng.choice(own)
        queued = time.monotonic()
        command = store.enqueue_command(cmd.ROLLBACK, {"checkpoint": target["id"], "hparams": cmd.HPARAMS_CHECKPOINT},
                                        source="cli")
        _until(f"the rollback #{command}", lambda: _applied(store, command))
        latencies.append(time.monotonic() - queued)
        print(f"rollback {k + 1}/{rollbacks} to #{target['id']} applied in {latencies[-1]:.2f} s", flush=True)
    info = {"rollbacks": rollbacks, "rollback_s": summarize(latencies), "build_s": time.monotonic() - started,
            "series": len(store.series()), "branches": len(store.branches())}
    store.close()
    return trainer, info


def keep_appending(run_dir: Path, stop: Any, steps_per_s: float) -> None:
    """Log loss points on a run's trainer branch at ``steps_per_s``, as its trainer would (so the
    one-branch run changes between refreshes as the live one does)."""
    store = RunStore(run_dir)
    status = store.status()
    step, series = int(status["step"]), store.series_id("loss", status["branch"], "step")
    rng = np.random.default_rng(2)
    while not stop.wait(0.25):
        n = max(1, round(steps_per_s / 4))
        steps = np.arange(step + 1, step + n + 1, dtype=np.int64)
        store.write_chunks([(series, steps, 0.1 + 0.05 * rng.random(n), time.time() + np.zeros(n))])
        step += n
        store.write_status(step=step, heartbeat=time.time())
    store.close()


def one_branch_copy(source: Path, target: Path) -> int:
    """A run of one branch holding the same points as ``source`` (its branches' points laid end to
    end, in branch order): a refresh of it is what the same run would cost without rollbacks."""
    shutil.rmtree(target, ignore_errors=True)
    src = RunStore(source)
    dst = RunStore(target, create=True)
    branch = dst.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    by_name: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for info in src.series():
        if info.segment == 0:
            _, values, walls = src.chunk_points(info.id)
            by_name.setdefault((info.name, info.per), []).append((values, walls))
    steps_total = 0
    with dst.transaction():
        for (name, per), parts in by_name.items():
            values = np.concatenate([v for v, _ in parts])
            walls = np.concatenate([w for _, w in parts])
            steps = np.arange(1, len(values) + 1, dtype=np.int64)
            if name == "loss":
                steps_total = len(values)
            series = dst.series_id(name, branch, per)
            dst.write_chunks([(series, steps[i:i + CHUNK_POINTS], values[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                              for i in range(0, len(steps), CHUNK_POINTS)])
        epochs = len(np.concatenate([v for v, _ in by_name.get(("val_loss", PER_EPOCH), [(np.empty(0), None)])]))
        for epoch in range(1, epochs + 1):
            dst.add_epoch(branch, epoch, epoch * max(1, steps_total // max(epochs, 1)))
    # Per-epoch series were laid one a step above: spread them over the run, as epochs are.
    for (name, per), _ in by_name.items():
        if per == PER_EPOCH:
            info = next(i for i in dst.series() if i.name == name)
            _, values, walls = dst.chunk_points(info.id)
            dst.conn().execute("DELETE FROM chunks WHERE series = ?", (info.id,))
            steps = np.arange(1, len(values) + 1, dtype=np.int64) * max(1, steps_total // max(len(values), 1))
            dst.write_chunks([(info.id, steps, values, walls)])
    status = src.status()
    dst.write_status(state="running", branch=branch, step=steps_total, epoch=epochs, steps_per_epoch=status.get(
        "steps_per_epoch"), lr=status.get("lr"), momentum=status.get("momentum"), heartbeat=time.time())
    src.close()
    dst.close()
    return steps_total


# -- 2. server refresh, before and after -------------------------------------------------------------
def refresher(package: Any) -> Callable[[Path, bool], dict[str, Any]]:
    """One chart refresh of ``package`` (babysit of this checkout or of the baseline), as the page
    runs it: read_view (excursion branches hidden), build_figure, the figure's JSON."""
    name = package.__name__
    data = importlib.import_module(f"{name}.ui.data")
    figures = importlib.import_module(f"{name}.ui.figures")
    compare = importlib.import_module(f"{name}.instruments.compare")
    store_module = importlib.import_module(f"{name}.store")
    delta_of = importlib.import_module(f"{name}.ui.figure_delta").figure_delta
    stores: dict[Path, Any] = {}
    sent: dict[tuple[Path, bool], dict[str, Any]] = {}

    def refresh(run_dir: Path, zoom: bool) -> dict[str, Any]:
        if run_dir not in stores:  # one store a run, as the page keeps one per session
            stores[run_dir] = store_module.RunStore(run_dir)
        store = stores[run_dir]
        status = store.status()
        t0 = time.perf_counter()
        lo = hi = None
        if zoom:
            newest = int(status.get("step") or 0)
            lo, hi = newest - ZOOM_STEPS * 1.05, newest + ZOOM_STEPS * 0.05
        view = data.read_view(store, status, lo, hi, hidden_branches=compare.excursion_side_branches(store))
        t1 = time.perf_counter()
        figure = figures.build_figure(view, figures.ChartOptions())
        t2 = time.perf_counter()
        # What the page sends: what changed since the figure it sent before (ui/live_chart.py).
        before = sent.get((run_dir, zoom))
        delta = delta_of(before, figure) if before is not None else None
        message = to_json_plotly(delta) if delta is not None else to_json_plotly(figure)
        t3 = time.perf_counter()
        sent[(run_dir, zoom)] = figure
        payload = to_json_plotly(figure)
        t4 = time.perf_counter()
        legend = [t["name"] for t in figure["data"] if t.get("showlegend", True)]
        return {"read_ms": (t1 - t0) * 1e3, "figure_ms": (t2 - t1) * 1e3, "message_ms": (t3 - t2) * 1e3,
                "total_ms": (t3 - t0) * 1e3, "json_ms": (t4 - t3) * 1e3, "traces": len(figure["data"]),
                "legend": len(legend), "points": sum(len(t.get("x") or []) for t in figure["data"]),
                "kb": len(payload) / 1e3, "message_kb": len(message) / 1e3}

    return refresh


def measure_refresh(variants: dict[str, Callable[[Path, bool], dict[str, Any]]], runs: dict[str, Path],
                    rounds: int) -> dict[str, Any]:
    """Each (variant, run, view) once per round, the order rotated every round."""
    cases = [(v, r, z) for v in variants for r in runs for z in (False, True)]
    found: dict[tuple[str, str, bool], list[dict[str, Any]]] = {case: [] for case in cases}
    for r in range(rounds + 1):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for variant, run, zoom in order:
            result = variants[variant](runs[run], zoom)
            if r:  # the first round warms the caches, as a page's first refresh does
                found[(variant, run, zoom)].append(result)
    out: dict[str, Any] = {}
    for (variant, run, zoom), results in found.items():
        out[f"{variant}|{run}|{'zoom' if zoom else 'whole'}"] = {
            key: summarize([x[key] for x in results]) for key in results[0]}
    return out


# -- 3. the browser --------------------------------------------------------------------------------
LAYOUT_JS = """(sel) => {
    const gd = document.querySelector(sel);
    const fl = gd._fullLayout;
    return {loss_px: fl.yaxis._length, traces: gd.data.length,
            points: gd.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0),
            legend_rows: new Set(Array.from(gd.querySelectorAll('g.legend g.traces'))
                                 .map((g) => Math.round(g.getBoundingClientRect().top))).size,
            legend_entries: gd.querySelectorAll('g.legend g.traces').length};
}"""
ZOOM_JS = """async ([sel, steps]) => {
    const gd = document.querySelector(sel);
    const box = gd.closest('.babysit-live-chart');
    const renders = () => Number(box.dataset.renders);
    const newest = Math.max(...gd._fullData.filter((t) => t.x && t.x.length && t.yaxis === 'y')
                                          .map((t) => Math.max(...t.x.filter((v) => v !== null))));
    const out = [];
    for (let i = 0; i < 3; i++) {
        const before = renders();
        const t0 = performance.now();
        await Plotly.relayout(gd, {'xaxis.range': [newest - steps, newest]});
        const t1 = performance.now();
        // The zoom is reported; the server answers with the window's denser data, drawn next.
        const deadline = t0 + 20000;
        while (renders() === before && performance.now() < deadline) await new Promise((r) => setTimeout(r, 10));
        const t2 = performance.now();
        out.push({relayout: t1 - t0, dense: t2 - t0});
        await Plotly.relayout(gd, {'xaxis.autorange': true});
        const back = renders();
        while (renders() === back && performance.now() < t2 + 20000) await new Promise((r) => setTimeout(r, 10));
    }
    return out;
}"""


def browse(variants: dict[str, Path], run_dir: Path, rounds: int, seconds: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from bench.first_chart import DRAWN, Server, Variant
    from tests.conftest import CHROMIUM, CHROMIUM_ARGS

    servers = {name: Server(Variant(name, code, code / "app.py"), run_dir, OUT / f"many-branches-{name}.log")
               for name, code in variants.items()}
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    plot = ".babysit-live-chart .js-plotly-plot"
    try:
        with sync_playwright() as pw:
            for r in range(rounds):
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    try:
                        page = browser.new_page(viewport={"width": 1366, "height": 768})
                        page.add_init_script("""window.__long = [];
                            new PerformanceObserver((l) => l.getEntries().forEach((e) => window.__long.push(e.duration)))
                              .observe({type: 'longtask', buffered: true});""")
                        page.goto(servers[name].url, timeout=180_000)
                        page.wait_for_function(DRAWN, timeout=180_000, polling=50)
                        page.wait_for_timeout(5_000)  # the page's second run and the first refreshes
                        layout = page.evaluate(LAYOUT_JS, plot)
                        page.evaluate("() => { window.__long = []; }")
                        page.wait_for_timeout(seconds * 1000)  # live refreshes while the trainer trains
                        long = page.evaluate("() => window.__long.slice()")
                        zooms = page.evaluate(ZOOM_JS, [plot, ZOOM_STEPS])
                        found[name].append({**layout, "long_per_min": len(long) * 60.0 / seconds,
                                            "long_total_ms": sum(long), "long_max_ms": max(long, default=0.0),
                                            "long_over_200": sum(1 for x in long if x > 200),
                                            "zoom_relayout_ms": statistics.median(z["relayout"] for z in zooms),
                                            "zoom_dense_ms": statistics.median(z["dense"] for z in zooms)})
                        print(f"browser {name}, round {r + 1}: {found[name][-1]}", flush=True)
                    finally:
                        browser.close()
    finally:
        for server in servers.values():
            server.stop()
    return {name: {key: summarize([x[key] for x in runs]) for key in runs[0]} for name, runs in found.items()}


# -- 4. one long branch ------------------------------------------------------------------------------
def single(variants: dict[str, Any], sizes: list[int], rounds: int) -> dict[str, Any]:
    from bench.dashboard import build_db, db_dir

    cache = OUT / "dash-cache"
    out: dict[str, Any] = {}
    for n in sizes:
        build_db(cache, n)
        run_dir = db_dir(cache, n)
        results: dict[str, dict[str, list[float]]] = {}
        raw_ok: dict[str, bool] = {}
        for r in range(rounds + 1):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                package = variants[name]
                data = importlib.import_module(f"{package.__name__}.ui.data")
                figures = importlib.import_module(f"{package.__name__}.ui.figures")
                store = importlib.import_module(f"{package.__name__}.store").RunStore(run_dir)
                for view_name, lo, hi in (("whole", None, None), ("last 1,000", n - 1_000, n)):
                    t0 = time.perf_counter()
                    view = data.read_view(store, store.status(), lo, hi)
                    to_json_plotly(figures.build_figure(view, figures.ChartOptions()))
                    elapsed = (time.perf_counter() - t0) * 1e3
                    if r:
                        results.setdefault(name, {}).setdefault(view_name, []).append(elapsed)
                    if lo is not None:
                        loss = next(w for w in view.windows if w.name == "loss")
                        raw_ok[name] = not loss.downsampled and loss.steps[1:].tolist() == list(range(lo, hi + 1))
                store.close()
        out[str(n)] = {name: {view: summarize(times) for view, times in views.items()} | {"every_raw_point": raw_ok[name]}
                       for name, views in results.items()}
    return out


# -- the report --------------------------------------------------------------------------------
def _f(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    base, meta = args.baseline, results["meta"]
    refresh, browser, run = results["refresh"], results.get("browser"), results["run"]
    lines = [
        "# Fifty rollbacks later: the chart on a run with many branches",
        "",
        f"`{meta['command']}` on {meta['started']}, commit {meta['commit']} against `{base}` "
        f"({meta['base_commit']}, imported beside it for the server side, `git archive` for the browser); "
        f"{meta['cpus']} CPU cores shared with the trainer, the servers, Chromium and other work; "
        f"Python {meta['python']}; load average {meta['load_start']} at the start, {meta['load_end']} at the end.",
        "",
        f"**The run**: the digits job (`python -m babysit train {' '.join(TRAIN_ARGS[:6])}`), {run['rollbacks']} real "
        f"rollbacks queued through the store's command queue (each after two epochs and an lr nudge; applied in a "
        f"median {run['rollback_s']['median']:.2f} s, {run['rollback_s']['min']:.2f}–{run['rollback_s']['max']:.2f}): "
        f"{run['branches']} branches, {run['series']} series. The trainer keeps training during every measurement "
        f"(~{run['steps_per_s']:.0f} steps/s). **One branch** = the same points on one branch "
        f"({results['one_branch_steps']:,} steps at the start), what the run would be without its rollbacks, logged on "
        "at the trainer's pace meanwhile.",
        "",
        f"## Server: one chart refresh (ms, median (min–max) of {args.rounds} interleaved rounds after a warm-up)",
        "",
        "read = `ui.data.read_view`, figure = `ui.figures.build_figure`, message = what the page sends each refresh "
        "(`ui.figure_delta.figure_delta` on the figure sent before, as JSON); **refresh** = the three. *first draw "
        f"JSON* = the whole figure's, sent once a page. *zoom* = the window of the last {ZOOM_STEPS:,} steps.",
        "",
        "| code | run | view | read | figure | message | **refresh** | first draw JSON | traces | points "
        "| legend entries | figure KB | message KB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in refresh.items():
        variant, run_name, view = key.split("|")
        lines.append(f"| {variant} | {run_name} | {view} | {_f(r['read_ms'])} | {_f(r['figure_ms'])} "
                     f"| {_f(r['message_ms'])} | **{_f(r['total_ms'])}** | {_f(r['json_ms'])} "
                     f"| {r['traces']['median']:.0f} | {r['points']['median']:,.0f} | {r['legend']['median']:.0f} "
                     f"| {r['kb']['median']:,.0f} | {r['message_kb']['median']:,.1f} |")
    ratio = lambda a, b: refresh[a]["total_ms"]["median"] / refresh[b]["total_ms"]["median"]  # noqa: E731
    lines += [
        "",
        f"- **{args.rollbacks} branches ÷ one branch, same points** (the target: ≤ 2): after "
        f"**{ratio('after|branches|whole', 'after|one|whole'):.2f}×** whole, "
        f"{ratio('after|branches|zoom', 'after|one|zoom'):.2f}× zoomed; before "
        f"{ratio('before|branches|whole', 'before|one|whole'):.2f}× whole, "
        f"{ratio('before|branches|zoom', 'before|one|zoom'):.2f}× zoomed.",
        f"- **Before → after** on the run with {args.rollbacks} rollbacks: "
        f"{refresh['before|branches|whole']['total_ms']['median']:,.1f} → "
        f"{refresh['after|branches|whole']['total_ms']['median']:,.1f} ms whole "
        f"(**{ratio('after|branches|whole', 'before|branches|whole'):.2f}×**), "
        f"{refresh['before|branches|whole']['traces']['median']:.0f} → "
        f"{refresh['after|branches|whole']['traces']['median']:.0f} traces, "
        f"{refresh['before|branches|whole']['points']['median']:,.0f} → "
        f"{refresh['after|branches|whole']['points']['median']:,.0f} points, "
        f"{refresh['before|branches|whole']['legend']['median']:.0f} → "
        f"{refresh['after|branches|whole']['legend']['median']:.0f} legend entries.",
    ]
    if browser:
        lines += [
            "",
            f"## Browser: Chromium at 1366×768 on the live run (median (min–max) of {args.browser_rounds} fresh pages each)",
            "",
            f"Long tasks (> 50 ms on the main thread) over {args.browser_seconds:g} s of live refreshes; zoom = "
            f"`Plotly.relayout` to the last {ZOOM_STEPS:,} steps (median of 3), and until the denser data it asked "
            "the server for is drawn.",
            "",
            "| code | loss panel (px) | legend rows | traces | points | long tasks / min | longest (ms) | over 200 ms "
            "| long tasks, total ms | zoom (ms) | zoom → dense data drawn (ms) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, b in browser.items():
            lines.append(f"| {name} | {b['loss_px']['median']:.0f} | {b['legend_rows']['median']:.0f} "
                         f"| {b['traces']['median']:.0f} | {b['points']['median']:,.0f} | {_f(b['long_per_min'])} "
                         f"| {_f(b['long_max_ms'], 0)} | {_f(b['long_over_200'], 0)} | {_f(b['long_total_ms'], 0)} "
                         f"| {_f(b['zoom_relayout_ms'], 0)} | {_f(b['zoom_dense_ms'], 0)} |")
    if results.get("single"):
        lines += [
            "",
            f"## One branch, long (bench/dashboard.py's runs): a refresh, ms (median (min–max) of {args.single_rounds})",
            "",
            "| steps | code | whole run | zoom to the last 1,000 steps | the zoom's points are every raw point |",
            "|---|---|---|---|---|",
        ]
        for n, by in results["single"].items():
            for name, r in by.items():
                lines.append(f"| {int(n):,} | {name} | {_f(r['whole'])} | {_f(r['last 1,000'])} | "
                             f"{'yes' if r['every_raw_point'] else 'no'} |")
    lines += ["", "## Reading it", "", *READING]
    return "\n".join(lines) + "\n"


READING = [
    "- *before* draws every branch's every series as traces of their own (two per loss: raw and smoothed), each "
    "with a legend entry, a dashed line for every rollback and nudge, and reads each series' summaries with a query "
    "that first lists every series again; *after* draws the live line as one curve per metric, every abandoned "
    "branch as one faint sketch under one legend entry (a click draws one in full), vertical lines for the newest "
    "five markers, and reads the summaries of every series it needs in one query and their raw points in another "
    "(babysit/ui/data.py); the stretches the live line keeps from its ancestors are kept between refreshes.",
    "- Long tasks: each refresh redraws the chart once (`Plotly.react` of every trace) and Streamlit redraws the "
    "page's other fragments; the redraw's length follows the points drawn and the machine's load.",
    "- The shared two-core machine moves absolute times by tens of per cent from minute to minute; the variants "
    "run interleaved, so compare the ratios.",
]


def main(argv: list[str] | None = None) -> int:
    from bench.first_chart import baseline_checkout
    from bench.step_overhead import package_at

    parser = argparse.ArgumentParser(prog="python -m bench.many_branches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollbacks", type=int, default=50)
    parser.add_argument("--baseline", default="dec3ec3", help="the git revision to compare with (default dec3ec3)")
    parser.add_argument("--rounds", type=int, default=30, help="server refresh rounds")
    parser.add_argument("--browser-rounds", type=int, default=3, help="fresh pages per variant (0: no browser)")
    parser.add_argument("--browser-seconds", type=float, default=30.0)
    parser.add_argument("--single", type=int, nargs="*", default=[1_000_000, 10_000_000],
                        help="steps of the one-branch runs (none: leave that part out)")
    parser.add_argument("--single-rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "MANY_BRANCHES.md")
    args = parser.parse_args(argv)

    import babysit

    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    meta = {"command": "python -m bench.many_branches " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git("rev-parse", "--short", "HEAD"),
            "base_commit": git("rev-parse", "--short", args.baseline), "cpus": os.cpu_count(),
            "python": platform.python_version(), "load_start": load_average()}
    OUT.mkdir(parents=True, exist_ok=True)
    before = package_at(args.baseline)
    run_dir = OUT / "many-branches-run"
    trainer, run = build_run(run_dir, args.rollbacks)
    results: dict[str, Any] = {"meta": meta, "run": run}
    stop = threading.Event()
    try:
        one = OUT / "many-branches-one"
        results["one_branch_steps"] = one_branch_copy(run_dir, one)
        store = RunStore(run_dir)
        first = (store.status()["step"], time.monotonic())
        _until("the trainer to go on", lambda: store.status()["step"] >= first[0] + 100, timeout=120)
        rate = (store.status()["step"] - first[0]) / (time.monotonic() - first[1])
        store.close()
        run["steps_per_s"] = rate
        appender = threading.Thread(target=keep_appending, args=(one, stop, rate), daemon=True)
        appender.start()
        variants = {"before": refresher(before), "after": refresher(babysit)}
        results["refresh"] = measure_refresh(variants, {"branches": run_dir, "one": one}, args.rounds)
        if args.browser_rounds:
            results["browser"] = browse({"before": baseline_checkout(args.baseline), "after": REPO}, run_dir,
                                        args.browser_rounds, args.browser_seconds)
    finally:
        stop.set()
        trainer.terminate()
        trainer.wait(timeout=120)
    if args.single:
        results["single"] = single({"before": before, "after": babysit}, args.single, args.single_rounds)
    meta["load_end"] = load_average()
    (OUT / "many-branches.json").write_text(json.dumps(results, indent=1, default=str))
    args.out.write_text(report(results, args))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
