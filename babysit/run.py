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
travels in every checkpoint. The rooms around it: :mod:`babysit.resume` (starting, resuming,
loading a checkpoint), :mod:`babysit.command_runner` (applying queued commands, carrying out a
rollback or a stop), :mod:`babysit.position` (the counters and RNG states of an exact resume),
:mod:`babysit.snapshots` (the checkpoint policy), :mod:`babysit.ranks` (torch.distributed),
:mod:`babysit.journal_replay` (replaying a panda journal's settings).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import commands as cmd
from . import journal_replay, optim, ranks as ranks_module, user_state
from .checkpoint import PendingCheckpoint, remove_stale_temps
from .command_runner import Interrupt, PendingRollback, CommandRunner  # noqa: F401 (Interrupt is public here)
from .errors import RunLockedError, SettingsError  # noqa: F401 (RunLockedError, as before the error tree)
from .guard import DivergenceGuard, GuardConfig
from .hparam_watch import LOOP, HparamWatch
from .position import ResumePosition
from .remedy import DivergenceRemedy
from .resume import Resume
from .rundir import acquire_run_lock as _acquire_run_lock
from .signals import install_stop_handlers
from .snapshots import Snapshots
from .store import CRASHED, FINISHED, PAUSED, PER_EPOCH, PER_STEP, RUNNING, STOPPED, CommandSignal, RunStore
from .writer import MetricsWriter, to_float

log = logging.getLogger(__name__)

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
        evaluate: a function of no arguments returning a dict of numbers (a validation loss),
            called at each probe's end and at a probe set's fork, to rank the probes by it
            (see :mod:`babysit.excursion_runner`); the RNGs and train/eval modes are kept as they were.
        replay: a panda journal (its path, or the loaded dict; ``python -m babysit journal``): its
            lr and momentum settings are applied at their steps, as a person applied them.
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
        evaluate: Callable[[], dict[str, Any]] | None = None,
        replay: str | os.PathLike[str] | dict[str, Any] | None = None,
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise SettingsError(f"keep_last must be a whole number >= 1 or None, got {keep_last!r}")
        if items_per_step is not None and (not isinstance(items_per_step, int) or items_per_step < 1):
            raise SettingsError(f"items_per_step must be a whole number >= 1 or None, got {items_per_step!r}")
        if evaluate is not None and not callable(evaluate):
            raise SettingsError(f"evaluate must be a function returning a dict of numbers, got {evaluate!r}")
        if not isinstance(item_unit, str) or not item_unit.strip() or len(item_unit) > 20:
            raise SettingsError(f"item_unit must be a short word such as 'samples' or 'tokens', got {item_unit!r}")
        journal = None if replay is None else journal_replay.load(replay)  # refused before anything is created
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

        # Under torch.distributed, rank 0 leads (the run directory and the store are its own) and
        # the other ranks follow it (see babysit.ranks); a single process is its own leader.
        self._ranks = ranks_module.join()
        self._follows = self._ranks is not None and not self._ranks.leads
        if self._follows:
            self.store: RunStore = None  # type: ignore[assignment]
            self.signal: CommandSignal = None  # type: ignore[assignment]
        else:
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
        self._ended = False                       # finished or stopped: close once the ranks have met
        self._checkpoint_asked: str | None = None  # run.checkpoint_now() under torch.distributed
        self._restore_signals: Any = None
        self._hparams = HparamWatch(self)
        self._evaluate = evaluate
        self._excursion: Any = None                # the probe set or sweep in progress (excursion_runner)
        self._epoch_trained = False                # the epoch's batches are done: the loop is at its epoch's end
        self._excursions_refused: str | None = None  # why this run's driver cannot take one (a framework's)

        self._guard = DivergenceGuard(self.guard_config)
        self._resume = Resume(self)          # starting, resuming, loading a checkpoint
        self._commands = CommandRunner(self)  # applying what is queued
        if self._follows:  # rank 0 logs, checkpoints and answers commands for the whole job
            self._log: Any = lambda _item: None
            self.log = _log_nothing  # type: ignore[method-assign]  # not even the .item() of a value rank 0 keeps
            self._meet(self._resume.restore_on_start, ranks_module.START)
            atexit.register(self._at_exit)
            return
        self.snapshots = Snapshots(self)
        self.remedy = DivergenceRemedy(self)
        queue: collections.deque[Any] = collections.deque()
        self._log = queue.append  # the training thread's share of storing a value: one append
        self._meet(self._resume.restore_on_start, ranks_module.START)
        if journal is not None:
            journal_replay.begin(self, journal)
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
        """True while the current epoch is being cut short (a stop, a rollback, Ctrl-C), and at the
        end of an epoch a probe or sweep reached (its branch is thrown away): skip the epoch's
        evaluation, lr anneal and "save best" — what the loop runs now is not kept."""
        return self._interrupt is not None or (self._excursion is not None and self._epoch_trained)

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
        if not self._follows:
            self._hparams.record(by=LOOP)

    @property
    def momentum(self) -> float | None:
        return optim.read_hparams(self.optimizer)["momentum"]

    @momentum.setter
    def momentum(self, value: float) -> None:
        optim.set_momentum(self.optimizer, cmd.validate_momentum(value))
        if not self._follows:
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
            raise SettingsError(f"max_epochs must be a whole number >= 1, got {max_epochs!r}")
        self.max_epochs = max_epochs
        restore_signals = None if self._restore_signals else self._install_signals()
        try:
            while self.position.next_epoch <= max_epochs:
                if self.stop_if_requested():  # Ctrl-C or request_stop() between two epochs
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
        self._epoch_trained = False
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
        return bool(self._meet(self._end_epoch_here, ranks_module.EPOCH_END))

    def _end_epoch_here(self) -> bool:
        if self._interrupt is Interrupt.ROLLBACK:
            self._commands.finish_rollback()
            return True
        if self._interrupt is Interrupt.STOP:
            self._commands.finish_stop()
            return False
        if self._interrupt is Interrupt.EXCURSION:
            self._excursion.transition()
            return True
        if self._excursion is not None:  # an epoch's end inside a probe: no checkpoint on its branch
            self._excursion.epoch_end()
            return True
        self.snapshots.end_epoch()
        self._checkpoint_asked = None  # a run.checkpoint_now() still waiting: the epoch's checkpoint answers it
        self._tell("epoch_end")
        return True

    def finish(self) -> None:
        """The loop trained all its epochs: the run is finished (the last epoch's checkpoint is its end)."""
        message = f"finished {self.max_epochs} epochs" if self.max_epochs else f"finished at step {self.step}"
        self._meet(lambda: self._finish(FINISHED, message), ranks_module.FINISH)

    # -- together with the other ranks (see babysit.ranks) ------------------------------------
    def _meet(self, body: Any, point: int | None = None) -> Any:
        """Run ``body`` here, or, under torch.distributed, on the leader while the followers
        carry out what it tells them (at ``point``, see babysit.ranks)."""
        result = body() if self._ranks is None else self._ranks.meet(self, body, point)
        if self._ended and not self._closed:
            self.close()
        return result

    def _tell(self, *op: Any) -> None:
        if self._ranks is not None:
            self._ranks.tell(*op)

    def _sync_ranks(self) -> None:
        """A sync step: every rank learns whether the leader had commands to apply at the last
        sync (and whether a follower got a stop signal); if so, they apply them together, at this
        step (see babysit.ranks: the exchange is read one step after it is posted)."""
        ranks = self._ranks
        assert ranks is not None
        step, replay = self.position.step, self._replay
        replay_due = bool(replay) and replay[0]["step"] <= step + 1  # due by the step this sync is acted on
        wants = ranks.leads and (self._wake or self.signal.changed() or replay_due)
        work, stop_asked = ranks.sync_step(step, work=wants, stop_asked=self._stop_reason is not None,
                                           due_at=replay[0]["step"] if replay else None)
        if stop_asked and ranks.leads and self._stop_reason is None:
            self.request_stop("a stop asked on another rank")
        if work or stop_asked:
            self._meet(self._commands.apply_due)

    def _stop_between_epochs(self) -> bool:
        """Ctrl-C, request_stop() or a stop deferred to the epoch's end: stop now; True if so."""
        if self._stop_reason is None:
            return False
        self._interrupt = Interrupt.STOP
        self._commands.finish_stop()
        return True

    def stop_if_requested(self) -> bool:
        """Between two epochs: carry out a stop that waited for the last epoch's end (a stop command
        at its last boundary, Ctrl-C, ``request_stop()``): final checkpoint, the run ends. True if it did."""
        return bool(self._meet(self._stop_between_epochs, ranks_module.BETWEEN_EPOCHS))

    def _left_epochs(self) -> None:
        """The loop broke out of ``run.epochs`` (or an error did): say so, write nothing — the
        state at a break is whatever the loop left, and after an error it may be half a step.
        ``run.request_stop()`` is the way to stop early with a final checkpoint."""
        if self._closed or self._interrupt is not None or self._follows:
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
        boundary = self.step_boundary
        for batch in iterator:
            position.step += 1  # begin_step(), inlined: this loop is the per-step path
            position.step_in_epoch += 1
            yield batch
            if boundary() is not None:  # the step is done: this is a step boundary
                return
        self._epoch_trained = True

    def step_boundary(self) -> Interrupt | None:
        """Apply what is due between two steps: replays, queued commands, a pause; record an lr or
        momentum the loop or its scheduler changed. Returns the interrupt (stop, rollback) that
        now cuts the epoch short, if any. Cheap when nothing is due (a flag and a memory read).

        The caller counts its steps in ``run.position`` first (``run.batches`` does); once it
        returns an interrupt, the caller leaves the epoch: nothing more is applied until then."""
        if self._interrupt is not None:
            return self._interrupt
        if self._ranks is None:
            signal = self.signal  # CommandSignal.changed(), inlined: this runs every step
            if self._wake or signal.word[:8] != signal.seen or (self._replay and self._commands.replay_due()):
                self._commands.apply_due()
        else:
            if self.position.step >= self._ranks.next_sync:
                self._sync_ranks()
            if self._follows:
                return self._interrupt
        if self._excursion is not None and self._interrupt is None:
            self._excursion.at_boundary()
        watch = self._hparams  # did the loop or its scheduler change the lr or momentum? (HparamWatch.seen)
        group = self.optimizer.param_groups[0]
        if group["lr"] != watch.lr or group.get(watch.key) != watch.seen:
            watch.record(by=watch.source())
        return self._interrupt

    def log(self, **metrics: Any) -> None:
        """Record per-step values (numbers or one-element tensors) at the current step.

        A CPU tensor is read at once (``.item()``, well under a microsecond); a GPU tensor is read
        on the writer thread, so logging a GPU loss does not wait for the GPU (do not change it in
        place afterwards). Either way no autograd graph is kept alive.
        """
        for name, value in metrics.items():  # one pass, no call: this runs every step
            if type(value) is _TENSOR:
                # CPU tensors become floats now (cheaper than keeping them, and their graphs,
                # alive); GPU tensors are detached and read later on the writer thread, no sync.
                metrics[name] = value.detach() if value.is_cuda else value.item()
        self._log((PER_STEP, self.branch, self.position.step, _wall_clock(), metrics))

    def log_epoch(self, **metrics: Any) -> None:
        """Record per-epoch values (validation loss, accuracy); they are saved in the checkpoint.
        Ignored while ``run.interrupted``: an evaluation after a cut, or on a probe's branch, is not kept."""
        if self.interrupted:
            return
        values = {name: to_float(value) for name, value in metrics.items()}
        self._epoch_metrics.update(values)
        self._log((PER_EPOCH, self.branch, self.position.step, time.time(), values))

    def request_stop(self, reason: str = "requested") -> None:
        """Stop at the next step boundary with a final checkpoint (safe in a signal handler)."""
        self._stop_reason = reason
        self._wake = True

    def checkpoint_now(self, reason: str = "command") -> PendingCheckpoint | None:
        """Snapshot now (mid-epoch if need be) and write it in the background. Under
        torch.distributed, the ranks take it together at their next meeting (within
        ``babysit.ranks.MAX_INTERVAL`` steps, or the epoch's own checkpoint at its end), whichever
        ranks call it (rank 0 only is fine); it returns None then."""
        if self._ranks is None:
            return self.snapshots.take(reason)
        if not self._follows:
            self._checkpoint_asked, self._wake = reason, True
        return None

    @property
    def checkpointer(self) -> Any:
        return None if self._follows else self.snapshots.writer

    def close(self) -> None:
        """Flush, wait for checkpoint writes and release the run directory."""
        if self._closed:
            return
        self._closed = True
        if self._ranks is not None:
            self._ranks.leave()
        if self._follows:
            self._release_signals()
            return
        self.snapshots.close()
        self.writer.close()
        if self.status in (RUNNING, PAUSED):
            self.status = STOPPED
            self.message = self.message or f"the training script ended at step {self.step} (not at a checkpoint)"
        self.store.write_status(**self._status_fields(), heartbeat=time.time())
        self.signal.close()
        self._lock_file.close()
        self._release_signals()

    def _release_signals(self) -> None:
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None
        atexit.unregister(self._at_exit)

    def __enter__(self) -> "Run":
        self._restore_signals = self._install_signals()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not self._closed and not self._follows:
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

    # -- step boundary -----------------------------------------------------------------------

    def _at_last_boundary(self) -> bool:
        """After the epoch's last batch: a cut here would leave an epoch with nothing to train but
        its end (evaluation, anneal) still to run; a stop or a checkpoint waits for that end."""
        return self.steps_per_epoch is not None and self.position.step_in_epoch >= self.steps_per_epoch

    # -- rollback and stop, as the loop leaves the epoch ---------------------------------------

    def _finish(self, status: str, message: str) -> None:
        self.snapshots.answer_waiting()
        self.status, self.message = status, message
        self.store.add_event(status, message, branch=self.branch, step=self.step, epoch=self.epoch)
        self._ended = True  # closed as the meeting ends (see _meet): every rank, after its last collective

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
        if not self._wake and self.store.has_pending_commands():
            self._wake = True

    def _at_exit(self) -> None:
        try:
            self.close()
        except Exception:  # the interpreter is exiting: say why the last status may be missing
            log.exception("babysit: closing the run in %s at exit failed; its status may say 'not responding' "
                          "(the checkpoints already listed are intact)", self.run_dir)


def _log_nothing(**_metrics: Any) -> None:
    """``run.log`` on a follower rank: rank 0 logs for the whole job."""


# Bound once: run.log runs every step, and module attribute lookups add up there.
_TENSOR = torch.Tensor
_wall_clock = time.time


def _optimizer_or_loop_hparams(optimizer: Any, lr: float | None, momentum: float | None) -> Any:
    if optimizer is not None:
        if lr is not None or momentum is not None:
            raise SettingsError("give either an optimizer or lr= (and momentum=) for hand-written updates, not both: "
                             "with an optimizer, babysit nudges the lr in its param_groups")
        if not getattr(optimizer, "param_groups", None):
            raise SettingsError(f"optimizer must be a torch optimizer (with param_groups), got {type(optimizer).__name__}; "
                             "a loop that updates its parameters by hand passes lr= instead and reads run.lr")
        return optimizer
    if lr is None:
        raise SettingsError("Run needs an optimizer, or lr= for a loop that updates its parameters by hand "
                         "(it reads run.lr every step, so nudges reach it)")
    return optim.LoopHparams(cmd.validate_lr(lr), None if momentum is None else cmd.validate_momentum(momentum))
