"""How a run obeys: the queued commands applied at a step boundary (lr, momentum, pause, resume,
checkpoint now, stop, rollback, probe, sweep, cancel) and the nudges replayed at their steps. Every
outcome is recorded on the command's row. What a stop or a rollback does as the loop leaves the
epoch is :mod:`babysit.cuts`; the lifecycle they move is :mod:`babysit.control`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from . import commands as cmd
from . import optim
from .checkpoint import KEY_EPOCH, REASON_EPOCH, REASON_STOP, rng_state
from .control import PendingDataSkip, PendingRollback, RunControl
from .errors import CheckpointError, CommandError
from .excursion_runner import Excursions
from .guard_watch import WatchedGuards
from .hparam_watch import COMMAND, HparamWatch
from .journal_replay import DATA_SKIP_KIND, ReplayQueue
from .position import ResumePosition
from .ranks import Ranks
from .remedy import DivergenceRemedy
from .snapshots import Snapshots
from .store import CommandSignal, RunStore
from .store.schema import EXCURSION_CANCELLED
from .trainables import Trainables

# A command that waited this long for a trainer (one that died or froze before applying it) is
# expired rather than applied out of the blue.
PENDING_COMMAND_TTL_S = 600.0


class CommandRunner:
    """Applies the queued commands of one run (on the leader rank)."""

    def __init__(self, run_dir: Path, store: RunStore, signal: CommandSignal, control: RunControl,
                 position: ResumePosition, trainables: Trainables, snapshots: Snapshots, hparams: HparamWatch,
                 guard: WatchedGuards, remedy: DivergenceRemedy, replay: ReplayQueue, excursions: Excursions,
                 ranks: Ranks | None, *, wake_writer: Callable[[], None]) -> None:
        self.run_dir = run_dir
        self.store = store
        self.signal = signal
        self.control = control
        self.position = position
        self.trainables = trainables
        self.snapshots = snapshots
        self.hparams = hparams
        self.guard = guard
        self.remedy = remedy
        self.replay = replay
        self.excursions = excursions
        self.ranks = ranks
        self.wake_writer = wake_writer
        self.data_skip_refused: str | None = None

    def replay_due(self) -> bool:
        position = self.position
        return self.replay.due(position.step, position.step_in_epoch, under_ranks=self.ranks is not None)

    def apply_due(self) -> None:
        """Replays, then queued commands, then a pause."""
        control = self.control
        if self.trainables.between_optimizer_steps():
            return  # all of it waits for the micro-batch that steps the optimizer (still due then)
        control.looked()
        if control.stop_asked and not self.position.at_last_boundary():
            self.begin_stop(None)
            return
        while self.replay_due():
            self._replay_command(self.replay.pop())
        if control.interrupt is not None:  # a replayed data skip cuts the epoch: nothing more until it is done
            return
        reason = control.take_checkpoint_asked()
        if reason is not None:  # run.checkpoint_now() under torch.distributed: taken here, together
            self.snapshots.take(reason)
        self._apply_pending()
        if control.interrupt is None and self.snapshots.periodic_due():
            self.snapshots.take_periodic()
        if control.paused and control.interrupt is None:
            self._wait_while_paused()

    def _apply_pending(self) -> None:
        control = self.control
        self.signal.mark_seen()
        for pending in self.store.pending_commands():
            # A cut ends what this boundary applies; a stop ends the queue: what waits behind it is
            # expired as the run ends (Run.close), never applied by this run or the next start.
            if control.interrupt is not None or control.stop_asked:
                return
            if self.snapshots.is_carrying_out(pending["id"]):
                continue
            self._apply(pending)

    def _wait_while_paused(self) -> None:
        control = self.control
        self.wake_writer()
        while control.paused and control.interrupt is None:
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not self.signal.changed() and not control.wake:
                time.sleep(0.005)
            # The other ranks wait in this meeting: a collective now and then keeps them, and tells
            # of a stop one of them was asked for (a signal to that rank).
            if self.ranks is not None and self.ranks.ping() and not control.stop_asked:
                control.ask_stop("a stop asked on another rank")
            control.looked()
            if control.stop_asked:
                self.begin_stop(None)
                break
            self._apply_pending()
        self.wake_writer()

    def _apply(self, pending: dict[str, Any]) -> None:
        """Check a queued command again and apply it; record what it changed or why not."""
        command_id, position = pending["id"], self.position
        self.control.saw_command(command_id)
        if self._expired(pending):
            return
        try:
            command = cmd.validate(pending["kind"], pending["args"])
            result = self._execute(command, pending)
        except CommandError as error:
            self.store.finish_command(command_id, cmd.REJECTED, branch=position.branch, step=position.step,
                                      reason=str(error))
            return
        except CheckpointError as error:
            reason = f"{error}; the run continues on branch {position.branch}; pick another checkpoint"
            self.store.finish_command(command_id, cmd.REJECTED, branch=position.branch, step=position.step,
                                      reason=reason)
            return
        except Exception as error:  # an unexpected failure rejects this command, never the run
            self.store.finish_command(command_id, cmd.REJECTED, branch=position.branch, step=position.step,
                                      reason=f"{type(error).__name__}: {error}")
            return
        if result is not None:  # None: acknowledged later (checkpoint written, rollback done, stop)
            self.store.finish_command(command_id, cmd.APPLIED, branch=position.branch, step=position.step,
                                      result=result)

    def _execute(self, command: cmd.Command, pending: dict[str, Any]) -> dict[str, Any] | None:
        kind, control, position = command.kind, self.control, self.position
        excursion = control.excursion
        if excursion is not None and kind in (cmd.SET_LR, cmd.SET_MOMENTUM, cmd.CHECKPOINT):
            excursion.refuse(command.describe())
        if kind in (cmd.PROBE, cmd.SWEEP):
            self.excursions.begin(command, pending)  # acknowledged there, on the run's own branch
            return None
        if kind == cmd.CANCEL:
            return self._cancel(command.args["excursion"])
        if kind in (cmd.SET_LR, cmd.SET_MOMENTUM):
            return self._nudge(kind, command.args["value"], command.args.get("optimizer"))
        for_branch = command.args.get("branch")
        if for_branch is not None and for_branch != position.branch:  # a remedy for a branch the run has left
            raise CommandError(f"this {kind} was for a divergence on branch {for_branch}; the run has moved on to "
                               f"branch {position.branch}")
        if kind == cmd.PAUSE:
            control.pause(f"paused at step {position.step}: {command.args.get('reason') or 'by ' + pending['source']}")
            return {"state": control.status}
        if kind == cmd.RESUME:
            control.resume(f"resumed at step {position.step}")
            self.guard.reset()
            self.remedy.person_resumed()
            return {"state": control.status}
        if kind == cmd.CHECKPOINT:
            self._checkpoint_now(pending["id"])
            return None
        if kind == cmd.STOP:
            if position.at_last_boundary():  # let the epoch end as usual; stop before the next one
                control.stop_at_epoch_end(pending)
            else:
                self.begin_stop(pending)
            return None
        if kind == cmd.ROLLBACK:
            self._begin_rollback(command, pending)
            return None
        raise CommandError(f"unknown command {kind!r}")

    def _nudge(self, kind: str, value: float, optimizer: str | None = None) -> dict[str, Any]:
        """Set lr or momentum of an optimizer (the first by default); the result says before → after,
        where in the epoch it landed, and, with several, which optimizer."""
        optimizer = self.trainables.resolve(optimizer)  # an unknown name is refused, naming the known ones
        before = self.trainables.hparams(optimizer)
        if kind == cmd.SET_LR:
            name, after = "lr", self.trainables.set_lr(value, optimizer)
            warning = cmd.lr_warning(after)
        else:
            name, after = "momentum", self.trainables.set_momentum(value, optimizer)
            scheduler = self.trainables.schedulers.get(optimizer)
            warning = (f"{type(scheduler).__name__} cycles momentum and will overwrite this at its next step (the "
                       "chart shows what it sets)") if optim.cycles_momentum(scheduler) else None
        self.hparams.record(by=COMMAND)
        # Where in the epoch: at an epoch's end, the last boundary (before the loop's own
        # epoch-end code) and the next epoch's first (after it) share a step; a replay needs both.
        result: dict[str, Any] = {"before": before[name], "after": after, "step_in_epoch": self.position.step_in_epoch}
        if self.trainables.several:
            result["optimizer"] = optimizer
        if warning:
            result["warning"] = warning
        return result

    def _cancel(self, wanted: int) -> dict[str, Any]:
        excursion = self.control.excursion
        if excursion is None or excursion.id != wanted:
            found = self.store.excursion(wanted)
            state = f"it is {found['state']}" if found else "there is no such excursion"
            raise CommandError(f"excursion #{wanted} is not running ({state}); nothing to cancel")
        excursion.cancel(EXCURSION_CANCELLED, "cancelled")
        return {"excursion": wanted, "checkpoint": excursion.return_record["id"]}

    def _checkpoint_now(self, command_id: int) -> None:
        position = self.position
        if not position.at_last_boundary():
            self.snapshots.take_for_command(command_id)
            return
        self.snapshots.answer_at_epoch_end(command_id)  # the epoch's own checkpoint, of this step, answers it
        if self.control.paused:  # not until the run resumes and the loop ends the epoch: say so
            self.store.add_event("checkpoint_waits", f"checkpoint #{command_id}: the run is paused after the last "
                                 f"batch of epoch {position.epoch}; that epoch's own checkpoint, of this step, "
                                 "answers it once the run resumes", branch=position.branch, step=position.step,
                                 epoch=position.epoch)

    def refuse_data_skips(self, why: str) -> None:
        """A driver whose loader skips batches itself (the Hugging Face Trainer's) refuses a
        rollback's ``skip_batches``, saying why."""
        self.data_skip_refused = why

    def _check_skip(self, skip: int, record: dict[str, Any]) -> None:
        """A rollback's data skip must leave something of the epoch it resumes in to train."""
        if self.data_skip_refused:
            raise CommandError(self.data_skip_refused)
        epoch_done = record["reason"] == REASON_EPOCH
        start = 0 if epoch_done else int(record["step_in_epoch"])
        total = self.position.steps_per_epoch
        if total is not None and start + skip >= total:
            where = (f"at the start of epoch {record['epoch'] + 1}" if epoch_done
                     else f"after batch {start} of epoch {record['epoch']}")
            raise CommandError(f"skip_batches {skip} goes past the end of the epoch: checkpoint #{record['id']} resumes "
                               f"{where}, and an epoch has {total} batches; at most {max(0, total - start - 1)} can be "
                               "skipped")

    def _begin_rollback(self, command: cmd.Command, pending: dict[str, Any]) -> None:
        record = self.store.checkpoint(command.args["checkpoint"], must_exist=True)
        assert record is not None
        if command.args.get("skip_batches"):
            self._check_skip(command.args["skip_batches"], record)
        state = self.trainables.read(self.run_dir, record)
        self.trainables.check_fits(state, record["id"])
        before, branch_at_cut, step_at_cut = self.trainables.hparams(), self.position.branch, self.position.step
        excursion = self.control.excursion
        if excursion is not None:  # it ends here; "current" hparams are the run's, not a probe's
            before, branch_at_cut, step_at_cut = (excursion.hparams_at_return, excursion.origin_branch,
                                                  excursion.origin_step)
            excursion.give_way_to_rollback(record["id"])
        self.control.begin_rollback(PendingRollback(pending, record, state, hparams_at_cut=before,
                                                    branch_at_cut=branch_at_cut, step_at_cut=step_at_cut))

    def begin_stop(self, pending: dict[str, Any] | None) -> None:
        """A stop is checkpointed here, at the step boundary, so that nothing the loop runs after
        the cut (its evaluation, its lr anneal) reaches the final checkpoint. During an excursion
        the final checkpoint is the return point's state, taken once back there."""
        job = None if self.control.excursion is not None else self.snapshots.take(REASON_STOP, reuse_same_step=True)
        self.control.begin_stop(pending, job)  # the snapshot may refuse (raise): nothing is set then

    # -- replays -----------------------------------------------------------------------------
    def _replay_command(self, applied: dict[str, Any]) -> None:
        if applied["kind"] == DATA_SKIP_KIND:  # a cut: the epoch is entered again further along (see Cuts)
            self.control.begin_data_skip(PendingDataSkip(
                applied, {**self.position.to_checkpoint(rng_state()), KEY_EPOCH: self.position.epoch},
                applied["args"]["batches"]))
            return
        value, position, store = applied["args"]["value"], self.position, self.store
        optimizer = applied["args"].get("optimizer")  # None: the first (a run with one, or rows from before names)
        args = {"value": value, **({"optimizer": optimizer} if optimizer is not None else {})}
        try:
            before = self.trainables.hparams(self.trainables.resolve(optimizer))
            if applied["kind"] == cmd.SET_LR:
                self.trainables.set_lr(value, optimizer)
            else:
                self.trainables.set_momentum(value, optimizer)
        except CommandError as error:  # a journal's momentum for an optimizer without one (or one this run has not)
            if applied["id"] is not None:
                raise
            store.record_trainer_command(applied["kind"], args, cmd.REJECTED, source=applied["source"],
                                         branch=position.branch, step=position.step, reason=str(error))
            return
        self.hparams.record(by=COMMAND)
        if applied["id"] is None:  # a journal's setting: recorded as a command of this run, applied now
            name = "lr" if applied["kind"] == cmd.SET_LR else "momentum"
            applied["id"] = store.record_trainer_command(
                applied["kind"], args, cmd.APPLIED, source=applied["source"], branch=position.branch,
                step=position.step, result={"before": before[name],
                                            "after": self.trainables.hparams(self.trainables.resolve(optimizer))[name],
                                            "step_in_epoch": position.step_in_epoch,
                                            "journal_entry": applied["entry"]})
        self.control.saw_command(applied["id"])

    # -- commands a dead trainer left ------------------------------------------------------------
    def expire_stale(self) -> None:
        for pending in self.store.pending_commands():
            self._expired(pending)

    def _expired(self, pending: dict[str, Any]) -> bool:
        """Expire a command that waited too long (its trainer died or froze); True if it did."""
        if time.time() - pending["created"] <= PENDING_COMMAND_TTL_S:
            return False
        self.store.finish_command(
            pending["id"], cmd.EXPIRED, branch=self.position.branch, step=self.position.step,
            reason=f"no trainer applied it within {PENDING_COMMAND_TTL_S:.0f} s; send it again",
        )
        return True
