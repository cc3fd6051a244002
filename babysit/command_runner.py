"""How a run obeys: the queued commands applied at a step boundary (lr, momentum, pause, resume,
checkpoint now, stop, rollback), replays of applied nudges after a resume, and the rollback and
stop carried out as the loop leaves the epoch. Every outcome is recorded on the command's row.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import commands as cmd
from . import excursion_runner, optim
from .checkpoint import KEY_MODEL, KEY_OPTIMIZER, REASON_STOP, read_verified
from .errors import CheckpointError, CommandError
from .hparam_watch import COMMAND
from .instruments import journal
from .store import PAUSED, RUNNING, STOPPED

if TYPE_CHECKING:
    from .run import Run

# A command that waited this long for a trainer (one that died or froze before applying it) is
# expired rather than applied out of the blue.
PENDING_COMMAND_TTL_S = 600.0


class Interrupt(enum.Enum):
    """Why the current epoch is being cut short."""

    STOP = "stop"
    ROLLBACK = "rollback"
    EXCURSION = "excursion"  # a probe set or sweep goes to its next branch, or back (see excursion_runner)


@dataclass
class PendingRollback:
    """A rollback applied at a step boundary, carried out when the loop leaves the epoch."""

    command: dict[str, Any]
    checkpoint: dict[str, Any]
    state: dict[str, Any]
    hparams_at_cut: dict[str, Any]   # what "keep the current hyperparameters" keeps
    branch_at_cut: int
    step_at_cut: int


class CommandRunner:
    """Applies the queued commands of one :class:`~babysit.run.Run`."""

    def __init__(self, run: "Run") -> None:
        self.run = run

    def apply_due(self) -> None:
        """Replays, then queued commands, then a pause."""
        run = self.run
        run._wake = False
        if run._stop_reason is not None and not run._at_last_boundary():
            self.begin_stop(None)
            return
        while self.replay_due():
            self._replay_command(run._replay.pop(0))
        if run._checkpoint_asked is not None:  # run.checkpoint_now() under torch.distributed: taken here, together
            reason, run._checkpoint_asked = run._checkpoint_asked, None
            run.snapshots.take(reason)
        self._apply_pending()
        if run.status == PAUSED and not run._interrupt:
            self._wait_while_paused()

    def _apply_pending(self) -> None:
        run = self.run
        run.signal.mark_seen()
        for pending in run.store.pending_commands():
            if run.snapshots.is_carrying_out(pending["id"]):
                continue
            self._apply(pending)
            if run._interrupt:
                return

    def _wait_while_paused(self) -> None:
        run = self.run
        run.writer.wake()
        while run.status == PAUSED and not run._interrupt:
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not run.signal.changed() and not run._wake:
                time.sleep(0.005)
            # The other ranks wait in this meeting: a collective now and then keeps them, and tells
            # of a stop one of them was asked for (a signal to that rank).
            if run._ranks is not None and run._ranks.ping(run) and run._stop_reason is None:
                run.request_stop("a stop asked on another rank")
            run._wake = False
            if run._stop_reason is not None:
                self.begin_stop(None)
                break
            self._apply_pending()
        run.writer.wake()

    def _apply(self, pending: dict[str, Any]) -> None:
        """Check a queued command again and apply it; record what it changed or why not."""
        run = self.run
        command_id = pending["id"]
        run._last_command_id = max(run._last_command_id, command_id)
        if self._expired(pending):
            return
        try:
            command = cmd.validate(pending["kind"], pending["args"])
            result = self._execute(command, pending)
        except CommandError as error:
            run.store.finish_command(command_id, cmd.REJECTED, branch=run.branch, step=run.step, reason=str(error))
            return
        except CheckpointError as error:
            reason = f"{error}; the run continues on branch {run.branch}; pick another checkpoint"
            run.store.finish_command(command_id, cmd.REJECTED, branch=run.branch, step=run.step, reason=reason)
            return
        except Exception as error:  # an unexpected failure rejects this command, never the run
            run.store.finish_command(command_id, cmd.REJECTED, branch=run.branch, step=run.step,
                                     reason=f"{type(error).__name__}: {error}")
            return
        if result is not None:  # None: acknowledged later (checkpoint written, rollback done, stop)
            run.store.finish_command(command_id, cmd.APPLIED, branch=run.branch, step=run.step, result=result)

    def _execute(self, command: cmd.Command, pending: dict[str, Any]) -> dict[str, Any] | None:
        run = self.run
        before = run.hparams
        excursion = run._excursion
        if excursion is not None and command.kind in (cmd.SET_LR, cmd.SET_MOMENTUM, cmd.CHECKPOINT):
            excursion.refuse(command.describe())
        if command.kind in (cmd.PROBE, cmd.SWEEP):
            excursion_runner.begin(run, command, pending)  # acknowledged there, on the run's own branch
            return None
        if command.kind == cmd.CANCEL:
            wanted = command.args["excursion"]
            if excursion is None or excursion.id != wanted:
                found = run.store.excursion(wanted)
                state = f"it is {found['state']}" if found else "there is no such excursion"
                raise CommandError(f"excursion #{wanted} is not running ({state}); nothing to cancel")
            excursion.cancel(excursion_runner.EXCURSION_CANCELLED, "cancelled")
            return {"excursion": wanted, "checkpoint": excursion.return_record["id"]}
        if command.kind == cmd.SET_LR:
            after = optim.set_lr(run.optimizer, command.args["value"], run.scheduler)
            run._tell("set_lr", command.args["value"])
            run._hparams.record(by=COMMAND)
            # Where in the epoch: at an epoch's end, the last boundary (before the loop's own
            # epoch-end code) and the next epoch's first (after it) share a step; a replay needs both.
            result: dict[str, Any] = {"before": before["lr"], "after": after, "step_in_epoch": run.step_in_epoch}
            warning = cmd.lr_warning(after)
            if warning:
                result["warning"] = warning
            return result
        if command.kind == cmd.SET_MOMENTUM:
            after = optim.set_momentum(run.optimizer, command.args["value"])
            run._tell("set_momentum", command.args["value"])
            run._hparams.record(by=COMMAND)
            result = {"before": before["momentum"], "after": after, "step_in_epoch": run.step_in_epoch}
            if optim.cycles_momentum(run.scheduler):
                result["warning"] = (f"{type(run.scheduler).__name__} cycles momentum and will overwrite this "
                                     "at its next step (the chart shows what it sets)")
            return result
        for_branch = command.args.get("branch")
        if for_branch is not None and for_branch != run.branch:  # a remedy for a branch the run has left
            raise CommandError(f"this {command.kind} was for a divergence on branch {for_branch}; the run has "
                                   f"moved on to branch {run.branch}")
        if command.kind == cmd.PAUSE:
            if run.status == PAUSED:
                raise CommandError("the run is already paused")
            why = command.args.get("reason") or f"by {pending['source']}"
            run.status, run.message = PAUSED, f"paused at step {run.step}: {why}"
            return {"state": PAUSED}
        if command.kind == cmd.RESUME:
            if run.status != PAUSED:
                raise CommandError(f"the run is not paused (it is {run.status}); nothing to resume")
            run.status, run.message = RUNNING, f"resumed at step {run.step}"
            run._guard.reset()
            run.remedy.person_resumed()
            return {"state": RUNNING}
        if command.kind == cmd.CHECKPOINT:
            if run._at_last_boundary():  # the epoch's own checkpoint, of this step, answers it
                run.snapshots.answer_at_epoch_end(pending["id"])
                if run.status == PAUSED:  # not until the run resumes and the loop ends the epoch: say so
                    run.store.add_event("checkpoint_waits", f"checkpoint #{pending['id']}: the run is paused after "
                                        f"the last batch of epoch {run.epoch}; that epoch's own checkpoint, of this "
                                        "step, answers it once the run resumes", branch=run.branch, step=run.step,
                                        epoch=run.epoch)
            else:
                run.snapshots.take_for_command(pending["id"])
            return None
        if command.kind == cmd.STOP:
            if run._at_last_boundary():  # let the epoch end as usual; stop before the next one
                run._stop_command, run._stop_reason = pending, run._stop_reason or "stop command"
            else:
                self.begin_stop(pending)
            return None
        if command.kind == cmd.ROLLBACK:
            record = run.store.checkpoint(command.args["checkpoint"], must_exist=True)
            assert record is not None
            state = read_verified(run.run_dir / record["file"], record["sha256"])
            self._check_fits(state, record)
            branch_at_cut, step_at_cut = run.branch, run.step
            if excursion is not None:  # it ends here; "current" hparams are the run's, not a probe's
                before, branch_at_cut, step_at_cut = (excursion.hparams_at_return, excursion.origin_branch,
                                                      excursion.origin_step)
                excursion.give_way_to_rollback(record["id"])
            run._rollback = PendingRollback(pending, record, state, hparams_at_cut=before,
                                            branch_at_cut=branch_at_cut, step_at_cut=step_at_cut)
            run._interrupt = Interrupt.ROLLBACK
            return None
        raise CommandError(f"unknown command {command.kind!r}")

    def begin_stop(self, pending: dict[str, Any] | None) -> None:
        """A stop is checkpointed here, at the step boundary, so that nothing the loop runs after
        the cut (its evaluation, its lr anneal) reaches the final checkpoint."""
        run = self.run
        # During an excursion the final checkpoint is the return point's state, taken once back there.
        run._stop_job = (None if run._excursion is not None
                         else run.snapshots.take(REASON_STOP, reuse_same_step=True))  # may refuse: nothing is set yet
        run._stop_command = pending
        run._interrupt = Interrupt.STOP

    def _check_fits(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Refuse a checkpoint whose tensors do not fit this model or optimizer before anything
        is changed (loading it would fail half-way)."""
        run = self.run
        live = run.model.state_dict()
        saved = state.get(KEY_MODEL) or {}
        problems = sorted(set(live) ^ set(saved))[:3]
        problems += [f"{name} {tuple(saved[name].shape)} vs {tuple(tensor.shape)} here" for name, tensor in live.items()
                     if name in saved and hasattr(saved[name], "shape") and saved[name].shape != tensor.shape][:3]
        groups = (state.get(KEY_OPTIMIZER) or {}).get("param_groups", [])
        if [len(g.get("params", [])) for g in groups] != [len(g["params"]) for g in run.optimizer.param_groups]:
            problems.append("the optimizer's parameter groups differ")
        if problems:
            raise CommandError(f"checkpoint #{record['id']} does not fit this model ({'; '.join(problems)}); "
                                   "nothing was changed")

    def restore_hparams(self, hparams: dict[str, Any]) -> None:
        run = self.run
        optim.restore_hparams(run.optimizer, hparams, run.scheduler)
        run._tell("restore_hparams", hparams)

    def replay_due(self) -> bool:
        """Whether the first nudge waiting to be replayed is due at this boundary: past its step, or
        at it in the same place of the epoch (see :func:`babysit.instruments.journal.at_of`)."""
        run = self.run
        if not run._replay:
            return False
        head = run._replay[0]
        if run.step != head["step"] or run._ranks is not None:
            # Under torch.distributed the ranks meet at sync steps only, and an epoch's first
            # boundary is none: a nudge recorded there is replayed at the step's first meeting.
            return run.step >= head["step"]
        return replay_at(head) != journal.AT_EPOCH_START or run.step_in_epoch == 0

    def _replay_command(self, applied: dict[str, Any]) -> None:
        run = self.run
        value = applied["args"]["value"]
        before = run.hparams
        try:
            if applied["kind"] == cmd.SET_LR:
                optim.set_lr(run.optimizer, value, run.scheduler)
                run._tell("set_lr", value)
            else:
                optim.set_momentum(run.optimizer, value)
                run._tell("set_momentum", value)
        except CommandError as error:  # a journal's momentum for an optimizer without one: said, not fatal
            if applied["id"] is not None:
                raise
            run.store.record_trainer_command(applied["kind"], {"value": value}, cmd.REJECTED, source=applied["source"],
                                             branch=run.branch, step=run.step, reason=str(error))
            return
        run._hparams.record(by=COMMAND)
        if applied["id"] is None:  # a journal's setting: recorded as a command of this run, applied now
            name = "lr" if applied["kind"] == cmd.SET_LR else "momentum"
            applied["id"] = run.store.record_trainer_command(
                applied["kind"], {"value": value}, cmd.APPLIED, source=applied["source"], branch=run.branch,
                step=run.step, result={"before": before[name], "after": run.hparams[name],
                                       "step_in_epoch": run.step_in_epoch, "journal_entry": applied["entry"]})
        run._last_command_id = max(run._last_command_id, applied["id"])

    def finish_rollback(self) -> None:
        run = self.run
        rollback = run._rollback
        assert rollback is not None
        run._rollback = None
        run._interrupt = None
        run._replay = []  # nudges of the old branch still waiting to be replayed stay there
        pending, record = rollback.command, rollback.checkpoint
        command = cmd.validate(pending["kind"], pending["args"])
        before = rollback.hparams_at_cut
        old_branch, old_step = rollback.branch_at_cut, rollback.step_at_cut
        try:
            run._resume.load_state(rollback.state, record)
        except Exception as error:
            # Checked to fit when applied; if loading still fails the model may be half-loaded:
            # end this process (a restart resumes from the latest checkpoint) but never leave the
            # command pending, or every restart would fail on it again.
            run.store.finish_command(pending["id"], cmd.REJECTED, branch=old_branch, step=old_step,
                                     reason=f"checkpoint #{record['id']} could not be loaded: {error}")
            raise
        if command.args["hparams"] == cmd.HPARAMS_CURRENT:
            self.restore_hparams(before)
        self.restore_hparams({k: command.args[k] for k in ("lr", "momentum") if k in command.args})
        after = run.hparams
        run.status = RUNNING
        run.message = f"rolled back to checkpoint #{record['id']} (epoch {record['epoch']}, step {record['step']})"
        run._guard.reset()
        with run.store.transaction():  # one commit: the branch, its status, the event, the acknowledgement
            run.branch = run.store.new_branch(
                parent=record["branch"], from_checkpoint=record["id"], start_step=run.step,
                start_epoch=run.epoch, hparams=after,
            )
            run.store.write_status(**run._status_fields(), heartbeat=time.time())
            run.store.add_event("rollback", run.message + f" as branch {run.branch}", branch=run.branch,
                                step=run.step, epoch=run.epoch,
                                data={"from_branch": old_branch, "from_step": old_step, "checkpoint": record["id"],
                                       "before": before, "after": after, "hparams": command.args["hparams"]})
            run.store.finish_command(pending["id"], cmd.APPLIED, branch=old_branch, step=old_step, result={
                "branch": run.branch, "epoch": run.epoch, "step": run.step, "checkpoint": record["id"],
                "lr": after["lr"], "momentum": after["momentum"], "before": before,
            })
        run._hparams.record(force=True)

    def finish_stop(self) -> None:
        run = self.run
        if run._excursion is not None:
            run._excursion.go_back_for_stop()
        job = run._stop_job or run.snapshots.take(REASON_STOP, reuse_same_step=True)
        run._final_hparams = job.meta["hparams"]
        run.snapshots.wait()
        pending = run._stop_command
        if pending is not None:
            result: dict[str, Any] = {"checkpoint": job.meta.get("id")}
            if job.error is not None:
                result = {"checkpoint": None, "warning": str(job.error)}
            run.store.finish_command(pending["id"], cmd.APPLIED, branch=run.branch, step=run.step, result=result)
        why = f" ({run._stop_reason})" if run._stop_reason and run._stop_reason != "stop command" else ""
        run._finish(STOPPED, f"stopped at step {run.step}{why} with a final checkpoint")

    def expire_stale(self) -> None:
        run = self.run
        if run.store.get_meta("config") is None:
            run.store.set_meta("config", run.config)
        for pending in run.store.pending_commands():
            self._expired(pending)

    def _expired(self, pending: dict[str, Any]) -> bool:
        """Expire a command that waited too long (its trainer died or froze); True if it did."""
        run = self.run
        if time.time() - pending["created"] <= PENDING_COMMAND_TTL_S:
            return False
        run.store.finish_command(
            pending["id"], cmd.EXPIRED, branch=run.branch, step=run.step,
            reason=f"no trainer applied it within {PENDING_COMMAND_TTL_S:.0f} s; send it again",
        )
        return True


def replay_at(entry: dict[str, Any]) -> str:
    """Where a nudge waiting to be replayed lands: a journal's setting says it; an applied command
    row recorded its ``step_in_epoch`` (rows from before that: the boundary after its step)."""
    if "at" in entry:
        return entry["at"]
    result = entry.get("result")
    return journal.at_of(result.get("step_in_epoch") if isinstance(result, dict) else None)
