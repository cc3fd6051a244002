"""The ``trainer_state.json`` a Hugging Face Trainer restarts from when babysit moves its loop (a
resume, a rollback): what the Trainer's own ``_save_checkpoint`` writes, at babysit's step.

The Trainer reads that file back as its whole state: it restores its callbacks and its
``TrainerControl`` from ``stateful_callbacks`` and, at its next save, updates that very dict by
class name (``state.stateful_callbacks["TrainerControl"]``), so a state without it makes the first
``save_strategy="steps"``/``"epoch"`` save after a restart fail with ``KeyError: 'TrainerControl'``.
The control is written as a fresh one (the Trainer's own is at a cut: ``should_training_stop``
set), every other stateful callback (``EarlyStoppingCallback``, …) as it is now.

The best-model bookkeeping (``best_metric``, ``best_global_step``, ``best_model_checkpoint``) is
the Trainer's record of its evaluations, which ``load_best_model_at_end`` and the checkpoint
rotation go by. It travels in every babysit checkpoint (:class:`BestRecord`), so the loop restarts
with the record as it was at the checkpoint it restarts from: after a kill -9 the best so far is
still known (as the Trainer's own resume from its folder knows it), and after a rollback a record
made on the branch being left is gone; a record whose folder the Trainer's rotation has removed
since is dropped (the evaluations from there on decide). A checkpoint written without it (an older run) falls back
to the live record, dropped when it was made after the step the loop restarts from.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState


BEST_FIELDS = ("best_metric", "best_global_step", "best_model_checkpoint")


class BestRecord:
    """The Trainer's best-model record as ``run.state`` keeps it: read from its live state when a
    checkpoint is taken, and held as loaded (a resume, a rollback) for the restart state."""

    def __init__(self) -> None:
        self.live: TrainerState | None = None
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = self.live
        if state is None:
            return dict.fromkeys(BEST_FIELDS)
        metric = state.best_metric
        return {"best_metric": None if metric is None else float(metric), "best_global_step": state.best_global_step,
                "best_model_checkpoint": state.best_model_checkpoint}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.loaded = {name: saved.get(name) for name in BEST_FIELDS}


def restart_state(state: TrainerState, callbacks: list[Any], step: int, steps_per_epoch: int | None,
                  best: dict[str, Any] | None = None) -> TrainerState:
    """The TrainerState the Trainer would have saved at ``step`` of this training (``state`` is its
    live one, ``callbacks`` its callback handler's list, ``best`` the best-model record of the
    checkpoint it restarts from, when that checkpoint holds one)."""
    if best is None:
        older = state.best_global_step is not None and state.best_global_step <= step
        best = {name: getattr(state, name) if older else None for name in BEST_FIELDS}
    folder = best["best_model_checkpoint"]
    if folder is not None and not os.path.isdir(folder):
        # Rotated away since: the Trainer would keep the metric with no model to load at the end;
        # the evaluations from here on decide the best, as at the start of training.
        best = dict.fromkeys(BEST_FIELDS)
    return TrainerState(
        global_step=step, epoch=step / steps_per_epoch if steps_per_epoch else 0.0, max_steps=state.max_steps,
        num_train_epochs=state.num_train_epochs, train_batch_size=state.train_batch_size,
        logging_steps=state.logging_steps, eval_steps=state.eval_steps, save_steps=state.save_steps,
        **best,
        is_local_process_zero=state.is_local_process_zero, is_world_process_zero=state.is_world_process_zero,
        stateful_callbacks=[cb for cb in callbacks if isinstance(cb, ExportableState)] + [TrainerControl()],
    )
