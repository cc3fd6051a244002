"""Babysit a Hugging Face ``transformers.Trainer``: a callback, and ``babysit.hf.train`` to start it.

    from babysit.hf import BabysitCallback, train

    trainer = Trainer(model=model, args=TrainingArguments(..., logging_steps=1),
                      train_dataset=train_set, eval_dataset=val_set,
                      callbacks=[BabysitCallback("checkpoints/my-run")])
    train(trainer)                  # instead of trainer.train(): it resumes and rolls back

How the Trainer's hooks drive :class:`babysit.Run` (the same pieces ``run.epochs`` and
``run.batches`` are made of):

- ``on_train_begin`` makes the Run from the model, optimizer and lr scheduler the Trainer has just
  built (the one AdamW inside accelerate's wrapper; the scheduler, a LambdaLR, is passed too, so a
  nudge scales its ``base_lrs`` and its next steps keep the nudge: lr(t) = nudged × λ(t) / λ(t₀)).
- ``on_step_begin`` counts the step; ``on_step_end`` — after the optimizer and scheduler stepped —
  is the step boundary: queued commands are applied there, a pause waits there, and a stop or a
  rollback cuts the run there (``control.should_training_stop``; the cut step's evaluation and
  save are cancelled, its loss is still logged; the cut is carried out in ``on_epoch_end``).
  ``on_epoch_begin`` is a step boundary too, before the epoch's first step (what was queued during
  the evaluation); a stop there ends ``babysit.hf.train`` before the Trainer trains that step.
- ``on_log`` records what the Trainer logs (``loss``, ``grad_norm``, …; ``logging_steps=1`` gives
  a point per step), ``on_evaluate`` the evaluation metrics (``run.log_epoch``).
- An epoch is checkpointed when the next one begins (or training ends), so the evaluation the
  Trainer runs after ``on_epoch_end`` is in the epoch's checkpoint.
- ``logging_nan_inf_filter`` is turned off while the divergence guard is on: the Trainer would
  otherwise log a NaN loss as the average of the previous ones, and the guard would never see it.

Resuming and rolling back. The Trainer decides where its loop starts — how many epochs and batches
to skip, the ``global_step`` its lr schedule continues from — from ``train(resume_from_checkpoint=)``
before any callback runs, so a callback alone cannot move it. ``babysit.hf.train(trainer)`` calls
``trainer.train()``; when the Run (made in ``on_train_begin``) resumes from a babysit checkpoint,
or a rollback has just loaded one, the callback stops that call before anything is trained and
``train`` calls ``trainer.train(resume_from_checkpoint=D)`` again, in the same process, with the
same Run. ``D`` is a temporary folder holding only what the Trainer reads to place its loop: a
``trainer_state.json`` as the Trainer's own save writes it, at the checkpoint's step
(:mod:`babysit.hf_state`), and an empty ``model.safetensors``
(the Trainer insists on a weights file; babysit has already loaded the weights, optimizer,
scheduler and random generators, and keeps them: the Trainer finds nothing else to load there).
The Trainer then skips the epochs and batches before that step, exactly as it does for its own
checkpoints. The second ``train()`` builds a new lr scheduler; the callback gives it the restored
scheduler's state and puts the optimizer's lr back, so the schedule continues where it was.

How exact: with the Trainer's default seedable sampler the data order of an epoch depends only on
the seed and the epoch, so a resumed run (after kill -9, a stop, or "checkpoint now") sees the same
batches in the same order, and the random generators (dropout) are put back as they were at the
checkpoint: on CPU the losses and weights match a run that was never interrupted. A rollback
continues on a new branch from the checkpoint's epoch and batch, with its data order.

The Trainer has no hook between fetching a batch and training on it, and looks at
``should_training_stop`` only after a step. So where a rollback, a resume or a stop must end a
train() call before its next step, the callback raises an exception that ``babysit.hf.train``
catches (a bare ``trainer.train()`` gets :class:`RestartNeeded`, which says what to do).

Under torchrun every rank makes the same callback and Run (babysit's Run decides what each rank
does); nothing here looks at the rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

from .checkpoint import rng_state, set_rng_state
from .errors import SettingsError
from .guard import GuardConfig
from .hf_state import BestRecord, restart_state
from .parallelism import refusal
from .run import Interrupt, Run
from .seeding import EXACTNESS, seeded, unseeded_warning
from .signals import install_stop_handlers

__all__ = ["BabysitCallback", "RestartNeeded", "train"]

log = logging.getLogger(__name__)

# What on_log passes on to run.log: the training values, not the Trainer's bookkeeping (babysit
# records the lr and the epoch itself) nor the end-of-training summary.
_NOT_LOGGED = frozenset({"epoch", "learning_rate", "total_flos", "step"})
_NOT_LOGGED_PREFIXES = ("eval_", "train_", "test_", "predict_")
# Evaluation keys that are timings, not metrics.
_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")
# The few TrainingArguments worth recording as the run's config (and comparing on resume).
_BEST_RECORD = "_hf_best"  # the run.state key of the Trainer's best-model record
_ARGS_IN_CONFIG = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "seed")


# The Trainer restarts itself for a rollback, and an excursion is rollbacks in process.
EXCURSIONS_REFUSED = ("probes and sweeps need babysit.Run in your own loop: the Hugging Face Trainer restarts for "
                      "every rollback, so it cannot try a branch and come back in process; nudges and rollbacks work "
                      "here")

# The Trainer's own loader skips the batches of a resume (by its global step): it cannot leave more out.
DATA_SKIPS_REFUSED = ("a rollback's skip_batches needs babysit.Run in your own loop or the Lightning callback: the "
                      "Hugging Face Trainer skips a resumed epoch's batches itself, by its step count; roll back "
                      "without it")


class RestartNeeded(RuntimeError):
    """The Trainer's loop must start again from a babysit checkpoint (a resume, a rollback):
    ``babysit.hf.train`` does that; a bare ``trainer.train()`` cannot, and raises this."""


class _Stopped(Exception):
    """The run stopped before the Trainer's next step (its final checkpoint is written)."""


class _AlreadyTrained(Exception):
    """The resumed run had trained all its steps: nothing is left to train."""


class BabysitCallback(TrainerCallback):
    """Connect a ``transformers.Trainer`` to a babysit run directory.

    Args:
        run_dir: the run directory (created if new, resumed if it holds checkpoints).
        state, config, guard, keep_last, retention, checkpoint_every_steps, checkpoint_every_minutes,
        flush_interval, items_per_step, item_unit: as for :class:`babysit.Run` (a step is an
            optimizer step). ``config`` is recorded with a few of the TrainingArguments;
            ``items_per_step`` defaults to the samples of one optimizer step on this process.

    Start training with :func:`babysit.hf.train` (it resumes and rolls back); ``self.run`` is the
    :class:`babysit.Run` once training has begun.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, state: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None, guard: GuardConfig | None = None,
                 keep_last: int | None = None, retention: Any = None, checkpoint_every_steps: int | None = None,
                 checkpoint_every_minutes: float | None = None, flush_interval: float = 0.25,
                 items_per_step: int | None = None, item_unit: str = "samples") -> None:
        self.run_dir = Path(run_dir)
        self.guard = guard or GuardConfig()
        self._user_state = state
        self._best = BestRecord()  # the Trainer's best-model record, in every checkpoint
        self._run_kwargs = dict(guard=self.guard, keep_last=keep_last, retention=retention,
                                checkpoint_every_steps=checkpoint_every_steps,
                                checkpoint_every_minutes=checkpoint_every_minutes, flush_interval=flush_interval,
                                item_unit=item_unit)
        self._config = dict(config or {})
        json.dumps(self._config)  # fail here, not when training starts
        self._items_per_step = items_per_step
        # Made before the Trainer, which seeds torch itself (TrainingArguments.seed): whether the
        # script seeded what it drew before (its data, its model) is known only here.
        self._seeded = seeded()
        self.run: Run | None = None
        self._driven = False              # started by babysit.hf.train, which restarts the loop
        self._carried: dict[str, Any] | None = None   # what a restart of the loop takes over
        self._epoch_open = False
        self._cut: Interrupt | None = None
        self._ended = False
        self._restore_signals: Any = None

    # -- the Trainer's hooks -------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *, model: Any = None,
                       optimizer: Any = None, lr_scheduler: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        optimizer = _unwrap(optimizer)
        if self.run is None or self._ended:
            self._ended = False
            refused = refusal(model, optimizer, framework="Hugging Face")
            if refused is not None:  # on every rank alike, before any waits for the others
                raise SettingsError(refused)
            self._best.live, self._best.loaded = state, None
            self.run = Run(self.run_dir, model, optimizer, lr_scheduler, config=self._run_config(args),
                           items_per_step=self._items_per_step or _samples_per_step(args),
                           state={**(self._user_state or {}), _BEST_RECORD: self._best}, **self._run_kwargs)
            self.run.refuse_excursions(EXCURSIONS_REFUSED)
            if not self._seeded:
                self.run.warn(EXACTNESS, unseeded_warning("transformers.set_seed(0) (the Trainer seeds only "
                                                          "once it is made, after the data and the model)"))
            self.run.refuse_data_skips(DATA_SKIPS_REFUSED)
            self._restore_signals = install_stop_handlers(self.run.request_stop, lambda: self.run.stop_requested)
        else:
            self._take_over(model, optimizer, lr_scheduler, state)
        run = self.run
        run.steps_per_epoch = _steps_per_epoch(args, state, train_dataloader)
        run.max_epochs = int(state.num_train_epochs)
        if self.guard.enabled and args.logging_nan_inf_filter:
            log.info("babysit: logging_nan_inf_filter turned off, so that the divergence guard sees a NaN loss")
            args.logging_nan_inf_filter = False
        if state.max_steps and run.step >= state.max_steps:
            run.finish()
            self._ended = True
            raise _AlreadyTrained(f"the run in {str(self.run_dir)!r} has trained all its {state.max_steps} steps")
        if run.step != state.global_step:
            self._check_fits_epochs(run.steps_per_epoch)
            self._restart(state, f"babysit resumes the run in {str(self.run_dir)!r} at step {run.step} (epoch "
                                 f"{run.position.next_epoch}), the Trainer started at step {state.global_step}")

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._epoch_open and self._end_epoch():
            self._stopped_before_a_step(control)  # stopped between epochs (Ctrl-C during the evaluation)
            return
        if self._ended:
            return
        self.run.begin_epoch()
        self._epoch_open = True
        # What was queued during the evaluation (or before the trainer started), and nudges to
        # replay at this very step, are applied before the epoch's first step, as run.batches does.
        self._cut = self.run.step_boundary()
        if self._cut is not None:
            self._carry_out_cut(state)
            self._stopped_before_a_step(control)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._ended:
            return
        position = self.run.position
        if position.skip_batches:  # the Trainer's loader skipped the batches trained before the checkpoint
            position.batches_skipped()
        self.run.begin_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._ended:
            return
        run = self.run
        cut = run.step_boundary()  # commands, a pause, the guard's remedy: applied here
        if cut is None:
            if run.stop_requested:  # a stop at the epoch's last boundary: the epoch ends as usual first
                control.should_training_stop = True
            return
        # The run is cut after this step: the loop leaves at once; nothing it would evaluate or
        # save now is kept. This step's loss is still logged (on_log comes next).
        self._cut = cut
        control.should_training_stop = True
        control.should_evaluate = control.should_save = False

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._ended or self.run is None or not logs:
            return
        values = {k: v for k, v in logs.items() if k not in _NOT_LOGGED and not k.startswith(_NOT_LOGGED_PREFIXES)
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.run.log(**values)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._ended or self.run is None or not metrics:
            return
        values = {k: v for k, v in metrics.items() if not k.endswith(_TIMING_SUFFIXES) and k != "epoch"
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.run.log_epoch(**values)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._cut is None or self._ended:
            return
        control.should_evaluate = control.should_save = control.should_log = False
        self._carry_out_cut(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._ended or self.run is None:
            return
        if self._epoch_open and self._end_epoch():
            return
        self.run.finish()
        self._ended = True
        self._put_signals_back()

    # -- the pieces ----------------------------------------------------------------------------
    def _carry_out_cut(self, state: TrainerState) -> None:
        """A stop: its final checkpoint, the run ends. A rollback: the checkpoint is loaded and the
        Trainer's loop starts again from it (this train() call ends here)."""
        cut, self._cut = self._cut, None
        run = self.run
        self._epoch_open = False
        run.end_epoch()
        if cut is Interrupt.STOP:
            self._ended = True
            self._put_signals_back()
            return
        self._restart(state, f"babysit rolled the run in {str(self.run_dir)!r} back to step {run.step} "
                             f"(epoch {run.position.next_epoch}) as branch {run.branch}")

    def _stopped_before_a_step(self, control: TrainerControl) -> None:
        """The run stopped where the Trainer is about to train a step that it cannot be kept from:
        ``babysit.hf.train`` ends the train() call here; a bare train() trains that one step, which
        no checkpoint and no chart will see."""
        control.should_training_stop = True
        if self._driven:
            raise _Stopped

    def _end_epoch(self) -> bool:
        """Checkpoint the epoch (its evaluation included); carry out a stop that waited for its
        end. True if the run has ended."""
        self._epoch_open = False
        self.run.end_epoch()
        if self.run.stop_if_requested():
            self._ended = True
            self._put_signals_back()
        return self._ended

    def _restart(self, state: TrainerState, why: str) -> None:
        """Leave this ``trainer.train()`` call before anything more is trained; ``babysit.hf.train``
        starts the loop again at the run's step, with what the Trainer cannot rebuild itself."""
        run = self.run
        self._epoch_open = False
        self._carried = {
            "lrs": [group["lr"] for group in run.optimizer.param_groups],
            "rng": rng_state(),
            "trainer_state": (state, run.step, run.steps_per_epoch, self._best.loaded),
        }
        self._best.loaded = None
        if self._driven:
            raise RestartNeeded(why)
        run.message = why
        run.close()
        self._ended = True
        self._put_signals_back()
        raise RestartNeeded(f"{why}: the Trainer cannot move its own loop there; start training with "
                            "babysit.hf.train(trainer), which does (running this script again with it resumes "
                            "from there)")

    def _take_over(self, model: Any, optimizer: Any, lr_scheduler: Any, state: TrainerState) -> None:
        """The loop started again (``babysit.hf.train`` after a resume or a rollback): the Trainer
        keeps its model and optimizer but builds a new lr scheduler, and the new scheduler's first
        step rewrote the lr. Give it the restored scheduler's state and put back what was there."""
        run, carried = self.run, self._carried
        if carried is None or model is not run.model or optimizer is not run.optimizer:
            raise RuntimeError("the Trainer trains another model or optimizer than the babysat one (model_init?); "
                               "babysit.hf.train needs the Trainer to keep them between its train() calls")
        self._carried = None
        self._best.live = state  # the restarted loop's state, loaded from the restart folder
        if lr_scheduler is not run.scheduler and run.scheduler is not None and lr_scheduler is not None:
            lr_scheduler.load_state_dict(run.scheduler.state_dict())
            run.scheduler = lr_scheduler
        for group, lr in zip(optimizer.param_groups, carried["lrs"]):
            group["lr"] = lr
        set_rng_state(carried["rng"])
        if state.global_step != run.step:
            raise RuntimeError(f"the Trainer restarted at step {state.global_step}, not at babysit's step {run.step}")

    def _check_fits_epochs(self, steps_per_epoch: int | None) -> None:
        """A checkpoint's step must fall where the Trainer will place it (same steps per epoch)."""
        run = self.run
        position = run.position
        if steps_per_epoch and (position.next_epoch - 1) * steps_per_epoch + position.skip_batches != run.step:
            message = (f"babysit resumes at step {run.step}, epoch {position.next_epoch} after "
                       f"{position.skip_batches} of its steps, which does not fit {steps_per_epoch} optimizer steps "
                       "per epoch: the data set, the batch size or gradient_accumulation_steps changed since; use "
                       "the same, or start a new run directory")
            run.message = message
            run.close()
            self._ended = True
            raise ValueError(message)

    def _run_config(self, args: TrainingArguments) -> dict[str, Any]:
        # Through JSON: the Trainer's enums (lr_scheduler_type, optim) are str subclasses, which a
        # checkpoint would pickle as objects that torch.load(weights_only=True) refuses.
        config = json.loads(json.dumps({name: getattr(args, name) for name in _ARGS_IN_CONFIG}, default=str))
        return {**config, **json.loads(json.dumps(self._config))}

    def _put_signals_back(self) -> None:
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None

    @contextmanager
    def _resume_point(self, callbacks: list[Any]) -> Iterator[str | None]:
        """The folder ``trainer.train(resume_from_checkpoint=)`` places its loop with, or None;
        ``callbacks`` are the Trainer's (their state goes into the folder's trainer state)."""
        carried = self._carried
        if carried is None:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="babysit-hf-resume-") as folder:
            live, step, steps_per_epoch, best = carried["trainer_state"]
            restart_state(live, callbacks, step, steps_per_epoch, best).save_to_json(os.path.join(folder, "trainer_state.json"))
            _write_empty_weights(os.path.join(folder, "model.safetensors"))
            with _quiet_about_empty_weights():
                yield folder

    def _crashed(self, error: BaseException) -> None:
        run = self.run
        if run is not None and not self._ended:
            self._ended = True
            run.__exit__(type(error), error, error.__traceback__)
            self._put_signals_back()


def train(trainer: Any, **train_kwargs: Any) -> TrainOutput:
    """``trainer.train(**train_kwargs)`` for a Trainer with a :class:`BabysitCallback`: resumes the
    run from its latest babysit checkpoint and carries out rollbacks, by starting the Trainer's loop
    again at the checkpoint's step (see the module's docstring). Returns the last call's TrainOutput."""
    if "resume_from_checkpoint" in train_kwargs:
        raise ValueError("babysit.hf.train resumes from the run directory's own checkpoints; "
                         f"resume_from_checkpoint={train_kwargs['resume_from_checkpoint']!r} is not accepted")
    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, BabysitCallback)]
    if len(found) != 1:
        raise ValueError(f"the Trainer needs exactly one BabysitCallback in Trainer(callbacks=[...]), it has {len(found)}")
    callback = found[0]
    callback._driven = True
    try:
        while True:
            try:
                with callback._resume_point(trainer.callback_handler.callbacks) as folder:
                    return trainer.train(resume_from_checkpoint=folder, **train_kwargs)
            except RestartNeeded:
                continue
            except _AlreadyTrained as done:
                log.info("babysit: %s", done)
                return TrainOutput(callback.run.step, math.nan, {})
            except _Stopped:
                return TrainOutput(callback.run.step, math.nan, {})
    except BaseException as error:
        callback._crashed(error)
        raise
    finally:
        callback._driven = False


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (it stays the same object when
    the Trainer wraps it again in a later train() call)."""
    while type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _steps_per_epoch(args: TrainingArguments, state: TrainerState, loader: Any) -> int | None:
    """Optimizer steps per epoch, as the Trainer counts them."""
    try:
        batches = len(loader)
    except TypeError:
        return int(state.max_steps) or None
    accumulation = max(1, args.gradient_accumulation_steps)
    return batches // accumulation + int(batches % accumulation > 0)


def _samples_per_step(args: TrainingArguments) -> int:
    return args.per_device_train_batch_size * max(1, args.gradient_accumulation_steps)


def _write_empty_weights(path: str) -> None:
    from safetensors.torch import save_file

    save_file({}, path)


class _EmptyWeightsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "There were missing keys in the checkpoint model loaded" not in record.getMessage()


@contextmanager
def _quiet_about_empty_weights() -> Iterator[None]:
    """The Trainer warns that the (deliberately empty) weights file misses every key: babysit has
    loaded the weights already, so that warning would mislead."""
    trainer_log = logging.getLogger("transformers.trainer")
    quiet = _EmptyWeightsFilter()
    trainer_log.addFilter(quiet)
    try:
        yield
    finally:
        trainer_log.removeFilter(quiet)
