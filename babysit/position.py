"""Where a run is, exactly: the counters and random-generator states that make a resume exact.

One object owns them, so every loop babysit serves (``Run.batches``, the framework callbacks)
resumes the same way. An epoch's checkpoint resumes at the next epoch with the generators as they
were when it was taken; a mid-epoch checkpoint ("checkpoint now", a stop) resumes inside its
epoch: the generators are put back as the epoch started, so the loader shuffles as before, the
batches already trained are skipped, and then the generators are put back as they were at the cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .checkpoint import KEY_EPOCH, KEY_EPOCH_START_RNG, KEY_RNG, KEY_STEP, KEY_STEP_IN_EPOCH, rng_state, set_rng_state


@dataclass
class ResumePosition:
    """The step counters of a run and the generator states a resume needs."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    next_epoch: int = 1
    skip_batches: int = 0
    epoch_start_rng: dict[str, Any] | None = None
    rng_after_skip: dict[str, Any] | None = None
    rng_at_epoch_end: dict[str, Any] | None = None

    def begin_epoch(self) -> int:
        """Enter the next epoch; return its number."""
        self.epoch = self.next_epoch
        if self.skip_batches == 0:
            self.step_in_epoch = 0
            # Nothing draws a random number between an epoch's checkpoint and the next epoch: its
            # RNG state is this epoch's start (reading it again would wait for the GIL while the
            # checkpoint thread holds it).
            self.epoch_start_rng = self.rng_at_epoch_end or rng_state()
            self.rng_at_epoch_end = None
        return self.epoch

    def skip_trained(self, batches: Iterator[Any]) -> None:
        """Resuming inside an epoch: skip the batches already trained, then restore the RNG."""
        for _ in range(self.skip_batches):
            next(batches)
        self.skip_batches = 0
        if self.rng_after_skip is not None:
            set_rng_state(self.rng_after_skip)
            self.rng_after_skip = None

    def end_epoch(self, rng_at_end: dict[str, Any]) -> None:
        self.rng_at_epoch_end = rng_at_end
        self.next_epoch = self.epoch + 1

    def to_checkpoint(self, rng_now: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint keys that record this position (``rng_now``: the generators at the cut)."""
        return {
            KEY_RNG: rng_now,
            KEY_EPOCH_START_RNG: self.epoch_start_rng if self.epoch_start_rng is not None else rng_now,
            KEY_EPOCH: self.epoch, KEY_STEP: self.step, KEY_STEP_IN_EPOCH: self.step_in_epoch,
        }

    def restore(self, state: dict[str, Any], *, epoch_done: bool) -> None:
        """Go back to a checkpoint's position, generators included."""
        self.step = int(state[KEY_STEP])
        self.epoch = int(state[KEY_EPOCH])
        self.rng_at_epoch_end = None
        if epoch_done:
            self.next_epoch = self.epoch + 1
            self.step_in_epoch = self.skip_batches = 0
            self.rng_after_skip = None
            set_rng_state(state[KEY_RNG])
        else:
            self.next_epoch = self.epoch
            self.step_in_epoch = self.skip_batches = int(state[KEY_STEP_IN_EPOCH])
            self.epoch_start_rng = state[KEY_EPOCH_START_RNG]
            set_rng_state(state[KEY_EPOCH_START_RNG])
            self.rng_after_skip = state[KEY_RNG]
