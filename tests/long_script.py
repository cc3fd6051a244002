"""A long run as its tests drive it: one epoch of 2,000 steps of a small regression, shuffled, with
dropout, around babysit.Run with a checkpoint every 200 steps (``--every``).

``--record FILE`` appends one JSON line per trained step (branch, step, the loss, a fingerprint of
the weights before the step), flushed at once, so a kill -9 keeps what was trained.
``--pause-at B:N`` (repeatable) queues a pause after step N of branch B, as a person's click
would, so a test acts at a point that does not depend on this machine's speed.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import babysit

STEPS = 2000
BATCH = 4


def fingerprint(model: nn.Module) -> float:
    return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.state_dict().values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--every", type=int, default=200, help="checkpoint_every_steps")
    parser.add_argument("--record")
    parser.add_argument("--pause-at", action="append", default=[], metavar="B:N")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator) + 0.1 * torch.randn(STEPS * BATCH, 1, generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.5)
    record = open(args.record, "a") if args.record else None
    pauses = {tuple(int(part) for part in where.split(":")) for where in args.pause_at}
    with babysit.Run(args.run_dir, model, optimizer, checkpoint_every_steps=args.every,
                     retention=babysit.RetentionPolicy(keep_recent=20), config={"every": args.every}) as run:
        for _epoch in run.epochs(1):
            for xb, yb in run.batches(loader):
                before = fingerprint(model) if record else None
                loss = nn.functional.mse_loss(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                run.log(loss=loss)
                if record:
                    record.write(json.dumps({"branch": run.branch, "step": run.step, "loss": loss.item(),
                                             "weights": before}) + "\n")
                    record.flush()
                if (run.branch, run.step) in pauses:
                    run.store.enqueue_command("pause", source="test")
    print(f"long_script: {run.status}: {run.message}", flush=True)


if __name__ == "__main__":
    main()
