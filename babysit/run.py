"""The Run object a training loop uses: log, obey commands at step boundaries, checkpoint, roll back.

    with babysit.Run("checkpoints/my-run", model, optimizer) as run:
        for epoch in run.epochs(20):
            for x, y in run.batches(train_loader):
                ...                                    # forward, backward, optimizer.step()
                run.log(loss=loss)

``run.batches`` calls :meth:`Run.step_boundary` between two batches, the one place babysit acts
(the framework callbacks call it too); ``run.epochs`` checkpoints each epoch, carries out a rollback
or a stop as the loop leaves an epoch, and resumes from the latest checkpoint. ``Run`` is the
facade: it builds the parts and hands each the narrow things it needs. The lifecycle is
:mod:`babysit.control`; docs/layout.md maps the other rooms.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import commands as cmd
from . import loader_skip, optim, ranks as ranks_module
from .checkpoint import PendingCheckpoint, remove_stale_temps
from .cadence import Cadence
from .command_runner import CommandRunner
from .control import Interrupt, RunControl
from .cuts import Cuts
from .errors import RunDirError, RunLockedError, SettingsError  # noqa: F401 (RunLockedError, as before the error tree)
from .excursion_runner import NOT_SHARDED, Excursions
from .guard import GuardConfig
from .guard_watch import WatchedGuards
from .hparam_watch import LOOP, HparamWatch
from .journal_replay import ReplayQueue
from .narrator import Narrator
from .position import ResumePosition
from .remedy import DivergenceRemedy
from .resume import Loader, Resume, let_go_after_failed_start
from .retention import RetentionPolicy
from .run_settings import check_run_settings
from .rundir import acquire_run_lock as _acquire_run_lock
from .rundir import usable_run_dir
from .sharded_writer import ShardedCheckpointer
from .signals import install_stop_handlers
from .snapshots import Snapshots
from .store import FINISHED, PER_EPOCH, PER_STEP, CommandSignal, RunStore
from .trainables import Trainables
from .writer import LogQueue, MetricsWriter, to_float

__all__ = ["Run", "Interrupt", "RunLockedError"]

log = logging.getLogger(__name__)


class Run:
    """Babysit one training run in ``run_dir`` (created if new, resumed if it holds checkpoints).

    Args:
        run_dir: the run directory (for example ``checkpoints/my-run``).
        model, optimizer, scheduler: what is checkpointed, restored and nudged. ``model`` may be a
            dict of networks (``{"D": netD, "G": netG}``, held as one ``nn.ModuleDict``).
        optimizers: several optimizers by name instead of ``optimizer`` (``{"D": optD, "G": optG}``),
            each checkpointed, restored and nudged by name (the first by default); ``scheduler`` is
            then the first's, or a dict of schedulers by the name of the optimizer each drives.
        lr, momentum: for a loop that updates its parameters by hand, without a torch optimizer:
            babysit holds them, the loop reads ``run.lr`` (and ``run.momentum``) every step.
        state: the loop's own state, kept in every checkpoint and restored with it: plain values
            (numbers, strings, tensors, None…) and objects with ``state_dict()/load_state_dict()``.
            Available as ``run.state``.
        config: the run's settings (JSON-serialisable); stored in every checkpoint.
        guard: divergence guard settings (``GuardConfig(enabled=False)`` turns it off).
        keep_last: keep only the newest N checkpoints of any kind (those a branch starts from, and
            those a probe set or sweep in progress needs, are kept too); ``None``: the default
            retention (every epoch's and every asked-for checkpoint kept, periodic ones thinned;
            see :mod:`babysit.retention` and docs/long-runs.md).
        retention: a :class:`babysit.RetentionPolicy` (thinning, a disk budget), instead of keep_last.
        checkpoint_every_steps, checkpoint_every_minutes: a periodic checkpoint every N steps (at the
            multiples of N) and/or every M minutes after the last one, besides each epoch's; each is
            an exact resume point inside its epoch and a rollback target (see :mod:`babysit.cadence`).
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
        model: torch.nn.Module | dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        momentum: float | None = None,
        state: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        guard: GuardConfig | None = None,
        keep_last: int | None = None,
        retention: RetentionPolicy | None = None,
        checkpoint_every_steps: int | None = None,
        checkpoint_every_minutes: float | None = None,
        flush_interval: float = 0.25,
        items_per_step: int | None = None,
        item_unit: str = "samples",
        evaluate: Callable[[], dict[str, Any]] | None = None,
        replay: str | os.PathLike[str] | dict[str, Any] | None = None,
    ) -> None:
        settings = check_run_settings(
            run_dir, model, optimizer, optimizers=optimizers, lr=lr, momentum=momentum, config=config,
            keep_last=keep_last, retention=retention, checkpoint_every_steps=checkpoint_every_steps,
            checkpoint_every_minutes=checkpoint_every_minutes, items_per_step=items_per_step, item_unit=item_unit,
            evaluate=evaluate, replay=replay)
        self.run_dir = Path(run_dir)
        self.config = settings.config
        self.guard_config = guard or GuardConfig()
        self.items_per_step = items_per_step
        self.item_unit = settings.item_unit
        self.max_epochs: int | None = None
        self._restore_signals: Any = None
        # Checked (run.state's values) before anything is created.
        self.trainables = trainables = Trainables(settings.model, settings.optimizer, scheduler, state,
                                                 optimizers=settings.optimizers)

        # Under torch.distributed, rank 0 leads (the run directory and the store are its own) and
        # the other ranks follow it (see babysit.ranks); a single process is its own leader.
        ranks = self._ranks = ranks_module.join()
        follows = self._follows = ranks is not None and not ranks.leads
        self._said: set[str] = set()  # what _say_once has said
        if ranks is not None:  # every change of lr or momentum on the leader reaches the followers
            trainables.tell = ranks.tell
            trainables.shard_group = ranks.group  # a sharded checkpoint loads on every rank together
        self.control, self.position = RunControl(), ResumePosition()
        self._queue = LogQueue(keep=not follows)  # the training thread's share of storing a value
        self._guard = WatchedGuards(self.guard_config)
        if not follows:
            unusable = usable_run_dir(self.run_dir, must_exist=False)
            if unusable:
                raise RunDirError(unusable)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = _acquire_run_lock(self.run_dir)
        try:
            self._assemble(evaluate, settings.journal, flush_interval, settings.policy, settings.cadence)
        except BaseException as error:
            if not follows:  # a retry in this process (a notebook) must find the run directory free
                let_go_after_failed_start(self.run_dir, error, self._lock_file, getattr(self, "store", None),
                                          getattr(self, "signal", None), getattr(self, "writer", None),
                                          getattr(self, "snapshots", None))
            raise

    def _assemble(self, evaluate: Callable[[], dict[str, Any]] | None, journal: dict[str, Any] | None,
                  flush_interval: float, policy: RetentionPolicy, cadence: Cadence) -> None:
        """Build the parts, then start or resume (what can fail once the run directory is taken)."""
        trainables, ranks, follows, control, position = (self.trainables, self._ranks, self._follows, self.control,
                                                          self.position)
        queue, guard_ = self._queue, self._guard
        if follows:
            self.store: RunStore = None  # type: ignore[assignment]
            self.signal: CommandSignal = None  # type: ignore[assignment]
        else:
            self.store = RunStore(self.run_dir, create=True)
            remove_stale_temps(self.run_dir)
            self.signal = CommandSignal(self.store.signal_path)
        store = self.store
        self._hparams = hparams = HparamWatch(trainables, position, queue, store)
        loader = Loader(store, trainables, position, control, ranks, hparams, guard_)
        if ranks is not None:
            ranks.bind(control, position, trainables, self.run_dir, loader.load_training_state)
        if follows:  # rank 0 logs, checkpoints and answers commands for the whole job
            if trainables.sharded:  # built where the leader builds its Snapshots' (a collective)
                ranks.shard_writer = ShardedCheckpointer(_nothing_written, _nothing_written)
            self.log = _log_nothing  # type: ignore[method-assign]  # not even the .item() of a value rank 0 keeps
            self._meet(_nothing, ranks_module.START)
            atexit.register(self._at_exit)
            return
        self.snapshots = snapshots = Snapshots(
            self.run_dir, store, trainables, position, control, ranks, config=self.config, policy=policy,
            cadence=cadence, flush_logged=lambda: self.writer.flush(),
            on_weights_diverged=lambda what, branch, step: self.remedy.apply(what, branch, step))
        self.remedy = DivergenceRemedy(store, control, position, trainables, snapshots, self.guard_config)
        self._replay = replay_queue = ReplayQueue()
        self._excursions = Excursions(
            self.run_dir, store, control, position, trainables, snapshots, loader, hparams, guard_, queue,
            flush_logged=lambda: self.writer.flush(), evaluate=evaluate, status_fields=self._status_fields,
            under_ranks=ranks is not None)
        if trainables.sharded:
            self._excursions.refuse(NOT_SHARDED)
        if ranks is not None:  # a long wait for a rank at a meeting is said on the page
            ranks.report_wait = lambda message, missing: store.add_event(
                "ranks_waiting", message, branch=position.branch, step=position.step, data={"missing": missing})
        self._commands = CommandRunner(
            self.run_dir, store, self.signal, control, position, trainables, snapshots, hparams, guard_, self.remedy,
            replay_queue, self._excursions, ranks, wake_writer=lambda: self.writer.wake())
        self._narrator = Narrator(store)  # the trainer's console: lines per epoch, command and event
        self._cuts = Cuts(store, control, position, trainables, snapshots, loader, hparams, guard_, replay_queue,
                          self._narrator, status_fields=self._status_fields, tell=self._tell)
        resume = Resume(self.run_dir, store, loader, snapshots, control, position, trainables, hparams, guard_,
                        replay_queue, config=self.config,
                        status_fields=self._status_fields, expire_stale=self._commands.expire_stale)
        self._meet(resume.restore_on_start, ranks_module.START)
        store.set_meta("retention", policy.to_json())  # what status and the page say is kept, and why
        if journal is not None:
            resume.start_replay(journal)
        self._narrator.branch_starts(position.branch, position.step, time.time())
        self.writer = MetricsWriter(
            store, queue=queue.items, status=self._status_fields, guard=guard_,
            on_divergence=self.remedy.on_divergence, on_tick=self._on_tick, interval=flush_interval,
        )
        atexit.register(self._at_exit)

    # -- what it trains, and where it is ---------------------------------------------------------
    model = property(lambda self: self.trainables.model)
    optimizer = property(lambda self: self.trainables.optimizer, doc="The optimizer (the first, with several).")
    optimizers = property(lambda self: dict(self.trainables.optimizers), doc="The optimizers by name.")
    state = property(lambda self: self.trainables.state, doc="The loop's own state, kept in every checkpoint.")

    @property
    def scheduler(self) -> Any:
        return self.trainables.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:  # a framework that builds its scheduler again (babysit.hf)
        self.trainables.scheduler = scheduler

    epoch = property(lambda self: self.position.epoch)
    step = property(lambda self: self.position.step)
    step_in_epoch = property(lambda self: self.position.step_in_epoch,
                             doc="Steps trained in this epoch; at the top of an epoch, 0 unless it resumes mid-way.")
    branch = property(lambda self: self.position.branch)

    @property
    def steps_per_epoch(self) -> int | None:
        return self.position.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, steps: int | None) -> None:  # a framework's callback knows its loader's length
        self.position.steps_per_epoch = steps

    status = property(lambda self: self.control.status)

    @property
    def message(self) -> str:
        return self.control.message

    @message.setter
    def message(self, message: str) -> None:
        self.control.say(message)

    @property
    def interrupted(self) -> bool:
        """True while the current epoch is being cut short (a stop, a rollback, Ctrl-C), and at the
        end of an epoch a probe or sweep reached (its branch is thrown away): skip the epoch's
        evaluation, lr anneal and "save best" — what the loop runs now is not kept."""
        return self.control.interrupted

    interrupt = property(lambda self: self.control.interrupt)
    stop_requested = property(lambda self: self.control.stop_asked)

    @property
    def lr(self) -> float:
        """The lr the optimizer uses now; a hand-written update reads it every step."""
        return self.trainables.hparams()["lr"]  # type: ignore[return-value]

    @lr.setter
    def lr(self, value: float) -> None:
        """The loop's own change of lr (its anneal): applied and marked as the loop's."""
        optim.set_lr(self.optimizer, cmd.validate_lr(value), self.scheduler)
        if not self._follows:
            self._hparams.record(by=LOOP)

    @property
    def momentum(self) -> float | None:
        return self.trainables.hparams()["momentum"]

    @momentum.setter
    def momentum(self, value: float) -> None:
        optim.set_momentum(self.optimizer, cmd.validate_momentum(value))
        if not self._follows:
            self._hparams.record(by=LOOP)

    @property
    def hparams(self) -> dict[str, float | None]:
        """The lr and momentum the optimizer uses now."""
        return self.trainables.hparams()

    def refuse_data_skips(self, why: str) -> None:
        """For a framework's callback whose loader skips the batches of a resume itself: refuse a
        rollback's ``skip_batches``, saying why."""
        if not self._follows:
            self._commands.refuse_data_skips(why)

    def refuse_excursions(self, why: str) -> None:
        """For a framework's callback whose loop cannot make probes and sweeps exact: refuse them, saying why."""
        if not self._follows:
            self._excursions.refuse(why)

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
        self.control.epoch_begins()
        if not self._follows:
            self.snapshots.begin_epoch()
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
        return bool(self._meet(lambda: self._cuts.leave_epoch(self.max_epochs), ranks_module.EPOCH_END))

    def finish(self) -> None:
        """The loop trained all its epochs: the run is finished (the last epoch's checkpoint is its end)."""
        message = f"finished {self.max_epochs} epochs" if self.max_epochs else f"finished at step {self.step}"
        self._meet(lambda: self._cuts.end_run(FINISHED, message), ranks_module.FINISH)

    def stop_if_requested(self) -> bool:
        """Between two epochs: carry out a stop that waited for the last epoch's end (a stop command
        at its last boundary, Ctrl-C, ``request_stop()``): final checkpoint, the run ends. True if it did."""
        return bool(self._meet(lambda: self._cuts.stop_between_epochs(), ranks_module.BETWEEN_EPOCHS,
                               only_for_a_stop=True))

    def _left_epochs(self) -> None:
        """The loop broke out of ``run.epochs`` (or an error did): say so, write nothing — the
        state at a break is whatever the loop left, and after an error it may be half a step.
        ``run.request_stop()`` is the way to stop early with a final checkpoint."""
        control = self.control
        if control.closed or control.interrupt is not None or self._follows:
            return
        control.left_loop(f"the loop left run.epochs at step {self.step} (epoch {self.epoch}); it resumes from the "
                          "latest checkpoint")
        self.store.add_event(control.status, control.message, branch=self.branch, step=self.step, epoch=self.epoch)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches of ``loader``; between two batches, call :meth:`step_boundary`.

        Ends early when a rollback or a stop is applied (the rest of the epoch is not trained).
        """
        position = self.position
        try:
            position.steps_per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            position.steps_per_epoch = None
        data = loader_skip.behind_bar(loader)  # tqdm(loader): the batch size is the loader's
        if self.items_per_step is None and isinstance(getattr(data, "batch_size", None), int):
            self.items_per_step = data.batch_size
        iterator = position.iterate(loader)  # a resumed epoch: past the batches behind the run, read only if need be
        if position.last_skip is not None and position.last_skip.note and not self._follows:
            self._say_once("resume_skip", position.last_skip.note, {"batches": position.last_skip.batches,
                                                                    "read": position.last_skip.read})
        self.control.wake_up()
        if self.step_boundary() is not None:
            return
        boundary = self.step_boundary
        for batch in iterator:
            position.step += 1  # begin_step(), inlined: this loop is the per-step path
            position.step_in_epoch += 1
            yield batch
            if boundary() is not None:  # the step is done: this is a step boundary
                return
        self.control.epoch_batches_done()

    def enumerate(self, loader: Iterable[Any], start: int = 0) -> Iterator[tuple[int, Any]]:
        """``enumerate(run.batches(loader))`` whose index is the batch's place in the epoch's data
        order: after a resume inside an epoch it goes on from there rather than from 0, so a loop's
        ``if i % 100 == 0`` blocks run where they ran before."""
        position = self.position
        for batch in self.batches(loader):
            yield start + position.step_in_epoch - 1, batch

    def warn(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Tell the person at the trainer's terminal and on the page (an event ``kind``), once, from
        the process that owns the store (under torch.distributed: rank 0)."""
        if self.store is not None:
            self._say_once(kind, message, data or {})

    def step_boundary(self) -> Interrupt | None:
        """Apply what is due between two steps: replays, queued commands, a pause; record an lr or
        momentum the loop or its scheduler changed. Returns the interrupt (stop, rollback) that
        now cuts the epoch short, if any. Cheap when nothing is due (a flag and a memory read).

        The caller counts its steps in ``run.position`` first (``run.batches`` does); once it
        returns an interrupt, the caller leaves the epoch: nothing more is applied until then."""
        control = self.control
        if control.interrupt is not None:
            return control.interrupt
        if self._ranks is None:
            signal = self.signal  # CommandSignal.changed(), inlined: this runs every step
            if (control.wake or signal.word[:8] != signal.seen or self.position.step >= self.snapshots.periodic_step
                    or (self._replay.entries and self._commands.replay_due())):
                self._commands.apply_due()
        else:
            if self.position.step >= self._ranks.next_sync:
                self._sync_ranks()
            if self._follows:
                return control.interrupt
        if control.excursion is not None and control.interrupt is None:
            control.excursion.at_boundary()
        # Did the loop or its scheduler change the lr or momentum? (HparamWatch.seen)
        watch, group = self._hparams, self.trainables.optimizer.param_groups[0]
        if group["lr"] != watch.lr or group.get(watch.key) != watch.seen or (watch.others and watch.others_moved()):
            watch.record(by=watch.source())
        return control.interrupt

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
                # A tensor of several values is kept for the writer thread to drop, naming the metric and step.
                metrics[name] = value.detach() if value.is_cuda or value.numel() != 1 else value.item()
        self._queue.put((PER_STEP, self.position.branch, self.position.step, _wall_clock(), metrics))

    def log_epoch(self, **metrics: Any) -> None:
        """Record per-epoch values (validation loss, accuracy); they are saved in the checkpoint.
        Ignored while ``run.interrupted``: an evaluation after a cut, or on a probe's branch, is not kept."""
        if self.interrupted or self._follows:
            return
        values, logged = {}, dict(metrics)
        for name, value in metrics.items():
            try:
                values[name] = to_float(value)
                logged[name] = values[name]
            except Exception:  # as run.log: the writer drops what is not a number, naming the metric and step
                logged[name] = value.detach() if isinstance(value, torch.Tensor) else value
        self.snapshots.epoch_metrics.update(values)
        self._queue.put((PER_EPOCH, self.branch, self.position.step, time.time(), logged))

    def request_stop(self, reason: str = "requested") -> None:
        """Stop at the next step boundary with a final checkpoint (safe in a signal handler)."""
        self.control.ask_stop(reason)

    def checkpoint_now(self, reason: str = "command") -> PendingCheckpoint | None:
        """Snapshot now (mid-epoch if need be) and write it in the background. Under
        torch.distributed, the ranks take it together at their next meeting (within
        ``babysit.ranks.MAX_INTERVAL`` steps, or the epoch's own checkpoint at its end), whichever
        ranks call it (rank 0 only is fine); it returns None then."""
        if self._ranks is None:
            return self.snapshots.take(reason)
        if not self._follows:
            self.control.ask_checkpoint(reason)
        return None

    @property
    def checkpointer(self) -> Any:
        """The checkpoint writer (``wait()`` for what it was given); on a follower rank, the writer of
        its shards (a sharded model), else None."""
        return self._ranks.shard_writer if self._follows else self.snapshots.writer

    def _say_once(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """Tell the person at the trainer's terminal and on the page (an event), once per trainer:
        the advice holds for the whole run, and a rollback after rollback would repeat it."""
        if kind in self._said:
            return
        self._said.add(kind)
        print(f"babysit: {message}", file=sys.stderr, flush=True)
        self.store.add_event(kind, message, branch=self.branch, step=self.step, epoch=self.epoch, data=data)

    # -- together with the other ranks (see babysit.ranks) ------------------------------------
    def _meet(self, body: Callable[[], Any], point: int | None = None, *, only_for_a_stop: bool = False) -> Any:
        """Run ``body`` here, or, under torch.distributed, on the leader while the followers
        carry out what it tells them (at ``point``, see babysit.ranks; ``only_for_a_stop``: the
        body does nothing unless a stop was asked)."""
        writer = self.checkpointer  # a snapshot taken in the meeting is written once it is over
        if writer is not None:
            writer.hold()
        try:
            result = body() if self._ranks is None else self._ranks.meet(body, point, only_for_a_stop=only_for_a_stop)
        finally:
            if writer is not None:
                writer.release()
        if self.control.ended and not self.control.closed:
            self.close()
        return result

    def _tell(self, *op: Any) -> None:
        if self._ranks is not None:
            self._ranks.tell(*op)

    def _sync_ranks(self) -> None:
        """A sync step: every rank learns whether the leader had commands to apply at the last
        sync (and whether a follower got a stop signal); if so, they apply them together, at this
        step (see babysit.ranks: the exchange is read one step after it is posted)."""
        ranks, control = self._ranks, self.control
        assert ranks is not None
        step = self.position.step
        due = None if self._follows else self._replay.next_step
        replay_due = due is not None and due <= step + 1  # due by the step this sync is acted on
        # A periodic checkpoint due: taken by every rank together at this meeting (within a sync interval of it).
        wants = ranks.leads and (control.wake or self.signal.changed() or replay_due or self.snapshots.periodic_due())
        work, stop_asked = ranks.sync_step(step, work=wants, stop_asked=control.stop_asked, due_at=due)
        if stop_asked and ranks.leads and not control.stop_asked:
            control.ask_stop("a stop asked on another rank")
        if work or stop_asked:
            self._meet(self._commands.apply_due if ranks.leads else _nothing)

    # -- the end -------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush, wait for checkpoint writes and release the run directory."""
        if not self.control.close(f"the training script ended at step {self.step} (not at a checkpoint)"):
            return
        if self._ranks is not None:
            self._ranks.leave()
        if self._follows:
            if self._ranks.shard_writer is not None:  # its shards still being written, with the others'
                self._ranks.shard_writer.close()
            self._release_signals()
            return
        self.snapshots.close()
        self.writer.close()
        self._cuts.write_final_status()
        self._narrate(final=True)
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
        control = self.control
        if exc is not None and not control.closed and not self._follows:
            if isinstance(exc, KeyboardInterrupt):
                control.aborted(f"aborted (Ctrl-C) at step {self.step}; resumes from the latest checkpoint")
            else:
                control.crashed(f"{type(exc).__name__}: {exc}"[:500])
                self.store.add_event("error", control.message, branch=self.branch, step=self.step, epoch=self.epoch,
                                     data={"traceback": "".join(traceback.format_exception(exc))[-4000:]})
        self.close()

    def _install_signals(self) -> Any:
        return install_stop_handlers(self.request_stop, lambda: self.stop_requested)

    # -- writer-thread callbacks --------------------------------------------------------------
    def _status_fields(self) -> dict[str, Any]:
        # After a stop, what the final checkpoint holds (and a resume uses), not what the loop
        # may have set after the cut.
        control, position = self.control, self.position
        hparams = control.final_hparams or self.trainables.hparams()
        return {
            "state": control.status, "epoch": position.epoch, "step": position.step,
            "step_in_epoch": position.step_in_epoch, "steps_per_epoch": position.steps_per_epoch,
            "max_epochs": self.max_epochs, "branch": position.branch, "lr": hparams["lr"],
            "momentum": hparams["momentum"], "message": control.message,
            "items_per_step": self.items_per_step, "item_unit": self.item_unit,
            "optimizers": self.trainables.status_json(),
        }

    def _on_tick(self) -> None:
        # A fallback for the signal file (a missed write, a filesystem without shared mmap); and
        # the clock of the time cadence, read here rather than at every step.
        if not self.control.wake and (self.store.has_pending_commands()
                                      or time.monotonic() >= self.snapshots.periodic_time):
            self.control.wake_up()
        self._narrate()

    def _narrate(self, final: bool = False) -> None:
        """The narrator's lines: a failure to say them never stops the run (nor its writer)."""
        try:
            self._narrator.tell(final=final)
        except Exception:
            log.exception("babysit: the trainer's console lines could not be read from the store")

    def _at_exit(self) -> None:
        try:
            self.close()
        except Exception:  # the interpreter is exiting: say why the last status may be missing
            log.exception("babysit: closing the run in %s at exit failed; its status may say 'not responding' "
                          "(the checkpoints already listed are intact)", self.run_dir)


def _log_nothing(**_metrics: Any) -> None:
    """``run.log`` on a follower rank: rank 0 logs for the whole job."""


def _nothing() -> None:
    """A follower's share of a meeting's body: it carries out what the leader tells (babysit.ranks)."""


def _nothing_written(_job: PendingCheckpoint) -> None:
    """A follower's writer reports nothing: rank 0 lists its checkpoint, or says why it could not."""


# Bound once: run.log runs every step, and module attribute lookups add up there.
_TENSOR = torch.Tensor
_wall_clock = time.time
