"""A run's checkpoint policy: when a snapshot is taken, what it holds, how it is listed, what is kept.

The training thread takes a snapshot (an in-memory copy of model, optimizer, scheduler, the loop's
``run.state``, the resume position and the RNGs); :class:`babysit.checkpoint.AsyncCheckpointer`
writes it; only once it is on disk is it listed in the store, with the commands it answers marked
applied in the same commit. Work is bounded whatever arrives: every "checkpoint now" pending at one
step is answered by one snapshot, and while one such snapshot is being written, later requests wait
for it (they stay pending, never carried out twice). File names never collide, so a listed file is
never overwritten.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from . import commands as cmd
from . import user_state
from .checkpoint import (
    FORMAT, KEY_BRANCH, KEY_CONFIG, KEY_FORMAT, KEY_HPARAMS, KEY_LAST_COMMAND, KEY_METRICS, KEY_MODEL, KEY_OPTIMIZER,
    KEY_SCHEDULER, KEY_USER_STATE, REASON_COMMAND, REASON_EPOCH, AsyncCheckpointer, CheckpointError, PendingCheckpoint, checkpoint_filename,
    clone_tree, disk_full_error, rng_state,
)

from .ranks import KEY_RANKS
from .rundir import unlink_in

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger(__name__)



class Snapshots:
    """Takes, lists and prunes the checkpoints of one :class:`~babysit.run.Run`."""

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.writer = AsyncCheckpointer(self._written, self._failed)
        self._lock = threading.Lock()
        self._names_in_flight: set[str] = set()
        self._command_job: PendingCheckpoint | None = None   # the "checkpoint now" being written
        self._last_job: PendingCheckpoint | None = None
        self._refused_keys: set[str] = set()
        self._for_epoch_end: list[int] = []               # "checkpoint now" at the epoch's last boundary

    # -- taking ------------------------------------------------------------------------------
    def take(self, reason: str, *, reuse_same_step: bool = False, commands: list[int] | None = None) -> PendingCheckpoint:
        """Snapshot now and hand it to the writer; ``reuse_same_step``: if the last snapshot was
        taken at this very step of this branch (nothing trained since), answer with that one.
        ``commands``: the "checkpoint now" requests it answers (set before the writer sees it)."""
        run = self.run
        last = self._last_job
        if (reuse_same_step and last is not None and last.meta["branch"] == run.branch
                and last.meta["step"] == run.step and last.error is None):
            return last
        hparams = run.hparams
        rng_now = rng_state()
        state = {
            KEY_FORMAT: FORMAT,
            KEY_MODEL: clone_tree(run.model.state_dict()),
            KEY_OPTIMIZER: clone_tree(run.optimizer.state_dict()),
            KEY_SCHEDULER: clone_tree(run.scheduler.state_dict()) if run.scheduler is not None else None,
            KEY_USER_STATE: user_state.capture(run.state, on_refused=self._state_refused),
            **run.position.to_checkpoint(rng_now),
            KEY_BRANCH: run.branch, KEY_HPARAMS: hparams, KEY_CONFIG: run.config,
            KEY_METRICS: dict(run._epoch_metrics), KEY_LAST_COMMAND: run._last_command_id,
        }
        if run._ranks is not None:  # what differs per rank, handed in by every other rank now
            state[KEY_RANKS] = run._ranks.gather_for_snapshot(run)
        meta = {"branch": run.branch, "epoch": run.epoch, "step": run.step, "step_in_epoch": run.step_in_epoch,
                "hparams": hparams, "metrics": dict(run._epoch_metrics), "reason": reason,
                "commands": list(commands or []), "rng": rng_now}
        job = PendingCheckpoint(path=self._unique_path(run.branch, run.epoch, run.step), state=state, meta=meta)
        self._last_job = job
        if commands:
            with self._lock:
                self._command_job = job
        return self.writer.submit(job)

    def _state_refused(self, key: str, message: str) -> None:
        """A run.state value no checkpoint can hold: left out, said once (the run goes on)."""
        if key in self._refused_keys:
            return
        self._refused_keys.add(key)
        run = self.run
        log.warning("babysit: %s; it is left out of the checkpoints", message)
        run.store.add_event("state_not_saved", f"{message}; it is left out of the checkpoints until it changes",
                            branch=run.branch, step=run.step, epoch=run.epoch, data={"key": key})

    def end_epoch(self) -> None:
        waiting, self._for_epoch_end = self._for_epoch_end, []
        job = self.take(REASON_EPOCH, commands=waiting)  # the epoch's end is recorded by the writer thread too
        self.run.position.end_epoch(job.meta["rng"])

    def take_for_command(self, command_id: int) -> None:
        """Answer a "checkpoint now": with the snapshot being written if it is of this very step,
        else with a new one once no other is being written (until then the command waits)."""
        run = self.run
        with self._lock:
            job = self._command_job
            if job is not None and not job.done.is_set():
                if job.meta["branch"] == run.branch and job.meta["step"] == run.step:
                    job.meta["commands"].append(command_id)
                return
        self.take(REASON_COMMAND, commands=[command_id])

    def answer_waiting(self) -> None:
        """As the run ends: answer the "checkpoint now" requests still waiting for a write with the
        last checkpoint, which is of this very step (the final epoch's, or the stop's)."""
        self.wait()
        last, run = self._last_job, self.run
        if last is None or last.error is not None or "id" not in last.meta or last.meta["step"] != run.step:
            return
        for pending in run.store.pending_commands():
            if pending["kind"] == cmd.CHECKPOINT:
                run.store.finish_command(pending["id"], cmd.APPLIED, branch=run.branch, step=run.step,
                                         result={"checkpoint": last.meta["id"]})

    def answer_at_epoch_end(self, command_id: int) -> None:
        if command_id not in self._for_epoch_end:
            self._for_epoch_end.append(command_id)

    def is_carrying_out(self, command_id: int) -> bool:
        """True for a "checkpoint now" whose snapshot is being written, or that the epoch's own
        checkpoint will answer (it must not be carried out again)."""
        if command_id in self._for_epoch_end:
            return True
        with self._lock:
            job = self._command_job
            return job is not None and not job.done.is_set() and command_id in job.meta["commands"]

    def _unique_path(self, branch: int, epoch: int, step: int) -> Any:
        name = checkpoint_filename(branch, epoch, step)
        stem, suffix = os.path.splitext(name)
        serial = 1
        with self._lock:
            while name in self._names_in_flight or os.path.lexists(self.run.run_dir / name):
                serial += 1
                name = f"{stem}-{serial}{suffix}"
            self._names_in_flight.add(name)
        return self.run.run_dir / name

    def wait(self) -> None:
        self.writer.wait()

    def close(self) -> None:
        self.writer.close()

    # -- the writer thread's callbacks -------------------------------------------------------
    def _written(self, job: PendingCheckpoint) -> None:
        run, meta, result = self.run, job.meta, job.result or {}
        # Everything logged up to the checkpoint's step must be stored before it is listed: a
        # trainer killed right after would resume from it, and never log those steps again.
        run.writer.flush()
        with run.store.transaction():
            self._record_epoch_end(meta)
            checkpoint_id = run.store.add_checkpoint(
                branch=meta["branch"], epoch=meta["epoch"], step=meta["step"], step_in_epoch=meta["step_in_epoch"],
                file=job.path.name, sha256=result["sha256"], size=result["size"], hparams=meta["hparams"],
                metrics=meta["metrics"], reason=meta["reason"],
            )
            meta["id"] = checkpoint_id
            with self._lock:
                answered = list(meta["commands"])
                self._names_in_flight.discard(job.path.name)
            for command_id in answered:
                run.store.finish_command(command_id, cmd.APPLIED, branch=meta["branch"], step=meta["step"],
                                         result={"checkpoint": checkpoint_id})
        run._wake = True  # requests that waited for this snapshot are answered at the next boundary
        self._apply_retention()

    def _record_epoch_end(self, meta: dict[str, Any]) -> None:
        if meta["reason"] == REASON_EPOCH:
            self.run.store.add_epoch(meta["branch"], meta["epoch"], meta["step"])

    def _failed(self, job: PendingCheckpoint) -> None:
        run, error, meta = self.run, job.error, job.meta
        with self._lock:
            answered = list(meta["commands"])
            self._names_in_flight.discard(job.path.name)
        self._record_epoch_end(meta)
        full = disk_full_error(error)
        non_finite = isinstance(error, CheckpointError) and "NaN or infinity" in str(error)
        if full is not None:
            message = (f"checkpoint at step {meta['step']} not written: the disk holding {run.run_dir} is full "
                       f"({os.strerror(full.errno)}); earlier checkpoints are intact; the run is paused: free some "
                       "space, then resume")
            reason = "the disk is full, no checkpoint could be written"
        else:
            message = f"checkpoint at step {meta['step']} not written: {error}"
            reason = "a checkpoint could not be written"
        run.store.add_event("checkpoint_failed", message, branch=meta["branch"], step=meta["step"],
                            epoch=meta["epoch"])
        for command_id in answered:
            run.store.finish_command(command_id, cmd.REJECTED, branch=meta["branch"], step=meta["step"],
                                     reason=message)
        run._wake = True
        if run._closed:
            return
        if non_finite:
            # The weights themselves diverged: the guard's remedy, whether or not the loss has
            # been seen to be NaN yet (the writer reads it a few times a second).
            run.remedy.apply(f"the weights hold NaN or infinity at step {meta['step']}", meta["branch"], meta["step"])
        else:
            run.store.enqueue_command(cmd.PAUSE, {"reason": reason}, source="guard", require_live=False)

    # -- what is kept, and where to go back to ------------------------------------------------
    def _apply_retention(self) -> None:
        run = self.run
        if run.keep_last is None:
            return
        for old in run.store.checkpoints_to_retire(run.keep_last):
            unlink_in(run.run_dir, old["file"])
            run.store.mark_checkpoint_deleted(old["id"])

    def lineage_before(self, branch_id: int, before_step: int) -> list[dict[str, Any]]:
        """Checkpoints on ``branch_id``'s line of descent taken before ``before_step`` (on each
        ancestor, before the point the line left it), newest first, files present."""
        run = self.run
        branches = {b["id"]: b for b in run.store.branches()}
        lineage: dict[int, int] = {}
        limit = before_step
        while branch_id in branches:
            lineage[branch_id] = limit
            branch = branches[branch_id]
            if branch["parent"] is None:
                break
            origin = run.store.checkpoint(branch["from_checkpoint"]) if branch["from_checkpoint"] else None
            limit = origin["step"] + 1 if origin else branch["start_step"]
            branch_id = branch["parent"]
        candidates = [c for c in run.store.checkpoints()
                      if c["branch"] in lineage and c["step"] < lineage[c["branch"]]
                      and (run.run_dir / c["file"]).is_file()]
        return sorted(candidates, key=lambda c: (c["step"], c["id"]), reverse=True)

    def last_healthy(self, before_step: int) -> dict[str, Any] | None:
        """The newest checkpoint on this branch's line of descent taken before ``before_step``."""
        found = self.lineage_before(self.run.branch, before_step)
        return found[0] if found else None
