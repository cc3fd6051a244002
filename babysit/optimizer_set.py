"""What ``Run(model, optimizer | optimizers=..., scheduler)`` accepts, checked before anything is
created, and the names a run's optimizers go by.

A run trains one model (an ``nn.Module``, or a dict of them such as ``{"D": netD, "G": netG}``,
held as an ``nn.ModuleDict`` so that one state dict covers every network) with one optimizer or
several named ones (``optimizers={"D": optD, "G": optG}``). The first named optimizer is the
run's default: a nudge that names none, the ``lr`` of the status line and the chart's ``lr``
series are its own; another one's series are ``lr/<name>`` and ``momentum/<name>``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .commands import OPTIMIZER_NAME, OPTIMIZER_NAME_ACCEPTED
from .errors import SettingsError

# The one optimizer of a run built with ``optimizer=``: it is named in nothing a person reads.
DEFAULT = "default"


def series_name(hparam: str, name: str, first: str) -> str:
    """The chart series of an optimizer's lr or momentum: ``lr`` for the first, ``lr/G`` for G."""
    return hparam if name == first else f"{hparam}/{name}"


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not OPTIMIZER_NAME.match(name):
        raise SettingsError(f"{what} names must be {OPTIMIZER_NAME_ACCEPTED}, got {name!r}")
    return name


def model_of(model: Any) -> torch.nn.Module:
    """The model a run checkpoints: an ``nn.Module``, or a dict of them held as an ``nn.ModuleDict``."""
    if isinstance(model, torch.nn.Module):
        return model
    if isinstance(model, Mapping) and model:
        for name, part in model.items():
            check_name(name, "model")
            if not isinstance(part, torch.nn.Module):
                raise SettingsError(f"model[{name!r}] must be a torch.nn.Module, got {type(part).__name__}")
        return torch.nn.ModuleDict(dict(model))
    raise SettingsError(f"model must be a torch.nn.Module or a dict of them (such as {{'D': netD, 'G': netG}}), "
                        f"got {type(model).__name__}")


def named_optimizers(optimizer: Any, optimizers: Any) -> dict[str, Any]:
    """The run's optimizers by name, the first the default (``{DEFAULT: optimizer}`` for one)."""
    if optimizers is None:
        return {DEFAULT: optimizer}
    if optimizer is not None:
        raise SettingsError("give optimizer= (one) or optimizers= (several, by name), not both")
    if not isinstance(optimizers, Mapping) or not optimizers:
        raise SettingsError(f"optimizers must be a dict of names to torch optimizers (such as {{'D': optD, "
                            f"'G': optG}}), got {type(optimizers).__name__}")
    named: dict[str, Any] = {}
    for name, each in optimizers.items():
        check_name(name, "optimizer")
        if not getattr(each, "param_groups", None):
            raise SettingsError(f"optimizers[{name!r}] must be a torch optimizer (with param_groups), got "
                                f"{type(each).__name__}")
        if any(each is other for other in named.values()):
            raise SettingsError(f"optimizers[{name!r}] is the same object as another one; give each optimizer once")
        named[name] = each
    return named


def named_schedulers(scheduler: Any, names: list[str]) -> dict[str, Any]:
    """The schedulers by the name of the optimizer each drives: a single one drives the first."""
    if scheduler is None:
        return {}
    if not isinstance(scheduler, Mapping):
        return {names[0]: scheduler}
    unknown = sorted(set(scheduler) - set(names))
    if unknown:
        raise SettingsError(f"scheduler names {', '.join(map(repr, unknown))} are not optimizers of this run; "
                            f"its optimizers: {', '.join(names)}")
    return {name: each for name, each in scheduler.items() if each is not None}
