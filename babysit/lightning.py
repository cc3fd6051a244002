"""Babysit a PyTorch Lightning ``Trainer``: one callback maps Lightning's hooks onto :class:`babysit.Run`.

    trainer = pl.Trainer(max_epochs=20, callbacks=[BabysitCallback("checkpoints/my-run")])
    trainer.fit(model, train_loader, val_loader)

Where babysit acts
    ``on_train_batch_start`` counts the step (``run.begin_step``); ``on_train_batch_end`` logs the
    loss and the values the module ``self.log``-ged at this step, then calls ``run.step_boundary``:
    nudges of lr and momentum reach ``trainer.optimizers[0]`` there, or the one they name by its
    place ("1"), scaled into the lr scheduler that drives it so the schedule keeps them; a pause
    blocks there, "checkpoint now" snapshots there.
    Validation metrics go to ``run.log_epoch`` when validation ends. An epoch trained to its end is
    checkpointed (``run.end_epoch``) once Lightning is done with it — at the next epoch's start or
    as training ends — so the module's ``on_train_epoch_end`` and a ReduceLROnPlateau step are in
    the checkpoint; a cut epoch's ``run.end_epoch`` (a rollback, a stop's end) runs in
    ``on_train_epoch_end``. A stop or a rollback cuts the epoch at the boundary: the next ``on_train_batch_start`` raises StopIteration, which
    ends Lightning's epoch loop before that batch is trained (no scheduler step, no validation for
    the cut). A finished stop sets ``trainer.should_stop``.

Resume and rollback: babysit's position wins, Lightning's counters follow it
    babysit's checkpoint is the one source of truth (model, optimizers, schedulers, ``run.state``,
    RNGs, epoch and step). The :class:`~babysit.Run` is made in ``on_fit_start``, when Lightning has
    built the optimizers and not yet drawn the first batch, and loads the latest checkpoint there;
    a rollback loads its checkpoint in ``on_train_epoch_end`` of the epoch it cut, after whatever
    Lightning still did at the cut (a last batch's validation, an epoch scheduler's step), so none
    of it reaches the restored state; the batch counters are reset there too, so the plateau
    schedulers Lightning steps after that hook leave the restored state alone. Either way the callback then writes the restored position into Lightning's
    loop counters — ``fit_loop.epoch_progress`` (so ``current_epoch`` is the number of finished
    epochs), the optimizer-step progress behind ``global_step`` (saved in babysit's checkpoint, so it
    is Lightning's own count), the batches-stepped count loggers use — and training continues in the
    same ``trainer.fit`` call, on a new branch after a rollback. Lightning's own restart machinery
    (``ckpt_path``, ``restarting``) is not used: it cannot resume inside an epoch exactly for an
    ordinary DataLoader (it warns as much), and after a rollback the fit is not restarting at all.

    Inside an epoch the callback owns the train loader's iteration: it wraps the (single) train
    DataLoader in Lightning's CombinedLoader, so every ``iter()`` Lightning makes goes through
    :class:`babysit.position.ResumePosition` exactly as ``run.batches`` does (the loader's shuffle
    replayed from the generators as the epoch started, the trained batches skipped by the sampler's indices
    without fetching them (:mod:`babysit.loader_skip`), the generators
    then put back as they were at the cut), and the batch counters of the epoch loop start at the
    number skipped. Epoch 0's iterator is made by Lightning before any hook can act, so the callback
    puts the RNG back and makes it again when epoch 0 starts (Lightning makes later epochs' after
    ``on_train_epoch_start``). Exact as far as the data is a function of those generators: a
    RandomSampler (with or without its own generator) and dropout replay the same; a sampler or
    dataset with random state of its own, ``num_workers > 0`` with random augmentation in the
    workers, and ``reload_dataloaders_every_n_epochs`` do not (resume is then at the right epoch and
    step, with other batches).

Ctrl-C and SIGTERM stop at the next step boundary with a final checkpoint (a second Ctrl-C
aborts); after SIGTERM, once babysit's stop is done, Lightning still ends the process with its
SIGTERMException (a SystemExit), as it does without babysit. Both packages Lightning ships as
(``lightning.pytorch`` and ``pytorch_lightning``) raise their own SIGTERMException class; either
one ends babysit's stop cleanly.

A "step" is a training batch (one ``on_train_batch_end``). Several optimizers are named by their
place in ``configure_optimizers`` ("0", "1", ...): each is checkpointed and restored with the
scheduler that drives it, and nudged by name (``set lr 1e-4 --optimizer 1``; the first by
default); Lightning's counters travel in ``run.state``. Do not pass ``ckpt_path`` to ``fit``: the run directory is the resume.
Every rank makes the Run and calls it identically; nothing here depends on the rank.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch

from .checkpoint import rng_state, set_rng_state
from .errors import SettingsError
from .guard import GuardConfig
from .parallelism import refusal
from .run import Interrupt, Run
from .seeding import EXACTNESS, seeded, unseeded_warning
from .signals import install_stop_handlers
from .store import PAUSED, RUNNING

_LIGHTNING_STATE = "_lightning"   # the run.state key of Lightning's counters and other optimizers


def _is_lightning_sigterm(exception: BaseException) -> bool:
    """Lightning's SIGTERMException, of either package it ships as: a Trainer of ``lightning.pytorch``
    raises that package's class, one of ``pytorch_lightning`` its own (only a loaded one can be it)."""
    for package in ("lightning.pytorch", "pytorch_lightning"):
        module = sys.modules.get(f"{package}.utilities.exceptions")
        if module is not None and isinstance(exception, module.SIGTERMException):
            return True
    return False


# Lightning's fit loop keeps its own counters and loader iterators across the epoch; a probe's
# branch change and return inside it is not yet made exact, so it is refused rather than half done.
EXCURSIONS_REFUSED = ("probes and sweeps are not available under the Lightning callback yet (Lightning's loop keeps "
                      "its own step counters and loader iterators, which a probe's return would leave out of step); "
                      "they work with babysit.Run in your own loop; nudges and rollbacks work here")

class BabysitCallback(pl.Callback):
    """Connect a Lightning ``Trainer`` to babysit's run directory ``run_dir``.

    Args:
        run_dir: the run directory (made if new, resumed if it holds checkpoints).
        state: the loop's own state kept in every checkpoint (see :class:`babysit.Run`); available
            as ``callback.run.state`` once training has started.
        config, guard, keep_last, retention, checkpoint_every_steps, checkpoint_every_minutes,
        flush_interval, items_per_step, item_unit: as for :class:`babysit.Run` (``items_per_step``
            defaults to the train loader's batch size; a step is a training batch).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        state: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        guard: GuardConfig | None = None,
        keep_last: int | None = None,
        retention: Any = None,
        checkpoint_every_steps: int | None = None,
        checkpoint_every_minutes: float | None = None,
        flush_interval: float = 0.25,
        items_per_step: int | None = None,
        item_unit: str = "samples",
    ) -> None:
        if not isinstance(run_dir, (str, Path)) or not str(run_dir).strip():
            raise ValueError(f"run_dir must be a directory path, got {run_dir!r}")
        if state is not None and (not isinstance(state, dict) or _LIGHTNING_STATE in state):
            raise ValueError(f"state must be a dict without the key {_LIGHTNING_STATE!r}, got {state!r}")
        self.run_dir = Path(run_dir)
        self._run_kwargs = dict(config=config, guard=guard, keep_last=keep_last, retention=retention,
                                checkpoint_every_steps=checkpoint_every_steps,
                                checkpoint_every_minutes=checkpoint_every_minutes, flush_interval=flush_interval,
                                items_per_step=items_per_step, item_unit=item_unit)
        self._user_state = state
        self._seeded = seeded()  # made before the Trainer: after the script drew its data and model
        self.run: Run | None = None
        self._counters = _LightningCounters(self)
        self._cut = False              # a stop or rollback was applied: end the epoch at the next batch
        self._rng_at_fit_start: dict[str, Any] | None = None
        self._epoch_to_end = False     # an epoch trained to its end, checkpointed once Lightning is done with it
        self._trainer: pl.Trainer | None = None
        self._restore_signals: Any = None

    # -- start: the Run, and Lightning's counters set to its position ----------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            raise ValueError(f"BabysitCallback resumes from its run directory {str(self.run_dir)!r}; do not pass "
                             f"ckpt_path={trainer.ckpt_path!r} to trainer.fit")
        if not trainer.optimizers:
            raise ValueError("BabysitCallback needs an optimizer: configure_optimizers returned none")
        first = trainer.optimizers[0]
        # Several optimizers (a GAN's) are named by their place in configure_optimizers: "0", "1", ...
        optimizers = {str(i): o for i, o in enumerate(trainer.optimizers)} if len(trainer.optimizers) > 1 else None
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        # The first scheduler that drives an optimizer is the one babysit scales that optimizer's nudges into.
        driving: dict[str, Any] = {}
        for name, optimizer in (optimizers or {"0": first}).items():
            found = next((s for s in schedulers if getattr(s, "optimizer", None) is optimizer), None)
            if found is not None:
                driving[name] = found
        scheduler: Any = driving if optimizers else driving.get("0")
        self._counters.extra = {f"scheduler_{i}": s for i, s in enumerate(schedulers)
                                if not any(s is d for d in driving.values())}
        state = dict(self._user_state or {})
        state[_LIGHTNING_STATE] = self._counters
        self._counters.loaded = None
        refused = refusal(pl_module, first, framework="Lightning")
        if refused is not None:  # on every rank alike, before any waits for the others
            raise SettingsError(refused)
        self.run = Run(self.run_dir, pl_module, None if optimizers else first, scheduler or None,
                       optimizers=optimizers, state=state, **self._run_kwargs)
        self.run.refuse_excursions(EXCURSIONS_REFUSED)
        if not (self._seeded or seeded()):
            self.run.warn(EXACTNESS, unseeded_warning("pl.seed_everything(0)"))
        self.run.max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        # Ctrl-C and SIGTERM: a stop at the next step boundary with a final checkpoint, as in your
        # own loop. Lightning, registering its SIGTERM handler after this hook, calls this one too.
        run = self.run
        self._restore_signals = install_stop_handlers(run.request_stop, lambda: run.stop_requested)
        self._sync_counters(trainer, at_epoch_end=False)
        # Lightning's first iter() of the train loader comes before any hook; it is made again at
        # epoch 0's start from the generators as they are now (see on_train_start).
        self._rng_at_fit_start = rng_state()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        combined = trainer.fit_loop._combined_loader
        if combined is None:
            return
        if len(combined.flattened) != 1:
            raise ValueError(f"BabysitCallback resumes inside an epoch for one train dataloader; got "
                             f"{len(combined.flattened)} ({type(combined.iterables).__name__} of loaders)")
        loader = combined.flattened[0]
        if not isinstance(loader, _ResumableLoader):
            combined.flattened = [_ResumableLoader(loader, self)]
        run = self.run
        assert run is not None
        if run.items_per_step is None and isinstance(getattr(loader, "batch_size", None), int):
            run.items_per_step = loader.batch_size
        if self._rng_at_fit_start is not None:
            set_rng_state(self._rng_at_fit_start)
            self._rng_at_fit_start = None

    # -- epochs ----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._live()
        if run is None:
            return
        self._end_trained_epoch()
        if run.stop_if_requested():  # a stop that waited for the last epoch's end
            trainer.should_stop = True
            return
        batches = trainer.num_training_batches
        run.steps_per_epoch = int(batches) if math.isfinite(batches) else None
        run.begin_epoch()
        if trainer.current_epoch == 0:
            # Lightning makes epoch 0's iterator in setup_data, before any hook (and not again
            # after a rollback to epoch 0): make it now, from the generators the epoch starts with.
            iter(trainer.fit_loop._data_fetcher)
        self._cut = run.step_boundary() is not None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._live()
        if run is None or trainer.sanity_checking:
            return
        names = {result.meta.name for result in trainer.fit_loop.epoch_loop.val_loop._results.values()}
        metrics = {name: value for name, value in trainer.callback_metrics.items() if name in names}
        if metrics:
            run.log_epoch(**metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._live()
        if run is None:
            return
        self._cut = False
        if run.interrupt is None:
            # Checkpointed when Lightning is done with the epoch (at the next epoch's start, or
            # as training ends): the module's own on_train_epoch_end and a ReduceLROnPlateau's
            # step, which come after this hook, are then in the checkpoint.
            self._epoch_to_end = True
            return
        rolling_back = run.interrupt is Interrupt.ROLLBACK
        if not run.end_epoch():
            trainer.should_stop = True  # stopped, with its final checkpoint
            return
        if rolling_back:
            self._sync_counters(trainer, at_epoch_end=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._live()
        if run is None:
            return
        self._end_trained_epoch()
        if not run.stop_if_requested():
            run.finish()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._live()
        if run is not None:  # fit had nothing left to train (a finished run resumed)
            run.finish()
        self._put_signals_back()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        run = self._live()
        if run is not None and _is_lightning_sigterm(exception):
            # Lightning ends fit with SIGTERMException right after the step boundary where babysit
            # began the stop (or after the epoch, when the signal came at its last boundary):
            # finish that stop, final checkpoint included; Lightning then exits as it always does.
            if run.interrupt is Interrupt.STOP:
                run.end_epoch()
            else:
                self._end_trained_epoch()
                run.stop_if_requested()
        if self._live() is not None:
            run.__exit__(type(exception), exception, exception.__traceback__)  # crashed or aborted, then closed
        self._put_signals_back()

    def _put_signals_back(self) -> None:
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None

    # -- steps -----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._cut or self._live() is None:
            # A stop or a rollback cut the epoch: end it before this batch is trained. (A
            # callback's -1 is ignored, only the module's counts; the epoch loop ends on
            # StopIteration alike, without stepping schedulers or validating.)
            raise StopIteration
        self.run.begin_step()  # type: ignore[union-attr]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        run = self._live()
        if run is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        metrics: dict[str, Any] = {"loss": loss} if isinstance(loss, torch.Tensor) else {}
        for result in trainer.fit_loop.epoch_loop._results.values():  # this step's self.log values
            cache = result._forward_cache
            if result.meta.on_step and type(cache) is torch.Tensor and not result.has_reset:
                metrics[result.meta.name] = cache
        if metrics:
            run.log(**metrics)
        if run.step_boundary() is not None:
            self._cut = True

    # -- keeping Lightning's counters where babysit's position is ----------------------------------
    def _end_trained_epoch(self) -> None:
        if self._epoch_to_end:
            self._epoch_to_end = False
            assert self.run is not None
            epoch_values = self._epoch_metrics()
            if epoch_values:
                self.run.log_epoch(**epoch_values)
            self.run.end_epoch()

    def _epoch_metrics(self) -> dict[str, Any]:
        """What the module ``self.log``-ged for the training epoch (``on_epoch=True``: torchmetrics'
        usual way), as Lightning reduced it when the epoch ended: the chart's per-epoch values at
        the epoch's last step, and the epoch checkpoint's metrics."""
        trainer = self._trainer
        if trainer is None:
            return {}
        reduced = trainer.callback_metrics
        values = {}
        for result in trainer.fit_loop.epoch_loop._results.values():
            meta = result.meta
            if meta.on_epoch:
                name = f"{meta.name}_epoch" if meta.on_step else meta.name  # Lightning's name for each
                if isinstance(reduced.get(name), torch.Tensor):
                    values[name] = reduced[name]
        return values

    def _live(self) -> Run | None:
        """The run, while it runs (not yet made, or stopped, finished, crashed: None)."""
        run = self.run
        return run if run is not None and run.status in (RUNNING, PAUSED) else None

    def _sync_counters(self, trainer: pl.Trainer, *, at_epoch_end: bool) -> None:
        """Make Lightning's loop counters say what babysit's restored position says: ``current_epoch``
        the epochs finished, ``global_step`` the optimizer steps taken, the batch of the next epoch the
        one after those trained (the loader skips them). ``at_epoch_end``: called from
        ``on_train_epoch_end``, after which Lightning still counts that epoch as completed."""
        run = self.run
        assert run is not None
        position = run.position
        finished_epochs = position.next_epoch - 1
        fit_loop = trainer.fit_loop
        for tracker in (fit_loop.epoch_progress.total, fit_loop.epoch_progress.current):
            tracker.ready = tracker.started = tracker.processed = finished_epochs
            tracker.completed = finished_epochs - 1 if at_epoch_end else finished_epochs
        epoch_loop = fit_loop.epoch_loop
        loaded = self._counters.loaded or {}
        steps = int(loaded.get("optimizer_steps", position.step))
        for tracker in (epoch_loop.automatic_optimization.optim_progress.optimizer.step.total,):
            tracker.ready = tracker.completed = steps
        manual = epoch_loop.manual_optimization.optim_step_progress.total
        manual.ready = manual.completed = int(loaded.get("manual_steps", position.step))
        for checkpointer in _model_checkpoints(trainer):
            # Lightning's ModelCheckpoint saves at an epoch's end unless it saved at this global
            # step already: the restored step is one, so the cut epoch's end saves nothing (its
            # monitored values would be the branch left behind's).
            checkpointer._last_global_step_saved = steps
        epoch_loop._batches_that_stepped = position.step
        batches = epoch_loop.batch_progress
        batches.total.ready = batches.total.started = batches.total.processed = batches.total.completed = position.step
        batches.current.reset()
        batches.is_last_batch = False  # the cut epoch's "last batch" must not step plateau schedulers
        self._counters.loaded = None

    def _start_after_skipped(self, skipped: int) -> None:
        """A resumed epoch's first batch is being fetched (after Lightning reset the epoch's
        counters): count the ``skipped`` batches as this epoch's already trained ones."""
        trainer = self._trainer
        assert trainer is not None
        epoch_loop = trainer.fit_loop.epoch_loop
        current = epoch_loop.batch_progress.current
        current.ready = current.started = current.processed = current.completed = skipped
        trainer.fit_loop._data_fetcher.fetched += skipped

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer


class _LightningCounters:
    """What babysit's checkpoint keeps of Lightning besides model, optimizers and their schedulers:
    its optimizer-step counts (``global_step``) and any scheduler that drives no optimizer itself."""

    def __init__(self, callback: BabysitCallback) -> None:
        self.callback = callback
        self.extra: dict[str, Any] = {}
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self.callback._trainer
        assert trainer is not None
        epoch_loop = trainer.fit_loop.epoch_loop
        return {
            "optimizer_steps": epoch_loop.automatic_optimization.optim_progress.optimizer_steps,
            "manual_steps": epoch_loop.manual_optimization.optim_step_progress.total.completed,
            "extra": {name: obj.state_dict() for name, obj in self.extra.items()},
            "model_checkpoints": [checkpointer.state_dict() for checkpointer in _model_checkpoints(trainer)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in (state.get("extra") or {}).items():
            if name in self.extra:
                self.extra[name].load_state_dict(saved)
        trainer = self.callback._trainer
        saved_checkpointers = state.get("model_checkpoints")
        if trainer is not None and saved_checkpointers is not None:
            for checkpointer, saved in zip(_model_checkpoints(trainer), saved_checkpointers):
                checkpointer.load_state_dict(saved)
                _forget_missing_files(checkpointer)
        self.loaded = state


def _model_checkpoints(trainer: pl.Trainer) -> list[Any]:
    """The trainer's ModelCheckpoint callbacks (of whichever Lightning package made it)."""
    return [c for c in trainer.checkpoint_callbacks if hasattr(c, "best_k_models") and hasattr(c, "state_dict")]


def _forget_missing_files(checkpointer: Any) -> None:
    """A ModelCheckpoint put back as it was at babysit's checkpoint (a rollback, a resume): the
    top-k files the abandoned branch's better scores pushed out are gone, so its bests are
    recomputed from the files that are still there (none: no best yet)."""
    kept = {path: score for path, score in checkpointer.best_k_models.items() if os.path.isfile(path)}
    checkpointer.best_k_models = kept
    lowest_first = checkpointer.mode == "min"
    if kept:
        ranked = sorted(kept, key=lambda path: float(kept[path]), reverse=not lowest_first)
        checkpointer.best_model_path, checkpointer.kth_best_model_path = ranked[0], ranked[-1]
        checkpointer.best_model_score, checkpointer.kth_value = kept[ranked[0]], kept[ranked[-1]]
    elif checkpointer.monitor is not None or not os.path.isfile(checkpointer.best_model_path or ""):
        checkpointer.best_model_path = checkpointer.kth_best_model_path = ""
        checkpointer.best_model_score = None
        checkpointer.kth_value = torch.tensor(math.inf if lowest_first else -math.inf)
    if checkpointer.last_model_path and not os.path.isfile(checkpointer.last_model_path):
        checkpointer.last_model_path = ""


class _ResumableLoader:
    """The train DataLoader as Lightning's CombinedLoader iterates it: each ``iter()`` goes through
    babysit's resume position (generators, batches already trained), as ``run.batches`` does."""

    def __init__(self, loader: Any, callback: BabysitCallback) -> None:
        self.loader = loader
        self._callback = callback

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, dataset...: the loader's
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        run = self._callback.run
        if run is None:
            return iter(self.loader)
        skipped = run.position.skip_batches
        iterator = run.position.iterate(self.loader)  # past the batches already trained, without reading them
        return self._batches(iterator, skipped)

    def _batches(self, iterator: Iterator[Any], skipped: int) -> Iterator[Any]:
        if skipped:  # runs at the first fetch, after the epoch loop has reset its counters
            self._callback._start_after_skipped(skipped)
        yield from iterator
