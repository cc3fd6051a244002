"""The ``trainer_state.json`` a Hugging Face Trainer restarts from when babysit moves its loop (a
resume, a rollback): what the Trainer's own ``_save_checkpoint`` writes, at babysit's step.

The Trainer reads that file back as its whole state: it restores its callbacks and its
``TrainerControl`` from ``stateful_callbacks`` and, at its next save, updates that very dict by
class name (``state.stateful_callbacks["TrainerControl"]``), so a state without it makes the first
``save_strategy="steps"``/``"epoch"`` save after a restart fail with ``KeyError: 'TrainerControl'``.
The control is written as a fresh one (the Trainer's own is at a cut: ``should_training_stop``
set), every other stateful callback (``EarlyStoppingCallback``, …) as it is now.

The best-model bookkeeping (``best_metric``, ``best_global_step``, ``best_model_checkpoint``) is
the Trainer's record of its evaluations; one made after the step the loop restarts from belongs to
the branch being left (a rollback) and is dropped, so ``load_best_model_at_end`` and the
checkpoint rotation never keep or load weights the person rolled away from.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState


def restart_state(state: TrainerState, callbacks: list[Any], step: int, steps_per_epoch: int | None) -> TrainerState:
    """The TrainerState the Trainer would have saved at ``step`` of this training (``state`` is its
    live one, ``callbacks`` its callback handler's list)."""
    best_is_older = state.best_global_step is not None and state.best_global_step <= step
    return TrainerState(
        global_step=step, epoch=step / steps_per_epoch if steps_per_epoch else 0.0, max_steps=state.max_steps,
        num_train_epochs=state.num_train_epochs, train_batch_size=state.train_batch_size,
        logging_steps=state.logging_steps, eval_steps=state.eval_steps, save_steps=state.save_steps,
        best_metric=state.best_metric if best_is_older else None,
        best_global_step=state.best_global_step if best_is_older else None,
        best_model_checkpoint=state.best_model_checkpoint if best_is_older else None,
        is_local_process_zero=state.is_local_process_zero, is_world_process_zero=state.is_world_process_zero,
        stateful_callbacks=[cb for cb in callbacks if isinstance(cb, ExportableState)] + [TrainerControl()],
    )
