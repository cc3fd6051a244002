"""The Run object a training loop uses: log, obey commands at step boundaries, checkpoint, roll back.

    run = babysit.Run("checkpoints/my-run", model, optimizer, scheduler, config=config)
    for epoch in run.epochs(20):
        for x, y in run.batches(train_loader):
            ...                                    # forward, backward, optimizer.step()
            run.log(loss=loss)
        run.log_epoch(val_loss=val_loss, val_acc=val_acc)

``run.batches`` is where babysit acts: between two batches it applies pending commands, waits
while paused, and ends the epoch early for a rollback or a stop. ``run.epochs`` checkpoints at the
end of every epoch, restores a rollback's checkpoint and starts its branch, and resumes from the
latest checkpoint when the run directory already holds one.
"""

from __future__ import annotations

import atexit
import collections
import fcntl
import json
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from . import commands as cmd
from . import optim
from .checkpoint import (
    KEY_BRANCH, KEY_CONFIG, KEY_EPOCH, KEY_EPOCH_START_RNG, KEY_FORMAT, KEY_HPARAMS, KEY_LAST_COMMAND, KEY_METRICS,
    KEY_MODEL, KEY_OPTIMIZER, KEY_RNG, KEY_SCHEDULER, KEY_STEP, KEY_STEP_IN_EPOCH, FORMAT,
    AsyncCheckpointer, CheckpointError, PendingCheckpoint, checkpoint_filename, clone_tree, disk_full_error,
    read_verified, remove_stale_temps, rng_state, set_rng_state,
)
from .guard import Divergence, DivergenceGuard, GuardConfig
from .store import (
    CRASHED, FINISHED, LOCK_NAME, PAUSED, PER_EPOCH, PER_STEP, RUNNING, STOPPED, CommandSignal, RunStore,
)
from .writer import MetricsWriter, to_float

# A command that waited this long for a trainer (one that died before applying it) is expired
# rather than applied out of the blue when a trainer next starts.
PENDING_COMMAND_TTL_S = 600.0
EPOCH_DONE = "epoch"


class RunLockedError(RuntimeError):
    """Another trainer owns this run directory."""


class Run:
    """Babysit one training run in ``run_dir`` (created if new, resumed if it holds checkpoints).

    Args:
        run_dir: the run directory (for example ``checkpoints/my-run``).
        model, optimizer, scheduler: what is checkpointed, restored and nudged.
        config: the run's settings (JSON-serialisable); stored in every checkpoint.
        guard: divergence guard settings (``GuardConfig(enabled=False)`` turns it off).
        keep_last: keep only the newest N checkpoints (those a branch started from are kept too);
            ``None`` keeps them all.
        flush_interval: seconds between writes of logged values (and heartbeats) to the store.
        items_per_step, item_unit: what one step trains on, for the throughput shown (for example
            ``batch_size * seq_len`` "tokens"); ``None``: the loader's ``batch_size`` "samples".
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        config: dict[str, Any] | None = None,
        guard: GuardConfig | None = None,
        keep_last: int | None = None,
        flush_interval: float = 0.25,
        items_per_step: int | None = None,
        item_unit: str = "samples",
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a whole number >= 1 or None, got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = dict(config or {})
        json.dumps(self.config)  # fail now, not at the first checkpoint
        self.keep_last = keep_last
        self.items_per_step = items_per_step  # throughput: what one step trains on (e.g. tokens)
        self.item_unit = item_unit
        self.guard_config = guard or GuardConfig()

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = _acquire_run_lock(self.run_dir)
        self.store = RunStore(self.run_dir, create=True)
        remove_stale_temps(self.run_dir)
        self.signal = CommandSignal(self.store.signal_path)

        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.steps_per_epoch: int | None = None
        self.max_epochs: int | None = None
        self.branch = 0
        self.state = RUNNING
        self.message = ""
        self._next_epoch = 1
        self._skip_batches = 0
        self._rng_after_skip: dict[str, Any] | None = None
        self._epoch_start_rng: dict[str, Any] | None = None
        self._rng_at_epoch_end: dict[str, Any] | None = None
        self._snapshot_rng: dict[str, Any] | None = None
        self._epoch_metrics: dict[str, float] = {}
        self._interrupt: str | None = None      # "rollback" or "stop": end the epoch now
        self._rollback: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None = None
        self._stop_command: dict[str, Any] | None = None
        self._stop_reason: str | None = None     # request_stop(): a signal, not a queued command
        self._replay: list[dict[str, Any]] = []
        self._last_command_id = 0                # the last command handled (see KEY_LAST_COMMAND)
        self._resumed_last_command: int | None = 0  # the resumed checkpoint's; None if it has none
        self._wake = True                        # look at the queue before the first batch
        self._closed = False
        self._remedies_used = 0
        self._read_momentum = _momentum_reader(optimizer)
        self._lr_seen: float | None = None
        self._momentum_seen: float | None = None

        self._guard = DivergenceGuard(self.guard_config)
        queue: collections.deque[Any] = collections.deque()
        self._log = queue.append  # the training thread's share of storing a value: one append
        self._restore_on_start()
        self.writer = MetricsWriter(
            self.store, queue=queue, status=self._status_fields, guard=self._guard,
            on_divergence=self._on_divergence, on_tick=self._on_tick, interval=flush_interval,
        )
        self.checkpointer = AsyncCheckpointer(self._checkpoint_written, self._checkpoint_failed)
        atexit.register(self._at_exit)

    # -- the loop API ------------------------------------------------------------------------
    def epochs(self, max_epochs: int) -> Iterator[int]:
        """Yield epoch numbers (1-based) up to ``max_epochs``, checkpointing after each one.

        Starts after the latest checkpoint when resuming; after a rollback, continues from the
        restored checkpoint's epoch on a new branch.
        """
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(f"max_epochs must be a whole number >= 1, got {max_epochs!r}")
        self.max_epochs = max_epochs
        while self._interrupt != "stop" and self._next_epoch <= max_epochs:
            if self._stop_reason is not None:
                self._interrupt = "stop"
                break
            self.epoch = self._next_epoch
            if self._skip_batches == 0:
                self.step_in_epoch = 0
                # Nothing draws a random number between an epoch's checkpoint and the next epoch:
                # its RNG state is this epoch's start (and reading it again would wait for the GIL
                # while the checkpoint thread holds it).
                self._epoch_start_rng = self._rng_at_epoch_end or rng_state()
                self._rng_at_epoch_end = None
            self._epoch_metrics = {}
            yield self.epoch
            if self._interrupt == "rollback":
                self._finish_rollback()
                continue
            if self._interrupt == "stop":
                break
            self._end_epoch()
        if self._interrupt == "stop":
            self._finish_stop()
        else:
            self._finish(FINISHED, f"finished {max_epochs} epochs")

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches of ``loader``; between two batches, apply pending commands.

        Ends early when a rollback or a stop is applied (the rest of the epoch is not trained).
        """
        try:
            self.steps_per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            self.steps_per_epoch = None
        iterator = iter(loader)
        if self._skip_batches:
            # Resuming inside an epoch: the loader was created under the epoch's starting RNG
            # (so it shuffles as before); skip what was trained, then restore the RNG as it was.
            for _ in range(self._skip_batches):
                next(iterator)
            self._skip_batches = 0
            if self._rng_after_skip is not None:
                set_rng_state(self._rng_after_skip)
                self._rng_after_skip = None
        self._boundary()
        if self._interrupt:
            return
        signal = self.signal
        for batch in iterator:
            self.step += 1
            self.step_in_epoch += 1
            yield batch
            # The step is done: this is a step boundary.
            if self._wake or signal.changed() or self._replay:
                self._boundary()
            group = self.optimizer.param_groups[0]
            if group["lr"] != self._lr_seen or self._read_momentum(group) != self._momentum_seen:
                self._record_hparams()
            if self._interrupt:
                return

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
        self._log((PER_STEP, self.branch, self.step, _wall_clock(), metrics))

    def log_epoch(self, **metrics: Any) -> None:
        """Record per-epoch values (validation loss, accuracy); they are saved in the checkpoint."""
        if self._interrupt:
            return  # the epoch was cut short by a rollback or a stop; its evaluation is not kept
        values = {name: to_float(value) for name, value in metrics.items()}
        self._epoch_metrics.update(values)
        self._log((PER_EPOCH, self.branch, self.step, time.time(), values))

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    def request_stop(self, reason: str = "requested") -> None:
        """Stop at the next step boundary with a final checkpoint (safe in a signal handler)."""
        self._stop_reason = reason
        self._wake = True

    @property
    def hparams(self) -> dict[str, float | None]:
        """The lr and momentum the optimizer uses now."""
        return optim.read_hparams(self.optimizer)

    def checkpoint_now(self, reason: str = "command") -> PendingCheckpoint:
        """Snapshot now (mid-epoch if need be) and write it in the background."""
        return self._snapshot(reason)

    def close(self) -> None:
        """Flush, wait for checkpoint writes and release the run directory."""
        if self._closed:
            return
        self._closed = True
        self.checkpointer.close()
        self.writer.close()
        if self.state in (RUNNING, PAUSED):
            self.state = STOPPED
            self.message = self.message or "the training script ended"
        self.store.write_status(**self._status_fields(), heartbeat=time.time())
        self.signal.close()
        self._lock_file.close()
        atexit.unregister(self._at_exit)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not self._closed:
            if isinstance(exc, KeyboardInterrupt):
                self.state, self.message = STOPPED, "interrupted (Ctrl-C); resumes from the latest checkpoint"
            else:
                self.state = CRASHED
                self.message = f"{type(exc).__name__}: {exc}"[:500]
                self.store.add_event("error", self.message, branch=self.branch, step=self.step, epoch=self.epoch,
                                     data={"traceback": "".join(traceback.format_exception(exc))[-4000:]})
        self.close()

    # -- start and resume ---------------------------------------------------------------------
    def _restore_on_start(self) -> None:
        status = self.store.status()
        branch_id = status.get("branch")
        branch = self.store.branch(branch_id) if branch_id else None
        if branch is None:
            self.branch = self.store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
            self._record_hparams(force=True)
            self._initial_status("started")
            self.store.add_event("start", "run started", branch=self.branch, step=0, epoch=0,
                                 data={"config": self.config})
            self._expire_stale_commands()
            return
        self.branch = branch["id"]
        latest = [c for c in self.store.checkpoints() if c["branch"] == self.branch]
        clean = status.get("state") in (STOPPED, FINISHED)
        resumed_from = None
        for candidate in reversed(latest):
            try:
                state = read_verified(self.run_dir / candidate["file"], candidate["sha256"])
            except CheckpointError as error:
                self.store.add_event("checkpoint_refused", str(error), branch=self.branch,
                                     data={"checkpoint": candidate["id"]})
                continue
            self._load_state(state, candidate)
            self._resume_commands(state)
            resumed_from = candidate
            break
        if resumed_from is None and branch["from_checkpoint"]:
            origin = self.store.checkpoint(branch["from_checkpoint"])
            if origin is not None:
                state = read_verified(self.run_dir / origin["file"], origin["sha256"])
                self._load_state(state, origin)
                optim.restore_hparams(self.optimizer, branch["hparams"], self.scheduler)
                self._resume_commands(state)
                resumed_from = origin
        resume_step = resumed_from["step"] if resumed_from else 0
        moved = self.store.supersede_after(self.branch, resume_step)
        scale = self.store.starting_mean(self.guard_config.metric)
        if scale is not None:  # the guard judges a rise against the loss the run started from
            self._guard.remember_scale(scale)
        self._record_hparams(force=True)
        self._replay = [
            c for c in self.store.applied_commands_after(self.branch, resume_step, self._resumed_last_command)
            if c["kind"] in (cmd.SET_LR, cmd.SET_MOMENTUM)
        ]
        where = (f"checkpoint #{resumed_from['id']} (epoch {resumed_from['epoch']}, step {resume_step})"
                 if resumed_from else "the start (no checkpoint yet)")
        how = "after a clean stop" if clean else "after the trainer died"
        message = f"resumed from {where} {how}"
        if moved:
            message += f"; {moved} values logged after that step are marked superseded"
        if self._replay:
            message += f"; {len(self._replay)} applied nudges will be re-applied at their steps"
        self._initial_status(message)
        self.store.add_event("resume", message, branch=self.branch, step=resume_step, epoch=self.epoch,
                             data={"checkpoint": resumed_from["id"] if resumed_from else None, "superseded": moved})
        self._warn_config_change(resumed_from)
        self._expire_stale_commands()

    def _initial_status(self, message: str) -> None:
        self.message = message
        self.store.write_status(
            **self._status_fields(), pid=os.getpid(), host=socket.gethostname(), started=time.time(),
            heartbeat=time.time(), optimizer=type(self.optimizer).__name__,
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
        now = time.time()
        for pending in self.store.pending_commands():
            if now - pending["created"] > PENDING_COMMAND_TTL_S:
                self.store.finish_command(
                    pending["id"], cmd.EXPIRED, branch=self.branch, step=self.step,
                    reason=f"no trainer applied it within {PENDING_COMMAND_TTL_S:.0f} s; send it again",
                )

    def _resume_commands(self, state: dict[str, Any]) -> None:
        """Pick up command handling from a checkpoint being resumed."""
        recorded = state.get(KEY_LAST_COMMAND)
        self._resumed_last_command = None if recorded is None else int(recorded)
        # A checkpoint written before checkpoints recorded this: count every command handled so
        # far as seen, so later checkpoints record a true bound (replays still waiting are found
        # by their step, which is past any checkpoint taken before they happen).
        self._last_command_id = (self._resumed_last_command if recorded is not None
                                 else self.store.last_handled_command_id())

    def _load_state(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Put a verified checkpoint's state into the model, optimizer, scheduler, RNGs and counters."""
        self.model.load_state_dict(state[KEY_MODEL])
        self.optimizer.load_state_dict(state[KEY_OPTIMIZER])
        if self.scheduler is not None and state.get(KEY_SCHEDULER) is not None:
            self.scheduler.load_state_dict(state[KEY_SCHEDULER])
        self.step = int(state[KEY_STEP])
        epoch_done = record["reason"] == EPOCH_DONE
        if epoch_done:
            self._next_epoch = int(state[KEY_EPOCH]) + 1
            self.epoch = int(state[KEY_EPOCH])
            self.step_in_epoch = 0
            self._skip_batches = 0
            set_rng_state(state[KEY_RNG])
        else:
            self._next_epoch = self.epoch = int(state[KEY_EPOCH])
            self.step_in_epoch = int(state[KEY_STEP_IN_EPOCH])
            self._skip_batches = self.step_in_epoch
            self._epoch_start_rng = state[KEY_EPOCH_START_RNG]
            set_rng_state(state[KEY_EPOCH_START_RNG])
            self._rng_after_skip = state[KEY_RNG]
        self._guard.reset()

    # -- step boundary -----------------------------------------------------------------------
    def _boundary(self) -> None:
        """Apply what is due at this step boundary: replays, then queued commands, then a pause."""
        self._wake = False
        if self._stop_reason is not None:
            self._interrupt = "stop"
            return
        while self._replay and self._replay[0]["step"] <= self.step:
            self._replay_command(self._replay.pop(0))
        self.signal.mark_seen()
        for pending in self.store.pending_commands():
            self._apply(pending)
            if self._interrupt:
                return
        if self.state == PAUSED:
            self._wait_while_paused()

    def _wait_while_paused(self) -> None:
        self.writer.wake()
        while self.state == PAUSED and not self._interrupt:
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not self.signal.changed() and not self._wake:
                time.sleep(0.005)
            self._wake = False
            if self._stop_reason is not None:
                self._interrupt = "stop"
                break
            self.signal.mark_seen()
            for pending in self.store.pending_commands():
                self._apply(pending)
                if self._interrupt:
                    break
        self.writer.wake()

    def _apply(self, pending: dict[str, Any]) -> None:
        """Check a queued command again and apply it; record what it changed or why not."""
        command_id = pending["id"]
        self._last_command_id = max(self._last_command_id, command_id)
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
            self._record_hparams()
            return {"before": before["lr"], "after": after}
        if command.kind == cmd.SET_MOMENTUM:
            after = optim.set_momentum(self.optimizer, command.args["value"])
            self._record_hparams()
            result: dict[str, Any] = {"before": before["momentum"], "after": after}
            if optim.cycles_momentum(self.scheduler):
                result["warning"] = (f"{type(self.scheduler).__name__} cycles momentum and will overwrite this "
                                     "at its next step (the chart shows what it sets)")
            return result
        if command.kind == cmd.PAUSE:
            if self.state == PAUSED:
                raise cmd.CommandError("the run is already paused")
            why = command.args.get("reason") or f"by {pending['source']}"
            self.state, self.message = PAUSED, f"paused at step {self.step}: {why}"
            return {"state": PAUSED}
        if command.kind == cmd.RESUME:
            if self.state != PAUSED:
                raise cmd.CommandError(f"the run is not paused (it is {self.state}); nothing to resume")
            self.state, self.message = RUNNING, f"resumed at step {self.step}"
            self._guard.reset()
            return {"state": RUNNING}
        if command.kind == cmd.CHECKPOINT:
            job = self._snapshot("command")
            job.meta["command"] = pending["id"]
            return None
        if command.kind == cmd.STOP:
            self._stop_command = pending
            self._interrupt = "stop"
            return None
        if command.kind == cmd.ROLLBACK:
            record = self.store.checkpoint(command.args["checkpoint"], must_exist=True)
            assert record is not None
            state = read_verified(self.run_dir / record["file"], record["sha256"])
            self._rollback = (pending, record, state)
            self._interrupt = "rollback"
            return None
        raise cmd.CommandError(f"unknown command {command.kind!r}")

    def _replay_command(self, applied: dict[str, Any]) -> None:
        self._last_command_id = max(self._last_command_id, applied["id"])
        value = applied["args"]["value"]
        if applied["kind"] == cmd.SET_LR:
            optim.set_lr(self.optimizer, value, self.scheduler)
        else:
            optim.set_momentum(self.optimizer, value)
        self._record_hparams()

    def _record_hparams(self, force: bool = False) -> None:
        """Log lr and momentum where they changed (a nudge, a scheduler, a restore), so the chart
        shows what the optimizer uses; ``force`` logs both (the start of a branch)."""
        group = self.optimizer.param_groups[0]
        lr, momentum = group["lr"], self._read_momentum(group)
        values = {}
        if force or lr != self._lr_seen:
            values["lr"] = lr
        if momentum is not None and (force or momentum != self._momentum_seen):
            values["momentum"] = momentum
        self._lr_seen, self._momentum_seen = lr, momentum
        if values:
            self._log((PER_STEP, self.branch, self.step, time.time(), values))

    # -- epoch end, rollback, stop -----------------------------------------------------------
    def _end_epoch(self) -> None:
        self._snapshot(EPOCH_DONE)  # the epoch's end is recorded by the writer thread too
        self._rng_at_epoch_end = self._snapshot_rng
        self._next_epoch = self.epoch + 1

    def _snapshot(self, reason: str) -> PendingCheckpoint:
        hparams = self.hparams
        self._snapshot_rng = rng_state()
        state = {
            KEY_FORMAT: FORMAT,
            KEY_MODEL: clone_tree(self.model.state_dict()),
            KEY_OPTIMIZER: clone_tree(self.optimizer.state_dict()),
            KEY_SCHEDULER: clone_tree(self.scheduler.state_dict()) if self.scheduler is not None else None,
            KEY_RNG: self._snapshot_rng,
            KEY_EPOCH_START_RNG: self._epoch_start_rng if self._epoch_start_rng is not None else rng_state(),
            KEY_EPOCH: self.epoch, KEY_STEP: self.step, KEY_STEP_IN_EPOCH: self.step_in_epoch,
            KEY_BRANCH: self.branch, KEY_HPARAMS: hparams, KEY_CONFIG: self.config,
            KEY_METRICS: dict(self._epoch_metrics), KEY_LAST_COMMAND: self._last_command_id,
        }
        meta = {"branch": self.branch, "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                "hparams": hparams, "metrics": dict(self._epoch_metrics), "reason": reason}
        path = self.run_dir / checkpoint_filename(self.branch, self.epoch, self.step)
        return self.checkpointer.submit(PendingCheckpoint(path=path, state=state, meta=meta))

    def _checkpoint_written(self, job: PendingCheckpoint) -> None:
        meta, result = job.meta, job.result or {}
        # Everything logged up to the checkpoint's step must be stored before it is listed: a
        # trainer killed right after would resume from it, and never log those steps again.
        self.writer.flush()
        with self.store.transaction():
            self._record_epoch_end(meta)
            checkpoint_id = self.store.add_checkpoint(
                branch=meta["branch"], epoch=meta["epoch"], step=meta["step"], step_in_epoch=meta["step_in_epoch"],
                file=job.path.name, sha256=result["sha256"], size=result["size"], hparams=meta["hparams"],
                metrics=meta["metrics"], reason=meta["reason"],
            )
            meta["id"] = checkpoint_id
            if "command" in meta:
                self.store.finish_command(meta["command"], cmd.APPLIED, branch=meta["branch"], step=meta["step"],
                                          result={"checkpoint": checkpoint_id})
        self._apply_retention()

    def _record_epoch_end(self, meta: dict[str, Any]) -> None:
        if meta["reason"] == EPOCH_DONE:
            self.store.add_epoch(meta["branch"], meta["epoch"], meta["step"])

    def _checkpoint_failed(self, job: PendingCheckpoint) -> None:
        error = job.error
        meta = job.meta
        self._record_epoch_end(meta)
        full = disk_full_error(error)
        if full is not None:
            message = (f"checkpoint at step {meta['step']} not written: the disk holding {self.run_dir} is full "
                       f"({os.strerror(full.errno)}); earlier checkpoints are intact; the run is paused: free some "
                       "space, then resume")
            reason = "the disk is full, no checkpoint could be written"
        else:
            message = f"checkpoint at step {meta['step']} not written: {error}"
            reason = "a checkpoint could not be written"
        self.store.add_event("checkpoint_failed", message, branch=meta["branch"], step=meta["step"],
                             epoch=meta["epoch"])
        if "command" in meta:
            self.store.finish_command(meta["command"], cmd.REJECTED, branch=meta["branch"], step=meta["step"],
                                      reason=message)
        if not self._closed:
            self.store.enqueue_command(cmd.PAUSE, {"reason": reason}, source="guard", require_live=False)

    def _apply_retention(self) -> None:
        if self.keep_last is None:
            return
        keep_origins = {b["from_checkpoint"] for b in self.store.branches() if b["from_checkpoint"]}
        listed = self.store.checkpoints()
        for old in listed[: max(0, len(listed) - self.keep_last)]:
            if old["id"] in keep_origins:
                continue
            (self.run_dir / old["file"]).unlink(missing_ok=True)
            self.store.mark_checkpoint_deleted(old["id"])

    def _finish_rollback(self) -> None:
        assert self._rollback is not None
        pending, record, state = self._rollback
        self._rollback = None
        self._interrupt = None
        self._replay = []  # nudges of the old branch still waiting to be replayed stay there
        command = cmd.validate(pending["kind"], pending["args"])
        before = self.hparams
        old_branch, old_step = self.branch, self.step
        self._load_state(state, record)
        if command.args["hparams"] == cmd.HPARAMS_CURRENT:
            optim.restore_hparams(self.optimizer, before, self.scheduler)
        overrides = {k: command.args[k] for k in ("lr", "momentum") if k in command.args}
        optim.restore_hparams(self.optimizer, overrides, self.scheduler)
        after = self.hparams
        self.state = RUNNING
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
        self._record_hparams(force=True)

    def _finish_stop(self) -> None:
        job = self._snapshot("stop")
        self.checkpointer.wait()
        pending = self._stop_command
        if pending is not None:
            if job.error is None:
                self.store.finish_command(pending["id"], cmd.APPLIED, branch=self.branch, step=self.step,
                                          result={"checkpoint": job.meta.get("id")})
            else:
                self.store.finish_command(pending["id"], cmd.APPLIED, branch=self.branch, step=self.step,
                                          result={"checkpoint": None, "warning": str(job.error)})
        self._finish(STOPPED, f"stopped at step {self.step} with a final checkpoint")

    def _finish(self, state: str, message: str) -> None:
        self.checkpointer.wait()
        self.state, self.message = state, message
        self.store.add_event(state, message, branch=self.branch, step=self.step, epoch=self.epoch)
        self.close()

    # -- writer-thread callbacks --------------------------------------------------------------
    def _status_fields(self) -> dict[str, Any]:
        hparams = optim.read_hparams(self.optimizer)
        return {
            "state": self.state, "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch, "max_epochs": self.max_epochs, "branch": self.branch,
            "lr": hparams["lr"], "momentum": hparams["momentum"], "message": self.message,
        }

    def _on_tick(self) -> None:
        # A fallback for the signal file (a missed write, a filesystem without shared mmap).
        if not self._wake and self.store.conn().execute(
            "SELECT 1 FROM commands WHERE state = ? LIMIT 1", (cmd.PENDING,)
        ).fetchone():
            self._wake = True

    def _on_divergence(self, found: Divergence, branch: int) -> None:
        if branch != self.branch:
            return
        if self._closed:  # found in the last values of a run that has ended: nothing to pause
            self.store.add_event("divergence", f"divergence: {found.describe()} (after the run ended)",
                                 branch=branch, step=found.step, data=found.as_dict())
            return
        healthy = self._last_healthy_checkpoint(found.step)
        lr = self.hparams["lr"] or 0.0
        data = {**found.as_dict(), "checkpoint": healthy["id"] if healthy else None, "suggested_lr": lr / 2}
        auto = self.guard_config.auto_remedy_max > self._remedies_used and healthy is not None
        if auto:
            self._remedies_used += 1
            message = (f"divergence: {found.describe()}; rolling back to checkpoint #{healthy['id']} with lr "
                       f"{lr / 2:g} (automatic remedy {self._remedies_used} of {self.guard_config.auto_remedy_max})")
            self.store.add_event("divergence", message, branch=branch, step=found.step, data=data)
            self.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": healthy["id"], "hparams": cmd.HPARAMS_CURRENT,
                                                      "lr": lr / 2}, source="guard", require_live=False)
        else:
            remedy = (f"; remedy: roll back to checkpoint #{healthy['id']} with lr {lr / 2:g}" if healthy
                      else "; no checkpoint to roll back to yet")
            self.store.add_event("divergence", f"divergence: {found.describe()}; run paused{remedy}",
                                 branch=branch, step=found.step, data=data)
            self.store.enqueue_command(cmd.PAUSE, {"reason": f"divergence: {found.describe()}"}, source="guard",
                                       require_live=False)
        self._wake = True

    def _last_healthy_checkpoint(self, before_step: int) -> dict[str, Any] | None:
        """The newest checkpoint on this branch's line of descent taken before ``before_step``."""
        lineage: dict[int, int] = {}
        branches = {b["id"]: b for b in self.store.branches()}
        branch_id, limit = self.branch, before_step
        while branch_id in branches:
            lineage[branch_id] = limit
            parent = branches[branch_id]
            origin = self.store.checkpoint(parent["from_checkpoint"]) if parent["from_checkpoint"] else None
            if parent["parent"] is None:
                break
            limit = origin["step"] if origin else parent["start_step"]
            branch_id = parent["parent"]
        candidates = [c for c in self.store.checkpoints()
                      if c["branch"] in lineage and c["step"] < lineage[c["branch"]]
                      and (self.run_dir / c["file"]).is_file()]
        return max(candidates, key=lambda c: (c["step"], c["id"])) if candidates else None

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


def _momentum_reader(optimizer: torch.optim.Optimizer) -> Any:
    key = optim.momentum_key(optimizer)
    if key == "betas":
        return lambda group: group["betas"][0]
    if key == "momentum":
        return lambda group: group["momentum"]
    return lambda group: None


def _acquire_run_lock(run_dir: Path) -> Any:
    """Hold an exclusive lock on the run directory for the life of this process."""
    handle = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RunLockedError(
            f"run directory {str(run_dir)!r} is already used by another trainer ({owner}); "
            f"stop it first (`python -m babysit stop --run-dir {run_dir}`) or use another --run-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle
