"""How a run starts: a new run's first branch, or a resume from the newest verified checkpoint
(falling back along the branch's line of descent when one is damaged), and the loading of a
checkpoint into the model, optimizer, scheduler, ``run.state``, RNGs and counters.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from . import commands as cmd
from . import excursion_runner, optim, user_state
from .checkpoint import (
    KEY_LAST_COMMAND, KEY_MODEL, KEY_OPTIMIZER, KEY_SCHEDULER, KEY_USER_STATE, REASON_EPOCH, read_verified,
)
from .errors import CheckpointError
from .ranks import KEY_RANKS
from .store import FINISHED, STOPPED

if TYPE_CHECKING:
    from .run import Run


class Resume:
    """Starts or resumes one :class:`~babysit.run.Run`, and loads checkpoints into it."""

    def __init__(self, run: "Run") -> None:
        self.run = run

    def restore_on_start(self) -> None:
        run = self.run
        status = run.store.status()
        # Never on an excursion's branch: its trainer died during it; the main line resumes.
        branch_id, abandoned = excursion_runner.abandon_on_start(run, status.get("branch"))
        branch = run.store.branch(branch_id) if branch_id else None
        if branch is None:
            run.branch = run.store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
            run._hparams.record(force=True)
            self._initial_status("started")
            run.store.add_event("start", "run started", branch=run.branch, step=0, epoch=0,
                                data={"config": run.config})
            run._commands.expire_stale()
            return
        run.branch = branch["id"]
        resumed_from, fallback_note = self._load_latest_usable(branch)
        resume_step = resumed_from["step"] if resumed_from else 0
        moved = run.store.supersede_after(run.branch, resume_step)
        scale = run.store.starting_mean(run.guard_config.metric)
        if scale is not None:  # the guard judges a rise against the loss the run started from
            run._guard.remember_scale(scale)
        run._hparams.record(force=True)
        run._replay = [
            c for c in run.store.applied_commands_after(run.branch, resume_step, run._resumed_last_command)
            if c["kind"] in (cmd.SET_LR, cmd.SET_MOMENTUM)
        ]
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
        if run._replay:
            message += f"; {len(run._replay)} applied nudges will be re-applied at their steps"
        self._initial_status(message)
        run.store.add_event("resume", message, branch=run.branch, step=resume_step, epoch=run.epoch,
                            data={"checkpoint": resumed_from["id"] if resumed_from else None, "superseded": moved})
        self._warn_config_change(resumed_from)
        run._commands.expire_stale()

    def _load_latest_usable(self, branch: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """Load the newest verified checkpoint of this branch, else its origin; if the origin is
        damaged or gone too, the newest intact one on the line of descent, as a new branch."""
        run = self.run
        own = [c for c in run.store.checkpoints() if c["branch"] == run.branch]
        for candidate in reversed(own):
            state = self._verified_or_event(candidate)
            if state is not None:
                self.load_state(state, candidate)
                return candidate, ""
        if not branch["from_checkpoint"] and not own:
            return None, ""  # killed before its first checkpoint: it starts again
        origin = run.store.checkpoint(branch["from_checkpoint"]) if branch["from_checkpoint"] else None
        state = self._verified_or_event(origin) if origin is not None else None
        if origin is not None and state is not None:
            self.load_state(state, origin)
            run._commands.restore_hparams(branch["hparams"])
            return origin, ""
        # What the rollback meant comes first (before the fork, on its line of descent); then any
        # other intact checkpoint, newest first, rather than no run at all.
        before_fork = run.snapshots.lineage_before(run.branch, branch["start_step"] + 1)
        probes = run.store.excursion_branch_ids()
        others = sorted((c for c in run.store.checkpoints() if c not in before_fork and c["branch"] not in probes),
                        key=lambda c: (c["step"], c["id"]), reverse=True)
        tried = {c["id"] for c in own} | {branch["from_checkpoint"]}
        for candidate in before_fork + others:
            if candidate["id"] in tried:
                continue
            state = self._verified_or_event(candidate)
            if state is None:
                continue
            self.load_state(state, candidate)
            damaged = run.branch
            run.branch = run.store.new_branch(parent=candidate["branch"], from_checkpoint=candidate["id"],
                                              start_step=run.step, start_epoch=run.epoch, hparams=run.hparams)
            lost = (f"branch {damaged}'s origin checkpoint #{branch['from_checkpoint']}" if branch["from_checkpoint"]
                    else f"no checkpoint of branch {damaged}")
            note = f"{lost} could not be loaded, so the run goes on from checkpoint #{candidate['id']} as branch {run.branch}"
            run.store.add_event("checkpoint_refused", note, branch=run.branch, step=run.step, epoch=run.epoch)
            return candidate, note
        raise CheckpointError(
            f"no checkpoint of branch {run.branch} or of the branches it came from in {str(run.run_dir)!r} can be "
            "loaded (see the checkpoint_refused events); restore one from a backup, or start a new run in another "
            "directory"
        )

    def _verified_or_event(self, record: dict[str, Any]) -> dict[str, Any] | None:
        run = self.run
        try:
            return read_verified(run.run_dir / record["file"], record["sha256"])
        except CheckpointError as error:
            run.store.add_event("checkpoint_refused", str(error), branch=run.branch,
                                data={"checkpoint": record["id"]})
            return None

    def _initial_status(self, message: str) -> None:
        run = self.run
        run.message = message
        run.store.write_status(
            **run._status_fields(), pid=os.getpid(), host=socket.gethostname(), started=time.time(),
            heartbeat=time.time(), optimizer=optimizer_name(run.optimizer),
        )

    def _warn_config_change(self, checkpoint: dict[str, Any] | None) -> None:
        run = self.run
        if checkpoint is None:
            return
        before = run.store.get_meta("config", {})
        changed = sorted(k for k in set(before) | set(run.config) if before.get(k) != run.config.get(k))
        if changed:
            run.store.add_event(
                "config", "config differs from the one the run was started with in "
                + ", ".join(changed) + "; model, optimizer and hyperparameters come from the checkpoint, "
                "the new config is used for everything else and is recorded",
                branch=run.branch, step=run.step, data={"before": before, "after": run.config},
            )
        run.store.set_meta("config", run.config)

    def load_state(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Put a verified checkpoint's state into the model, optimizer, scheduler, loop state, RNGs
        and counters (on every rank), and pick up command handling where it was."""
        run = self.run
        run._tell("load", {key: record[key] for key in ("id", "file", "sha256", "reason", "step")})
        self.load_training_state(state, record)
        self._say_if_ranks_changed(state, record)
        recorded = state.get(KEY_LAST_COMMAND)
        run._resumed_last_command = None if recorded is None else int(recorded)
        # A checkpoint written before checkpoints recorded this: count every command handled so
        # far as seen, so later checkpoints record a true bound (replays still waiting are found
        # by their step, which is past any checkpoint taken before they happen).
        run._last_command_id = (run._resumed_last_command if recorded is not None
                                 else run.store.last_handled_command_id())

    def _say_if_ranks_changed(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """A checkpoint of a job with another number of ranks loads, but not exactly: say what differs."""
        run = self.run
        saved = len(state.get(KEY_RANKS) or []) or 1
        now = run._ranks.world_size if run._ranks is not None else 1
        if saved == now:
            return
        inexact = []
        if now > saved:
            inexact.append(f"ranks {saved}..{now - 1} start from rank 0's random generators and run.state")
        if record["reason"] != REASON_EPOCH:
            inexact.append("inside its epoch, the batches skipped are counted in the old job's shards")
        run.store.add_event("ranks_changed", f"checkpoint #{record['id']} was written by a job of {saved} rank(s), this "
                            f"one has {now}: it resumes, but not exactly" + (" (" + "; ".join(inexact) + ")" if inexact
                                                                             else ""),
                            branch=run.branch, step=int(record["step"]), data={"saved": saved, "now": now})

    def load_training_state(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        run = self.run
        run.model.load_state_dict(state[KEY_MODEL])
        run.optimizer.load_state_dict(state[KEY_OPTIMIZER])
        if run.scheduler is not None and state.get(KEY_SCHEDULER) is not None:
            run.scheduler.load_state_dict(state[KEY_SCHEDULER])
        for note in user_state.restore(run.state, state.get(KEY_USER_STATE) or run._initial_state):
            if not run._follows:
                run.store.add_event("state_not_restored", note, branch=run.branch, step=int(record["step"]))
        run.position.restore(state, epoch_done=record["reason"] == REASON_EPOCH)
        if run._ranks is not None:  # the step went back: meet at the next boundary, then as usual
            run._ranks.next_sync = 0
        run._hparams.restored()
        run._guard.reset()


def optimizer_name(optimizer: Any) -> str:
    return "hand-written updates (run.lr)" if isinstance(optimizer, optim.LoopHparams) else type(optimizer).__name__
