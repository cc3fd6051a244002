"""Resume time inside an epoch: from ``Run(...)`` to the first new batch, at step-in-epoch 10,
10³ and 10⁵, against a fresh start, for a map-style DataLoader and a torchdata StatefulDataLoader.

    python -m bench.resume_skip                 # → bench/RESUME.md
    python -m bench.resume_skip --rounds 5 --points 10,1000,100000

The dataset is what a real one costs to read: 0.5 ms a sample (busy-waited, so the cost is CPU
time, as decoding is), batch 16, 1.7 M samples (so that 10⁵ batches fit in one epoch), shuffled.
For each point a run directory is prepared once (trained to the point with the same dataset at no
read cost, stopped there with its final checkpoint); then, in rounds with the order rotated, a
fresh start (a new run directory) and a resume (that checkpoint) are timed in this process, with
the model, optimizer and loader made before the clock starts, as a restarted script makes them.
Reported: median (min–max) seconds, and resume / fresh. For reference the way every resume worked
before (reading the batches already trained and throwing them away) is timed at the points where
it ends in reasonable time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from babysit import Run, loader_skip

from .common import BENCH_DIR, load_average, machine_info

BATCH = 16
SAMPLES = 1_700_000
READ_COST_S = 0.0005
REREAD_UP_TO = 1000  # the old way reads 16 × 0.5 ms per batch skipped: 10⁵ batches would take 13 minutes


class Slow(Dataset):
    """Sample i: four numbers made from i, after ``cost_s`` of busy CPU (a decode)."""

    def __init__(self, cost_s: float) -> None:
        self.cost_s = cost_s

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.cost_s:
            end = time.perf_counter() + self.cost_s
            while time.perf_counter() < end:
                pass
        return torch.full((4,), float(index % 97) / 97)


def make_loader(kind: str, cost_s: float) -> Any:
    if kind == "StatefulDataLoader":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(Slow(cost_s), batch_size=BATCH, shuffle=True)
    return DataLoader(Slow(cost_s), batch_size=BATCH, shuffle=True)


def parts(kind: str, cost_s: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), make_loader(kind, cost_s)


def prepare(run_dir: Path, kind: str, steps: int) -> None:
    """Train ``steps`` steps (reading at no cost) and stop there with a final checkpoint."""
    model, optimizer, loader = parts(kind, 0.0)
    with Run(run_dir, model, optimizer, config={"bench": "resume"}) as run:
        for _epoch in run.epochs(1):
            for x in run.batches(loader):
                loss = model(x).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if run.step == steps:
                    run.request_stop("bench")
    assert run.status == "stopped" and run.step == steps, (run.status, run.step)


def first_batch(run_dir: Path, kind: str) -> tuple[float, loader_skip.Skip | None]:
    """Seconds from Run(...) to the first batch in hand (model, optimizer, loader made before)."""
    model, optimizer, loader = parts(kind, READ_COST_S)
    start = time.perf_counter()
    run = Run(run_dir, model, optimizer, config={"bench": "resume"})
    epochs = run.epochs(1)
    next(epochs)
    batches = run.batches(loader)
    next(batches)
    elapsed = time.perf_counter() - start
    skip = run.position.last_skip
    batches.close()
    epochs.close()
    run.close()
    return elapsed, skip


def reading_only() -> Callable[[], None]:
    """Make every resume read its skipped batches (the way before); returns the undo."""
    original = loader_skip._skips_by_sampler
    loader_skip._skips_by_sampler = lambda loader: False  # type: ignore[assignment]
    stateful = loader_skip.has_own_state
    loader_skip.has_own_state = lambda loader: False  # type: ignore[assignment]

    def undo() -> None:
        loader_skip._skips_by_sampler = original  # type: ignore[assignment]
        loader_skip.has_own_state = stateful  # type: ignore[assignment]
    return undo


def measure(kind: str, point: int, rounds: int, scratch: Path) -> dict[str, Any]:
    resume_dir = scratch / f"{kind}-{point}"
    prepare(resume_dir, kind, point)
    times: dict[str, list[float]] = {"fresh": [], "resume": [], "re-read (before)": []}
    how = set()
    variants = ["fresh", "resume"] + (["re-read (before)"] if point <= REREAD_UP_TO else [])
    for r in range(rounds):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            if variant == "fresh":
                fresh_dir = scratch / f"fresh-{kind}-{point}-{r}"
                elapsed, _ = first_batch(fresh_dir, kind)
                shutil.rmtree(fresh_dir)
            elif variant == "resume":
                elapsed, skip = first_batch(resume_dir, kind)
                assert skip is not None and skip.batches == point, skip
                how.add(skip.how)
            else:
                undo = reading_only()
                try:
                    elapsed, skip = first_batch(resume_dir, kind)
                finally:
                    undo()
                assert skip is not None and skip.how == loader_skip.BY_READING and skip.read == point, skip
            times[variant].append(elapsed)
    return {"kind": kind, "point": point, "how": sorted(how), **{k: v for k, v in times.items() if v}}


def report(results: list[dict[str, Any]], command: str, facts: dict[str, Any]) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"

    lines = [
        "# Resume inside an epoch: time to the first new batch",
        "",
        f"Command: `{command}` (bench/resume_skip.py; its docstring says how it measures).",
        f"Machine: {facts['cpu_model']}, {facts['cpus_usable']} usable cores, load average "
        f"{facts['load_average_start']} at start and {load_average()} at end; torch {facts['torch']}; "
        f"commit {facts['git_commit'][:10]}{' (with uncommitted changes)' if facts['git_dirty'] else ''}.",
        f"Dataset: {READ_COST_S * 1e3:g} ms a sample, batch {BATCH}, {SAMPLES:,} samples, shuffled. Seconds from "
        "`Run(...)` to the first new batch in hand, median (min–max); ratio = resume / fresh (target ≤ 1.5).",
        "",
        "| loader | step in epoch | skipped by | fresh start s | resume s | resume / fresh | read them (before) s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = statistics.median(r["resume"]) / statistics.median(r["fresh"])
        before = cell(r["re-read (before)"]) if "re-read (before)" in r else "—"
        lines.append(f"| {r['kind']} | {r['point']:,} | {', '.join(r['how'])} | {cell(r['fresh'])} | "
                     f"{cell(r['resume'])} | {ratio:.2f}× | {before} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--points", default="10,1000,100000")
    parser.add_argument("--kinds", default="DataLoader,StatefulDataLoader")
    parser.add_argument("--results", default=str(BENCH_DIR / "RESUME.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    facts = machine_info(threads=1)
    command = "python -m bench.resume_skip" + (f" --rounds {args.rounds}" if args.rounds != 3 else "") + (
        f" --points {args.points}" if args.points != "10,1000,100000" else "")
    results = []
    with tempfile.TemporaryDirectory(prefix="babysit-resume-") as scratch:
        for kind in args.kinds.split(","):
            for point in (int(p) for p in args.points.split(",")):
                results.append(measure(kind, point, args.rounds, Path(scratch)))
                print(results[-1], flush=True)
    text = report(results, command, facts)
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
