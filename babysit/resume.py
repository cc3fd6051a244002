"""How a run starts: a new run's first branch, or a resume from the newest verified checkpoint
(falling back along the branch's line of descent when one is damaged); and the loading of a
checkpoint into the model, optimizer, scheduler, ``run.state``, RNGs and counters, on every rank.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import commands as cmd
from . import journal_replay
from .checkpoint import KEY_LAST_COMMAND, REASON_EPOCH
from .control import RunControl
from .errors import CheckpointError
from .guard_watch import WatchedGuards
from .hparam_watch import HparamWatch
from .journal_replay import ReplayQueue
from .position import ResumePosition
from .ranks import KEY_RANKS, Ranks
from .sharded import KEY_SHARDED
from .snapshots import Snapshots
from .store import FINISHED, PAUSED, RUNNING, STOPPED, RunStore
from .store.schema import EXCURSION_ABANDONED
from .trainables import Trainables, optimizer_name

log = logging.getLogger(__name__)


class Loader:
    """Puts a verified checkpoint into one rank's run (``store`` is None on a follower rank)."""

    def __init__(self, store: RunStore | None, trainables: Trainables, position: ResumePosition, control: RunControl,
                 ranks: Ranks | None, hparams: HparamWatch, guard: WatchedGuards) -> None:
        self.store = store
        self.trainables = trainables
        self.position = position
        self.control = control
        self.ranks = ranks
        self.hparams = hparams
        self.guard = guard

    def load_state(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Load a checkpoint on every rank, and pick up command handling where it was (leader)."""
        assert self.store is not None, "the leader loads; followers are told to (Ranks.follow)"
        if self.ranks is not None:
            self.ranks.tell("load", {key: record[key] for key in ("id", "file", "sha256", "reason", "step")})
        self.load_training_state(state, record)
        self._say_if_ranks_changed(state, record)
        recorded = state.get(KEY_LAST_COMMAND)
        # A checkpoint written before checkpoints recorded this: count every command handled so
        # far as seen, so later checkpoints record a true bound (replays still waiting are found
        # by their step, which is past any checkpoint taken before they happen).
        self.control.resumed_at(None if recorded is None else int(recorded),
                                self.store.last_handled_command_id() if recorded is None else 0)

    def load_training_state(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        for note in self.trainables.load(state):
            if self.store is not None:
                self.store.add_event("state_not_restored", note, branch=self.position.branch,
                                     step=int(record["step"]))
        self.position.restore(state, epoch_done=record["reason"] == REASON_EPOCH)
        if self.ranks is not None:
            self.ranks.restart_syncs()
        self.hparams.restored()
        self.guard.reset()

    def _say_if_ranks_changed(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """A checkpoint of a job with another number of ranks loads, but not exactly: say what differs."""
        assert self.store is not None
        saved = len(state.get(KEY_RANKS) or []) or 1
        now = self.ranks.world_size if self.ranks is not None else 1
        if saved == now:
            return
        inexact = ["the data each rank sees (a DistributedSampler shards it by the number of ranks)"]
        if now > saved:
            inexact.append(f"ranks {saved}..{now - 1} start from rank 0's random generators and run.state")
        else:
            inexact.append(f"the random generators and run.state of ranks {now}..{saved - 1} are dropped")
        if record["reason"] != REASON_EPOCH:
            inexact.append("inside its epoch, the batches skipped are counted in the old job's shards")
        # A sharded checkpoint's tensors are reassembled from the shards that hold their slices.
        exact = "; its model and optimizer are resharded exactly" if KEY_SHARDED in state else ""
        self.store.add_event(
            "ranks_changed", f"checkpoint #{record['id']} was written by a job of {saved} rank(s), this one has {now}: "
            f"it resumes, but not exactly ({'; '.join(inexact)}){exact}",
            branch=self.position.branch, step=int(record["step"]), data={"saved": saved, "now": now})


class Resume:
    """Starts or resumes one run (the leader's share: followers are told what to load)."""

    def __init__(self, run_dir: Path, store: RunStore, loader: Loader, snapshots: Snapshots, control: RunControl,
                 position: ResumePosition, trainables: Trainables, hparams: HparamWatch, guard: WatchedGuards,
                 replay: ReplayQueue, *, config: dict[str, Any],
                 status_fields: Callable[[], dict[str, Any]], expire_stale: Callable[[], None]) -> None:
        self.run_dir = run_dir
        self.store = store
        self.loader = loader
        self.snapshots = snapshots
        self.control = control
        self.position = position
        self.trainables = trainables
        self.hparams = hparams
        self.guard = guard
        self.replay = replay
        self.config = config
        self.status_fields = status_fields
        self.expire_stale = expire_stale

    def restore_on_start(self) -> None:
        store, position = self.store, self.position
        status = store.status()
        # Never on an excursion's branch: its trainer died during it; the main line resumes.
        branch_id, abandoned = abandon_excursion_on_start(store, status.get("branch"))
        branch = store.branch(branch_id) if branch_id else None
        if branch is None:
            position.branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
            self.hparams.record(force=True)
            self._initial_status("started")
            store.add_event("start", "run started", branch=position.branch, step=0, epoch=0,
                            data={"config": self.config})
            self._settle_queue()
            return
        position.branch = branch["id"]
        built = self.trainables.hparams()  # as the script built its optimizers, before the checkpoint's load
        resumed_from, fallback_note = self._load_latest_usable(branch)
        resume_step = resumed_from["step"] if resumed_from else 0
        moved = store.supersede_after(position.branch, resume_step)
        for name in sorted({info.name for info in store.series() if self.guard.watches(info.name)}):
            scale = store.starting_mean(name)
            if scale is not None:  # the guard judges a rise against the loss the run started from
                self.guard.remember_scale(name, scale)
        self.hparams.record(force=True)
        self.replay.replace([
            c for c in store.applied_commands_after(position.branch, resume_step, self.control.resumed_last_command)
            if c["kind"] in (cmd.SET_LR, cmd.SET_MOMENTUM)
        ])
        where = (f"checkpoint #{resumed_from['id']} (epoch {resumed_from['epoch']}, step {resume_step})"
                 if resumed_from else "the start (no checkpoint yet)")
        clean = status.get("state") in (STOPPED, FINISHED) and status.get("step") == resume_step
        how = ("after a clean stop" if clean else
               f"after the trainer stopped at step {status.get('step')}" if status.get("state") == STOPPED else
               "after the trainer died")
        message = f"resumed from {where} {how}"
        if abandoned:
            message += f"; {abandoned}"
        if fallback_note:
            message += f"; {fallback_note}"
        if moved:
            message += f"; {moved} values logged after that step are marked superseded"
        if self.replay:
            message += f"; {len(self.replay)} applied nudges will be re-applied at their steps"
        self._initial_status(message)
        store.add_event("resume", message, branch=position.branch, step=resume_step, epoch=position.epoch,
                        data={"checkpoint": resumed_from["id"] if resumed_from else None, "superseded": moved})
        self._warn_config_change(resumed_from, built)
        self._settle_queue()

    def _settle_queue(self) -> None:
        """Record the config of a run that has none yet; expire commands a dead trainer left waiting."""
        if self.store.get_meta("config") is None:
            self.store.set_meta("config", self.config)
        self.expire_stale()

    def start_replay(self, journal: dict[str, Any]) -> None:
        """After the run started or resumed: queue a journal's settings still ahead of it, say so."""
        position, store = self.position, self.store
        queued, done = journal_replay.queue_journal(self.replay, journal, position.step)
        message = journal_replay.describe(journal, queued, done, position.step)
        self.control.say(f"{self.control.message}; {message}" if self.control.message else message)
        data = journal_replay.event_data(journal, queued)
        store.add_event("replay", message, branch=position.branch, step=position.step, epoch=position.epoch, data=data)
        store.set_meta("replay", data)
        differs = journal_replay.config_differences(journal, self.config)
        if differs:
            store.add_event("config", "this replay's config differs from the journal's in " + ", ".join(differs)
                            + "; the settings are applied at their steps, but the run will not be the same",
                            branch=position.branch, step=position.step,
                            data={"journal": (journal.get("run") or {}).get("config"), "here": self.config})

    def _load_latest_usable(self, branch: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """Load the newest verified checkpoint of this branch, else its origin; if the origin is
        damaged or gone too, the newest intact one on the line of descent, as a new branch."""
        store, position = self.store, self.position
        own = [c for c in store.checkpoints() if c["branch"] == position.branch]
        for candidate in reversed(own):
            state = self._verified_or_event(candidate)
            if state is not None:
                self._load(state, candidate)
                return candidate, ""
        if not branch["from_checkpoint"] and not own:
            return None, ""  # killed before its first checkpoint: it starts again
        origin = store.checkpoint(branch["from_checkpoint"]) if branch["from_checkpoint"] else None
        state = self._verified_or_event(origin) if origin is not None else None
        if origin is not None and state is not None:
            self._load(state, origin)
            self.trainables.restore_hparams(branch["hparams"])
            return origin, ""
        # What the rollback meant comes first (before the fork, on its line of descent); then any
        # other intact checkpoint, newest first, rather than no run at all.
        before_fork = self.snapshots.lineage_before(position.branch, branch["start_step"] + 1)
        probes = store.excursion_branch_ids()
        others = sorted((c for c in store.checkpoints() if c not in before_fork and c["branch"] not in probes),
                        key=lambda c: (c["step"], c["id"]), reverse=True)
        tried = {c["id"] for c in own} | {branch["from_checkpoint"]}
        for candidate in before_fork + others:
            if candidate["id"] in tried:
                continue
            state = self._verified_or_event(candidate)
            if state is None:
                continue
            self._load(state, candidate)
            damaged = position.branch
            position.branch = store.new_branch(parent=candidate["branch"], from_checkpoint=candidate["id"],
                                               start_step=position.step, start_epoch=position.epoch,
                                               hparams=self.trainables.hparams())
            lost = (f"branch {damaged}'s origin checkpoint #{branch['from_checkpoint']}" if branch["from_checkpoint"]
                    else f"no checkpoint of branch {damaged}")
            note = (f"{lost} could not be loaded, so the run goes on from checkpoint #{candidate['id']} as branch "
                    f"{position.branch}")
            store.add_event("checkpoint_refused", note, branch=position.branch, step=position.step,
                            epoch=position.epoch)
            return candidate, note
        raise CheckpointError(
            f"no checkpoint of branch {position.branch} or of the branches it came from in {str(self.run_dir)!r} can "
            "be loaded (see the checkpoint_refused events); restore one from a backup, or start a new run in another "
            "directory"
        )

    def _load(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Load a verified checkpoint, after checking that it fits this model and optimizer: one that
        does not is another model's run (a script changed, a run directory reused), which no other
        checkpoint of the run would fit either, so it is refused before anything is loaded."""
        problems = self.trainables.misfit(state)
        if problems:
            raise CheckpointError(
                f"checkpoint #{record['id']} of run {str(self.run_dir)!r} does not fit this model and optimizer "
                f"({'; '.join(problems)}): the run was trained with others; build the model and optimizer it was "
                "trained with, or start a new run in another directory; nothing was loaded")
        self.loader.load_state(state, record)

    def _verified_or_event(self, record: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.trainables.read(self.run_dir, record)  # every file of it, whatever its form
        except CheckpointError as error:
            self.store.add_event("checkpoint_refused", str(error), branch=self.position.branch,
                                 data={"checkpoint": record["id"]})
            return None

    def _initial_status(self, message: str) -> None:
        self.control.say(message)
        self.store.write_status(
            **self.status_fields(), pid=os.getpid(), host=socket.gethostname(), started=time.time(),
            heartbeat=time.time(), optimizer=optimizer_name(self.trainables.optimizer, self.trainables.optimizers),
        )

    def _warn_config_change(self, checkpoint: dict[str, Any] | None, built: dict[str, Any]) -> None:
        """A restart with other settings than the checkpoint's: said on the trainer's terminal and
        on the page (an event), with what is used: the checkpoint's model, optimizers, lr and
        momentum; the new config for everything else."""
        if checkpoint is None:
            return
        store = self.store
        before = store.get_meta("config", {})
        changed = sorted(k for k in set(before) | set(self.config) if before.get(k) != self.config.get(k))
        notes = [f"{k} {_shown(self.config.get(k))} here, {_shown(before.get(k))} in the run" for k in changed]
        restored = self.trainables.hparams()
        # (A scheduler sets the lr as it is built, a warmup's to 0: only a plain optimizer's is the script's choice.)
        for name in ("lr", "momentum") if self.trainables.scheduler is None else ():
            if built.get(name) is not None and restored.get(name) is not None and built[name] != restored[name]:
                notes.append(f"the optimizer was built with {name} {built[name]:.6g}, checkpoint #{checkpoint['id']} "
                             f"holds {restored[name]:.6g} and it is used (`python -m babysit set {name}` nudges it)")
        if changed:
            store.add_event(
                "config", "config differs from the one the run was started with in "
                + ", ".join(changed) + "; model, optimizer and hyperparameters come from the checkpoint, "
                "the new config is used for everything else and is recorded",
                branch=self.position.branch, step=self.position.step, data={"before": before, "after": self.config},
            )
        if notes:
            print(f"babysit: this restart's settings differ from checkpoint #{checkpoint['id']}'s: " + "; ".join(notes)
                  + ("; model, optimizer, lr and momentum come from the checkpoint, the new config is used for "
                     "everything else" if changed else ""), file=sys.stderr, flush=True)
        store.set_meta("config", self.config)


def _shown(value: Any) -> str:
    return "(none)" if value is None else (f"{value:.6g}" if isinstance(value, float) else repr(value))


def abandon_excursion_on_start(store: RunStore, branch_id: int | None) -> tuple[int | None, str]:
    """A trainer starting on a run whose excursion was running when its trainer died: mark it
    abandoned (with an event), and resume on the main line (the excursion's origin branch, never
    an excursion branch). Returns the branch to resume and a note for the resume message."""
    note = ""
    running = store.running_excursion()
    if running is not None:
        note = (f"excursion #{running['id']} was abandoned (its trainer died during it); the run resumes on branch "
                f"{running['origin_branch']}")
        store.finish_excursion(running["id"], EXCURSION_ABANDONED, message=note)
        store.add_event("excursion", note, branch=running["origin_branch"], step=running["origin_step"],
                        data={"excursion": running["id"], "state": EXCURSION_ABANDONED})
    owner = store.excursion_branch_ids().get(branch_id) if branch_id is not None else None
    if owner is not None:
        found = store.excursion(owner)
        if found is not None:
            branch_id = int(found["origin_branch"])
    return branch_id, note


def let_go_after_failed_start(run_dir: Path, error: BaseException, lock_file: Any, store: RunStore | None,
                              signal: Any, *threads: Any) -> None:
    """``Run()`` failed once it had taken the run directory: stop the threads it had started (the
    writer, the checkpoint writer), say so in the status row if this process had claimed it, and
    release the lock, so that a retry in the same process (a notebook) finds the directory free."""
    for part in threads:
        if part is not None:
            try:
                part.close()
            except Exception:
                log.exception("babysit: closing after a failed start in %s", run_dir)
    if store is not None:
        try:
            status = store.status()
            if status.get("pid") == os.getpid() and status.get("state") in (RUNNING, PAUSED):
                store.write_status(state=STOPPED, heartbeat=time.time(),
                                   message=f"Run() failed as it started: {type(error).__name__}: {error}"[:500])
        except Exception:
            log.exception("babysit: the status of %s could not be written after a failed start", run_dir)
        store.close()
    if signal is not None:
        signal.close()
    lock_file.close()
