"""A run's checkpoint policy: when a snapshot is taken, what it holds, how it is listed, what is kept.

The training thread takes a snapshot (an in-memory copy of model, optimizer, scheduler, the loop's
``run.state``, the resume position and the RNGs); :class:`babysit.checkpoint.AsyncCheckpointer`
writes it (a sharded model's, every rank its shard with the others: see babysit.sharded_writer);
only once it is on disk is it listed in the store, with the commands it answers marked
applied in the same commit. Work is bounded whatever arrives: every "checkpoint now" pending at one
step is answered by one snapshot, and while one such snapshot is being written, later requests wait
for it (they stay pending, never carried out twice). File names never collide, so a listed file is
never overwritten.

Periodic checkpoints (``Run(checkpoint_every_steps=, checkpoint_every_minutes=)``, see
:mod:`babysit.cadence`) are taken at the step boundary they fall due at, never inside an excursion
and never at an epoch's last boundary (the epoch's own checkpoint is that one); each is an exact
resume point inside its epoch. After every checkpoint written, :mod:`babysit.retention` decides
what is kept; a periodic checkpoint the disk budget or the free space cannot take is not written,
with an event.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from . import commands as cmd
from . import retention
from .cadence import Cadence
from .checkpoint import (
    FORMAT, KEY_BRANCH, KEY_CONFIG, KEY_FORMAT, KEY_HPARAMS, KEY_LAST_COMMAND, KEY_METRICS, REASON_COMMAND,
    REASON_EPOCH, AsyncCheckpointer, CheckpointError, PendingCheckpoint, checkpoint_filename, disk_full_error,
    rng_state, sharded_checkpoint_name,
)
from .control import RunControl
from .position import ResumePosition
from .ranks import KEY_RANKS, Ranks
from .retention import REASON_PERIODIC, RetentionPolicy
from .rundir import checkpoint_present
from .sharded import KEY_SHARDED
from .sharded_writer import ShardedCheckpointer
from .store import RunStore
from .store.lineage import line_of
from .trainables import Trainables

log = logging.getLogger(__name__)

_NEVER = 2**62  # a step no run reaches: no periodic checkpoint by steps


class Snapshots:
    """Takes, lists and prunes the checkpoints of one run.

    ``flush_logged`` stores every value logged so far (a checkpoint is listed only after the values
    up to its step); ``on_weights_diverged(what, branch, step)`` is the divergence remedy, called
    when a snapshot holds NaN or infinite weights."""

    def __init__(self, run_dir: Path, store: RunStore, trainables: Trainables, position: ResumePosition,
                 control: RunControl, ranks: Ranks | None, *, config: dict[str, Any], policy: RetentionPolicy,
                 cadence: Cadence, flush_logged: Callable[[], None],
                 on_weights_diverged: Callable[[str, int, int], None]) -> None:
        self.run_dir = run_dir
        self.store = store
        self.trainables = trainables
        self.position = position
        self.control = control
        self.ranks = ranks
        self.config = config
        self.policy = policy
        self.cadence = cadence
        # The next periodic checkpoint: at this step (a multiple of every_steps), or at this
        # time.monotonic() (every_minutes after the last checkpoint written, or the start).
        self.periodic_step = cadence.next_step(position.step) or _NEVER
        self.periodic_time = cadence.next_time(time.monotonic()) or float("inf")
        self._periodic_refused: str | None = None          # why the last periodic one was not written
        self.pins: dict[int, str] = {}                     # checkpoints about to be relied on (see pin())
        self._flush_logged = flush_logged
        self._on_weights_diverged = on_weights_diverged
        self.epoch_metrics: dict[str, float] = {}          # the epoch's log_epoch values so far
        # A sharded model's writer meets every other rank's (building it is a collective: every
        # rank builds one at this point, see babysit.run).
        self.writer = (ShardedCheckpointer(self._written, self._failed) if trainables.sharded
                       else AsyncCheckpointer(self._written, self._failed))
        self._lock = threading.Lock()
        self._names_in_flight: set[str] = set()
        self._command_job: PendingCheckpoint | None = None   # the "checkpoint now" being written
        self._last_job: PendingCheckpoint | None = None
        self._refused_keys: set[str] = set()
        self._damage_said: set[str] = set()               # a damaged line of descent, said once
        self._for_epoch_end: list[int] = []               # "checkpoint now" at the epoch's last boundary

    # -- taking ------------------------------------------------------------------------------
    def take(self, reason: str, *, reuse_same_step: bool = False, commands: list[int] | None = None) -> PendingCheckpoint:
        """Snapshot now and hand it to the writer; ``reuse_same_step``: if the last snapshot was
        taken at this very step of this branch (nothing trained since), answer with that one.
        ``commands``: the "checkpoint now" requests it answers (set before the writer sees it)."""
        position = self.position
        last = self._last_job
        if (reuse_same_step and last is not None and last.meta["branch"] == position.branch
                and last.meta["step"] == position.step and last.error is None):
            return last
        hparams = self.trainables.hparams()
        rng_now = rng_state()
        path = self._unique_path(position.branch, position.epoch, position.step)
        sharded = self.trainables.sharded
        state = {
            KEY_FORMAT: FORMAT,
            **self.trainables.snapshot(on_refused=self._state_refused),
            **position.to_checkpoint(rng_now),
            KEY_BRANCH: position.branch, KEY_HPARAMS: hparams, KEY_CONFIG: self.config,
            KEY_METRICS: dict(self.epoch_metrics), KEY_LAST_COMMAND: self.control.last_command,
        }
        if self.ranks is not None:  # what differs per rank: every other rank hands it in (and writes its shard)
            self.ranks.ask_for_shares(path.name if sharded else None)
        if sharded:  # (copied while the other ranks copy theirs)
            shards = self.trainables.shards()
            state[KEY_SHARDED] = {"world_size": self.ranks.world_size if self.ranks is not None else 1}
        if self.ranks is not None:
            state[KEY_RANKS] = self.ranks.gather_shares()
        meta = {"branch": position.branch, "epoch": position.epoch, "step": position.step,
                "step_in_epoch": position.step_in_epoch, "hparams": hparams, "metrics": dict(self.epoch_metrics),
                "reason": reason, "commands": list(commands or []), "rng": rng_now, "taken": time.monotonic()}
        if self.cadence.every_steps is not None:  # any checkpoint counts; the next periodic one is at the next multiple
            self.periodic_step = self.cadence.next_step(position.step) or _NEVER
        job = PendingCheckpoint(path=path, state={"shards": shards, "rest": state} if sharded else state, meta=meta)
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
        position = self.position
        log.warning("babysit: %s; it is left out of the checkpoints", message)
        self.store.add_event("state_not_saved", f"{message}; it is left out of the checkpoints until it changes",
                             branch=position.branch, step=position.step, epoch=position.epoch, data={"key": key})

    def begin_epoch(self) -> None:
        self.epoch_metrics = {}
        if self.cadence.every_steps is not None:  # after a resume or a rollback the step may have gone back
            self.periodic_step = self.cadence.next_step(self.position.step) or _NEVER
            self._record_cadence()

    # -- periodic checkpoints ------------------------------------------------------------------
    def periodic_due(self) -> bool:
        """A periodic checkpoint falls due at this boundary (by steps or by time)."""
        return self.position.step >= self.periodic_step or time.monotonic() >= self.periodic_time

    def take_periodic(self) -> PendingCheckpoint | None:
        """The periodic checkpoint due now, unless this boundary is no place for one (an excursion
        runs, a cut is in progress, the epoch's own checkpoint comes next) or the disk cannot take
        it (an event says why, once until that changes). None when none is written."""
        position, control = self.position, self.control
        if control.excursion is not None or control.interrupt is not None or position.at_last_boundary():
            self.periodic_step = self.cadence.next_step(position.step) or _NEVER
            return None
        refused = self._why_not_periodic()
        if refused is not None:
            self.periodic_step = self.cadence.next_step(position.step) or _NEVER
            self.periodic_time = self.cadence.next_time(time.monotonic()) or float("inf")
            if refused != self._periodic_refused:
                self.store.add_event("checkpoint_skipped", f"periodic checkpoint at step {position.step} not written: "
                                     f"{refused}", branch=position.branch, step=position.step, epoch=position.epoch)
            self._periodic_refused = refused
            return None
        self._periodic_refused = None
        job = self.take(REASON_PERIODIC, reuse_same_step=True)
        # Not due again while this one is being written (its write restarts the clock once more).
        self.periodic_time = self.cadence.next_time(time.monotonic()) or float("inf")
        return job

    def _why_not_periodic(self) -> str | None:
        legs = self.store.excursion_branch_ids()
        rows = [c for c in self.store.checkpoints() if c["branch"] not in legs]
        # The next one is about as large as the last ones written (the snapshots still being
        # written are not sized yet).
        size = max((int(c["size"] or 0) for c in rows[-3:]), default=0)
        if size == 0:
            return None  # nothing written yet to size the next one by
        try:
            free: int | None = shutil.disk_usage(self.run_dir).free
        except OSError:
            free = None
        pinned = {**retention.pins(self.store.branches(), legs, self.store.running_excursion()), **self.pins}
        return retention.refuse_periodic(rows, self.policy, now=time.time(), pinned=pinned, next_bytes=size,
                                         free_bytes=free)

    def _record_cadence(self) -> None:
        """What `status` and the page say of the cadence: it, and when the next one is due."""
        if not self.cadence.active:
            return
        left = self.periodic_time - time.monotonic()
        self.store.set_meta("cadence", self.cadence.to_json(
            next_step=self.periodic_step if self.periodic_step != _NEVER else None,
            next_wall=time.time() + left if left != float("inf") else None))

    def pin(self, checkpoint_id: int, why: str) -> None:
        """Keep ``checkpoint_id`` whatever the retention policy, until :meth:`unpin` (an excursion's
        fork while its return point is written, before the excursion's own row pins it)."""
        self.pins[checkpoint_id] = why

    def unpin(self, checkpoint_id: int) -> None:
        self.pins.pop(checkpoint_id, None)

    def end_epoch(self) -> None:
        waiting, self._for_epoch_end = self._for_epoch_end, []
        job = self.take(REASON_EPOCH, commands=waiting)  # the epoch's end is recorded by the writer thread too
        self.position.end_epoch(job.meta["rng"])

    def take_for_command(self, command_id: int) -> None:
        """Answer a "checkpoint now": with the snapshot being written if it is of this very step,
        else with a new one once no other is being written (until then the command waits)."""
        position = self.position
        with self._lock:
            job = self._command_job
            if job is not None and not job.done.is_set():
                if job.meta["branch"] == position.branch and job.meta["step"] == position.step:
                    job.meta["commands"].append(command_id)
                return
        self.take(REASON_COMMAND, commands=[command_id])

    def answer_waiting(self) -> None:
        """As the run ends: answer the "checkpoint now" requests still waiting for a write with the
        last checkpoint, which is of this very step (the final epoch's, or the stop's)."""
        self.wait()
        last, position = self._last_job, self.position
        if last is None or last.error is not None or "id" not in last.meta or last.meta["step"] != position.step:
            return
        for pending in self.store.pending_commands():
            if pending["kind"] == cmd.CHECKPOINT:
                self.store.finish_command(pending["id"], cmd.APPLIED, branch=position.branch, step=position.step,
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
        name = (sharded_checkpoint_name if self.trainables.sharded else checkpoint_filename)(branch, epoch, step)
        stem, suffix = os.path.splitext(name)
        serial = 1
        with self._lock:
            while name in self._names_in_flight or os.path.lexists(self.run_dir / name):
                serial += 1
                name = f"{stem}-{serial}{suffix}"
            self._names_in_flight.add(name)
        return self.run_dir / name

    def wait(self) -> None:
        self.writer.wait()

    def close(self) -> None:
        self.writer.close()

    # -- the writer thread's callbacks -------------------------------------------------------
    def _written(self, job: PendingCheckpoint) -> None:
        store, meta, result = self.store, job.meta, job.result or {}
        # Everything logged up to the checkpoint's step must be stored before it is listed: a
        # trainer killed right after would resume from it, and never log those steps again.
        self._flush_logged()
        with store.transaction():
            self._record_epoch_end(meta)
            checkpoint_id = store.add_checkpoint(
                branch=meta["branch"], epoch=meta["epoch"], step=meta["step"], step_in_epoch=meta["step_in_epoch"],
                file=job.path.name, sha256=result["sha256"], size=result["size"], hparams=meta["hparams"],
                metrics=meta["metrics"], reason=meta["reason"],
            )
            meta["id"] = checkpoint_id
            with self._lock:
                answered = list(meta["commands"])
                self._names_in_flight.discard(job.path.name)
            for command_id in answered:
                store.finish_command(command_id, cmd.APPLIED, branch=meta["branch"], step=meta["step"],
                                     result={"checkpoint": checkpoint_id})
        job.listed = True  # committed: the file is the store's now (retention may still remove it)
        self.control.wake_up()  # requests that waited for this snapshot are answered at the next boundary
        if self.cadence.every_minutes is not None:  # the time cadence counts from the last checkpoint written
            self.periodic_time = self.cadence.next_time(time.monotonic()) or float("inf")
        self._record_cadence()
        self._apply_retention()

    def _record_epoch_end(self, meta: dict[str, Any]) -> None:
        if meta["reason"] == REASON_EPOCH:
            self.store.add_epoch(meta["branch"], meta["epoch"], meta["step"])

    def _failed(self, job: PendingCheckpoint) -> None:
        store, error, meta = self.store, job.error, job.meta
        if job.listed:  # listed and its commands answered: only what came after (retention) failed
            store.add_event("checkpoint_failed", f"checkpoint #{meta['id']} at step {meta['step']} is kept, but "
                            f"removing older checkpoints (keep_last) failed: {type(error).__name__}: {error}",
                            branch=meta["branch"], step=meta["step"], epoch=meta["epoch"])
            return
        with self._lock:
            answered = list(meta["commands"])
            self._names_in_flight.discard(job.path.name)
        self._record_epoch_end(meta)
        full = disk_full_error(error)
        non_finite = isinstance(error, CheckpointError) and "NaN or infinity" in str(error)
        if full is not None:
            message = (f"checkpoint at step {meta['step']} not written: the disk holding {self.run_dir} is full "
                       f"({os.strerror(full.errno)}); earlier checkpoints are intact; the run is paused: free some "
                       "space, then resume")
            reason = "the disk is full, no checkpoint could be written"
        elif job.result is not None:  # written, but the store did not list it: its file was removed
            message = (f"checkpoint at step {meta['step']} not kept: it was written but could not be listed "
                       f"({type(error).__name__}: {error}), so its file was removed")
            reason = "a checkpoint could not be listed"
        else:
            message = f"checkpoint at step {meta['step']} not written: {error}"
            reason = "a checkpoint could not be written"
        store.add_event("checkpoint_failed", message, branch=meta["branch"], step=meta["step"], epoch=meta["epoch"])
        for command_id in answered:
            store.finish_command(command_id, cmd.REJECTED, branch=meta["branch"], step=meta["step"], reason=message)
        self.control.wake_up()
        if self.control.closed:
            return
        if non_finite:
            # The weights themselves diverged: the guard's remedy, whether or not the loss has
            # been seen to be NaN yet (the writer reads it a few times a second).
            self._on_weights_diverged(f"the weights hold NaN or infinity at step {meta['step']}", meta["branch"],
                                      meta["step"])
        else:
            store.enqueue_command(cmd.PAUSE, {"reason": reason}, source="guard", require_live=False)

    # -- what is kept, and where to go back to ------------------------------------------------
    def _apply_retention(self) -> None:
        retention.apply(self.store, self.policy, now=time.time(), extra_pins=self.pins)

    def lineage_before(self, branch_id: int, before_step: int) -> list[dict[str, Any]]:
        """Checkpoints on ``branch_id``'s line of descent taken before ``before_step`` (on each
        ancestor, before the point the line left it), newest first, files present. A damaged line
        (branches naming each other as parents, a missing parent) ends where it breaks, said once."""
        store = self.store

        def fork(child: Mapping[str, Any]) -> int:  # the step of the checkpoint the child forked from
            origin = store.checkpoint(child["from_checkpoint"]) if child.get("from_checkpoint") else None
            return origin["step"] if origin else int(child["start_step"]) - 1

        line = line_of(store.branches(), branch_id, fork_step=fork)
        if line.damage and line.damage not in self._damage_said:
            self._damage_said.add(line.damage)
            store.add_event("damaged_run", f"{line.damage}; the line of descent ends there", branch=branch_id)
        limits = {s.branch: before_step if s.until is None else s.until + 1 for s in line.stretches}
        candidates = [c for c in store.checkpoints()
                      if c["branch"] in limits and c["step"] < limits[c["branch"]]
                      and checkpoint_present(self.run_dir, c["file"])]
        return sorted(candidates, key=lambda c: (c["step"], c["id"]), reverse=True)

    def last_healthy(self, before_step: int) -> dict[str, Any] | None:
        """The newest checkpoint on this branch's line of descent taken before ``before_step``."""
        found = self.lineage_before(self.position.branch, before_step)
        return found[0] if found else None
