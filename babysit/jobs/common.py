"""What the built-in jobs share: checking their settings, the optimizer they train with, threads."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from babysit.cadence import Cadence
from babysit.commands import validate_lr, validate_momentum
from babysit.errors import SettingsError

OPTIMIZERS = ("sgd", "adam")


def check_settings(config: Any, whole_numbers: Sequence[str]) -> None:
    """Refuse a job config with an unknown optimizer, a bad lr or momentum, a seed that is not a
    whole number torch takes, a bad checkpoint cadence, or one of ``whole_numbers`` below 1; the
    message names the value."""
    if config.optimizer not in OPTIMIZERS:
        raise SettingsError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    validate_lr(config.lr)
    validate_momentum(config.momentum)
    for name in ("epochs", *whole_numbers):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingsError(f"{name} must be a whole number >= 1, got {value!r}")
    Cadence(getattr(config, "checkpoint_every_steps", None), getattr(config, "checkpoint_every_minutes", None))
    seed = config.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64:
        raise SettingsError(f"seed must be a whole number from -2**63 to 2**64 - 1 (what torch.manual_seed takes), "
                            f"got {seed!r}")


def build_optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum, or Adam with the momentum as its beta1."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.momentum, 0.999))
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def configure_threads() -> None:
    """One intra-op thread unless OMP_NUM_THREADS says otherwise: these models are too small to gain
    from more, and on a shared two-core machine (the dashboard, a browser) more threads make each
    step several times slower. The thread count is part of what makes a run reproducible."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
