"""What happens as the loop leaves an epoch: the cut it was cut short for, carried out — a rollback
(its checkpoint loaded, a new branch started from it), a stop (the final checkpoint written, the
run ended), a replayed data skip, an excursion's next leg — or else the epoch's checkpoint; and the
end of a run, stopped or finished, down to its last status row. The cuts themselves are set at a
step boundary by :mod:`babysit.command_runner` (see :mod:`babysit.control` for the transitions).
"""

from __future__ import annotations

import sqlite3
import sys
import time
from typing import Any, Callable

from . import commands as cmd
from .checkpoint import REASON_STOP
from .control import Interrupt, RunControl
from .guard_watch import WatchedGuards
from .hparam_watch import HparamWatch
from .journal_replay import DATA_SKIP_KIND, ReplayQueue
from .narrator import Narrator
from .position import ResumePosition
from .resume import Loader
from .snapshots import Snapshots
from .store import FINISHED, STOPPED, RunStore, disk_full
from .trainables import Trainables


class Cuts:
    """Carries out the rollback or the stop that cut one run's epoch (on the leader rank)."""

    def __init__(self, store: RunStore, control: RunControl, position: ResumePosition, trainables: Trainables,
                 snapshots: Snapshots, loader: Loader, hparams: HparamWatch, guard: WatchedGuards,
                 replay: ReplayQueue, narrator: Narrator, *, status_fields: Callable[[], dict[str, Any]],
                 tell: Callable[[str], None]) -> None:
        self.store = store
        self.control = control
        self.position = position
        self.trainables = trainables
        self.snapshots = snapshots
        self.loader = loader
        self.hparams = hparams
        self.guard = guard
        self.replay = replay
        self.narrator = narrator
        self.status_fields = status_fields
        self.tell = tell  # the other ranks, under torch.distributed (babysit.ranks)

    def leave_epoch(self, max_epochs: int | None) -> bool:
        """The loop left the epoch: carry out the cut it was cut short for, or checkpoint the epoch.
        False when the run has ended (a stop)."""
        control, position = self.control, self.position
        if control.interrupt is Interrupt.ROLLBACK:
            self.finish_rollback()
            return True
        if control.interrupt is Interrupt.STOP:
            self.finish_stop()
            return False
        if control.interrupt is Interrupt.EXCURSION:
            control.excursion.transition()
            return True
        if control.interrupt is Interrupt.DATA_SKIP:
            self.finish_data_skip()
            return True
        if control.excursion is not None:  # an epoch's end inside a probe: no checkpoint on its branch
            control.excursion.epoch_end(last_epoch=max_epochs is not None and position.epoch >= max_epochs)
            return True
        self.snapshots.end_epoch()
        self.narrator.epoch_ended(branch=position.branch, epoch=position.epoch, max_epochs=max_epochs,
                                  step=position.step, wall=time.time(), metrics=dict(self.snapshots.epoch_metrics),
                                  hparams=self.trainables.hparams())
        control.take_checkpoint_asked()  # a run.checkpoint_now() still waiting: the epoch's checkpoint answers it
        self.tell("epoch_end")
        return True

    def stop_between_epochs(self) -> bool:
        """A stop that waited for the last epoch's end: carried out now. True if there was one."""
        if not self.control.stop_between_epochs():
            return False
        self.finish_stop()
        return True

    def finish_rollback(self) -> None:
        """Load the rollback's checkpoint and go on from it on a new branch, with the hyperparameters
        the command asked for; one commit records the branch, the status, the event and the answer."""
        store, position, control = self.store, self.position, self.control
        rollback = control.take_rollback()
        self.replay.clear()  # nudges of the old branch still waiting to be replayed stay there
        pending, record = rollback.command, rollback.checkpoint
        command = cmd.validate(pending["kind"], pending["args"])
        before = rollback.hparams_at_cut
        old_branch, old_step = rollback.branch_at_cut, rollback.step_at_cut
        try:
            self.loader.load_state(rollback.state, record)
        except Exception as error:
            # Checked to fit when applied; if loading still fails the model may be half-loaded:
            # end this process (a restart resumes from the latest checkpoint) but never leave the
            # command pending, or every restart would fail on it again.
            store.finish_command(pending["id"], cmd.REJECTED, branch=old_branch, step=old_step,
                                 reason=f"checkpoint #{record['id']} could not be loaded: {error}")
            raise
        skip = command.args.get("skip_batches", 0)
        position.skip_ahead(skip)  # a data skip: the next `skip` batches of the data order are left out
        if command.args["hparams"] == cmd.HPARAMS_CURRENT:
            self.trainables.restore_hparams(before)
        self.trainables.restore_hparams({k: command.args[k] for k in ("lr", "momentum") if k in command.args})
        after = self.trainables.hparams()
        control.run_again(f"rolled back to checkpoint #{record['id']} (epoch {record['epoch']}, step {record['step']})"
                          + (f", skipping the next {skip} batches" if skip else ""))
        self.guard.reset()
        with store.transaction():  # one commit: the branch, its status, the event, the acknowledgement
            position.branch = store.new_branch(
                parent=record["branch"], from_checkpoint=record["id"], start_step=position.step,
                start_epoch=position.epoch, hparams=after,
            )
            store.write_status(**self.status_fields(), heartbeat=time.time())
            store.add_event("rollback", control.message + f" as branch {position.branch}", branch=position.branch,
                            step=position.step, epoch=position.epoch,
                            data={"from_branch": old_branch, "from_step": old_step, "checkpoint": record["id"],
                                  "before": before, "after": after, "hparams": command.args["hparams"],
                                  **({"skip_batches": skip} if skip else {})})
            store.finish_command(pending["id"], cmd.APPLIED, branch=old_branch, step=old_step, result={
                "branch": position.branch, "epoch": position.epoch, "step": position.step,
                "checkpoint": record["id"], "lr": after["lr"], "momentum": after["momentum"],
                **{f"{hparam}/{name}": values[hparam] for name, values in after.get("others", {}).items()
                   for hparam in ("lr", "momentum")},  # several optimizers: each one's, named as on the chart
                "before": before, **({"skip_batches": skip} if skip else {}),
            })
        self.hparams.record(force=True)

    def finish_data_skip(self) -> None:
        """A journal's data skip (a rollback's ``skip_batches`` in the run it was exported from): the
        epoch is entered again at the position of the cut, further along its data order by the
        batches skipped, exactly as that rollback resumed (its checkpoint held this very state)."""
        skip, position = self.control.take_data_skip(), self.position
        position.restore(skip.position, epoch_done=False)
        position.skip_ahead(skip.batches)
        message = f"skipped the next {skip.batches} batches of the data order at step {position.step} (replayed)"
        self.control.say(message)
        entry = skip.entry
        with self.store.transaction():
            entry["id"] = self.store.record_trainer_command(
                DATA_SKIP_KIND, {"skip_batches": skip.batches}, cmd.APPLIED, source=entry["source"],
                branch=position.branch, step=position.step,
                result={"step_in_epoch": position.step_in_epoch, "journal_entry": entry.get("entry")})
            self.store.add_event("data_skip", message, branch=position.branch, step=position.step,
                                 epoch=position.epoch, data={"skip_batches": skip.batches})
        if entry["id"]:
            self.control.saw_command(entry["id"])

    def finish_stop(self) -> None:
        """The final checkpoint (taken at the cut, or now), the stop command answered, the run ended."""
        control, position = self.control, self.position
        if control.excursion is not None:
            control.excursion.go_back_for_stop()
        stop = control.take_stop()
        job = stop.job or self.snapshots.take(REASON_STOP, reuse_same_step=True)
        control.final_hparams = job.meta["hparams"]
        self.snapshots.wait()
        if stop.command is not None:
            result: dict[str, Any] = {"checkpoint": job.meta.get("id")}
            if job.error is not None:
                result = {"checkpoint": None, "warning": str(job.error)}
            self.store.finish_command(stop.command["id"], cmd.APPLIED, branch=position.branch, step=position.step,
                                      result=result)
        reason = control.stop_reason
        why = f" ({reason})" if reason and reason != "stop command" else ""
        # How long the final checkpoint took (copied at the cut, then written): what a scheduler's
        # grace period after SIGTERM must leave room for, with a step (docs/long-runs.md).
        took = time.monotonic() - job.meta.get("taken", time.monotonic())
        written = (f"the final checkpoint took {took:.1f} s" if job.error is None
                   else f"the final checkpoint could not be written ({job.error})")
        print(f"babysit: stopped at step {position.step}{why}; {written}", file=sys.stderr, flush=True)
        # Say what is on disk: a final checkpoint refused (NaN weights) or failed leaves the run's
        # newest checkpoint the one to resume from.
        outcome = "with a final checkpoint" if job.error is None else f"without a final checkpoint ({job.error})"
        self.end_run(STOPPED, f"stopped at step {position.step}{why} {outcome}",
                     data={"final_checkpoint_s": round(took, 3) if job.error is None else None})

    def end_run(self, status: str, message: str, data: dict[str, Any] | None = None) -> None:
        """The run is over (stopped or finished): answer the "checkpoint now" still waiting, say so."""
        self.snapshots.answer_waiting()
        self.control.finish(status, message)
        position = self.position
        self.store.add_event(status, message, branch=position.branch, step=position.step, epoch=position.epoch,
                             data=data)


    def write_final_status(self) -> None:
        """The last status row; a run that stopped or finished also expires the commands still
        pending, in the same commit: a command sent meanwhile is either expired here or refused
        because the run is over (enqueue_command reads the status in its own transaction), never
        carried out unasked by the next start."""
        status, position = self.control.status, self.position
        try:
            with self.store.transaction():
                if status in (STOPPED, FINISHED):
                    self.store.expire_pending(f"the run {status} before it applied this", branch=position.branch,
                                              step=position.step)
                self.store.write_status(**self.status_fields(), heartbeat=time.time())
        except sqlite3.OperationalError as error:
            if not disk_full(error):
                raise
            # A full disk: nothing can be recorded now (the writer has said so); what is pending stays so.
