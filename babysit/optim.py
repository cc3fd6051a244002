"""Read and write the learning rate and momentum of any torch optimizer (and its scheduler).

Momentum lives in ``momentum`` for SGD and RMSprop and in ``betas[0]`` for Adam, AdamW and their
kin. Whatever is written, the caller records what :func:`read_hparams` reads back, so the number
shown in the dashboard is the number in ``param_groups``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .commands import CommandError

# Keys some schedulers keep in param_groups and derive the lr from (OneCycleLR, CyclicLR, ...).
_SCHEDULER_LR_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr")


def as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _write(group: dict[str, Any], key: str, value: float) -> None:
    # A tensor lr (capturable Adam, compiled optimizers) must be updated in place.
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


def momentum_key(optimizer: torch.optim.Optimizer) -> str | None:
    """``'momentum'``, ``'betas'``, or None for an optimizer without momentum."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return "betas"
    if "momentum" in group:
        return "momentum"
    return None


def read_hparams(optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
    """The lr and momentum the optimizer will use at its next step (from its first group)."""
    group = optimizer.param_groups[0]
    key = momentum_key(optimizer)
    momentum: float | None = None
    if key == "betas":
        momentum = as_float(group["betas"][0])
    elif key == "momentum":
        momentum = as_float(group["momentum"])
    return {"lr": as_float(group["lr"]), "momentum": momentum}


def set_lr(optimizer: torch.optim.Optimizer, lr: float, scheduler: Any = None) -> float:
    """Set the lr of the first group to ``lr``, scaling the other groups by the same factor.

    A scheduler derives the lr from its ``base_lrs`` (LambdaLR, CosineAnnealingLR's closed form)
    or from keys in the group (OneCycleLR); those are scaled too, or its next step would silently
    undo the nudge. Returns the lr read back from the optimizer.
    """
    current = as_float(optimizer.param_groups[0]["lr"])
    factor = lr / current if current > 0 else None
    for group in optimizer.param_groups:
        if factor is None:
            _write(group, "lr", lr)
            continue
        _write(group, "lr", as_float(group["lr"]) * factor)
        for key in _SCHEDULER_LR_KEYS:
            if key in group and isinstance(group[key], (int, float, torch.Tensor)):
                _write(group, key, as_float(group[key]) * factor)
    # The first group gets exactly the value asked for, not value*current/current.
    _write(optimizer.param_groups[0], "lr", lr)
    if scheduler is not None and factor is not None:
        _scale_scheduler(scheduler, factor, optimizer)
    return read_hparams(optimizer)["lr"]  # type: ignore[return-value]


def real_scheduler(scheduler: Any) -> Any:
    """The scheduler that computes the lr: inside a wrapper that only decides when it steps and
    hands it over as ``.scheduler`` (accelerate's AcceleratedScheduler, which a loop prepared with
    ``accelerator.prepare`` and the Hugging Face Trainer both step), else ``scheduler`` itself."""
    seen = 0
    while scheduler is not None and not hasattr(scheduler, "base_lrs") and getattr(scheduler, "scheduler", None) is not None:
        scheduler, seen = scheduler.scheduler, seen + 1
        if seen > 8:  # a wrapper that hands back itself, or a chain no scheduler ends
            break
    return scheduler


def _scale_scheduler(scheduler: Any, factor: float, optimizer: torch.optim.Optimizer) -> None:
    # base_lrs: most schedulers; max_lrs: CyclicLR; _schedulers: SequentialLR and ChainedScheduler,
    # whose children each keep their own.
    scheduler = real_scheduler(scheduler)
    for attribute in ("base_lrs", "max_lrs"):
        if isinstance(getattr(scheduler, attribute, None), list):
            setattr(scheduler, attribute, [value * factor for value in getattr(scheduler, attribute)])
    for child in getattr(scheduler, "_schedulers", None) or []:
        _scale_scheduler(child, factor, optimizer)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [as_float(g["lr"]) for g in optimizer.param_groups]


def cycles_momentum(scheduler: Any) -> bool:
    """True for schedulers that rewrite momentum at every step (OneCycleLR, CyclicLR by default)."""
    scheduler = real_scheduler(scheduler)
    if scheduler is None:
        return False
    if getattr(scheduler, "cycle_momentum", False):
        return True
    return any(cycles_momentum(child) for child in getattr(scheduler, "_schedulers", None) or [])


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> float:
    """Set SGD/RMSprop ``momentum`` or Adam-style ``betas[0]`` in every group; return the read-back."""
    key = momentum_key(optimizer)
    if key is None:
        raise CommandError(
            f"{type(optimizer).__name__} has no momentum to set; "
            "accepted for optimizers with 'momentum' (SGD, RMSprop) or 'betas' (Adam, AdamW)"
        )
    for group in optimizer.param_groups:
        if key == "momentum" and group.get("nesterov") and momentum == 0:
            raise CommandError("momentum must be > 0 for SGD with nesterov=True, got 0.0")
    for group in optimizer.param_groups:
        if key == "betas":
            beta2 = group["betas"][1]
            group["betas"] = (momentum, beta2)
        else:
            _write(group, "momentum", momentum)
    if isinstance(optimizer, torch.optim.RMSprop):
        _start_momentum_buffers(optimizer)
    value = read_hparams(optimizer)["momentum"]
    assert value is not None and math.isfinite(value)
    return value


def _start_momentum_buffers(optimizer: torch.optim.RMSprop) -> None:
    """RMSprop makes a parameter's momentum buffer on its first step, and only if momentum was > 0
    then: nudged from 0 later, its next step would look the buffer up and fail. A zero buffer is
    what it would have started with."""
    for group in optimizer.param_groups:
        if group["momentum"] > 0:
            for param in group["params"]:
                state = optimizer.state.get(param)
                if state and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def restore_hparams(optimizer: torch.optim.Optimizer, hparams: dict[str, Any], scheduler: Any = None) -> None:
    """Put back a recorded lr / momentum (a rollback that keeps the current hyperparameters)."""
    if hparams.get("lr") is not None:
        set_lr(optimizer, float(hparams["lr"]), scheduler)
    if hparams.get("momentum") is not None and momentum_key(optimizer) is not None:
        set_momentum(optimizer, float(hparams["momentum"]))


class LoopHparams:
    """The lr (and momentum) of a loop that updates its parameters by hand, held where babysit can
    nudge, checkpoint and restore them like an optimizer's: the loop reads ``run.lr`` every step.

    It looks like a parameter-free torch optimizer (``param_groups``, ``state_dict``), so every
    reader and writer in this module works on it unchanged.
    """

    def __init__(self, lr: float, momentum: float | None = None) -> None:
        group: dict[str, Any] = {"lr": float(lr), "params": []}
        if momentum is not None:
            group["momentum"] = float(momentum)
        self.param_groups = [group]

    def state_dict(self) -> dict[str, Any]:
        return {"param_groups": [dict(group) for group in self.param_groups], "state": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state.get("param_groups") if isinstance(state, dict) else None
        if not groups or "lr" not in groups[0]:
            raise ValueError(f"not the hyperparameters of a hand-written loop: {str(state)[:80]}")
        self.param_groups = [{**group, "params": []} for group in groups[:1]]
