"""First chart fast, refresh cheap: the dashboard next to a bare `st.plotly_chart` page, in Chromium.

    python -m bench.first_chart [--sizes 10000 100000 1000000] [--rounds 5] [--baseline REF]
                                [--load-seconds 20] [--out bench/DASHBOARD.md]

For each size a run directory is built (bench/browser_render.py: loss with spikes, lr, momentum,
validation loss; cached in bench/out/) and a thread keeps appending 1,000 steps a second to it, as a
trainer would. Then, per size, one Streamlit server per variant, and in rounds whose order rotates,
a fresh headless Chromium per page load (the tests' settings, software rendering):

- **first chart**: navigation start → the chart holds data and is drawn (`performance.now()`);
- at the largest size, with the page open for ``--load-seconds``: the **server's CPU** (user +
  system time of the Streamlit process, as a share of one core, and per chart refresh) and the
  **bytes per minute** the page received over the websocket.

Variants: ``babysit`` (app.py of this checkout) and ``bare`` (bench/apps/bare_chart.py: the same
figure from the same data layer in a plain `st.plotly_chart`, refreshed every second). With
``--baseline REF`` the same two run again from ``git archive REF`` (the code before a change), so
before → after and the ratios come from one run on one machine. Medians (min–max) and ratios of
medians are reported; the machine is shared, so the ratios are the numbers to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.browser_render import build_run, keep_appending
from babysit.store import RunStore
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, wait_healthy

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
BARE_APP = REPO / "bench" / "apps" / "bare_chart.py"
DRAWN = """() => {
  const gd = document.querySelector('.js-plotly-plot');
  return !!(gd && gd._fullLayout && gd.data && gd.data.some((t) => t.x && t.x.length)
            && gd.querySelector('.main-svg'));
}"""
COUNT_DRAWS = """() => {
  const gd = document.querySelector('.js-plotly-plot');
  if (!gd.__draws) { gd.__draws = 0; gd.on('plotly_afterplot', () => { gd.__draws += 1; }); }
  return gd.__draws;
}"""


@dataclass
class Variant:
    name: str
    code: Path  # the babysit checkout it runs
    script: Path

    def args(self, run_dir: Path) -> list[str]:
        if self.script.name == "app.py":
            return ["--root", str(run_dir), "--run", str(run_dir)]
        return ["--run-dir", str(run_dir)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`streamlit run` of a variant on a run directory, with the flags `python -m babysit dashboard` uses."""

    def __init__(self, variant: Variant, run_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(variant.script), "--server.address", "127.0.0.1",
             "--server.port", str(self.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.enableXsrfProtection", "true", "--server.enableCORS", "true",
             "--server.fileWatcherType", "none", "--global.developmentMode", "false", "--client.toolbarMode", "minimal",
             "--", *variant.args(run_dir)],
            cwd=variant.code, env={**os.environ, "PYTHONPATH": str(variant.code)}, stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(self.url, self.process, log, timeout=90)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def open_page(pw: Any, url: str, frames: list[int] | None = None) -> tuple[Any, Any, float]:
    """A fresh Chromium on ``url``; returns (browser, page, ms from navigation start to first chart)."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    if frames is not None:
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(len(f))))
    page.goto(url, timeout=120_000)
    page.wait_for_function(DRAWN, timeout=180_000, polling=25)
    return browser, page, float(page.evaluate("() => performance.now()"))


def first_chart(pw: Any, server: Server) -> float:
    browser, _page, ms = open_page(pw, server.url)
    browser.close()
    return ms


def load(pw: Any, server: Server, seconds: float) -> dict[str, float]:
    """Server CPU and websocket bytes while the page stays open on a live run."""
    frames: list[int] = []
    browser, page, _ = open_page(pw, server.url, frames)
    page.wait_for_timeout(3000)  # past the first rerun burst
    draws0, bytes0, cpu0, t0 = page.evaluate(COUNT_DRAWS), sum(frames), server.cpu_seconds(), time.monotonic()
    page.wait_for_timeout(seconds * 1000)
    draws, sent, cpu, elapsed = (page.evaluate(COUNT_DRAWS) - draws0, sum(frames) - bytes0,
                                 server.cpu_seconds() - cpu0, time.monotonic() - t0)
    browser.close()
    # Every variant reruns its chart once a second: CPU per second is CPU per refresh.
    return {"cpu_share": cpu / elapsed, "cpu_ms_per_refresh": 1000 * cpu / elapsed, "chart_draws": draws,
            "bytes_per_minute": sent * 60 / elapsed}


def baseline_checkout(ref: str) -> Path:
    """``git archive REF`` unpacked under bench/out (the code as it was, to run beside this one)."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    target = OUT / f"baseline-{commit}"
    if not (target / "app.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True)
        with tempfile.TemporaryFile() as f:
            f.write(archive.stdout)
            f.seek(0)
            tarfile.open(fileobj=f).extractall(target, filter="data")
    return target


def cached_run(steps: int) -> Path:
    """A built run of ``steps`` steps under bench/out (building 1M steps takes a while); a fresh copy."""
    built = OUT / f"first-chart-run-{steps}"
    if not (built / "run.db").exists():
        shutil.rmtree(built, ignore_errors=True)
        build_run(built, steps).close()
    work = OUT / f"first-chart-live-{steps}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(built, work)
    return work


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(variants: list[Variant], sizes: list[int], rounds: int, load_seconds: float,
            load_rounds: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    results: dict[str, Any] = {"first_chart_ms": {}, "load": {}}
    with sync_playwright() as pw:
        for steps in sizes:
            run_dir = cached_run(steps)
            store = RunStore(run_dir)
            stop = threading.Event()
            appender = threading.Thread(target=keep_appending, args=(store, steps, stop), daemon=True)
            appender.start()
            servers = {v.name: Server(v, run_dir, OUT / f"first-chart-{v.name}-{steps}.log") for v in variants}
            try:
                names = list(servers)
                for name in names:  # warm-up: Python imports, first script run, OS file cache
                    first_chart(pw, servers[name])
                times: dict[str, list[float]] = {name: [] for name in names}
                for r in range(rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for name in order:
                        times[name].append(first_chart(pw, servers[name]))
                    print(f"{steps:>9,} steps, round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:,.0f} ms" for n in names),
                          flush=True)
                results["first_chart_ms"][steps] = {name: summary(t) for name, t in times.items()}
                if steps == max(sizes):
                    loads: dict[str, list[dict[str, float]]] = {name: [] for name in names}
                    for r in range(load_rounds):
                        for name in (names if r % 2 == 0 else names[::-1]):
                            loads[name].append(load(pw, servers[name], load_seconds))
                            print(f"load {name}: {loads[name][-1]}", flush=True)
                    results["load"] = {"steps": steps, "seconds": load_seconds, **{
                        name: {key: statistics.median(x[key] for x in runs) for key in runs[0]}
                        for name, runs in loads.items()}}
            finally:
                stop.set()
                appender.join(timeout=10)
                for server in servers.values():
                    server.stop()
                store.close()
    return results


def report(results: dict[str, Any], args: argparse.Namespace, baseline: str | None) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    names = list(next(iter(results["first_chart_ms"].values())))
    lines = [
        "# The dashboard's first chart and refresh cost, next to a bare `st.plotly_chart` page",
        "",
        f"`python -m bench.first_chart {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"commit {commit}" + (f", baseline `{baseline}` (git archive)" if baseline else "") +
        f"; {chromium}, headless, software rendering, viewport 1366×768; {os.cpu_count()} CPU cores shared "
        f"with the servers, the appender (1,000 steps/s) and other work; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "Variants: **babysit** = app.py, **bare** = bench/apps/bare_chart.py (the same figure in `st.plotly_chart`, "
        "refreshed every second); `…@base` = the same from the baseline commit. A fresh Chromium for every page "
        "load, the variants' order rotated every round; medians (min–max) of "
        f"{args.rounds} rounds after one warm-up load each.",
        "",
        "## Navigation → first drawn chart (ms)",
        "",
        "| steps | " + " | ".join(names) + " | babysit / bare"
        + (" | babysit / bare@base | babysit / babysit@base | babysit@base / bare@base |" if baseline else " |"),
        "|---|" + "---|" * (len(names) + (4 if baseline else 1)),
    ]
    for steps, by in results["first_chart_ms"].items():
        cells = [f"{by[n]['median']:,.0f} ({by[n]['min']:,.0f}–{by[n]['max']:,.0f})" for n in names]
        ratio = by["babysit"]["median"] / by["bare"]["median"]
        row = f"| {int(steps):,} | " + " | ".join(cells) + f" | **{ratio:.2f}** |"
        if baseline:
            base = by["babysit@base"]["median"]
            row += (f" **{by['babysit']['median'] / by['bare@base']['median']:.2f}** |"
                    f" {by['babysit']['median'] / base:.2f} | {base / by['bare@base']['median']:.2f} |")
        lines.append(row)
    load_result = results.get("load") or {}
    if load_result:
        lines += [
            "",
            f"## With the page open on a live run of {load_result['steps']:,} steps "
            f"({load_result['seconds']:g} s, median of {args.load_rounds})",
            "",
            "| variant | server CPU (share of one core) | server CPU per refresh, one a second (ms) | chart redraws "
            "seen in the page (`plotly_afterplot`; st.plotly_chart remounts, so none counted) | websocket bytes per minute |",
            "|---|---|---|---|---|",
        ]
        for n in names:
            x = load_result[n]
            lines.append(f"| {n} | {x['cpu_share']:.1%} | {x['cpu_ms_per_refresh']:.0f} | {x['chart_draws']:.0f} | "
                         f"{x['bytes_per_minute'] / 1e6:.2f} MB |")
        if baseline:
            new, old = load_result["babysit"], load_result["babysit@base"]
            lines += [
                "",
                f"Before → after (baseline → this commit): server CPU {old['cpu_share']:.1%} → {new['cpu_share']:.1%} "
                f"of a core (**{new['cpu_share'] / old['cpu_share']:.2f}×**), per refresh "
                f"{old['cpu_ms_per_refresh']:.0f} → {new['cpu_ms_per_refresh']:.0f} ms "
                f"(**{new['cpu_ms_per_refresh'] / old['cpu_ms_per_refresh']:.2f}×**); websocket "
                f"{old['bytes_per_minute'] / 1e6:.2f} → {new['bytes_per_minute'] / 1e6:.2f} MB a minute "
                f"(**{new['bytes_per_minute'] / old['bytes_per_minute']:.2f}×**).",
            ]
    lines += ["", READING]
    return "\n".join(lines) + "\n"


READING = """## Reading it

- **bare** draws the figure the dashboard draws *now* (SVG traces, fewer epoch markers), so
  babysit / bare compares the page around the chart and the way the chart gets to the browser;
  **bare@base** draws the figure as the baseline made it (WebGL traces past 1,000 points), the
  bare page the issue measured against. The targets: first chart ≤ 0.6× the bare page, server CPU
  per refresh ≤ 0.35× and websocket bytes per minute ≤ 0.2× the baseline's.
- What the dashboard does for the first chart: plotly.js's "basic" bundle (1.19 MB, 395 KB
  gzip-compressed, against 4.8 MB / 1.48 MB; babysit/ui/live_chart/PLOTLY.md), SVG traces only,
  plotly.js started by a data-free component placed first on the page and by the chart's stub
  before its module is fetched, and a session's first run drawing the curve and the status alone
  (the controls and tables follow in an immediate rerun). A revisit takes plotly.js from the
  browser's Cache Storage (Streamlit's component file server sends no max-age or validators);
  this benchmark opens a fresh Chromium every time, so it measures first visits only.
- What it does for each refresh: Streamlit's `gc.collect(2)` after every run is off
  (`runner.postScriptGC`, set by app.py), whole-series chunk summaries are cached (only the last
  chunk and newer are read again), and the chart is sent as a delta on the previous figure
  (babysit/ui/figure_delta.py; aligned downsampling buckets keep the earlier points identical).
- The 2-core machine is shared: absolute times move by tens of per cent from one minute to the
  next (see the min–max); compare the ratios, which come from interleaved rounds.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description="First chart and refresh cost of the dashboard vs a bare page")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="a git ref to measure beside this checkout")
    parser.add_argument("--load-seconds", type=float, default=20.0)
    parser.add_argument("--load-rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "DASHBOARD.md")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    variants = [Variant("babysit", REPO, REPO / "app.py"), Variant("bare", REPO, BARE_APP)]
    if args.baseline:
        old = baseline_checkout(args.baseline)
        variants += [Variant("babysit@base", old, old / "app.py"), Variant("bare@base", old, BARE_APP)]
    results = measure(variants, args.sizes, args.rounds, args.load_seconds, args.load_rounds)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"first-chart-{stamp}.json").write_text(json.dumps(results, indent=1))
    args.out.write_text(report(results, args, args.baseline))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
