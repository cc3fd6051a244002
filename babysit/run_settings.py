"""``Run()``'s arguments, checked before anything is created: a bad one is refused with a message
that names it and what is accepted, and leaves no run directory, lock or thread behind."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from . import journal_replay, parallelism
from .cadence import Cadence
from .errors import SettingsError
from .retention import RetentionPolicy
from .trainables import what_it_trains


@dataclass(frozen=True)
class RunSettings:
    """What ``Run()`` builds its parts from, once every argument passed its check."""

    model: Any                        # the network, or a dict of them as one nn.ModuleDict
    optimizers: dict[str, Any]        # by name, the first the default of a nudge
    optimizer: Any                    # the first: a torch optimizer, or babysit's stand-in for a hand-written update
    policy: RetentionPolicy
    cadence: Cadence
    journal: dict[str, Any] | None    # a panda journal to replay, loaded
    config: dict[str, Any]
    item_unit: str


def check_run_settings(run_dir: Any, model: Any, optimizer: Any, *, optimizers: Any, lr: Any, momentum: Any, config: Any,
                       keep_last: Any, retention: Any, checkpoint_every_steps: Any, checkpoint_every_minutes: Any,
                       items_per_step: Any, item_unit: Any, evaluate: Callable[[], Any] | None,
                       replay: Any) -> RunSettings:
    """Check ``Run()``'s arguments (their meaning is in its docstring); raises SettingsError."""
    if retention is not None and keep_last is not None:
        raise SettingsError("give keep_last or retention, not both: keep_last=N is RetentionPolicy(keep_last=N)")
    if retention is not None and not isinstance(retention, RetentionPolicy):
        raise SettingsError(f"retention must be a babysit.RetentionPolicy, got {retention!r}")
    policy = retention or RetentionPolicy(keep_last=keep_last)  # checks keep_last
    cadence = Cadence(checkpoint_every_steps, checkpoint_every_minutes)
    if items_per_step is not None and (not isinstance(items_per_step, int) or items_per_step < 1):
        raise SettingsError(f"items_per_step must be a whole number >= 1 or None, got {items_per_step!r}")
    if evaluate is not None and not callable(evaluate):
        raise SettingsError(f"evaluate must be a function returning a dict of numbers, got {evaluate!r}")
    if not isinstance(item_unit, str) or not item_unit.strip() or len(item_unit) > 20:
        raise SettingsError(f"item_unit must be a short word such as 'samples' or 'tokens', got {item_unit!r}")
    journal = None if replay is None else journal_replay.load(replay)
    model, optimizers = what_it_trains(model, optimizer, optimizers, lr, momentum)
    optimizer = next(iter(optimizers.values()))
    if not isinstance(run_dir, (str, os.PathLike)) or not str(os.fspath(run_dir)).strip():
        # Path("") is the current directory: a run directory is named, never implied.
        raise SettingsError(f"run_dir must name a directory, such as 'checkpoints/my-run' (or '.' for the "
                            f"current one), got {run_dir!r}")
    # What babysit cannot checkpoint (FSDP1, tensor parallel, DeepSpeed) is refused on every rank
    # alike, before any rank waits for the others: it would hang or be lost at the first checkpoint.
    refused = parallelism.refusal(model, optimizer)
    if refused is not None:
        raise SettingsError(refused)
    config = dict(config or {})
    json.dumps(config)  # fail now, not at the first checkpoint
    return RunSettings(model=model, optimizers=optimizers, optimizer=optimizer, policy=policy, cadence=cadence, journal=journal, config=config,
                       item_unit=item_unit.strip())
