"""Watching the lr and momentum the optimizer really uses, and who changed them.

Every change is logged as a point of the lr / momentum series (so the chart shows what the
optimizer does). A change no command made — a scheduler's step, the loop's own anneal — is also
marked as theirs, with before → after, once it has moved far enough from the last mark: a
schedule that moves the lr a little every step gets a mark every 20 %, not one per step.

With several optimizers the first's are the ``lr`` and ``momentum`` series, and each other's are
``lr/<name>`` and ``momentum/<name>`` (see :mod:`babysit.optimizer_set`), looked at every step
boundary; the marks are the first's.
"""

from __future__ import annotations

import time
from typing import Any

from . import optim
from .optimizer_set import series_name
from .position import ResumePosition
from .store import PER_STEP, RunStore
from .trainables import Trainables
from .writer import LogQueue

MARK_LR_RATIO = 1.2
MARK_MOMENTUM_DELTA = 0.02
COMMAND, SCHEDULER, LOOP = "command", "scheduler", "loop"


class HparamWatch:
    """The last lr / momentum seen and marked for one run (``store`` is None on a follower rank,
    which marks nothing: rank 0 does, for the whole job)."""

    def __init__(self, trainables: Trainables, position: ResumePosition, queue: LogQueue,
                 store: RunStore | None) -> None:
        self.trainables = trainables
        self.position = position
        self.queue = queue
        self.store = store
        self.key = optim.momentum_key(trainables.optimizer)
        self.read_momentum = momentum_reader(self.key)
        self.lr: float | None = None        # read every step boundary: plain attributes
        # Run.step_boundary compares group["lr"] with ``lr`` and group.get(key) with ``seen``, the
        # group's momentum entry as floats (a tuple for betas): no call per step, and a tensor entry
        # changed in place still compares unequal (tuple comparison compares element values).
        self.seen: Any = None
        self.momentum: float | None = None
        self._marked: dict[str, Any] = {}
        self._scheduler_steps = scheduler_steps(trainables.scheduler)
        # The other optimizers (empty with one, so Run.step_boundary's `or watch.others` costs nothing).
        self.others = [_OtherWatch(name, trainables.optimizers[name], trainables.names[0])
                       for name in trainables.names[1:]]

    def source(self) -> str:
        """Who made a change no command made: the scheduler if it stepped since, else the loop."""
        steps = scheduler_steps(self.trainables.scheduler)
        if steps != self._scheduler_steps:
            self._scheduler_steps = steps
            return SCHEDULER
        return LOOP

    def restored(self) -> None:
        """A checkpoint's scheduler state was loaded: its step count is not a step it took."""
        self._scheduler_steps = scheduler_steps(self.trainables.scheduler)

    def adopt(self) -> None:
        """Take the lr and momentum in use now as seen and marked, logging nothing: the run went
        back to a point of its own branch (after an excursion), whose values are on its curve."""
        group = self.trainables.optimizer.param_groups[0]
        self.lr, self.momentum = optim.as_float(group["lr"]), self.read_momentum(group)
        self.seen = _as_floats(group.get(self.key))
        self._marked = {"lr": self.lr, "momentum": self.momentum}
        for other in self.others:
            other.seen = other.read()

    def others_moved(self) -> bool:
        """Whether another optimizer's lr or momentum changed (a run with several; cheap when none did)."""
        return any(other.moved() for other in self.others)

    def record(self, force: bool = False, by: str | None = None) -> None:
        """Log lr and momentum where they changed; ``force`` logs both (the start of a branch)."""
        group = self.trainables.optimizer.param_groups[0]
        position = self.position
        lr, momentum = optim.as_float(group["lr"]), self.read_momentum(group)
        values = {}
        if force or lr != self.lr:
            values["lr"] = lr
        if momentum is not None and (force or momentum != self.momentum):
            values["momentum"] = momentum
        self.lr, self.momentum = lr, momentum
        self.seen = _as_floats(group.get(self.key))
        for other in self.others:
            other.changes(values, force)
        if values:
            self.queue.put((PER_STEP, position.branch, position.step, time.time(), values))
        after = {"lr": lr, "momentum": momentum}
        if force or by == COMMAND:
            self._marked = after
        elif by is not None and values and self.store is not None and self._moved_far(after):
            before, self._marked = self._marked, after
            self.store.add_event("hparams", f"{describe_change(before, after)} by the {by}",
                                 branch=position.branch, step=position.step, epoch=position.epoch,
                                 data={"before": before, "after": after, "by": by})

    def _moved_far(self, now: dict[str, Any]) -> bool:
        lr, marked_lr = now["lr"], self._marked.get("lr")
        if marked_lr and lr and not (1 / MARK_LR_RATIO < lr / marked_lr < MARK_LR_RATIO):
            return True
        momentum, marked = now["momentum"], self._marked.get("momentum")
        return momentum is not None and marked is not None and abs(momentum - marked) >= MARK_MOMENTUM_DELTA


class _OtherWatch:
    """One more optimizer's lr and momentum, as last logged under ``lr/<name>``, ``momentum/<name>``."""

    def __init__(self, name: str, optimizer: Any, first: str) -> None:
        self.optimizer = optimizer
        self.names = {hparam: series_name(hparam, name, first) for hparam in ("lr", "momentum")}
        self.key = optim.momentum_key(optimizer)
        self.seen: dict[str, Any] = {}
        self.entries: tuple[Any, Any] = (None, None)  # its group's lr and momentum entry as last read

    def read(self) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        self.entries = (optim.as_float(group["lr"]), _as_floats(group.get(self.key)))
        return optim.read_hparams(self.optimizer)

    def moved(self) -> bool:
        """Whether its lr or momentum entry changed since last read (as Run.step_boundary checks the first's)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] != self.entries[0] or group.get(self.key) != self.entries[1]

    def changes(self, values: dict[str, float], force: bool) -> None:
        """Add to ``values`` what changed since last logged (everything, with ``force``)."""
        now = self.read()
        for hparam, value in now.items():
            if value is not None and (force or value != self.seen.get(hparam)):
                values[self.names[hparam]] = value
        self.seen = now


def scheduler_steps(scheduler: Any) -> Any:
    scheduler = optim.real_scheduler(scheduler)  # accelerate's wrapper keeps no count of its own
    if scheduler is None:
        return None
    return getattr(scheduler, "last_epoch", None), getattr(scheduler, "_step_count", None)


def describe_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    parts = []
    for name in ("lr", "momentum"):
        if after.get(name) is not None and before.get(name) != after.get(name):
            old = "?" if before.get(name) is None else f"{before[name]:.4g}"
            parts.append(f"{name} {old} → {after[name]:.4g}")
    return ", ".join(parts) or "hyperparameters changed"


def _as_floats(entry: Any) -> Any:
    """A group's momentum entry (a number, a tensor, betas, or None) with numbers as floats."""
    if isinstance(entry, (tuple, list)):  # the same type, or a list would never equal the tuple
        return type(entry)(optim.as_float(v) for v in entry)
    return None if entry is None else optim.as_float(entry)


def momentum_reader(key: str | None) -> Any:
    """How to read the momentum of a group whose momentum entry is ``key`` (optim.momentum_key)."""
    as_float = optim.as_float  # a tensor momentum is read now: it may be changed in place later
    if key == "betas":
        return lambda group: as_float(group["betas"][0])
    if key == "momentum":
        return lambda group: as_float(group["momentum"])
    return lambda group: None
