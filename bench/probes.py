"""The cost of a probe set against training the same number of steps plainly, and the lr sweep's
restore checked bit-identical: ``python -m bench.probes`` writes bench/INSTRUMENTS.md.

Each round trains the demo's digits job (its CNN, augmentation, DataLoader with RandomSampler)
from the same seed in a fresh run directory, one long epoch, three ways, in an order rotated per
round (bench.common.interleave):

* plain: from step S, K×N steps more; timed from the hook at step S to the hook at S + K×N + 1.
* probes: at step S a probe set of K values × N steps (``then="continue"``); timed from the hook
  at step S to the hook of the first step trained back on branch 1 (also K×N + 1 steps trained).
  Its own parts are timed inside: waiting for checkpoint writes (the return point, each probe's
  end), loading checkpoints (the fork for probes 2…K, the return point), and skipping the
  epoch's batches already trained after a load (the loader's exact position).
* sweep: at step S an lr sweep of W steps; a thread resumes the run when it pauses after it.

All three then train to the same final step; the probes' and the sweep's final weights are
compared with the plain run's (torch.equal, every tensor).
"""

from __future__ import annotations

import argparse
import sys
import copy
import statistics
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .common import BENCH_DIR, Scratch, fmt, interleave, load_average, machine_info, set_threads, summarize

OUT = BENCH_DIR / "INSTRUMENTS.md"


class Timers:
    """Seconds spent in a few of babysit's own functions while an excursion runs (wrapped here)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.on = False  # only what happens inside the timed window counts
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                    self.counts[label] = self.counts.get(label, 0) + 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def undo(self) -> None:
        for step in reversed(self._undo):
            step()
        self._undo.clear()


def one_run(work: Any, loader: Callable[[int], Any], run_dir: Path, *, start: int, total: int,
            command: tuple[str, dict[str, Any]] | None, end_step: int) -> dict[str, Any]:
    """Train ``total`` steps; at ``start`` queue ``command``; time from the hook at ``start`` to the
    first hook on branch 1 at ``end_step`` (after the excursion, if any). Returns the timing, the
    final weights and the babysit parts timed."""
    import torch

    from babysit import Run
    from babysit import commands as cmd
    from babysit.excursion_runner import Excursion
    from babysit.position import ResumePosition
    from babysit.snapshots import Snapshots
    from babysit.store import RunStore

    # Workload.reset() would hand the optimizer the very tensors of its saved state (torch's
    # load_state_dict keeps them), which training then changes: a deep copy keeps every run equal.
    work.model.load_state_dict(work.initial["model"])
    work.optimizer.load_state_dict(copy.deepcopy(work.initial["optimizer"]))
    torch.manual_seed(1)
    timers = Timers()
    timers.wrap(Excursion, "_load", "loads")
    timers.wrap(ResumePosition, "iterate", "skips")  # an epoch's iter(), past the batches behind the run
    timers.wrap(Snapshots, "wait", "checkpoint waits")
    run = Run(run_dir, work.model, work.optimizer, config={"bench": "probes"}, keep_last=3)
    t0 = t1 = None
    sent = False
    stamps: list[tuple[int, int, float]] = []  # (branch, step, time) at every hook from the start step on

    def resume_after_pause() -> None:  # the person who reads the sweep and resumes the run
        store = RunStore(run_dir)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if store.status().get("state") == "paused":
                store.enqueue_command(cmd.RESUME, {}, source="bench")
                return
            time.sleep(0.01)

    if command is not None and command[0] == cmd.SWEEP:
        threading.Thread(target=resume_after_pause, daemon=True).start()
    try:
        for _epoch in run.epochs(1):
            for batch in run.batches(loader(total)):
                loss = work.step(batch)
                run.log(loss=loss)
                if t0 is not None and t1 is None:
                    stamps.append((run.branch, run.step, time.perf_counter()))
                if run.branch != 1:
                    continue
                if run.step == start and t0 is None:
                    t0, timers.on = time.perf_counter(), True
                    if command is not None and not sent:
                        sent = True
                        run.store.enqueue_command(command[0], command[1], source="bench")
                        run._wake = True  # applied at this boundary, as the page's signal makes it
                if run.step == end_step and t0 is not None and t1 is None and run._excursion is None:
                    t1, timers.on = time.perf_counter(), False
    finally:
        timers.undo()
        run.close()
    store = RunStore(run_dir)
    excursions = store.excursions()
    # One step's time: between two hooks of consecutive steps of one branch (a load or a checkpoint
    # wait falls between a probe's last step and the next one's first, never inside such a pair).
    steps_ms = [(b[2] - a[2]) * 1000 for a, b in zip(stamps, stamps[1:]) if a[0] == b[0] and b[1] == a[1] + 1
                and (command is None or b[0] != 1)]
    return {"seconds": (t1 - t0) if t0 and t1 else float("nan"), "parts": dict(timers.seconds),
            "step_ms": statistics.median(steps_ms) if steps_ms else float("nan"),
            "counts": dict(timers.counts), "weights": [p.detach().clone() for p in work.model.state_dict().values()],
            "excursion": excursions[0] if excursions else None, "steps": run.step}


def tap_microseconds(calls: int = 100_000) -> float:
    """What the excursion's loss tap adds to one ``run.log`` call, in µs (timeit)."""
    import timeit

    from babysit.excursion_runner import LossTap
    from babysit.store import PER_STEP

    queue: list[Any] = []
    tap, item = LossTap(queue.append), (PER_STEP, 2, 10, 0.0, {"loss": 1.234})
    with_tap = timeit.timeit(lambda: tap(item), number=calls)
    plain = timeit.timeit(lambda: queue.append(item), number=calls)
    return (with_tap - plain) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probes", type=int, default=3, help="K, values tried (factors spread around ×1)")
    parser.add_argument("--steps", type=int, default=60, help="N, steps per probe")
    parser.add_argument("--sweep-steps", type=int, default=60)
    parser.add_argument("--start", type=int, default=30, help="S, the step the probe set starts at")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info(args.threads)
    machine["command"] = "python -m bench.probes" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))

    import torch

    from babysit import commands as cmd

    from .common import make_digits_workload

    work, loader = make_digits_workload()
    factors = [2.0 ** (i - (args.probes - 1) / 2) for i in range(args.probes)]
    k_n = args.probes * args.steps
    total = args.start + k_n + 20
    scratch = Scratch(BENCH_DIR / "out", "probes-")
    probe = (cmd.PROBE, {"factors": factors, "steps": args.steps, "then": "continue"})
    sweep = (cmd.SWEEP, {"steps": args.sweep_steps})
    started = time.perf_counter()
    try:
        results = interleave({
            "plain": lambda r: one_run(work, loader, scratch.fresh("plain"), start=args.start, total=total,
                                       command=None, end_step=args.start + k_n + 1),
            "probes": lambda r: one_run(work, loader, scratch.fresh("probes"), start=args.start, total=total,
                                        command=probe, end_step=args.start + 1),
            "sweep": lambda r: one_run(work, loader, scratch.fresh("sweep"), start=args.start, total=total,
                                       command=sweep, end_step=args.start + 1),
        }, rounds=args.rounds)
    finally:
        scratch.cleanup()
    wall = time.perf_counter() - started

    def identical(a: list[Any], b: list[Any]) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    plain, probes, sweeps = results["plain"], results["probes"], results["sweep"]
    ratios = [p["seconds"] / q["seconds"] for p, q in zip(probes, plain)]
    parts = {name: summarize([p["parts"].get(name, 0.0) * 1000 for p in probes])
             for name in ("checkpoint waits", "loads", "skips")}
    counts = probes[0]["counts"]
    fixed = [sum(p["parts"].values()) for p in probes]
    ratio_without = [(p["seconds"] - f) / q["seconds"] for p, f, q in zip(probes, fixed, plain)]
    summary = {
        "machine": machine, "wall_s": round(wall, 1), "rounds": args.rounds,
        "K": args.probes, "N": args.steps, "factors": factors, "start": args.start, "sweep_steps": args.sweep_steps,
        "plain_ms": summarize([q["seconds"] * 1000 for q in plain]),
        "probes_ms": summarize([p["seconds"] * 1000 for p in probes]),
        "ratio": summarize(ratios), "ratio_without_loads_writes_skips": summarize(ratio_without),
        "parts_ms": parts, "counts": counts,
        "plain_step_ms": summarize([q["step_ms"] for q in plain]),
        "probe_step_ms": summarize([p["step_ms"] for p in probes]),
        "step_ratio": summarize([p["step_ms"] / q["step_ms"] for p, q in zip(probes, plain)]),
        "probes_identical": all(identical(p["weights"], q["weights"]) for p, q in zip(probes, plain)),
        "sweep_identical": all(identical(s["weights"], q["weights"]) for s, q in zip(sweeps, plain)),
        "sweep_steps_done": [s["excursion"]["branches"][0]["result"].get("steps_done") for s in sweeps],
        "excursions_done": all(p["excursion"]["state"] == "done" for p in probes + sweeps),
    }
    summary["load_end"] = load_average()
    summary["tap_us"] = tap_microseconds()
    args.out.write_text(report(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1, default=str))
    return 0 if summary["probes_identical"] and summary["sweep_identical"] and summary["excursions_done"] else 1


def report(s: dict[str, Any]) -> str:
    m = s["machine"]
    per = {name: s["parts_ms"][name] for name in ("checkpoint waits", "loads", "skips")}
    counts = s["counts"]

    def ms(summary: dict[str, float]) -> str:
        return f"{fmt(summary['median'], 0)} ({fmt(summary['min'], 0)}–{fmt(summary['max'], 0)})"

    def x(summary: dict[str, float]) -> str:
        return f"{summary['median']:.3f}× ({summary['min']:.3f}–{summary['max']:.3f})"

    k, n = s["K"], s["N"]
    return f"""# The panda's instruments: what a probe set costs, and the sweep's exact return

`{m['command']}` on {m['started_utc']} UTC ({s['wall_s']} s), {m['cpu_model']}, {m['cpus_usable']} usable
cores shared with other work (load {m['load_average_start']}), torch {m['torch']} on {m['torch_threads']} thread(s),
commit {m['git_commit'][:10]}{' (uncommitted changes)' if m['git_dirty'] else ''}.

Workload: the demo's digits job (CNN, augmentation, a DataLoader with RandomSampler), one long epoch,
the same seed every run. {s['rounds']} paired rounds after a warm-up one, each round training three
fresh runs in a rotated order: plain, a probe set, an lr sweep (bench/probes.py says how each is timed).

## A probe set of K × N steps against K × N plain steps

K = {k} values (lr × {', '.join(f'{f:g}' for f in s['factors'])}), N = {n} steps each, from step {s['start']}, then back
on branch 1 (`then="continue"`). Medians (min–max) over the rounds, in ms.

| | ms |
|---|---|
| {k * n + 1} steps plainly | {ms(s['plain_ms'])} |
| the probe set: {k} × {n} probe steps, then the first step back on branch 1 | {ms(s['probes_ms'])} |
| **ratio, paired per round** | **{x(s['ratio'])}** |
| ratio without the parts below | {x(s['ratio_without_loads_writes_skips'])} |

One step (the median of each run's steps, then the median over the rounds): {fmt(s['plain_step_ms']['median'], 2)} ms
plainly, {fmt(s['probe_step_ms']['median'], 2)} ms on the probe branches; paired ratio {x(s['step_ratio'])}. A
probe's step runs the same code as a plain one, plus a few attribute reads at its boundary and one
EWMA update per logged loss (the probe's divergence check: {s['tap_us']:.1f} µs a call, timeit); what a probe set adds beyond its steps
is the checkpoint writes, loads and skips below.

On this machine, shared with other work (load average {m['load_average_start']} at the start,
{s['load_end']} at the end), the paired ratio of whole probe sets wanders by tens of per cent from
round to round; the step ratio and the parts below are the steadier figures.

Inside the probe set:

| part | times per probe set | ms per probe set |
|---|---|---|
| waiting for checkpoint writes (the return point, and each probe's end, kept to continue from the winner; the writer thread runs niced, so a busy machine stretches these) | {counts.get('checkpoint waits', 0)} | {ms(per['checkpoint waits'])} |
| checkpoint loads (read, SHA-256 checked, `torch.load`, `load_state_dict`): the fork for probes 2…{k}, the return point | {counts.get('loads', 0)} | {ms(per['loads'])} |
| skipping the epoch's batches already trained after each load (the loader's exact position) | {counts.get('skips', 0)} | {ms(per['skips'])} |

The first probe starts in place (the state at the fork is the run's own: nothing to load), so a set of K
probes from now costs K loads (K − 1 forks and the return) and K + 1 checkpoint writes. The loads and
skips grow with the model and with how far into its epoch the fork is (the skip draws the batches again,
without training on them); everything else is the K × N steps themselves.

Bit-identical: after the probe set, the run's final weights equal the plain run's in every round:
**{'yes' if s['probes_identical'] else 'NO'}**.

## The lr sweep's restore

An lr sweep of {s['sweep_steps']} steps (from the current lr × 1e-3 to × 100) at step {s['start']}, then back on
branch 1 (paused; a thread resumes it), trained to the same final step as the plain run: final weights
equal to the plain run's in every round (torch.equal on every tensor): **{'yes' if s['sweep_identical'] else 'NO'}**.
Steps the sweeps trained before their divergence stop: {s['sweep_steps_done']}.
"""


if __name__ == "__main__":
    raise SystemExit(main())
