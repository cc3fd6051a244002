"""babysit under torchrun against plain DDP: the cost per step, and how many steps a nudge takes
to reach every rank.

    python -m bench.overhead_torchrun [--rounds 12] [--steps 400]

Starts ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU, one torch thread per rank) on
this file. Each rank trains the same DDP model (the MLP 64→256→10, batch 64 per rank) for
``steps`` steps per block, once as a plain DDP loop and once inside ``run.batches`` with
``run.log(loss=loss)`` every step; the two variants alternate, the order shuffled every round
(the same order on every rank). A block is timed on rank 0 from its first batch to its last step
(the epoch's checkpoint is not in it: bench/checkpoint_stall.py measures those); its wall time
divided by the steps is the mean step the user pays. Beside the wall time, each rank's CPU time
over the block: of its training thread (``time.thread_time``: babysit's own work in the step, what
a machine with a core per rank would still pay) and of the whole process (``time.process_time``:
that plus babysit's writer thread and gloo's threads). Overheads are per-round differences, as
medians with their spread.

In every babysat block rank 0 queues an lr nudge (the store call the CLI makes) after step
``steps // 2``; each rank notes the step at which its optimizer first uses the new lr. Every rank
must see it at the same step; the lag is that step minus the step it was queued at, bounded by
babysit.ranks.MAX_INTERVAL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("TORCHRUN.md")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import babysit
    from babysit import commands as cmd

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(64, 64, generator=generator), torch.randint(0, 10, (64,), generator=generator))
               for _ in range(args.steps)]

    def train(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    def clocks() -> tuple[float, float, float]:
        return time.perf_counter(), time.thread_time(), time.process_time()

    def per_step(start: tuple[float, float, float], end: tuple[float, float, float]) -> dict[str, Any]:
        wall, thread, process = ((b - a) / len(batches) * 1e6 for a, b in zip(start, end))
        cpu = [None] * dist.get_world_size()
        dist.all_gather_object(cpu, (thread, process))
        return {"per_step_us": wall, "thread_cpu_us": [c[0] for c in cpu], "process_cpu_us": [c[1] for c in cpu]}

    def plain(_run: Any, _round: int) -> dict[str, Any]:
        start = clocks()
        for xb, yb in batches:
            train(xb, yb)
        return per_step(start, clocks())

    def babysat(run: Any, round_: int) -> dict[str, Any]:
        nudge = round_ % 2 == 1  # every other round: the per-step figures come from the rounds without one
        lr_before = optimizer.param_groups[0]["lr"]
        new_lr = lr_before / 2 if round_ % 4 == 1 else lr_before * 2  # back and forth: the lr stays in range
        queued_at = seen_at = None
        if rank == 0:
            live.unpark()
        start = clocks()
        for xb, yb in run.batches(batches):
            if seen_at is None and optimizer.param_groups[0]["lr"] != lr_before:
                seen_at = run.step - 1  # the boundary after that step applied it
            run.log(loss=train(xb, yb))
            if nudge and rank == 0 and run.step_in_epoch == len(batches) // 2:
                run.store.enqueue_command(cmd.SET_LR, {"value": new_lr}, source="bench")
                queued_at = run.step
        if rank == 0:
            run.writer.flush()  # the block's values the writer thread had not stored yet: its cost
        end = clocks()
        if rank == 0:
            live.park()
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, seen_at)
        queued = [queued_at]
        dist.broadcast_object_list(queued, src=0)
        return {**per_step(start, end), "nudged": nudge, "seen_at": seen, "queued_at": queued[0]}

    class Live:
        """Rank 0's writer thread at its own pace during a babysat block, asleep between blocks
        (as in bench/step_overhead.py), so a plain block never pays for babysit's values."""

        def __init__(self, run: Any) -> None:
            self.run, self.interval = run, run.writer._interval

        def park(self) -> None:
            self.run.writer._interval = 3600.0
            self.run.writer.wake()

        def unpark(self) -> None:
            self.run.writer._interval = self.interval
            self.run.writer.wake()

    variants = {"plain DDP": plain, "babysit": babysat}
    order = random.Random(12345)  # the same shuffles on every rank: both run the same variant together
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    # One Run for the whole job, as in a real run; one epoch per round. Its start and each epoch's
    # checkpoint (measured by bench/checkpoint_stall.py) are outside the timed blocks.
    with babysit.Run(Path(args.scratch) / "run", model, optimizer) as run:
        live = Live(run) if rank == 0 else None
        if live is not None:
            live.park()
        for round_, _epoch in enumerate(run.epochs(args.rounds + 1)):
            if run.checkpointer is not None:
                run.checkpointer.wait()  # the last epoch's checkpoint is written before the round starts
            names = list(variants)
            order.shuffle(names)
            for name in names:
                dist.barrier()
                result = variants[name](run, round_)
                if round_ > 0:  # the first round warms up
                    results[name].append(result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    from babysit.ranks import MAX_INTERVAL, SYNC_EVERY_S
    from bench.common import fmt_range, summarize

    pairs = list(zip(results["plain DDP"], results["babysit"]))  # the same round
    quiet = [(p, b) for p, b in pairs if not b["nudged"]]
    nudged = [(p, b) for p, b in pairs if b["nudged"]]

    def wall_rows(rounds: list[tuple[dict[str, Any], dict[str, Any]]], label: str) -> list[str]:
        plain = [p["per_step_us"] for p, _ in rounds]
        babysat = [b["per_step_us"] for _, b in rounds]
        return [f"| {label}: plain DDP | {fmt_range(summarize(plain))} |",
                f"| {label}: babysit (`run.batches`, `run.log` every step) | {fmt_range(summarize(babysat))} |",
                f"| {label}: babysit − plain, same round | {fmt_range(summarize([b - p for b, p in zip(babysat, plain)]))} |",
                f"| {label}: overhead, % of the plain step | "
                f"{fmt_range(summarize([(b - p) / p * 100 for b, p in zip(babysat, plain)]), 2)} % |"]

    cpu_rows = []
    for key, what in (("thread_cpu_us", "training thread"), ("process_cpu_us", "whole process")):
        plain_cpu = [sum(p[key]) / len(p[key]) for p, _ in quiet]  # per round, the mean of the ranks
        babysat_cpu = [sum(b[key]) / len(b[key]) for _, b in quiet]
        cpu_rows.append(
            f"| {what} | {fmt_range(summarize(plain_cpu))} | {fmt_range(summarize(babysat_cpu))} | "
            f"{fmt_range(summarize([b - p for b, p in zip(babysat_cpu, plain_cpu)]))} | "
            f"{fmt_range(summarize([(b - p) / p * 100 for b, p in zip(babysat_cpu, plain_cpu)]), 2)} % |")
    lags = [b["seen_at"][0] - b["queued_at"] for _, b in nudged]
    agreed = all(len(set(b["seen_at"])) == 1 and b["seen_at"][0] is not None for _, b in nudged)
    return "\n".join([
        "# babysit under torchrun against plain DDP",
        "",
        f"`python -m bench.overhead_torchrun --rounds {args.rounds} --steps {args.steps}` — 2 ranks (gloo, CPU, one "
        f"torch thread each) on this {os.cpu_count()}-core machine; {args.rounds} paired rounds of {args.steps} steps, "
        "the order shuffled every round, one babysit Run for the whole job (one epoch per round, its checkpoint "
        "outside the timed blocks); a babysat block ends when rank 0 has stored its values. In every other round "
        "rank 0 queues an lr nudge half-way: the per-step figures are from the rounds without one, the nudge's "
        "lag and its one-off cost from the others. Medians (min–max) of the per-round figures, measured side by "
        "side in one run.",
        "",
        "| | µs per step |",
        "|---|---|",
        *wall_rows(quiet, f"no nudge ({len(quiet)} rounds)"),
        *wall_rows(nudged, f"one nudge ({len(nudged)} rounds)"),
        "",
        "CPU time per step, mean of the two ranks (rounds without a nudge):",
        "",
        "| | plain DDP | babysit | babysit − plain | % of plain |",
        "|---|---|---|---|---|",
        *cpu_rows,
        "",
        f"An lr nudge queued after step {args.steps // 2} of the block reached both ranks at the same step in "
        f"{'every' if agreed else 'NOT every'} round, {fmt_range(summarize(lags), 0)} steps after it was queued "
        f"(bound: {MAX_INTERVAL} steps; sync steps are about {SYNC_EVERY_S * 1000:g} ms apart).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="babysit-torchrun-bench-") as scratch:
        out = Path(scratch) / "results.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--worker", "--rounds", str(args.rounds), "--steps", str(args.steps),
                        "--scratch", scratch, "--out", str(out)],
                       check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        text = report(json.loads(out.read_text()), args)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
