"""Run the benchmark suite and write its results.

    python -m bench            # the full suite (~10 min on 2 cores): bench/RESULTS.md + bench/out/
    python -m bench --quick    # everything at tiny sizes (< 1 min): bench/out/RESULTS-quick.md

Options: ``--only step,nudge,checkpoint,rollback,dashboard``, ``--threads N`` (torch
threads for the training steps, default 1), ``--out DIR`` (raw numbers, scratch run directories,
cached dashboard databases), ``--results FILE`` (the Markdown report).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from . import report
from .common import BENCH_DIR, DEFAULT_THREADS, Scratch, load_average, machine_info, set_threads

SECTIONS = ("step", "nudge", "checkpoint", "rollback", "dashboard")

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "whole_loop": {"steps": 2_000, "rounds": 15, "threads": [1, 2]},
        "isolated": {"steps": 20_000, "rounds": 10},
        "reference": {"steps": 500, "rounds": 90},
        "digits": {"steps": 50, "rounds": 16},
        "nudge": {"count": 60, "gap_ms": (10.0, 60.0)},
        "checkpoint": {"small_reps": 30, "big_reps": 8},
        "rollback": {"small_reps": 20, "big_reps": 6},
        "dashboard": {"sizes": [10_000, 100_000, 1_000_000], "rounds": 3, "reps": 10},
    },
    "quick": {
        "whole_loop": {"steps": 50, "rounds": 2, "threads": [1, 2]},
        "isolated": {"steps": 2_000, "rounds": 2},
        "reference": {"steps": 100, "rounds": 3},
        "digits": {"steps": 10, "rounds": 2},
        "nudge": {"count": 5, "gap_ms": (5.0, 15.0)},
        "checkpoint": {"small_reps": 3, "big_reps": 2},
        "rollback": {"small_reps": 3, "big_reps": 2},
        "dashboard": {"sizes": [10_000, 50_000], "rounds": 1, "reps": 2},
    },
}


def _sections(cfg: dict[str, Any], quick: bool, out: Path, scratch: Scratch) -> dict[str, Callable[[], Any]]:
    from . import checkpoint_stall, dashboard, nudge, rollback, step_overhead
    from .common import make_big_workload, make_digits_workload, make_mlp_workload

    cache: dict[str, Any] = {}

    def mlp() -> Any:
        if "mlp" not in cache:
            cache["mlp"] = make_mlp_workload()
        return cache["mlp"]

    def big() -> Any:
        if "big" not in cache:
            cache["big"] = make_big_workload(quick)
        return cache["big"]

    def step() -> dict[str, Any]:
        digits, loader = make_digits_workload()
        loop = cfg["whole_loop"]
        return {
            "whole_loop": step_overhead.measure_whole_loop(
                step_overhead.whole_loop_workload(), scratch, steps=loop["steps"], rounds=loop["rounds"],
                threads=tuple(loop["threads"])),
            "isolated": step_overhead.measure_isolated(scratch, **cfg["isolated"]),
            "reference": step_overhead.measure_reference(mlp(), scratch, **cfg["reference"]),
            "digits": step_overhead.measure_digits(digits, loader, scratch, **cfg["digits"]),
        }

    def nudges() -> dict[str, Any]:
        return nudge.measure(mlp(), scratch, **cfg["nudge"])

    def checkpoints() -> dict[str, Any]:
        c = cfg["checkpoint"]
        small = checkpoint_stall.measure(mlp(), scratch, reps=c["small_reps"], label="small")
        large = checkpoint_stall.measure(big(), scratch, reps=c["big_reps"], label="large")
        return {"small": small, "large": large}

    def rollbacks() -> dict[str, Any]:
        c = cfg["rollback"]
        small = rollback.measure(mlp(), scratch, reps=c["small_reps"], label="small", settle_steps=20)
        large = rollback.measure(big(), scratch, reps=c["big_reps"], label="large", settle_steps=2)
        return {"small": small, "large": large}

    def dash() -> dict[str, Any]:
        return dashboard.measure(out, **cfg["dashboard"])

    return {"step": step, "nudge": nudges, "checkpoint": checkpoints, "rollback": rollbacks, "dashboard": dash}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, < 1 min (what CI runs)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads (default %(default)s)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="raw results and scratch (git-ignored)")
    parser.add_argument("--results", type=Path, default=None,
                        help="Markdown report (default: bench/RESULTS.md, or OUT/RESULTS-quick.md with --quick)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.threads < 1:
        parser.error(f"--threads must be a whole number >= 1, got {args.threads}")
    mode = "quick" if args.quick else "full"
    results_path = args.results or (args.out / "RESULTS-quick.md" if args.quick else BENCH_DIR / "RESULTS.md")
    args.out.mkdir(parents=True, exist_ok=True)

    set_threads(args.threads)
    cfg = PROFILES[mode]
    started = time.time()
    results: dict[str, Any] = {"mode": mode, "machine": machine_info(args.threads), "config": cfg, "sections": {},
                               "errors": {}, "section_seconds": {}}
    scratch = Scratch(args.out, "work-")
    try:
        runners = _sections(cfg, args.quick, args.out, scratch)
        for name in SECTIONS:
            if name not in only:
                continue
            print(f"[bench] {name} ...", flush=True)
            t0 = time.time()
            try:
                results["sections"][name] = runners[name]()
            except Exception:
                results["errors"][name] = traceback.format_exc()
                print(results["errors"][name], file=sys.stderr, flush=True)
            results["section_seconds"][name] = round(time.time() - t0, 1)
            print(f"[bench] {name} done in {results['section_seconds'][name]} s", flush=True)
    finally:
        scratch.cleanup()
    results["machine"]["load_average_end"] = load_average()
    results["duration_s"] = round(time.time() - started, 1)
    results["targets"] = report.evaluate_targets(results)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw_path = args.out / f"results-{mode}-{stamp}.json"
    text = json.dumps(results, indent=1, default=float)
    raw_path.write_text(text)
    (args.out / f"latest-{mode}.json").write_text(text)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(report.render(results, raw_path=raw_path, previous=results_path))
    print(report.targets_text(results["targets"]))
    print(f"[bench] results: {results_path}  raw: {raw_path}  ({results['duration_s']} s)")
    return 1 if results["errors"] else 0
