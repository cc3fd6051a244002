"""The fast job: a small CNN on scikit-learn's bundled handwritten digits (no download).

`python -m babysit train --job digits`: learned within a few epochs, so the tests train it. The five
babysit lines are marked ``# babysit``.

1,797 8x8 images, 80 % for training and 20 % held out. One epoch is ``epoch_passes`` passes over
the training images, each batch shifted by up to a pixel and lightly noised, so that an epoch
lasts a few seconds on two CPU cores: long enough to watch, short enough to see epochs go by.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import babysit
from babysit.jobs.common import build_optimizer, check_settings, configure_threads



@dataclass(frozen=True)
class DigitsConfig:
    epochs: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    optimizer: str = "sgd"
    seed: int = 0
    batch_size: int = 32
    epoch_passes: int = 6
    checkpoint_every_steps: int | None = None  # a periodic checkpoint every N steps
    checkpoint_every_minutes: float | None = None  # and/or every M minutes (babysit.cadence)

    def __post_init__(self) -> None:
        check_settings(self, ("batch_size", "epoch_passes"))


def load_digits_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The bundled digits as (train, validation) tensors; the split depends only on ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, val = order[:cut], order[cut:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def augment(images: torch.Tensor) -> torch.Tensor:
    """Shift the batch by up to one pixel each way and add a little noise."""
    dx, dy = torch.randint(-1, 2, (2,)).tolist()
    shifted = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    return shifted + 0.05 * torch.randn_like(shifted)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    model.eval()
    images, labels = data.tensors
    logits = model(images)
    model.train()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def train(run_dir: str | Path, config: DigitsConfig, *, on_run: object = None, replay: Any = None) -> babysit.Run:
    """Train (or resume) the demo in ``run_dir``. ``on_run(run)`` is called once the run exists;
    ``replay``: a panda journal whose lr and momentum settings are applied at their steps."""
    configure_threads()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    train_data, val_data = load_digits_split(config.seed)
    sampler = RandomSampler(train_data, num_samples=config.epoch_passes * len(train_data))
    loader = DataLoader(train_data, batch_size=config.batch_size, sampler=sampler)
    model = build_model()
    optimizer = build_optimizer(config, model)

    # evaluate= ranks probe branches by their validation loss (python -m babysit probe).
    with babysit.Run(run_dir, model, optimizer, config=asdict(config), replay=replay,  # babysit
                     checkpoint_every_steps=config.checkpoint_every_steps,
                     checkpoint_every_minutes=config.checkpoint_every_minutes,
                     evaluate=lambda: dict(zip(("val_loss", "val_acc"), evaluate(model, val_data)))) as run:
        if callable(on_run):
            on_run(run)
        for epoch in run.epochs(config.epochs):  # babysit
            for images, labels in run.batches(loader):  # babysit
                loss = F.cross_entropy(model(augment(images)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                run.log(loss=loss)  # babysit
            val_loss, val_acc = evaluate(model, val_data)
            run.log_epoch(val_loss=val_loss, val_acc=val_acc)  # babysit
    return run
