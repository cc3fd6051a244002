"""A torchrun script written the way FSDP2 scripts are, babysat: every rank shards the same model
with ``fully_shard`` (two Linear layers and the root) and builds the same ``babysit.Run`` around it;
rank 0 leads (see babysit/ranks.py), every rank writes its own shard of each checkpoint.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_script.py --run-dir D --epochs 3

20 batches an epoch per rank on 2 ranks (40 on one). Each rank seeds its own generator (dropout
differs per rank, so a resume must restore every rank's RNG) and keeps a count of the samples it has
seen in ``run.state``. For the tests it records, per step and per rank, the lr and momentum its
optimizer used and its loss (``--record DIR``) and, at the end, the whole model (every parameter
gathered from its shards).
"""

from __future__ import annotations

import argparse
import json
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import babysit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--keep-last", type=int)
    parser.add_argument("--record", help="a directory for each rank's record of what its optimizer used")
    parser.add_argument("--pause-at-step", type=int, action="append", default=[], metavar="N",
                        help="for the tests: rank 0 queues a pause after step N (or the first step after it that "
                             "it trains), as a person's click would")
    parser.add_argument("--stall-after-epoch", type=int, metavar="N",
                        help="for the tests: rank 1 is stuck after epoch N's evaluation (a deadlock of its own)")
    parser.add_argument("--timeout-s", type=float, default=1800, help="the process group's timeout")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    features = torch.Generator().manual_seed(0)
    x = torch.randn(640, 16, generator=features)
    y = (x[:, :8].sum(1) > x[:, 8:].sum(1)).long()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)

    torch.manual_seed(0)  # the same initial weights on every rank, then each keeps its shard
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2))
    fully_shard(model[0])
    fully_shard(model[3])
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1000 + rank)  # dropout: each rank its own stream

    pauses = sorted(args.pause_at_step)
    record = open(Path(args.record) / f"rank{rank}.jsonl", "a") if args.record else None
    with babysit.Run(args.run_dir, model, optimizer, state={"seen": 0}, keep_last=args.keep_last) as run:
        for epoch in run.epochs(args.epochs):
            sampler.set_epoch(epoch)
            model.train()
            for xb, yb in run.batches(loader):
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                group = optimizer.param_groups[0]
                if record is not None:
                    record.write(json.dumps({"step": run.step, "branch": run.branch, "lr": group["lr"],
                                             "momentum": group["momentum"], "loss": loss.item(),
                                             "seen": run.state["seen"]}) + "\n")
                    record.flush()
                optimizer.step()
                run.state["seen"] += len(xb)
                run.log(loss=loss)
                if rank == 0 and pauses and run.step >= pauses[0]:
                    pauses.pop(0)
                    run.store.enqueue_command("pause", source="test")
            if not run.interrupted:
                model.eval()
                with torch.no_grad():
                    run.log_epoch(val_loss=float(F.cross_entropy(model(x), y)))
            if rank == 1 and epoch == args.stall_after_epoch:
                threading.Event().wait()  # never set: this rank is stuck here
    whole = {name: p.full_tensor() for name, p in model.named_parameters()}  # every rank takes part
    if args.record:
        torch.save(whole, Path(args.record) / f"final-rank{rank}.pt")
        json.dump({"seen": run.state["seen"], "status": run.status, "branch": run.branch, "world": dist.get_world_size()},
                  open(Path(args.record) / f"end-rank{rank}.json", "w"))
    print(f"fsdp_script rank {rank}: {run.status}: {run.message}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
