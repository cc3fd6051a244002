"""What a run trains and a checkpoint holds of it: the model, the optimizer, its scheduler and the
loop's own ``run.state``; and the one way babysit changes their lr and momentum.

Every change of lr or momentum babysit makes (a nudge, a replay, a rollback's hyperparameters)
goes through :meth:`Trainables.set_lr`, :meth:`Trainables.set_momentum` or
:meth:`Trainables.restore_hparams`, which also tell the other ranks under torch.distributed (the
``tell`` given at construction; see babysit.ranks), so every rank's optimizer holds the same numbers.

A model sharded with FSDP2 (DTensor parameters) is checkpointed in shards, every rank its own
(:mod:`babysit.sharded`): its model and a torch optimizer are then not in the snapshot, which
holds the rest, but in :meth:`Trainables.shards`, and a checkpoint loads them on every rank
together.

A run may have several optimizers, by name (:mod:`babysit.optimizer_set`): the first is
``optimizer`` (its state under the checkpoint's ``optimizer`` key, as with one), the others, and
their schedulers, under ``optimizers`` and ``schedulers``; a nudge names the one it is for.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

from . import commands as cmd
from . import optim, optimizer_set, parallelism, sharded, user_state
from .checkpoint import (KEY_MODEL, KEY_OPTIMIZER, KEY_OTHER_OPTIMIZERS, KEY_OTHER_SCHEDULERS, KEY_SCHEDULER,
                         KEY_USER_STATE, clone_tree)
from .errors import CheckpointError, CommandError, SettingsError


def _tell_nobody(*_op: Any) -> None:
    """A single process has no other rank to tell."""


class Trainables:
    """The model, optimizers, schedulers and ``run.state`` of one run."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any] | None,
                 *, tell: Callable[..., None] = _tell_nobody, optimizers: dict[str, Any] | None = None) -> None:
        self.model = model
        # By name, the first the default (its name is optimizer_set.DEFAULT for a run given one).
        self.optimizers: dict[str, Any] = optimizers or {optimizer_set.DEFAULT: optimizer}
        self.names = list(self.optimizers)
        self.optimizer = self.optimizers[self.names[0]]
        self.schedulers: dict[str, Any] = optimizer_set.named_schedulers(scheduler, self.names)
        if len(self.names) > 1 and parallelism.is_sharded(model):
            raise SettingsError("several optimizers are not checkpointed for a sharded (FSDP) model; give one")
        self.state: dict[str, Any] = dict(state or {})
        # What a checkpoint from before run.state existed restores (and a check, before anything
        # is created, that a checkpoint can hold these values).
        self.initial_state = user_state.capture(self.state)
        self.tell = tell
        self.sharded = parallelism.is_sharded(model)  # checkpointed in shards, every rank its own
        self.shard_group: Any = None  # the group every rank loads its shards with (babysit's, under torchrun)

    @property
    def scheduler(self) -> Any:
        """The scheduler of the first optimizer (the one a run given one optimizer has)."""
        return self.schedulers.get(self.names[0])

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:  # a framework that builds its scheduler again (babysit.hf)
        self.schedulers[self.names[0]] = scheduler

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    def resolve(self, name: str | None) -> str:
        """The optimizer a command names (None: the first); an unknown name is refused, naming the known ones."""
        if name is None:
            return self.names[0]
        if name not in self.optimizers:
            known = ", ".join(self.names) if self.several else "one optimizer, unnamed (leave --optimizer out)"
            raise CommandError(f"unknown optimizer {name!r}; this run has {known}")
        return name

    def between_optimizer_steps(self) -> bool:
        """True between two micro-batches of accelerate's gradient accumulation (its optimizer
        wrapper knows): the gradients summed so far are in no checkpoint, so nothing is cut here."""
        gradients = getattr(self.optimizer, "gradient_state", None)
        return gradients is not None and getattr(gradients, "sync_gradients", True) is False

    # -- lr and momentum ------------------------------------------------------------------------
    def hparams(self, name: str | None = None) -> dict[str, Any]:
        """The lr and momentum an optimizer uses now (the first by default); of the first, with
        several, also the others' under ``"others"`` (what a rollback keeping them puts back)."""
        if name is not None:
            return optim.read_hparams(self.optimizers[name])
        values: dict[str, Any] = optim.read_hparams(self.optimizer)
        if self.several:
            values["others"] = {other: optim.read_hparams(self.optimizers[other]) for other in self.names[1:]}
        return values

    def set_lr(self, value: float, name: str | None = None) -> float:
        """Set an optimizer's lr (scheduler-aware) on every rank; returns the lr read back."""
        name = self.resolve(name)
        after = optim.set_lr(self.optimizers[name], value, self.schedulers.get(name))
        self.tell("set_lr", value, name)
        return after

    def set_momentum(self, value: float, name: str | None = None) -> float:
        name = self.resolve(name)
        after = optim.set_momentum(self.optimizers[name], value)
        self.tell("set_momentum", value, name)
        return after

    def restore_hparams(self, hparams: dict[str, Any]) -> None:
        """Put back recorded lr / momentum (either may be missing) on every rank; the others' too
        where recorded (see :meth:`hparams`)."""
        optim.restore_hparams(self.optimizer, hparams, self.scheduler)
        for name, values in (hparams.get("others") or {}).items():
            if name in self.optimizers and isinstance(values, dict):
                optim.restore_hparams(self.optimizers[name], values, self.schedulers.get(name))
        self.tell("restore_hparams", hparams)

    def status_json(self) -> str | None:
        """Each optimizer's kind, lr and momentum now, as JSON for the status row (None with one)."""
        if not self.several:
            return None
        return json.dumps({name: {"type": type(each).__name__, **optim.read_hparams(each)}
                           for name, each in self.optimizers.items()})

    # -- checkpoints ----------------------------------------------------------------------------
    def snapshot(self, on_refused: Callable[[str, str], None]) -> dict[str, Any]:
        """Copies of the model, optimizer, scheduler and run.state, as a checkpoint holds them (of a
        sharded model, all but the model and a torch optimizer: see :meth:`shards`)."""
        whole = not self.sharded
        return {
            **({KEY_MODEL: clone_tree(self.model.state_dict())} if whole else {}),
            **({KEY_OPTIMIZER: clone_tree(self.optimizer.state_dict())}
               if whole or not isinstance(self.optimizer, torch.optim.Optimizer) else {}),
            KEY_SCHEDULER: clone_tree(self.scheduler.state_dict()) if self.scheduler is not None else None,
            KEY_USER_STATE: user_state.capture(self.state, on_refused=on_refused),
            **({KEY_OTHER_OPTIMIZERS: {name: clone_tree(self.optimizers[name].state_dict()) for name in self.names[1:]},
                KEY_OTHER_SCHEDULERS: {name: clone_tree(self.schedulers[name].state_dict())
                                       for name in self.names[1:] if self.schedulers.get(name) is not None}}
               if self.several else {}),
        }

    def shards(self) -> dict[str, Any]:
        """A sharded model's part of a snapshot: this rank's shard of the model and optimizer, as
        they are (the sharded writer copies them before the next step)."""
        return sharded.state_dicts(self.model, self.optimizer)

    def read(self, run_dir: Any, record: dict[str, Any], *, verify_shards: bool = True) -> dict[str, Any]:
        """Checkpoint ``record`` of ``run_dir``, verified (every file, whatever its form; with
        ``verify_shards=False`` a shard is checked only as it is loaded). A checkpoint of the whole
        model is refused for a sharded one: its shards are not in it."""
        state = sharded.read_checkpoint(run_dir, record["file"], record["sha256"], verify_shards=verify_shards)
        if self.sharded and sharded.KEY_SHARDED not in state:
            raise CheckpointError(
                f"checkpoint #{record['id']} ({record['file']!r}) holds the whole model, written by a run that was "
                "not sharded; this run's model is sharded (FSDP) and loads sharded checkpoints only")
        return state

    def check_fits(self, state: dict[str, Any], checkpoint_id: Any) -> None:
        """Refuse a checkpoint whose tensors do not fit this model or optimizer before anything
        is changed (loading it would fail half-way)."""
        problems = self.misfit(state)
        if problems:
            raise CommandError(f"checkpoint #{checkpoint_id} does not fit this model ({'; '.join(problems)}); "
                               "nothing was changed")

    def misfit(self, state: dict[str, Any]) -> list[str]:
        """What in a checkpoint does not fit this model and optimizer (nothing when it loads): names
        only one side has, shapes that differ, other parameter groups, another kind of optimizer.
        A sharded checkpoint's shapes are its index's (a DTensor's shape is the whole tensor's)."""
        live = self.model.state_dict()
        if sharded.KEY_SHARDED in state:
            saved: dict[str, Any] = {name: torch.Size(shape)
                                     for name, shape in state[sharded.KEY_SHARDED]["model_shapes"].items()}
        else:
            saved = {name: getattr(tensor, "shape", None) for name, tensor in (state.get(KEY_MODEL) or {}).items()}
        problems = []
        for names, where in ((set(saved) - set(live), "the checkpoint has {} that this model has not"),
                             (set(live) - set(saved), "this model has {} that the checkpoint has not")):
            if names:
                shown = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                problems.append(where.format(shown))
        problems += [f"{name} {tuple(saved[name])} vs {tuple(tensor.shape)} here" for name, tensor in live.items()
                     if saved.get(name) is not None and saved[name] != tensor.shape][:3]
        groups = (state.get(KEY_OPTIMIZER) or {}).get("param_groups", [])
        if KEY_OPTIMIZER in state and \
                [len(g.get("params", [])) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            problems.append("the optimizer's parameter groups differ")
        elif groups and isinstance(self.optimizer, torch.optim.Optimizer):
            # Another kind of optimizer has settings this one lacks and lacks some of its own (SGD's
            # momentum and dampening, Adam's betas and eps); a newer torch only adds settings.
            ignored = {"params", "param_names"}
            theirs, ours = set(groups[0]) - ignored, set(self.optimizer.param_groups[0]) - ignored
            if theirs - ours and ours - theirs:
                problems.append(f"its optimizer has {', '.join(sorted(theirs - ours)[:4])}, which this "
                                f"{type(self.optimizer).__name__} has not: another kind of optimizer")
        saved_others = set(state.get(KEY_OTHER_OPTIMIZERS) or {})
        if KEY_OPTIMIZER in state and saved_others != set(self.names[1:]):
            def optimizers(others: list[str]) -> str:
                return f"{len(others) + 1} optimizers (the first, {', '.join(others)})" if others else "one optimizer"
            problems.append(f"it holds {optimizers(sorted(saved_others))}, this run has {optimizers(self.names[1:])}")
        for name in self.names[1:] if not problems else ():
            theirs_groups = [len(g.get("params", [])) for g in state[KEY_OTHER_OPTIMIZERS][name].get("param_groups", [])]
            if theirs_groups != [len(g["params"]) for g in self.optimizers[name].param_groups]:
                problems.append(f"optimizer {name}'s parameter groups differ")
        return problems

    def load(self, state: dict[str, Any]) -> list[str]:
        """Load a verified checkpoint's model, optimizer, scheduler and run.state; returns notes on
        run.state values that could not be restored. A sharded checkpoint is loaded by every rank
        together (a collective, on ``shard_group``), each rank reading the shards it needs."""
        if sharded.KEY_SHARDED in state:
            sharded.load_shards(state[sharded.KEY_SHARDED], self.model, self.optimizer, group=self.shard_group)
        else:
            self.model.load_state_dict(state[KEY_MODEL])
        if KEY_OPTIMIZER in state:  # (a sharded checkpoint holds a loop's own lr and momentum here)
            self.optimizer.load_state_dict(state[KEY_OPTIMIZER])
        if self.scheduler is not None and state.get(KEY_SCHEDULER) is not None:
            self.scheduler.load_state_dict(state[KEY_SCHEDULER])
        for name, saved in (state.get(KEY_OTHER_OPTIMIZERS) or {}).items():  # misfit() checked the names
            self.optimizers[name].load_state_dict(saved)
        for name, saved in (state.get(KEY_OTHER_SCHEDULERS) or {}).items():
            if self.schedulers.get(name) is not None:
                self.schedulers[name].load_state_dict(saved)
        return user_state.restore(self.state, state.get(KEY_USER_STATE) or self.initial_state)


def what_it_trains(model: Any, optimizer: Any, optimizers: Any, lr: float | None,
                   momentum: float | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``Run``'s model and optimizers, checked: the model (a dict of networks as one ``nn.ModuleDict``)
    and the optimizers by name, the first the default."""
    model = optimizer_set.model_of(model)
    if optimizers is not None and (lr is not None or momentum is not None):
        raise SettingsError("give optimizers= or lr= (and momentum=) for hand-written updates, not both")
    if optimizers is None:
        optimizer = optimizer_or_loop_hparams(optimizer, lr, momentum)
    return model, optimizer_set.named_optimizers(optimizer, optimizers)


def optimizer_or_loop_hparams(optimizer: Any, lr: float | None, momentum: float | None) -> Any:
    """The optimizer babysit nudges: the loop's own, or, for hand-written updates, a holder of lr
    (and momentum) the loop reads as ``run.lr``."""
    if optimizer is not None:
        if lr is not None or momentum is not None:
            raise SettingsError("give either an optimizer or lr= (and momentum=) for hand-written updates, not both: "
                                "with an optimizer, babysit nudges the lr in its param_groups")
        if isinstance(optimizer, (list, tuple, dict)):
            raise SettingsError(f"optimizer must be one torch optimizer, got a {type(optimizer).__name__}; give "
                                "several by name: optimizers={'D': optD, 'G': optG}")
        if not getattr(optimizer, "param_groups", None):
            raise SettingsError(f"optimizer must be a torch optimizer (with param_groups), got "
                                f"{type(optimizer).__name__}; a loop that updates its parameters by hand passes lr= "
                                "instead and reads run.lr")
        return optimizer
    if lr is None:
        raise SettingsError("Run needs an optimizer, or lr= for a loop that updates its parameters by hand "
                            "(it reads run.lr every step, so nudges reach it)")
    return optim.LoopHparams(cmd.validate_lr(lr), None if momentum is None else cmd.validate_momentum(momentum))


def optimizer_name(optimizer: Any, optimizers: dict[str, Any] | None = None) -> str:
    """The optimizer as the status line names it (several: each by name and kind)."""
    if optimizers and len(optimizers) > 1:
        return ", ".join(f"{name}: {type(each).__name__}" for name, each in optimizers.items())
    return "hand-written updates (run.lr)" if isinstance(optimizer, optim.LoopHparams) else type(optimizer).__name__
