"""The training thread's stall for a sharded checkpoint: babysit's against ``dcp.save`` and
``dcp.async_save`` of the same state, side by side in one run.

    python -m bench.sharded_stall [--rounds 6] [--width 2048] [--layers 4] [--steps 4]

Starts ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU, one torch thread per rank) on this
file. Both ranks train an MLP of ``layers`` Linear(width, width) layers, each and the root sharded
with ``fully_shard`` (FSDP2), with SGD and momentum; every round each variant checkpoints the same
state (the model's and the optimizer's sharded state dicts), in an order rotated every round and
the same on both ranks:

- **babysit**: ``babysit.sharded.stage`` (``get_state_dict`` and a copy of this rank's shard) and
  ``ShardedCheckpointer.submit`` (rank 0's file with the rest, every rank's shard, hashes, the
  manifest and the rename happen on the writer thread);
- **dcp.save**: ``get_state_dict`` and ``dcp.save`` (blocking until every rank's shard and the
  index are on disk);
- **dcp.async_save**: ``get_state_dict`` and ``dcp.async_save`` (it returns once the state is
  staged, a copy in CPU memory; the writing runs on its own thread), on a gloo group of its own,
  as DCP advises when training runs collectives meanwhile.

Per variant: the **stall** (from the decision to checkpoint to the training thread's next step),
the time until the checkpoint is complete on disk, and the **extra time of the next ``steps``
training steps**, taken while the write runs, over the same steps taken with nothing being written
(the writer competes for the CPU). A rank's figure per round is the larger of the two ranks'
(the ranks wait for each other at the next collective). Medians (min–max) over the rounds after a
warm-up round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("SHARDED.md")
VARIANTS = ("babysit", "dcp.save", "dcp.async_save")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    from babysit.checkpoint import FORMAT, KEY_FORMAT, PendingCheckpoint, rng_state
    from babysit.sharded import stage
    from babysit.sharded_writer import ShardedCheckpointer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batch = torch.randn(32, args.width, generator=torch.Generator().manual_seed(rank))
    scratch = Path(args.scratch)
    writer = ShardedCheckpointer(lambda job: None, lambda job: None)
    async_group = dist.new_group(backend="gloo")

    def train(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            model(batch).pow(2).mean().backward()
            optimizer.step()
        return time.perf_counter() - started

    def babysit_variant(target: Path) -> tuple[float, Any]:
        started = time.perf_counter()
        rest = {KEY_FORMAT: FORMAT, "rng": rng_state()} if rank == 0 else None
        job = writer.submit(PendingCheckpoint(path=target, state={"shards": stage(model, optimizer), "rest": rest},
                                              meta={}))
        return time.perf_counter() - started, job.done.wait

    def save_variant(target: Path) -> tuple[float, Any]:
        started = time.perf_counter()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=target)
        return time.perf_counter() - started, lambda: None

    def async_variant(target: Path) -> tuple[float, Any]:
        started = time.perf_counter()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=target,
                                process_group=async_group)
        return time.perf_counter() - started, future.result

    variants = {"babysit": babysit_variant, "dcp.save": save_variant, "dcp.async_save": async_variant}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    train(2)  # warm: the optimizer's state exists, the first collectives are set up
    for round_ in range(args.rounds + 1):
        order = list(VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3])
        for name in order:
            dist.barrier()
            quiet = train(args.steps)  # the same steps with nothing being written
            dist.barrier()
            started = time.perf_counter()
            stall, finish = variants[name](scratch / f"{name}-{round_}")
            completed: list[float] = []
            watcher = threading.Thread(target=lambda: (finish(), completed.append(time.perf_counter())))
            watcher.start()
            busy = train(args.steps)  # while the write runs (nothing, for dcp.save)
            watcher.join()
            done = completed[0] - started
            dist.barrier()
            figures = torch.tensor([stall, done, busy - quiet], dtype=torch.float64)
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)  # the slower rank's: the other waits for it
            if round_ > 0:
                stall_s, done_s, extra_s = figures.tolist()
                results[name].append({"stall_ms": stall_s * 1000, "done_ms": done_s * 1000,
                                      "extra_ms": extra_s * 1000})
    writer.close()
    sizes = {name: sum(f.stat().st_size for f in (scratch / f"{name}-1").iterdir()) for name in VARIANTS}
    if rank == 0:
        shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) * 2  # + momentum
        Path(args.out).write_text(json.dumps({"results": results, "sizes": sizes, "shard_bytes": shard_bytes}))
    dist.destroy_process_group()


def report(found: dict[str, Any], args: argparse.Namespace) -> str:
    from bench.common import fmt_range, summarize

    results = found["results"]
    rows = []
    for name in VARIANTS:
        rows.append(f"| {name} | {fmt_range(summarize([r['stall_ms'] for r in results[name]]))} | "
                    f"{fmt_range(summarize([r['extra_ms'] for r in results[name]]))} | "
                    f"{fmt_range(summarize([r['stall_ms'] + r['extra_ms'] for r in results[name]]))} | "
                    f"{fmt_range(summarize([r['done_ms'] for r in results[name]]))} |")
    ratio = [b["stall_ms"] / a["stall_ms"] for b, a in zip(results["babysit"], results["dcp.async_save"])]
    ratio_save = [b["stall_ms"] / a["stall_ms"] for b, a in zip(results["babysit"], results["dcp.save"])]
    mib = found["shard_bytes"] / 2**20
    return "\n".join([
        "# Sharded checkpoints: the training thread's stall",
        "",
        f"`python -m bench.sharded_stall --rounds {args.rounds} --width {args.width} --layers {args.layers} "
        f"--steps {args.steps}` — 2 ranks (gloo, CPU, one torch thread each) on this {os.cpu_count()}-core machine; "
        f"an MLP of {args.layers} Linear({args.width}, {args.width}) layers sharded with `fully_shard`, SGD with "
        f"momentum: {mib:,.0f} MiB of weights and momentum per rank. {args.rounds} rounds after a warm-up round, the "
        "variants' order rotated every round; each figure per round is the slower rank's. Medians (min–max), "
        "milliseconds, measured side by side in one run (see the module's docstring for what each variant does).",
        "",
        f"| variant | stall | extra time of the next {args.steps} steps (write in flight) | stall + extra | "
        "until complete on disk |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"babysit's stall over `dcp.async_save`'s, same round: {fmt_range(summarize(ratio), 2)}; "
        f"over `dcp.save`'s: {fmt_range(summarize(ratio_save), 3)}.",
        "",
        "Folder sizes (round 1): " + ", ".join(f"{name} {size / 2**20:,.1f} MiB" for name, size in found["sizes"].items())
        + f". Load average (1 min) {found['load'][0]:.1f} before the run, {found['load'][1]:.1f} after.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(RESULTS), help="the Markdown file to write")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="babysit-sharded-bench-") as scratch:
        out = Path(scratch) / "results.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--worker", "--rounds", str(args.rounds), "--width", str(args.width),
                        "--layers", str(args.layers), "--steps", str(args.steps), "--scratch", scratch,
                        "--out", str(out)],
                       check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        found = json.loads(out.read_text())
    found["load"] = (load_before, os.getloadavg()[0])
    text = report(found, args)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
