"""The training thread's stall for a sharded checkpoint: babysit's against ``dcp.save`` and
``dcp.async_save`` of the same state, side by side in one run.

    python -m bench.sharded_stall [--rounds 6] [--width 2048] [--layers 4] [--steps 4]

Starts ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU, one torch thread per rank) on this
file. Both ranks train an MLP of ``layers`` Linear(width, width) layers, each and the root sharded
with ``fully_shard`` (FSDP2), with SGD and momentum, in a loop around ``babysit.Run``: one epoch per
round, whose end babysit checkpoints. In every round the same state is checkpointed three ways:

- **babysit**: the epoch's own checkpoint, taken by ``run.epochs`` between two epochs: the ranks
  meet, every rank copies its shard (``get_state_dict`` and a clone) and rank 0 the rest of the
  checkpoint (RNGs of every rank, position, hparams), then the writer threads write it all. Its
  stall is the gap from the end of an epoch's body to the start of the next one;
- **dcp.save**: ``get_state_dict`` and ``dcp.save``, inside the epoch (blocking until every rank's
  shard and the index are on disk);
- **dcp.async_save**: ``get_state_dict`` and ``dcp.async_save``, inside the epoch (it returns once
  the state is staged, a copy in CPU memory; the writing runs on its own thread), on a gloo group
  of its own, as DCP advises when training runs collectives meanwhile.

Per variant: the **stall**, the time until the checkpoint is complete on disk (babysit: listed in
the store), and the **extra time of the next ``steps`` training steps**, taken while the write
runs, over the same steps taken with nothing being written (the writer competes for the CPU). A
figure per round is the larger of the two ranks' (the ranks wait for each other at the next
collective); the two DCP variants run in an order alternated every round. Medians (min–max) over
the rounds after a warm-up round.
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

    import babysit

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
    async_group = dist.new_group(backend="gloo")

    def train(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            model(batch).pow(2).mean().backward()
            optimizer.step()
        return time.perf_counter() - started

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

    def slower_rank(*figures: float) -> list[float]:
        values = torch.tensor(figures, dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)  # the other rank waits for the slower one
        return values.tolist()

    def measured(stall: float, finish: Any, started: float) -> dict[str, float]:
        """The steps taken while the write runs, the time it completes, and the same steps quiet."""
        completed: list[float] = []
        watcher = threading.Thread(target=lambda: (finish(), completed.append(time.perf_counter())))
        watcher.start()
        busy = train(args.steps)
        watcher.join()
        dist.barrier()
        quiet = train(args.steps)
        stall, done, extra = slower_rank(stall, completed[0] - started, busy - quiet)
        return {"stall_ms": stall * 1000, "done_ms": done * 1000, "extra_ms": extra * 1000}

    # Inside babysit's stall: the snapshot (rank 0's Snapshots.take, a follower's hand_in: the rest
    # of the checkpoint, the ranks' shares, the shard's copy started), the wait for the shard's copy
    # as the meeting ends (ShardedCheckpointer.release); the remainder is the ranks' meetings.
    from babysit.ranks import Ranks
    from babysit.sharded_writer import ShardedCheckpointer
    from babysit.snapshots import Snapshots

    spent: dict[str, list[float]] = {"snapshot": [], "copy": []}

    def timed(method: Any, part: str) -> Any:
        def call(*args_: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args_, **kwargs)
            finally:
                spent[part].append(time.perf_counter() - started)
        return call

    Snapshots.take = timed(Snapshots.take, "snapshot")  # type: ignore[method-assign]
    Ranks.hand_in = timed(Ranks.hand_in, "snapshot")  # type: ignore[method-assign]
    ShardedCheckpointer.release = timed(ShardedCheckpointer.release, "copy")  # type: ignore[method-assign]
    variants = {"dcp.save": save_variant, "dcp.async_save": async_variant}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    train(2)  # warm: the optimizer's state exists, the first collectives are set up
    epoch_end: float | None = None
    with babysit.Run(scratch / "babysit", model, optimizer) as run:
        for epoch in run.epochs(args.rounds + 2):
            if epoch_end is not None:  # babysit's checkpoint of the epoch that just ended
                stall = time.perf_counter() - epoch_end
                copy = max(spent["copy"][-2:])  # the epoch's meeting, then the next epoch's start
                snapshot, copy = slower_rank(spent["snapshot"][-1], copy)
                writer = run.checkpointer  # every rank's writer of its shards
                result = measured(stall, writer.wait, epoch_end)
                if epoch > 2:  # the first round warms up
                    results["babysit"].append({**result, "snapshot_ms": snapshot * 1000, "copy_ms": copy * 1000})
            order = list(variants) if epoch % 2 else list(reversed(variants))
            for name in order:
                dist.barrier()
                started = time.perf_counter()
                stall, finish = variants[name](scratch / f"{name}-{epoch}")
                result = measured(stall, finish, started)
                if epoch > 1 and epoch <= args.rounds + 1:
                    results[name].append(result)
            for _ in run.batches([None]):  # one step inside babysit's loop, then the epoch's end
                train(1)
            dist.barrier()
            epoch_end = time.perf_counter()
    sizes = {name: sum(f.stat().st_size for f in (scratch / f"{name}-2").iterdir()) for name in ("dcp.save",
                                                                                                   "dcp.async_save")}
    sizes["babysit"] = sum(f.stat().st_size for f in next((scratch / "babysit").glob("epoch-0002-*.dcp")).iterdir())
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
    snapshot = summarize([r["snapshot_ms"] for r in results["babysit"]])
    copy = summarize([r["copy_ms"] for r in results["babysit"]])
    meetings = summarize([r["stall_ms"] - r["snapshot_ms"] - r["copy_ms"] for r in results["babysit"]])
    ratio = [b["stall_ms"] / a["stall_ms"] for b, a in zip(results["babysit"], results["dcp.async_save"])]
    ratio_snapshot = [b["snapshot_ms"] / a["stall_ms"] for b, a in zip(results["babysit"], results["dcp.async_save"])]
    ratio_save = [b["stall_ms"] / a["stall_ms"] for b, a in zip(results["babysit"], results["dcp.save"])]
    mib = found["shard_bytes"] / 2**20
    return "\n".join([
        "# Sharded checkpoints: the training thread's stall",
        "",
        f"`python -m bench.sharded_stall --rounds {args.rounds} --width {args.width} --layers {args.layers} "
        f"--steps {args.steps}` — 2 ranks (gloo, CPU, one torch thread each) on this {os.cpu_count()}-core machine; "
        f"an MLP of {args.layers} Linear({args.width}, {args.width}) layers sharded with `fully_shard`, SGD with "
        f"momentum: {mib:,.0f} MiB of weights and momentum per rank, in a loop around `babysit.Run`. {args.rounds} "
        "rounds (epochs) after a warm-up round, the two DCP variants' order alternated every round; each figure per "
        "round is the slower rank's. Medians (min–max), milliseconds, measured side by side in one run (see the "
        "module's docstring for what each variant does).",
        "",
        f"| variant | stall | extra time of the next {args.steps} steps (write in flight) | stall + extra | "
        "until complete on disk |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"babysit's stall over `dcp.async_save`'s, same round: {fmt_range(summarize(ratio), 2)} "
        f"(below it in {sum(r < 1 for r in ratio)} of {len(ratio)} rounds); "
        f"over `dcp.save`'s: {fmt_range(summarize(ratio_save), 3)}. Babysit's stall, in parts (the slower rank's "
        f"each): the snapshot (rank 0's rest of the checkpoint, the other ranks' shares, the shard's copy started) "
        f"{fmt_range(snapshot)} ms, {fmt_range(summarize(ratio_snapshot), 2)} of `dcp.async_save`'s stall; the wait "
        f"for the shard's copy as the meeting ends {fmt_range(copy)} ms; the rest, the ranks' two meetings at an "
        f"epoch's end (the epoch's, and the next one's start), {fmt_range(meetings)} ms.",
        "",
        "Checkpoint sizes: " + ", ".join(f"{name} {size / 2**20:,.1f} MiB" for name, size in found["sizes"].items())
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
