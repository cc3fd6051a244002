"""How the real dashboard renders in Chromium for long runs (Performance API, in the page).

    python -m bench.browser_render [--sizes 10000 100000 1000000] [--out bench/BROWSER.md]

For each size, a run directory is built with the store's own writer format (loss with spikes, lr,
momentum per step; validation loss per 1,000 steps) and a process keeps appending steps to it, as a
trainer would. The dashboard (`python -m babysit dashboard`) is served on it and opened in
Chromium. Measured in the page with `performance.now()` and a PerformanceObserver:
- first chart: from navigation start until the chart holds data;
- redraw: `Plotly.react` of the current figure with fresh arrays (what each live refresh does),
  median of 7;
- zoom: `Plotly.relayout` to a window of a tenth of the run, median of 7;
- long tasks (> 50 ms) on the main thread during 20 s of live refreshes, their count and total;
- points drawn: the sum over the chart's traces, and the largest trace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore
from tests.conftest import CHROMIUM, CHROMIUM_ARGS  # the browser settings the tests use

REPO = Path(__file__).resolve().parent.parent


def build_run(run_dir: Path, steps: int, seed: int = 0) -> RunStore:
    """A finished-looking run of ``steps`` steps, then marked running (the appender keeps it alive)."""
    store = RunStore(run_dir, create=True)
    rng = np.random.default_rng(seed)
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    x = np.arange(1, steps + 1)
    loss = 2.0 * np.exp(-x / (steps / 5)) + 0.1 + 0.05 * rng.random(steps)
    loss[rng.choice(steps, 20, replace=False)] += 5.0
    walls = 1_790_000_000.0 + x * 0.01
    series = {"loss": loss, "lr": np.full(steps, 0.05), "momentum": np.full(steps, 0.9)}
    with store.transaction():
        for name, values in series.items():
            sid = store.series_id(name, 1, PER_STEP)
            store.write_chunks((sid, x[i:i + CHUNK_POINTS], values[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                               for i in range(0, steps, CHUNK_POINTS))
        ends = np.arange(1000, steps + 1, 1000)
        val = store.series_id("val_loss", 1, PER_EPOCH)
        store.write_chunks([(val, ends, loss[ends - 1] * 0.9, walls[ends - 1])])
        for epoch, end in enumerate(ends, start=1):
            store.add_epoch(1, epoch, int(end))
    return store


def keep_appending(store: RunStore, start: int, stop: threading.Event) -> None:
    """Append 250 steps every 0.25 s and keep the heartbeat fresh, like a trainer."""
    sid = store.series_id("loss", 1, PER_STEP)
    step, rng = start, np.random.default_rng(1)
    while not stop.is_set():
        steps = np.arange(step + 1, step + 251)
        store.write_chunks([(sid, steps, 0.1 + 0.05 * rng.random(250), time.time() + np.zeros(250))])
        step += 250
        store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), heartbeat=time.time(),
                           epoch=step // 1000 + 1, max_epochs=10_000, step=step, step_in_epoch=step % 1000,
                           steps_per_epoch=1000, branch=1, lr=0.05, momentum=0.9, optimizer="SGD", message="")
        stop.wait(0.25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MEASURE_JS = """
async () => {
  const gd = document.querySelector('.js-plotly-plot');
  const Plotly = window.Plotly;
  const points = gd.data.map(t => (t.x || []).length);
  const times = async (f) => { const out = []; for (let i = 0; i < 7; i++) { const t = performance.now(); await f(i); out.push(performance.now() - t); } out.sort((a, b) => a - b); return out[3]; };
  // Fresh arrays each time, as a live refresh brings: Plotly.react cannot skip the redraw.
  const fresh = (i) => [gd.data.map(t => ({...t, x: Array.from(t.x), y: Array.from(t.y)})),
                        {...gd.layout, datarevision: i}];
  const redraw = await times((i) => { const [d, l] = fresh(i); return Plotly.react(gd, d, l); });
  const xs = gd.data[0].x; const lo = xs[Math.floor(xs.length * 0.45)], hi = xs[Math.floor(xs.length * 0.55)];
  const zoom = await times((i) => Plotly.relayout(gd, {'xaxis.range': i % 2 ? [lo, hi] : [xs[0], xs[xs.length - 1]]}));
  await Plotly.relayout(gd, {'xaxis.autorange': true});
  return {points_total: points.reduce((a, b) => a + b, 0), points_max_trace: Math.max(...points), traces: points.length,
          redraw_ms: redraw, zoom_ms: zoom};
}
"""


def measure(steps: int, work: Path) -> dict:
    from playwright.sync_api import sync_playwright

    run_dir = work / f"run-{steps}"
    started = time.perf_counter()
    store = build_run(run_dir, steps)
    build_s = time.perf_counter() - started
    stop = threading.Event()
    appender = threading.Thread(target=keep_appending, args=(store, steps, stop), daemon=True)
    appender.start()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "babysit", "dashboard", "--root", str(run_dir), "--port", str(port)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "dashboard at" in (server.stdout.readline() if server.stdout else ""), "dashboard did not start"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.add_init_script("""
              window.__long = [];
              new PerformanceObserver(l => l.getEntries().forEach(e => window.__long.push(e.duration)))
                .observe({type: 'longtask', buffered: true});
            """)
            page.goto(f"http://127.0.0.1:{port}", timeout=120_000)
            page.wait_for_function("() => { const gd = document.querySelector('.js-plotly-plot');"
                                   " return gd && gd.data && gd.data.some(t => (t.x || []).length > 0); }",
                                   timeout=180_000, polling=50)
            first_chart_ms = page.evaluate("() => performance.now()")
            page.evaluate("() => { window.__long = []; }")
            time.sleep(20)  # live refreshes while the appender logs
            live = page.evaluate("() => ({count: window.__long.length, total: window.__long.reduce((a, b) => a + b, 0),"
                                 " max: Math.max(0, ...window.__long)})")
            result = page.evaluate(MEASURE_JS)
            browser.close()
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)
    return {"steps": steps, "build_s": round(build_s, 1), "first_chart_ms": round(first_chart_ms),
            "long_tasks_20s": live["count"], "long_tasks_total_ms": round(live["total"]),
            "long_task_max_ms": round(live["max"]), **{k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description="Render times of the dashboard in Chromium")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "BROWSER.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(steps, Path(work)) for steps in args.sizes]
    for row in rows:
        print(json.dumps(row))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    chromium = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# The dashboard in the browser: render times for long runs",
        "",
        f"`python -m bench.browser_render --sizes {' '.join(map(str, args.sizes))}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {chromium}, headless with "
        f"--disable-gpu (software rendering), {os.cpu_count()} CPU cores shared with the dashboard server "
        f"and the process appending steps; Python {platform.python_version()}.",
        "",
        "Times are measured in the page (`performance.now()`); the machine is shared, so read them as orders of "
        "magnitude and compare the sizes with each other.",
        "",
        "| logged steps | first chart (ms after navigation) | redraw with new data, `Plotly.react` (ms, median of 7) | zoom, "
        "`Plotly.relayout` (ms, median of 7) | long tasks in 20 s of live refresh (count / total ms / max ms) | "
        "points drawn (all traces / largest trace) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['steps']:,} | {r['first_chart_ms']:,} | {r['redraw_ms']} | {r['zoom_ms']} | "
                     f"{r['long_tasks_20s']} / {r['long_tasks_total_ms']:,} / {r['long_task_max_ms']} | "
                     f"{r['points_total']:,} / {r['points_max_trace']:,} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
