"""What babysit does when a run diverges: pause it with the remedy one click away, or — when the
guard may (``GuardConfig(auto_remedy_max=N)``) — apply the remedy itself: a rollback to the last
healthy checkpoint with half of its lr (babysit/instruments/remedy_offer.py).

A divergence can be reported twice, from two threads: by the guard reading the loss (the writer
thread) and by a checkpoint that found NaN weights (the checkpoint thread). A branch gets one
remedy, and a remedy meant for a branch the run has left never reaches the next one; a person's
resume re-arms it.
"""

from __future__ import annotations

import threading
from typing import Any

from . import commands as cmd
from .control import RunControl
from .guard import Divergence, GuardConfig
from .instruments.remedy_offer import read_offer
from .position import ResumePosition
from .snapshots import Snapshots
from .store import RunStore
from .trainables import Trainables


class DivergenceRemedy:
    """Answers the divergences of one run."""

    def __init__(self, store: RunStore, control: RunControl, position: ResumePosition, trainables: Trainables,
                 snapshots: Snapshots, guard_config: GuardConfig) -> None:
        self.store = store
        self.control = control
        self.position = position
        self.trainables = trainables
        self.snapshots = snapshots
        self.guard_config = guard_config
        self.used = 0
        self._lock = threading.Lock()
        self._answered_branch: int | None = None

    def on_divergence(self, found: Divergence, branch: int) -> None:
        """The writer thread's callback: the guard found a divergence in the logged loss."""
        if branch != self.position.branch:
            return
        if self.control.closed:  # found in the last values of a run that has ended: nothing to pause
            self.store.add_event("divergence", f"divergence: {found.describe()} (after the run ended)",
                                branch=branch, step=found.step, data=found.as_dict())
            return
        self.apply(found.describe(), branch, found.step, found.as_dict())

    def person_resumed(self) -> None:
        """A person looked at the paused run and resumed it: a new divergence gets a new remedy."""
        with self._lock:
            self._answered_branch = None

    def apply(self, what: str, branch: int, step: int, data: dict[str, Any] | None = None) -> None:
        """A divergence found on ``branch`` at ``step``: pause, or roll back by itself."""
        excursion, store = self.control.excursion, self.store
        if excursion is not None and excursion.owns(branch):
            return  # a sweep is meant to diverge; a probe that does ends early, recorded (excursion_runner)
        with self._lock:
            if branch != self.position.branch or self._answered_branch == branch:
                return
            self._answered_branch = branch
        healthy = self.snapshots.last_healthy(step)
        offer = read_offer(store, healthy) if healthy else None  # half of its lr (instruments/remedy_offer.py)
        data = {**(data or {}), "what": what, "checkpoint": healthy["id"] if healthy else None,
                "suggested_lr": offer.lr if offer else None}
        limit = self.guard_config.auto_remedy_max
        if offer is not None and limit > self.used:
            self.used += 1
            message = (f"divergence: {what}; rolling back to checkpoint #{offer.checkpoint} with {offer.describe()} "
                       f"(automatic remedy {self.used} of {limit})")
            store.add_event("divergence", message, branch=branch, step=step, data=data)
            store.enqueue_command(cmd.ROLLBACK, {**offer.command_args(), "branch": branch}, source="guard",
                                  require_live=False)
        else:
            remedy = (f"; remedy: roll back to checkpoint #{offer.checkpoint} with {offer.describe()}" if offer
                      else "; no checkpoint to roll back to yet")
            store.add_event("divergence", f"divergence: {what}; run paused{remedy}", branch=branch, step=step, data=data)
            store.enqueue_command(cmd.PAUSE, {"reason": f"divergence: {what}", "branch": branch}, source="guard",
                                  require_live=False)
        self.control.wake_up()
