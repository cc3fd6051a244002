"""A torchrun script written the way DDP scripts are, babysat: every rank builds the same
``babysit.Run`` around its DDP model; rank 0 leads (see babysit/ranks.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_script.py --run-dir D --epochs 4

Each rank seeds its own generator (dropout differs per rank, so a resume must restore every rank's
RNG), shards the data with a DistributedSampler, and keeps a count of the samples it has seen in
``run.state``. For the tests it records, per step and per rank, the lr and momentum its optimizer
used (``--record DIR``) and, at the end, its weights.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import babysit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--keep-last", type=int)
    parser.add_argument("--record", help="a directory for each rank's record of what its optimizer used")
    parser.add_argument("--pause-at-step", type=int, metavar="N",
                        help="for the tests: rank 0 queues a pause after step N, as a person's click would")
    parser.add_argument("--nudge-at-step", type=int, metavar="N",
                        help="for the tests: rank 0 queues 'set lr 0.01' after step N, as a person's click would")
    parser.add_argument("--rank0-checkpoint-at", type=int, metavar="N",
                        help="for the tests: rank 0 alone calls run.checkpoint_now() after step N")
    parser.add_argument("--signal-at-step", type=int, metavar="N",
                        help="for the tests: rank 1 sends itself SIGTERM after step N (a signal one rank gets)")
    parser.add_argument("--step-seconds", type=float, default=0.0, metavar="S",
                        help="for the tests: each step lasts at least S seconds, as a real model's does; the "
                             "ranks' sync steps (babysit.ranks, about 20 ms apart) are then a step or two apart, "
                             "so a command queued at a step lands before the epoch ends whatever this machine's speed")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    features = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=features)
    y = (x[:, :8].sum(1) > x[:, 8:].sum(1)).long()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    torch.manual_seed(1000 + rank)  # dropout: each rank its own stream

    record = open(Path(args.record) / f"rank{rank}.jsonl", "a") if args.record else None
    with babysit.Run(args.run_dir, model, optimizer, scheduler, state={"seen": 0}, keep_last=args.keep_last,
                     config={"world_size": dist.get_world_size()}) as run:
        for epoch in run.epochs(args.epochs):
            sampler.set_epoch(epoch)
            model.train()
            for xb, yb in run.batches(loader):
                started = time.perf_counter()
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                group = optimizer.param_groups[0]
                if record is not None:
                    record.write(json.dumps({"step": run.step, "branch": run.branch, "lr": group["lr"],
                                             "momentum": group["momentum"], "seen": run.state["seen"]}) + "\n")
                    record.flush()
                optimizer.step()
                run.state["seen"] += len(xb)
                run.log(loss=loss)
                if rank == 0 and run.step == args.pause_at_step:
                    run.store.enqueue_command("pause", source="test")
                if rank == 0 and run.step == args.nudge_at_step:
                    run.store.enqueue_command("set_lr", {"value": 0.01}, source="test")
                if rank == 0 and run.step == args.rank0_checkpoint_at:  # as scripts that save on rank 0 only do
                    run.checkpoint_now()
                if rank == 1 and run.step == args.signal_at_step:
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(max(0.0, args.step_seconds - (time.perf_counter() - started)))
            if not run.interrupted:
                scheduler.step()
                model.eval()
                with torch.no_grad():
                    run.log_epoch(val_loss=float(F.cross_entropy(model(x), y)))
    if args.record:
        torch.save(model.module.state_dict(), Path(args.record) / f"final-rank{rank}.pt")
        json.dump({"seen": run.state["seen"], "status": run.status, "branch": run.branch},
                  open(Path(args.record) / f"end-rank{rank}.json", "w"))
    print(f"ddp_script rank {rank}: {run.status}: {run.message}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
