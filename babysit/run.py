"""The Run object a training loop uses: log, obey commands at step boundaries, checkpoint, roll back.

    with babysit.Run("checkpoints/my-run", model, optimizer, state={"best": float("inf")}) as run:
        for epoch in run.epochs(20):
            for x, y in run.batches(train_loader):
                ...                                    # forward, backward, optimizer.step()
                run.log(loss=loss)
            if not run.interrupted:                    # the epoch was not cut short
                run.log_epoch(val_loss=evaluate())

``run.batches`` calls :meth:`Run.step_boundary` between two batches: it applies pending commands,
waits while paused, and cuts the epoch short for a rollback or a stop — the one place babysit acts,
which the framework callbacks call too. ``run.epochs`` checkpoints at the end of every epoch,
restores a rollback's checkpoint and starts its branch, and resumes from the latest checkpoint when
the run directory already holds one. ``run.state`` (the loop's own values and Stateful objects)
travels in every checkpoint; :mod:`babysit.position` owns the counters and RNG states of an exact
resume; :mod:`babysit.snapshots` owns the checkpoint policy.
"""

from __future__ import annotations

import atexit
import collections
import enum
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from . import commands as cmd
from . import optim, user_state
from .checkpoint import (
    KEY_LAST_COMMAND, KEY_MODEL, KEY_OPTIMIZER, KEY_SCHEDULER, KEY_USER_STATE, CheckpointError, PendingCheckpoint,
    read_verified, remove_stale_temps,
)
from .guard import DivergenceGuard, GuardConfig
from .hparam_watch import COMMAND, LOOP, HparamWatch
from .position import ResumePosition
from .remedy import DivergenceRemedy
from .rundir import RunLockedError
from .rundir import acquire_run_lock as _acquire_run_lock
from .signals import install_stop_handlers
from .snapshots import EPOCH_DONE, Snapshots
from .store import (
    CRASHED, FINISHED, PAUSED, PER_EPOCH, PER_STEP, RUNNING, STOPPED, CommandSignal, RunStore,
)
from .writer import MetricsWriter, to_float

# A command that waited this long for a trainer (one that died or froze before applying it) is
# expired rather than applied out of the blue.
PENDING_COMMAND_TTL_S = 600.0


class Interrupt(enum.Enum):
    """Why the current epoch is being cut short."""

    STOP = "stop"
    ROLLBACK = "rollback"


@dataclass
class PendingRollback:
    """A rollback applied at a step boundary, carried out when the loop leaves the epoch."""

    command: dict[str, Any]
    checkpoint: dict[str, Any]
    state: dict[str, Any]
    hparams_at_cut: dict[str, Any]   # what "keep the current hyperparameters" keeps
    branch_at_cut: int
    step_at_cut: int


class Run:
    """Babysit one training run in ``run_dir`` (created if new, resumed if it holds checkpoints).

    Args:
        run_dir: the run directory (for example ``checkpoints/my-run``).
        model, optimizer, scheduler: what is checkpointed, restored and nudged.
        lr, momentum: for a loop that updates its parameters by hand, without a torch optimizer:
            babysit holds them, the loop reads ``run.lr`` (and ``run.momentum``) every step.
        state: the loop's own state, kept in every checkpoint and restored with it: plain values
            (numbers, strings, tensors, None…) and objects with ``state_dict()/load_state_dict()``.
            Available as ``run.state``.
        config: the run's settings (JSON-serialisable); stored in every checkpoint.
        guard: divergence guard settings (``GuardConfig(enabled=False)`` turns it off).
        keep_last: keep only the newest N checkpoints (those a branch started from are kept too);
            ``None`` keeps them all.
        flush_interval: seconds between writes of logged values (and heartbeats) to the store.
        items_per_step, item_unit: what one step trains, for the throughput shown on the page
            (for example 32 ``"samples"`` or 32×128 ``"tokens"``); by default the loader's batch size.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        lr: float | None = None,
        momentum: float | None = None,
        state: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        guard: GuardConfig | None = None,
        keep_last: int | None = None,
        flush_interval: float = 0.25,
        items_per_step: int | None = None,
        item_unit: str = "samples",
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a whole number >= 1 or None, got {keep_last!r}")
        if items_per_step is not None and (not isinstance(items_per_step, int) or items_per_step < 1):
            raise ValueError(f"items_per_step must be a whole number >= 1 or None, got {items_per_step!r}")
        if not isinstance(item_unit, str) or not item_unit.strip() or len(item_unit) > 20:
            raise ValueError(f"item_unit must be a short word such as 'samples' or 'tokens', got {item_unit!r}")
        self.optimizer = _optimizer_or_loop_hparams(optimizer, lr, momentum)
        self.run_dir = Path(run_dir)
        self.model = model
        self.scheduler = scheduler
        self.state: dict[str, Any] = dict(state or {})
        # What a checkpoint from before run.state existed restores (and a check, before anything
        # is created, that a checkpoint can hold these values).
        self._initial_state = user_state.capture(self.state)
        self.config = dict(config or {})
        json.dumps(self.config)  # fail now, not at the first checkpoint
        self.keep_last = keep_last
        self.guard_config = guard or GuardConfig()
        self.items_per_step = items_per_step
        self.item_unit = item_unit.strip()

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = _acquire_run_lock(self.run_dir)
        self.store = RunStore(self.run_dir, create=True)
        remove_stale_temps(self.run_dir)
        self.signal = CommandSignal(self.store.signal_path)

        self.position = ResumePosition()
        self.steps_per_epoch: int | None = None
        self.max_epochs: int | None = None
        self.branch = 0
        self.status = RUNNING                     # the lifecycle, as the store's status row says
        self.message = ""
        self._epoch_metrics: dict[str, float] = {}
        self._interrupt: Interrupt | None = None
        self._rollback: PendingRollback | None = None
        self._stop_command: dict[str, Any] | None = None
        self._stop_job: PendingCheckpoint | None = None
        self._final_hparams: dict[str, Any] | None = None
        self._stop_reason: str | None = None      # request_stop(): a signal, not a queued command
        self._replay: list[dict[str, Any]] = []
        self._last_command_id = 0                 # the last command handled (see KEY_LAST_COMMAND)
        self._resumed_last_command: int | None = 0  # the resumed checkpoint's; None if it has none
        self._wake = True                         # look at the queue before the first batch
        self._closed = False
        self._restore_signals: Any = None
        self._hparams = HparamWatch(self)

        self._guard = DivergenceGuard(self.guard_config)
        self.snapshots = Snapshots(self)
        self.remedy = DivergenceRemedy(self)
        queue: collections.deque[Any] = collections.deque()
        self._log = queue.append  # the training thread's share of storing a value: one append
        self._restore_on_start()
        self.writer = MetricsWriter(
            self.store, queue=queue, status=self._status_fields, guard=self._guard,
            on_divergence=self.remedy.on_divergence, on_tick=self._on_tick, interval=flush_interval,
        )
        atexit.register(self._at_exit)

    # -- where the run is ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def step(self) -> int:
        return self.position.step

    @property
    def step_in_epoch(self) -> int:
        """Steps trained in this epoch; at the top of an epoch, 0 unless it resumes mid-way."""
        return self.position.step_in_epoch

    @property
    def interrupted(self) -> bool:
        """True while the current epoch is being cut short (a stop, a rollback, Ctrl-C): skip the
        epoch's evaluation, lr anneal and "save best" — what the loop runs now is not kept."""
        return self._interrupt is not None

    @property
    def interrupt(self) -> Interrupt | None:
        return self._interrupt

    @property
    def lr(self) -> float:
        """The lr the optimizer uses now; a hand-written update reads it every step."""
        return optim.read_hparams(self.optimizer)["lr"]  # type: ignore[return-value]

    @lr.setter
    def lr(self, value: float) -> None:
        """The loop's own change of lr (its anneal): applied and marked as the loop's."""
        optim.set_lr(self.optimizer, cmd.validate_lr(value), self.scheduler)
        self._hparams.record(by=LOOP)

    @property
    def momentum(self) -> float | None:
        return optim.read_hparams(self.optimizer)["momentum"]

    @momentum.setter
    def momentum(self, value: float) -> None:
        optim.set_momentum(self.optimizer, cmd.validate_momentum(value))
        self._hparams.record(by=LOOP)

    @property
    def hparams(self) -> dict[str, float | None]:
        """The lr and momentum the optimizer uses now."""
        return optim.read_hparams(self.optimizer)

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    # -- the loop API ------------------------------------------------------------------------
    def epochs(self, max_epochs: int) -> Iterator[int]:
        """Yield epoch numbers (1-based) up to ``max_epochs``, checkpointing after each one.

        Starts after the latest checkpoint when resuming; after a rollback, continues from the
        restored checkpoint's epoch on a new branch. Ctrl-C and SIGTERM stop at the next step
        boundary with a final checkpoint (unless the loop handles those signals itself).
        """
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(f"max_epochs must be a whole number >= 1, got {max_epochs!r}")
        self.max_epochs = max_epochs
        restore_signals = None if self._restore_signals else self._install_signals()
        try:
            while self.position.next_epoch <= max_epochs:
                if self.stop_if_requested():
                    return
                self.begin_epoch()
                try:
                    yield self.epoch
                except GeneratorExit:
                    self._left_epochs()
                    raise
                if not self.end_epoch():
                    return
            self.finish()
        finally:
            if restore_signals is not None:
                restore_signals()

    # The pieces of ``epochs`` and ``batches``, for a framework's callback that drives the run
    # from its own loop: begin_epoch, then per step begin_step and step_boundary, then end_epoch;
    # finish when the framework's loop ends.
    def begin_epoch(self) -> int:
        """Enter the next epoch; returns its number (1-based)."""
        self.position.begin_epoch()
        self._epoch_metrics = {}
        return self.epoch

    def begin_step(self) -> int:
        """Count the step about to be trained (what ``run.log`` records values at); returns it."""
        position = self.position
        position.step += 1
        position.step_in_epoch += 1
        return position.step

    def end_epoch(self) -> bool:
        """Leave the epoch: carry out a rollback applied in it (the model, optimizer, scheduler,
        ``run.state`` and position are the checkpoint's; a new branch starts), or a stop (final
        checkpoint; the run ends), or else checkpoint the epoch. False when the run has ended."""
        if self._interrupt is Interrupt.ROLLBACK:
            self._finish_rollback()
            return True
        if self._interrupt is Interrupt.STOP:
            self._finish_stop()
            return False
        self.snapshots.end_epoch()
        return True

    def stop_if_requested(self) -> bool:
        """Between two epochs: carry out a stop that waited for the last epoch's end (a stop command
        at its last boundary, Ctrl-C, ``request_stop()``): final checkpoint, the run ends. True if it did."""
        if self._stop_reason is None:
            return False
        self._interrupt = Interrupt.STOP
        self._finish_stop()
        return True

    def finish(self) -> None:
        """The loop trained all its epochs: the run is finished (the last epoch's checkpoint is its end)."""
        self._finish(FINISHED, f"finished {self.max_epochs} epochs" if self.max_epochs else f"finished at step {self.step}")

    def _left_epochs(self) -> None:
        """The loop broke out of ``run.epochs`` (or an error did): say so, write nothing — the
        state at a break is whatever the loop left, and after an error it may be half a step.
        ``run.request_stop()`` is the way to stop early with a final checkpoint."""
        if self._closed or self._interrupt is not None:
            return
        self.status = STOPPED
        self.message = (f"the loop left run.epochs at step {self.step} (epoch {self.epoch}); it resumes from the "
                        "latest checkpoint")
        self.store.add_event(STOPPED, self.message, branch=self.branch, step=self.step, epoch=self.epoch)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches of ``loader``; between two batches, call :meth:`step_boundary`.

        Ends early when a rollback or a stop is applied (the rest of the epoch is not trained).
        """
        try:
            self.steps_per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            self.steps_per_epoch = None
        if self.items_per_step is None and isinstance(getattr(loader, "batch_size", None), int):
            self.items_per_step = loader.batch_size  # type: ignore[attr-defined]
        position = self.position
        position.use_loader(loader)
        iterator = iter(loader)
        if position.skip_batches:
            position.skip_trained(iterator)
        self._wake = True
        if self.step_boundary() is not None:
            return
        for batch in iterator:
            self.begin_step()
            yield batch
            if self.step_boundary() is not None:  # the step is done: this is a step boundary
                return

    def step_boundary(self) -> Interrupt | None:
        """Apply what is due between two steps: replays, queued commands, a pause; record an lr or
        momentum the loop or its scheduler changed. Returns the interrupt (stop, rollback) that
        now cuts the epoch short, if any. Cheap when nothing is due (a flag and a memory read).

        The caller counts its steps in ``run.position`` first (``run.batches`` does); once it
        returns an interrupt, the caller leaves the epoch: nothing more is applied until then."""
        if self._interrupt is not None:
            return self._interrupt
        if self._wake or self.signal.changed() or self._replay:
            self._apply_due()
        watch = self._hparams
        group = self.optimizer.param_groups[0]
        if group["lr"] != watch.lr or watch.read_momentum(group) != watch.momentum:
            watch.record(by=watch.source())
        return self._interrupt

    def log(self, **metrics: Any) -> None:
        """Record per-step values (numbers or one-element tensors) at the current step.

        A CPU tensor is read at once (``.item()``, well under a microsecond); a GPU tensor is read
        on the writer thread, so logging a GPU loss does not wait for the GPU (do not change it in
        place afterwards). Either way no autograd graph is kept alive.
        """
        for value in metrics.values():
            if type(value) is _TENSOR:
                _read_tensors(metrics)
                break
        self._log((PER_STEP, self.branch, self.position.step, _wall_clock(), metrics))

    def log_epoch(self, **metrics: Any) -> None:
        """Record per-epoch values (validation loss, accuracy); they are saved in the checkpoint.
        Ignored while the epoch is cut short: an evaluation after the cut is not kept."""
        if self._interrupt:
            return
        values = {name: to_float(value) for name, value in metrics.items()}
        self._epoch_metrics.update(values)
        self._log((PER_EPOCH, self.branch, self.position.step, time.time(), values))

    def request_stop(self, reason: str = "requested") -> None:
        """Stop at the next step boundary with a final checkpoint (safe in a signal handler)."""
        self._stop_reason = reason
        self._wake = True

    def checkpoint_now(self, reason: str = "command") -> PendingCheckpoint:
        """Snapshot now (mid-epoch if need be) and write it in the background."""
        return self.snapshots.take(reason)

    @property
    def checkpointer(self) -> Any:
        return self.snapshots.writer

    def close(self) -> None:
        """Flush, wait for checkpoint writes and release the run directory."""
        if self._closed:
            return
        self._closed = True
        self.snapshots.close()
        self.writer.close()
        if self.status in (RUNNING, PAUSED):
            self.status = STOPPED
            self.message = self.message or f"the training script ended at step {self.step} (not at a checkpoint)"
        self.store.write_status(**self._status_fields(), heartbeat=time.time())
        self.signal.close()
        self._lock_file.close()
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None
        atexit.unregister(self._at_exit)

    def __enter__(self) -> "Run":
        self._restore_signals = self._install_signals()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not self._closed:
            if isinstance(exc, KeyboardInterrupt):
                self.status = STOPPED
                self.message = f"aborted (Ctrl-C) at step {self.step}; resumes from the latest checkpoint"
            else:
                self.status = CRASHED
                self.message = f"{type(exc).__name__}: {exc}"[:500]
                self.store.add_event("error", self.message, branch=self.branch, step=self.step, epoch=self.epoch,
                                     data={"traceback": "".join(traceback.format_exception(exc))[-4000:]})
        self.close()

    def _install_signals(self) -> Any:
        return install_stop_handlers(self.request_stop, lambda: self.stop_requested)

    # -- start and resume ---------------------------------------------------------------------
    def _restore_on_start(self) -> None:
        status = self.store.status()
        branch_id = status.get("branch")
        branch = self.store.branch(branch_id) if branch_id else None
        if branch is None:
            self.branch = self.store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
            self._hparams.record(force=True)
            self._initial_status("started")
            self.store.add_event("start", "run started", branch=self.branch, step=0, epoch=0,
                                 data={"config": self.config})
            self._expire_stale_commands()
            return
        self.branch = branch["id"]
        resumed_from, fallback_note = self._load_latest_usable(branch)
        resume_step = resumed_from["step"] if resumed_from else 0
        moved = self.store.supersede_after(self.branch, resume_step)
        scale = self.store.starting_mean(self.guard_config.metric)
        if scale is not None:  # the guard judges a rise against the loss the run started from
            self._guard.remember_scale(scale)
        self._hparams.record(force=True)
        self._replay = [
            c for c in self.store.applied_commands_after(self.branch, resume_step, self._resumed_last_command)
            if c["kind"] in (cmd.SET_LR, cmd.SET_MOMENTUM)
        ]
        where = (f"checkpoint #{resumed_from['id']} (epoch {resumed_from['epoch']}, step {resume_step})"
                 if resumed_from else "the start (no checkpoint yet)")
        clean = status.get("state") in (STOPPED, FINISHED) and status.get("step") == resume_step
        how = ("after a clean stop" if clean else
               f"after the trainer stopped at step {status.get('step')}" if status.get("state") == STOPPED else
               "after the trainer died")
        message = f"resumed from {where} {how}"
        if fallback_note:
            message += f"; {fallback_note}"
        if moved:
            message += f"; {moved} values logged after that step are marked superseded"
        if self._replay:
            message += f"; {len(self._replay)} applied nudges will be re-applied at their steps"
        self._initial_status(message)
        self.store.add_event("resume", message, branch=self.branch, step=resume_step, epoch=self.epoch,
                             data={"checkpoint": resumed_from["id"] if resumed_from else None, "superseded": moved})
        self._warn_config_change(resumed_from)
        self._expire_stale_commands()

    def _load_latest_usable(self, branch: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """Load the newest verified checkpoint of this branch, else its origin; if the origin is
        damaged or gone too, the newest intact one on the line of descent, as a new branch."""
        own = [c for c in self.store.checkpoints() if c["branch"] == self.branch]
        for candidate in reversed(own):
            state = self._verified_or_event(candidate)
            if state is not None:
                self._load_state(state, candidate)
                return candidate, ""
        if not branch["from_checkpoint"] and not own:
            return None, ""  # killed before its first checkpoint: it starts again
        origin = self.store.checkpoint(branch["from_checkpoint"]) if branch["from_checkpoint"] else None
        state = self._verified_or_event(origin) if origin is not None else None
        if origin is not None and state is not None:
            self._load_state(state, origin)
            optim.restore_hparams(self.optimizer, branch["hparams"], self.scheduler)
            return origin, ""
        # What the rollback meant comes first (before the fork, on its line of descent); then any
        # other intact checkpoint, newest first, rather than no run at all.
        before_fork = self.snapshots.lineage_before(self.branch, branch["start_step"] + 1)
        others = sorted((c for c in self.store.checkpoints() if c not in before_fork),
                        key=lambda c: (c["step"], c["id"]), reverse=True)
        tried = {c["id"] for c in own} | {branch["from_checkpoint"]}
        for candidate in before_fork + others:
            if candidate["id"] in tried:
                continue
            state = self._verified_or_event(candidate)
            if state is None:
                continue
            self._load_state(state, candidate)
            damaged = self.branch
            self.branch = self.store.new_branch(parent=candidate["branch"], from_checkpoint=candidate["id"],
                                                start_step=self.step, start_epoch=self.epoch, hparams=self.hparams)
            lost = (f"branch {damaged}'s origin checkpoint #{branch['from_checkpoint']}" if branch["from_checkpoint"]
                    else f"no checkpoint of branch {damaged}")
            note = f"{lost} could not be loaded, so the run goes on from checkpoint #{candidate['id']} as branch {self.branch}"
            self.store.add_event("checkpoint_refused", note, branch=self.branch, step=self.step, epoch=self.epoch)
            return candidate, note
        raise CheckpointError(
            f"no checkpoint of branch {self.branch} or of the branches it came from in {str(self.run_dir)!r} can be "
            "loaded (see the checkpoint_refused events); restore one from a backup, or start a new run in another "
            "directory"
        )

    def _verified_or_event(self, record: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return read_verified(self.run_dir / record["file"], record["sha256"])
        except CheckpointError as error:
            self.store.add_event("checkpoint_refused", str(error), branch=self.branch,
                                 data={"checkpoint": record["id"]})
            return None

    def _initial_status(self, message: str) -> None:
        self.message = message
        self.store.write_status(
            **self._status_fields(), pid=os.getpid(), host=socket.gethostname(), started=time.time(),
            heartbeat=time.time(), optimizer=_optimizer_name(self.optimizer),
        )

    def _warn_config_change(self, checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is None:
            return
        before = self.store.get_meta("config", {})
        changed = sorted(k for k in set(before) | set(self.config) if before.get(k) != self.config.get(k))
        if changed:
            self.store.add_event(
                "config", "config differs from the one the run was started with in "
                + ", ".join(changed) + "; model, optimizer and hyperparameters come from the checkpoint, "
                "the new config is used for everything else and is recorded",
                branch=self.branch, step=self.step, data={"before": before, "after": self.config},
            )
        self.store.set_meta("config", self.config)

    def _expire_stale_commands(self) -> None:
        if self.store.get_meta("config") is None:
            self.store.set_meta("config", self.config)
        for pending in self.store.pending_commands():
            self._expired(pending)

    def _expired(self, pending: dict[str, Any]) -> bool:
        """Expire a command that waited too long (its trainer died or froze); True if it did."""
        if time.time() - pending["created"] <= PENDING_COMMAND_TTL_S:
            return False
        self.store.finish_command(
            pending["id"], cmd.EXPIRED, branch=self.branch, step=self.step,
            reason=f"no trainer applied it within {PENDING_COMMAND_TTL_S:.0f} s; send it again",
        )
        return True

    def _load_state(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Put a verified checkpoint's state into the model, optimizer, scheduler, loop state, RNGs
        and counters, and pick up command handling where it was."""
        self.model.load_state_dict(state[KEY_MODEL])
        self.optimizer.load_state_dict(state[KEY_OPTIMIZER])
        if self.scheduler is not None and state.get(KEY_SCHEDULER) is not None:
            self.scheduler.load_state_dict(state[KEY_SCHEDULER])
        for note in user_state.restore(self.state, state.get(KEY_USER_STATE) or self._initial_state):
            self.store.add_event("state_not_restored", note, branch=self.branch, step=int(record["step"]))
        self.position.restore(state, epoch_done=record["reason"] == EPOCH_DONE)
        self._hparams.restored()
        self._guard.reset()
        recorded = state.get(KEY_LAST_COMMAND)
        self._resumed_last_command = None if recorded is None else int(recorded)
        # A checkpoint written before checkpoints recorded this: count every command handled so
        # far as seen, so later checkpoints record a true bound (replays still waiting are found
        # by their step, which is past any checkpoint taken before they happen).
        self._last_command_id = (self._resumed_last_command if recorded is not None
                                 else self.store.last_handled_command_id())

    # -- step boundary -----------------------------------------------------------------------
    def _apply_due(self) -> None:
        """Replays, then queued commands, then a pause."""
        self._wake = False
        if self._stop_reason is not None and not self._at_last_boundary():
            self._begin_stop(None)
            return
        while self._replay and self._replay[0]["step"] <= self.step:
            self._replay_command(self._replay.pop(0))
        self._apply_pending()
        if self.status == PAUSED and not self._interrupt:
            self._wait_while_paused()

    def _apply_pending(self) -> None:
        self.signal.mark_seen()
        for pending in self.store.pending_commands():
            if self.snapshots.is_carrying_out(pending["id"]):
                continue
            self._apply(pending)
            if self._interrupt:
                return

    def _wait_while_paused(self) -> None:
        self.writer.wake()
        while self.status == PAUSED and not self._interrupt:
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not self.signal.changed() and not self._wake:
                time.sleep(0.005)
            self._wake = False
            if self._stop_reason is not None:
                self._begin_stop(None)
                break
            self._apply_pending()
        self.writer.wake()

    def _apply(self, pending: dict[str, Any]) -> None:
        """Check a queued command again and apply it; record what it changed or why not."""
        command_id = pending["id"]
        self._last_command_id = max(self._last_command_id, command_id)
        if self._expired(pending):
            return
        try:
            command = cmd.validate(pending["kind"], pending["args"])
            result = self._execute(command, pending)
        except cmd.CommandError as error:
            self.store.finish_command(command_id, cmd.REJECTED, branch=self.branch, step=self.step, reason=str(error))
            return
        except CheckpointError as error:
            reason = f"{error}; the run continues on branch {self.branch}; pick another checkpoint"
            self.store.finish_command(command_id, cmd.REJECTED, branch=self.branch, step=self.step, reason=reason)
            return
        except Exception as error:  # an unexpected failure rejects this command, never the run
            self.store.finish_command(command_id, cmd.REJECTED, branch=self.branch, step=self.step,
                                      reason=f"{type(error).__name__}: {error}")
            return
        if result is not None:  # None: acknowledged later (checkpoint written, rollback done, stop)
            self.store.finish_command(command_id, cmd.APPLIED, branch=self.branch, step=self.step, result=result)

    def _execute(self, command: cmd.Command, pending: dict[str, Any]) -> dict[str, Any] | None:
        before = self.hparams
        if command.kind == cmd.SET_LR:
            after = optim.set_lr(self.optimizer, command.args["value"], self.scheduler)
            self._hparams.record(by=COMMAND)
            result: dict[str, Any] = {"before": before["lr"], "after": after}
            warning = cmd.lr_warning(after)
            if warning:
                result["warning"] = warning
            return result
        if command.kind == cmd.SET_MOMENTUM:
            after = optim.set_momentum(self.optimizer, command.args["value"])
            self._hparams.record(by=COMMAND)
            result = {"before": before["momentum"], "after": after}
            if optim.cycles_momentum(self.scheduler):
                result["warning"] = (f"{type(self.scheduler).__name__} cycles momentum and will overwrite this "
                                     "at its next step (the chart shows what it sets)")
            return result
        for_branch = command.args.get("branch")
        if for_branch is not None and for_branch != self.branch:  # a remedy for a branch the run has left
            raise cmd.CommandError(f"this {command.kind} was for a divergence on branch {for_branch}; the run has "
                                   f"moved on to branch {self.branch}")
        if command.kind == cmd.PAUSE:
            if self.status == PAUSED:
                raise cmd.CommandError("the run is already paused")
            why = command.args.get("reason") or f"by {pending['source']}"
            self.status, self.message = PAUSED, f"paused at step {self.step}: {why}"
            return {"state": PAUSED}
        if command.kind == cmd.RESUME:
            if self.status != PAUSED:
                raise cmd.CommandError(f"the run is not paused (it is {self.status}); nothing to resume")
            self.status, self.message = RUNNING, f"resumed at step {self.step}"
            self._guard.reset()
            self.remedy.person_resumed()
            return {"state": RUNNING}
        if command.kind == cmd.CHECKPOINT:
            if self._at_last_boundary():  # the epoch's own checkpoint, of this step, answers it
                self.snapshots.answer_at_epoch_end(pending["id"])
            else:
                self.snapshots.take_for_command(pending["id"])
            return None
        if command.kind == cmd.STOP:
            if self._at_last_boundary():  # let the epoch end as usual; stop before the next one
                self._stop_command, self._stop_reason = pending, self._stop_reason or "stop command"
            else:
                self._begin_stop(pending)
            return None
        if command.kind == cmd.ROLLBACK:
            record = self.store.checkpoint(command.args["checkpoint"], must_exist=True)
            assert record is not None
            state = read_verified(self.run_dir / record["file"], record["sha256"])
            self._check_fits(state, record)
            self._rollback = PendingRollback(pending, record, state, hparams_at_cut=before,
                                             branch_at_cut=self.branch, step_at_cut=self.step)
            self._interrupt = Interrupt.ROLLBACK
            return None
        raise cmd.CommandError(f"unknown command {command.kind!r}")

    def _at_last_boundary(self) -> bool:
        """After the epoch's last batch: a cut here would leave an epoch with nothing to train but
        its end (evaluation, anneal) still to run; a stop or a checkpoint waits for that end."""
        return self.steps_per_epoch is not None and self.position.step_in_epoch >= self.steps_per_epoch

    def _begin_stop(self, pending: dict[str, Any] | None) -> None:
        """A stop is checkpointed here, at the step boundary, so that nothing the loop runs after
        the cut (its evaluation, its lr anneal) reaches the final checkpoint."""
        self._stop_job = self.snapshots.take("stop", reuse_same_step=True)  # may refuse: nothing is set yet
        self._stop_command = pending
        self._interrupt = Interrupt.STOP

    def _check_fits(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Refuse a checkpoint whose tensors do not fit this model or optimizer before anything
        is changed (loading it would fail half-way)."""
        live = self.model.state_dict()
        saved = state.get(KEY_MODEL) or {}
        problems = sorted(set(live) ^ set(saved))[:3]
        problems += [f"{name} {tuple(saved[name].shape)} vs {tuple(tensor.shape)} here" for name, tensor in live.items()
                     if name in saved and hasattr(saved[name], "shape") and saved[name].shape != tensor.shape][:3]
        groups = (state.get(KEY_OPTIMIZER) or {}).get("param_groups", [])
        if [len(g.get("params", [])) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            problems.append("the optimizer's parameter groups differ")
        if problems:
            raise cmd.CommandError(f"checkpoint #{record['id']} does not fit this model ({'; '.join(problems)}); "
                                   "nothing was changed")

    def _replay_command(self, applied: dict[str, Any]) -> None:
        self._last_command_id = max(self._last_command_id, applied["id"])
        value = applied["args"]["value"]
        if applied["kind"] == cmd.SET_LR:
            optim.set_lr(self.optimizer, value, self.scheduler)
        else:
            optim.set_momentum(self.optimizer, value)
        self._hparams.record(by=COMMAND)

    # -- rollback and stop, as the loop leaves the epoch ---------------------------------------
    def _finish_rollback(self) -> None:
        rollback = self._rollback
        assert rollback is not None
        self._rollback = None
        self._interrupt = None
        self._replay = []  # nudges of the old branch still waiting to be replayed stay there
        pending, record = rollback.command, rollback.checkpoint
        command = cmd.validate(pending["kind"], pending["args"])
        before = rollback.hparams_at_cut
        old_branch, old_step = rollback.branch_at_cut, rollback.step_at_cut
        try:
            self._load_state(rollback.state, record)
        except Exception as error:
            # Checked to fit when applied; if loading still fails the model may be half-loaded:
            # end this process (a restart resumes from the latest checkpoint) but never leave the
            # command pending, or every restart would fail on it again.
            self.store.finish_command(pending["id"], cmd.REJECTED, branch=old_branch, step=old_step,
                                      reason=f"checkpoint #{record['id']} could not be loaded: {error}")
            raise
        if command.args["hparams"] == cmd.HPARAMS_CURRENT:
            optim.restore_hparams(self.optimizer, before, self.scheduler)
        overrides = {k: command.args[k] for k in ("lr", "momentum") if k in command.args}
        optim.restore_hparams(self.optimizer, overrides, self.scheduler)
        after = self.hparams
        self.status = RUNNING
        self.message = f"rolled back to checkpoint #{record['id']} (epoch {record['epoch']}, step {record['step']})"
        self._guard.reset()
        with self.store.transaction():  # one commit: the branch, its status, the event, the acknowledgement
            self.branch = self.store.new_branch(
                parent=record["branch"], from_checkpoint=record["id"], start_step=self.step,
                start_epoch=self.epoch, hparams=after,
            )
            self.store.write_status(**self._status_fields(), heartbeat=time.time())
            self.store.add_event("rollback", self.message + f" as branch {self.branch}", branch=self.branch,
                                 step=self.step, epoch=self.epoch,
                                 data={"from_branch": old_branch, "from_step": old_step, "checkpoint": record["id"],
                                       "before": before, "after": after, "hparams": command.args["hparams"]})
            self.store.finish_command(pending["id"], cmd.APPLIED, branch=old_branch, step=old_step, result={
                "branch": self.branch, "epoch": self.epoch, "step": self.step, "checkpoint": record["id"],
                "lr": after["lr"], "momentum": after["momentum"], "before": before,
            })
        self._hparams.record(force=True)

    def _finish_stop(self) -> None:
        job = self._stop_job or self.snapshots.take("stop", reuse_same_step=True)
        self._final_hparams = job.meta["hparams"]
        self.snapshots.wait()
        pending = self._stop_command
        if pending is not None:
            result: dict[str, Any] = {"checkpoint": job.meta.get("id")}
            if job.error is not None:
                result = {"checkpoint": None, "warning": str(job.error)}
            self.store.finish_command(pending["id"], cmd.APPLIED, branch=self.branch, step=self.step, result=result)
        why = f" ({self._stop_reason})" if self._stop_reason and self._stop_reason != "stop command" else ""
        self._finish(STOPPED, f"stopped at step {self.step}{why} with a final checkpoint")

    def _finish(self, status: str, message: str) -> None:
        self.snapshots.answer_waiting()
        self.status, self.message = status, message
        self.store.add_event(status, message, branch=self.branch, step=self.step, epoch=self.epoch)
        self.close()

    # -- writer-thread callbacks --------------------------------------------------------------
    def _status_fields(self) -> dict[str, Any]:
        # After a stop, what the final checkpoint holds (and a resume uses), not what the loop
        # may have set after the cut.
        hparams = self._final_hparams or optim.read_hparams(self.optimizer)
        position = self.position
        return {
            "state": self.status, "epoch": position.epoch, "step": position.step,
            "step_in_epoch": position.step_in_epoch, "steps_per_epoch": self.steps_per_epoch,
            "max_epochs": self.max_epochs, "branch": self.branch, "lr": hparams["lr"],
            "momentum": hparams["momentum"], "message": self.message,
            "items_per_step": self.items_per_step, "item_unit": self.item_unit,
        }

    def _on_tick(self) -> None:
        # A fallback for the signal file (a missed write, a filesystem without shared mmap).
        if not self._wake and self.store.conn().execute(
            "SELECT 1 FROM commands WHERE state = ? LIMIT 1", (cmd.PENDING,)
        ).fetchone():
            self._wake = True

    def _at_exit(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# Bound once: run.log runs every step, and module attribute lookups add up there.
_TENSOR = torch.Tensor
_wall_clock = time.time


def _read_tensors(metrics: dict[str, Any]) -> None:
    """CPU tensors become floats now (cheaper than keeping them, and their graphs, alive); GPU
    tensors are detached and read later on the writer thread, without a sync here."""
    for name, value in metrics.items():
        if type(value) is _TENSOR:
            metrics[name] = value.detach() if value.is_cuda else value.item()


def _optimizer_or_loop_hparams(optimizer: Any, lr: float | None, momentum: float | None) -> Any:
    if optimizer is not None:
        if lr is not None or momentum is not None:
            raise ValueError("give either an optimizer or lr= (and momentum=) for hand-written updates, not both: "
                             "with an optimizer, babysit nudges the lr in its param_groups")
        if not getattr(optimizer, "param_groups", None):
            raise ValueError(f"optimizer must be a torch optimizer (with param_groups), got {type(optimizer).__name__}; "
                             "a loop that updates its parameters by hand passes lr= instead and reads run.lr")
        return optimizer
    if lr is None:
        raise ValueError("Run needs an optimizer, or lr= for a loop that updates its parameters by hand "
                         "(it reads run.lr every step, so nudges reach it)")
    return optim.LoopHparams(cmd.validate_lr(lr), None if momentum is None else cmd.validate_momentum(momentum))


def _optimizer_name(optimizer: Any) -> str:
    return "hand-written updates (run.lr)" if isinstance(optimizer, optim.LoopHparams) else type(optimizer).__name__
