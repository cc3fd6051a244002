"""The run's control state: one object, named transitions, one owner.

Every change of a run's lifecycle goes through a method of :class:`RunControl`, and each method
checks the state it starts from, so "who may set the interrupt, and when?" has one answer: read this
file. Plain Python (no torch, no store): tests/test_control.py walks it with a table.

The state is two things that change together:

* ``status``, as the store's status row shows it: running, paused, and once the run is over
  stopped, finished or crashed;
* ``interrupt``, the cut in progress: the current epoch is being left for a stop, a rollback or an
  excursion's next leg. It is set at a step boundary (``begin_stop``, ``begin_rollback``,
  ``cut_for_excursion``) and carried out as the loop leaves the epoch (``take_stop``,
  ``take_rollback``, ``excursion_cut_done``); nothing else is applied while it is set.

Transitions::

    running  --pause-->           paused      --resume-->          running
    running | paused  --begin_stop/begin_rollback/begin_data_skip/cut_for_excursion-->  (same status, cut set)
    (cut)    --take_rollback / take_data_skip / excursion_cut_done-->   (no cut)
    (STOP cut) --finish(STOPPED)-->  stopped, ended
    running  --finish(FINISHED)-->   finished, ended
    any live --left_loop / crashed / aborted-->  stopped | crashed
    any      --close-->  closed (a live status becomes stopped)

Beside them: a stop *asked* (``ask_stop``: a signal, ``run.request_stop()``, a stop command at an
epoch's last boundary, which waits for the epoch's end) is not yet a cut; ``wake`` says the queue
must be looked at before the next step; ``last_command`` is the newest command handled (what a
checkpoint records, so a resume neither applies a command twice nor misses one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .errors import CommandError
from .store.schema import CRASHED, FINISHED, PAUSED, RUNNING, STOPPED

LIVE = (RUNNING, PAUSED)
ENDED = (STOPPED, FINISHED, CRASHED)


class Interrupt(enum.Enum):
    """Why the current epoch is being cut short."""

    STOP = "stop"
    ROLLBACK = "rollback"
    EXCURSION = "excursion"  # a probe set or sweep goes to its next branch, or back (see excursion_runner)
    DATA_SKIP = "data_skip"  # a journal's data skip: the epoch is entered again further along its data order


class TransitionError(RuntimeError):
    """A transition asked from a state it does not start from: a bug in babysit, not a user's input."""


@dataclass
class PendingRollback:
    """A rollback applied at a step boundary, carried out when the loop leaves the epoch."""

    command: dict[str, Any]
    checkpoint: dict[str, Any]
    state: dict[str, Any]
    hparams_at_cut: dict[str, Any]   # what "keep the current hyperparameters" keeps
    branch_at_cut: int
    step_at_cut: int


@dataclass
class PendingDataSkip:
    """A replayed data skip applied at a step boundary: the position there (as a checkpoint would
    hold it) and the batches to leave out, carried out as the loop leaves the epoch."""

    entry: dict[str, Any]
    position: dict[str, Any]
    batches: int


@dataclass
class PendingStop:
    """A stop in progress: the command that asked for it (None for a signal) and its final checkpoint
    (taken at the boundary, or None to take it as the loop leaves the epoch)."""

    command: dict[str, Any] | None
    job: Any = None


class RunControl:
    """The lifecycle of one run (see the module's docstring)."""

    def __init__(self) -> None:
        self.status = RUNNING
        self.message = ""
        self.interrupt: Interrupt | None = None
        self._rollback: PendingRollback | None = None
        self._data_skip: PendingDataSkip | None = None
        self._stop: PendingStop | None = None
        self.stop_reason: str | None = None       # a stop asked, not yet carried out
        self._deferred_stop: dict[str, Any] | None = None  # a stop command waiting for its epoch's end
        self.final_hparams: dict[str, Any] | None = None   # what the final checkpoint holds
        self.wake = True                          # look at the queue before the first batch
        self.checkpoint_asked: str | None = None  # run.checkpoint_now() under torch.distributed
        self.excursion: Any = None                # the probe set or sweep in progress (excursion_runner)
        self.epoch_trained = False                # the epoch's batches are done: the loop is at its end
        self.ended = False                        # finished or stopped: close once the ranks have met
        self.closed = False
        self.last_command = 0                     # the newest command handled
        self.resumed_last_command: int | None = 0  # the resumed checkpoint's; None if it has none

    # -- reading ----------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self.status == PAUSED

    @property
    def interrupted(self) -> bool:
        """The epoch is being cut, or it reached its end inside an excursion (its branch is thrown away)."""
        return self.interrupt is not None or (self.excursion is not None and self.epoch_trained)

    @property
    def stop_asked(self) -> bool:
        return self.stop_reason is not None

    def _require(self, ok: bool, what: str) -> None:
        if not ok:
            raise TransitionError(f"{what} from status {self.status!r} with cut {self.interrupt}")

    # -- the queue --------------------------------------------------------------------------
    def wake_up(self) -> None:
        """Something arrived (a command, a written checkpoint): look at the queue at the next boundary."""
        self.wake = True

    def looked(self) -> None:
        self.wake = False

    def saw_command(self, command_id: int) -> None:
        self.last_command = max(self.last_command, command_id)

    def resumed_at(self, recorded: int | None, handled_so_far: int) -> None:
        """A checkpoint was loaded: command handling picks up where it recorded (``recorded``), or,
        for a checkpoint from before checkpoints recorded it, counts every command handled so far."""
        self.resumed_last_command = recorded
        self.last_command = recorded if recorded is not None else handled_so_far

    # -- running and paused -----------------------------------------------------------------
    def say(self, message: str) -> None:
        """Tell what the run is doing, with no change of state."""
        self.message = message

    def pause(self, message: str) -> None:
        """running -> paused (a person's or the guard's pause)."""
        if self.status == PAUSED:
            raise CommandError("the run is already paused")
        self._require(self.status == RUNNING, "pause")
        self.status, self.message = PAUSED, message

    def resume(self, message: str) -> None:
        """paused -> running."""
        if self.status != PAUSED:
            raise CommandError(f"the run is not paused (it is {self.status}); nothing to resume")
        self.status, self.message = RUNNING, message

    def pause_after_excursion(self, message: str) -> None:
        """Back from a probe set or sweep: paused for the person to choose (paused already or not)."""
        self._require(self.status in LIVE, "pause_after_excursion")
        self.status, self.message = PAUSED, message

    def run_again(self, message: str) -> None:
        """A rollback or an excursion's leg was carried out: the run trains (a pause is over)."""
        self._require(self.status in LIVE, "run_again")
        self.status, self.message = RUNNING, message

    # -- stops ------------------------------------------------------------------------------
    def ask_stop(self, reason: str) -> None:
        """Stop at the next step boundary (safe in a signal handler: two assignments)."""
        self.stop_reason = reason
        self.wake = True

    def stop_at_epoch_end(self, command: dict[str, Any]) -> None:
        """A stop command at an epoch's last boundary: the epoch ends as usual, the run stops before the next."""
        self._deferred_stop = command
        if self.stop_reason is None:
            self.stop_reason = "stop command"

    def begin_stop(self, command: dict[str, Any] | None, job: Any) -> None:
        """(no cut) -> STOP: the final checkpoint (``job``) is taken here, at the step boundary."""
        self._require(self.interrupt is None, "begin_stop")
        self._stop = PendingStop(command, job)
        self.interrupt = Interrupt.STOP

    def stop_between_epochs(self) -> bool:
        """Between two epochs, a stop asked earlier becomes the cut (its checkpoint taken as it is
        carried out); False when none was asked."""
        if self.stop_reason is None:
            return False
        self._require(self.interrupt is None, "stop_between_epochs")
        self._stop = PendingStop(self._deferred_stop)
        self.interrupt = Interrupt.STOP
        return True

    def take_stop(self) -> PendingStop:
        """STOP: what carrying out the stop needs (the run then ends with :meth:`finish`)."""
        self._require(self.interrupt is Interrupt.STOP and self._stop is not None, "take_stop")
        stop, self._stop = self._stop, None
        assert stop is not None
        if stop.command is None:
            stop.command, self._deferred_stop = self._deferred_stop, None
        return stop

    # -- rollbacks and excursions -----------------------------------------------------------
    def begin_rollback(self, rollback: PendingRollback) -> None:
        """(no cut) -> ROLLBACK."""
        self._require(self.interrupt is None, "begin_rollback")
        self._rollback = rollback
        self.interrupt = Interrupt.ROLLBACK

    def take_rollback(self) -> PendingRollback:
        """ROLLBACK -> (no cut): the rollback to carry out now."""
        self._require(self.interrupt is Interrupt.ROLLBACK and self._rollback is not None, "take_rollback")
        rollback, self._rollback = self._rollback, None
        self.interrupt = None
        assert rollback is not None
        return rollback

    def begin_data_skip(self, skip: PendingDataSkip) -> None:
        """(no cut) -> DATA_SKIP."""
        self._require(self.interrupt is None, "begin_data_skip")
        self._data_skip = skip
        self.interrupt = Interrupt.DATA_SKIP

    def take_data_skip(self) -> PendingDataSkip:
        """DATA_SKIP -> (no cut): the skip to carry out now."""
        self._require(self.interrupt is Interrupt.DATA_SKIP and self._data_skip is not None, "take_data_skip")
        skip, self._data_skip = self._data_skip, None
        self.interrupt = None
        assert skip is not None
        return skip

    def start_excursion(self, excursion: Any) -> None:
        """A probe set or sweep begins; one asked of a paused run is what the person wants it to do now."""
        self._require(self.excursion is None and self.interrupt is None, "start_excursion")
        self.excursion = excursion
        if self.status == PAUSED:
            self.status = RUNNING

    def cut_for_excursion(self) -> None:
        """(no cut) -> EXCURSION: the excursion goes to its next leg, or back, as the loop leaves the epoch."""
        self._require(self.excursion is not None and self.interrupt is None, "cut_for_excursion")
        self.interrupt = Interrupt.EXCURSION

    def excursion_cut_done(self) -> None:
        self._require(self.interrupt is Interrupt.EXCURSION, "excursion_cut_done")
        self.interrupt = None

    def end_excursion(self) -> None:
        self._require(self.excursion is not None, "end_excursion")
        self.excursion = None

    # -- epochs -----------------------------------------------------------------------------
    def epoch_begins(self) -> None:
        self.epoch_trained = False

    def epoch_batches_done(self) -> None:
        self.epoch_trained = True

    # -- the end ----------------------------------------------------------------------------
    def finish(self, status: str, message: str) -> None:
        """The run is over: stopped (its stop carried out) or finished (every epoch trained)."""
        self._require(status in (STOPPED, FINISHED) and not self.ended, f"finish as {status}")
        self.status, self.message, self.ended = status, message, True

    def left_loop(self, message: str) -> None:
        """The loop broke out of ``run.epochs`` (or an error did): stopped, with nothing written."""
        self.status, self.message = STOPPED, message

    def aborted(self, message: str) -> None:
        """Ctrl-C reached the loop (a second one, or a loop that handles none): stopped."""
        self.status, self.message = STOPPED, message

    def crashed(self, message: str) -> None:
        self.status, self.message = CRASHED, message

    def close(self, message: str) -> bool:
        """Closing: a run still live becomes stopped with ``message`` (unless it said why already).
        False if it was closed before."""
        if self.closed:
            return False
        self.closed = True
        if self.status in LIVE:
            self.status = STOPPED
            self.message = self.message or message
        return True

    # -- under torch.distributed ------------------------------------------------------------
    def adopt(self, status: str, message: str, interrupt: Interrupt | None, ended: bool) -> None:
        """A follower rank takes the leader's state as a meeting ends (see babysit.ranks)."""
        self.status, self.message, self.interrupt, self.ended = status, message, interrupt, ended

    def ask_checkpoint(self, reason: str) -> None:
        """``run.checkpoint_now()`` under torch.distributed: taken at the next meeting, together."""
        self.checkpoint_asked, self.wake = reason, True

    def take_checkpoint_asked(self) -> str | None:
        reason, self.checkpoint_asked = self.checkpoint_asked, None
        return reason
