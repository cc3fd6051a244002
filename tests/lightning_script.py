"""A Lightning training script as people write them, babysat by one callback (the e2e tests' trainer).

A small regression network on data made here; SGD with momentum and a per-step LambdaLR decay
(a closed-form schedule, so a nudge must be scaled into it to survive its next step); validation
every epoch; Lightning's own checkpointing and logger off (babysit checkpoints the run).

For the tests, ``--record FILE`` appends one JSON line per trained step: what the optimizer holds
as the step trains (lr, momentum), where Lightning says it is (epoch, batch index, global step),
what babysit says (branch, step), which batch it is and a fingerprint of the weights before the
step. ``--pause-at-step N`` queues a pause after step N, as a person's click would, so a test can
act at a point that does not depend on this machine's speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from babysit import GuardConfig
from babysit.lightning import BabysitCallback

# Lightning ships as two packages with the same classes: `lightning` (`import lightning.pytorch`, what
# its documentation installs today) and `pytorch_lightning`; the tests run the script with each.
PACKAGE = os.environ.get("BABYSIT_LIGHTNING_PACKAGE", "pytorch_lightning")
pl = importlib.import_module(PACKAGE)

BATCH = 16


def weights_fingerprint(state: dict[str, torch.Tensor]) -> float:
    """One number that changes with any weight (float64 sum of every parameter tensor, in order)."""
    return float(sum(tensor.double().sum() * (index + 1) for index, tensor in enumerate(state.values())))


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
        self.record: list[dict] | None = None
        self.babysit: BabysitCallback | None = None
        self.nan_at_step: int | None = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.record is not None:
            group = self.trainer.optimizers[0].param_groups[0]
            run = self.babysit.run
            self.record.append({
                "branch": run.branch, "step": run.step, "epoch": self.current_epoch, "batch_idx": batch_idx,
                "global_step": self.global_step, "lr": group["lr"], "momentum": group["momentum"],
                "batch": float(x.double().sum()), "weights": weights_fingerprint(self.state_dict()),
            })
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.babysit.run.step == self.nan_at_step and self.babysit.run.branch == 1:
            loss = loss * float("nan")  # for the tests: the run diverges here (once, on its first branch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's own return shape)
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.01 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def make_data(steps_per_epoch: int) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    n = steps_per_epoch * BATCH
    x = torch.randn(n + 64, 8, generator=generator)
    y = (x @ torch.randn(8, 1, generator=generator)) + 0.1 * torch.randn(n + 64, 1, generator=generator)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=BATCH, shuffle=True)
    val = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=32)
    return train, val


class _Record(pl.Callback):
    """Writes the model's step records to a file as each step ends (a kill -9 keeps what was trained)."""

    def __init__(self, model: Regressor, path: str, pause_at_steps: list[int], sigterm_at_step: int | None) -> None:
        self.model, self.file, self.pause_at_steps = model, open(path, "a"), pause_at_steps
        self.sigterm_at_step = sigterm_at_step
        self.waited_for_guard = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        for row in self.model.record or []:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.model.record = []
        run = self.model.babysit.run
        if run.step in self.pause_at_steps and run.store is not None:  # rank 0's store: one click
            run.store.enqueue_command("pause", source="test")
        if run.step == self.sigterm_at_step and run.branch == 1:  # a scheduler's preemption, landing in this step
            os.kill(os.getpid(), signal.SIGTERM)
        nan_at = self.model.nan_at_step
        if nan_at is not None and run.branch == 1 and run.step > nan_at and run.store is not None:
            self._wait_for_the_guard(run.store)

    def _wait_for_the_guard(self, store) -> None:  # noqa: ANN001
        """After the NaN step, hold the next one until the guard has seen it, as a real step's length
        would: the guard reads the loss on babysit's writer thread, and on a loaded machine these
        steps of a tiny model could otherwise reach the run's end first."""
        if self.waited_for_guard:
            return
        self.waited_for_guard = True
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not store.events(kinds=("divergence",), limit=1):
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--record", help="for the tests: append a JSON line per trained step to this file")
    parser.add_argument("--pause-at-step", type=int, metavar="N", action="append", default=[],
                        help="for the tests: queue a pause after step N (on any branch; may be repeated)")
    parser.add_argument("--sigterm-at-step", type=int, metavar="N",
                        help="for the tests: the process sends itself SIGTERM as step N ends (on the first branch)")
    parser.add_argument("--nan-at-step", type=int, metavar="N", help="for the tests: the loss is NaN at step N")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when more than one)")
    parser.add_argument("--guard-auto-remedy", type=int, default=0, metavar="N",
                        help="let the divergence guard roll back by itself up to N times")
    args = parser.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    train, val = make_data(args.steps_per_epoch)
    model = Regressor()
    model.nan_at_step = args.nan_at_step
    babysit = BabysitCallback(args.run_dir, config={"steps_per_epoch": args.steps_per_epoch},
                              guard=GuardConfig(auto_remedy_max=args.guard_auto_remedy))
    model.babysit = babysit
    callbacks: list[pl.Callback] = [babysit]
    if args.record:
        model.record = []
        rank = int(os.environ.get("LOCAL_RANK", "0"))  # Lightning's DDP: each rank keeps its own record
        path = args.record if rank == 0 else f"{args.record}.rank{rank}"
        callbacks.insert(0, _Record(model, path, args.pause_at_step, args.sigterm_at_step))
    ddp = {"strategy": "ddp"} if args.devices > 1 else {}
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, **ddp, callbacks=callbacks,
                         logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    print(f"lightning_script: {babysit.run.status}: {babysit.run.message}", flush=True)


if __name__ == "__main__":
    main()
