"""Two ranks of FSDP2 (gloo, CPU) writing sharded checkpoints with babysit.sharded, for
tests/test_sharded.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/sharded_script.py RUN_DIR RECORD_DIR

1. checkpoint "a" while both ranks train on (FSDP's collectives on the training thread, the
   writers' on their own), then load it into a freshly built model on both ranks;
2. checkpoint "b" with a NaN in rank 1's shard only: refused on both ranks, nothing left behind;
3. checkpoint "c" submitted by rank 0 alone: rank 0 names rank 1 as the rank that did not come.

Each rank records what happened in RECORD_DIR/rank<r>.json; rank 0 saves checkpoint "a"'s model and
momentum as whole tensors (RECORD_DIR/a-full.pt) for the test to load it on one plain process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from babysit.checkpoint import FORMAT, KEY_FORMAT, PendingCheckpoint
from babysit.sharded import KEY_SHARDED, load_shards, read_sharded, stage
from babysit.sharded_writer import ShardedCheckpointer


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()


def whole(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and momentum buffer as a whole tensor (a collective: every rank calls it)."""
    out = {name: p.full_tensor() for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        out[f"momentum:{names[id(p)]}"] = state["momentum_buffer"].full_tensor()
    return out


def main() -> None:
    run_dir, record_dir = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    written: list[PendingCheckpoint] = []
    failed: list[PendingCheckpoint] = []
    writer = ShardedCheckpointer(written.append, failed.append, timeout_s=60)
    rest = {KEY_FORMAT: FORMAT, "note": "rank 0's part"} if rank == 0 else None

    # 1. a checkpoint written while training goes on, then loaded into a new model
    model, optimizer = build(0)
    train(model, optimizer, 3)
    expected = whole(model, optimizer)
    job = writer.submit(PendingCheckpoint(path=run_dir / "a.dcp", state={"shards": stage(model, optimizer), "rest": rest},
                                          meta={}))
    train(model, optimizer, 5)
    writer.wait()
    record["a"] = {"error": None if job.error is None else str(job.error),
                   "folder": job.path.name, "result": job.result}
    listed = [job.result["sha256"] if rank == 0 else None]
    dist.broadcast_object_list(listed, src=0)
    state = read_sharded(run_dir, "a.dcp", listed[0], verify_shards=rank == 0)
    fresh, fresh_optimizer = build(1)
    load_shards(state[KEY_SHARDED], fresh, fresh_optimizer)
    loaded = whole(fresh, fresh_optimizer)
    record["a"]["loaded_equal"] = sorted(loaded) == sorted(expected) and all(
        torch.equal(loaded[k], expected[k]) for k in expected)
    record["a"]["note"] = state["note"]
    if rank == 0:
        torch.save(expected, record_dir / "a-full.pt")

    # 2. NaN in rank 1's shard only: both ranks refuse it
    shards = stage(model, optimizer)
    if rank == 1:
        shards["model"]["2.weight"].to_local()[0, 0] = float("nan")
    job = writer.submit(PendingCheckpoint(path=run_dir / "b.dcp", state={"shards": shards, "rest": rest}, meta={}))
    writer.wait()
    record["b"] = {"error": None if job.error is None else str(job.error)}
    writer.close()

    # 3. rank 0 alone submits: it names rank 1, within its deadline
    impatient = ShardedCheckpointer(written.append, failed.append, timeout_s=3)
    if rank == 0:
        started = time.monotonic()
        job = impatient.submit(PendingCheckpoint(path=run_dir / "c.dcp", state={"shards": stage(model, optimizer),
                                                                                "rest": rest}, meta={}))
        impatient.wait()
        record["c"] = {"error": None if job.error is None else str(job.error),
                       "type": type(job.error).__name__, "seconds": time.monotonic() - started}
    dist.barrier()
    impatient.close()
    record["written"] = [j.path.name for j in written]
    record["failed"] = [j.path.name for j in failed]
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
