"""Where a run is, exactly: the counters and random-generator states that make a resume exact.

One object owns them, so every loop babysit serves (``Run.batches``, the framework callbacks)
resumes the same way. An epoch's checkpoint resumes at the next epoch with the generators as they
were when it was taken; a mid-epoch checkpoint ("checkpoint now", a periodic one, a stop) resumes
inside its epoch: the generators are put back as the epoch started, so the loader shuffles as
before, the batches already trained are skipped (by the loader's own state, by the sampler's
indices, or by reading them: :mod:`babysit.loader_skip`), and then the generators are put back as
they were at the cut.

``step_in_epoch`` counts the batches of the epoch's data order that are behind the run: those
trained, and those a rollback's data skip left out (:meth:`ResumePosition.skip_ahead`); ``step``
counts the steps trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from . import loader_skip
from .checkpoint import (
    KEY_EPOCH, KEY_EPOCH_START_RNG, KEY_LOADER_RNG, KEY_LOADER_STATE, KEY_RNG, KEY_STEP, KEY_STEP_IN_EPOCH, rng_state,
    set_rng_state,
)


@dataclass
class ResumePosition:
    """The step counters of a run and the generator states a resume needs."""

    branch: int = 0                       # the branch being trained (the store's id)
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    steps_per_epoch: int | None = None    # the loader's length, when it has one
    next_epoch: int = 1
    skip_batches: int = 0
    epoch_start_rng: dict[str, Any] | None = None
    rng_after_skip: dict[str, Any] | None = None
    rng_at_epoch_end: dict[str, Any] | None = None
    # A loader with a torch.Generator of its own (PyTorch's reproducibility recipe) shuffles from
    # it, not from the global generator: its states travel too, set when the loader is next used.
    loader_generators: tuple[torch.Generator, ...] = ()
    loader_rng_epoch_start: list[torch.Tensor] | None = None
    loader_rng_to_set: list[torch.Tensor] | None = None
    loader_rng_after_skip: list[torch.Tensor] | None = None
    # The loader of the epoch in progress: a loader with state_dict() (torchdata's
    # StatefulDataLoader) has its state in every checkpoint, loaded back before its next iter().
    loader: Any = None
    loader_state_to_load: dict[str, Any] | None = None
    loader_state_batches: int = 0  # how far into its epoch that saved state stands
    last_skip: loader_skip.Skip | None = None  # how the last resumed epoch got past its first batches

    def iterate(self, loader: Iterable[Any]) -> Iterator[Any]:
        """``iter(loader)`` at this position: a resumed epoch starts after the batches behind the
        run, skipped the cheapest exact way the loader allows (:func:`babysit.loader_skip.start`);
        :attr:`last_skip` says how."""
        self.use_loader(loader)
        state, self.loader_state_to_load = self.loader_state_to_load, None
        iterator, self.last_skip = loader_skip.start(loader, self.skip_batches, state=state,
                                                     state_batches=self.loader_state_batches)
        if self.skip_batches:
            self.batches_skipped()
        return iterator

    def use_loader(self, loader: Iterable[Any]) -> None:
        """Before ``iter(loader)``: find its generators, put back a checkpoint's states."""
        self.loader = loader_skip.behind_bar(loader)  # a tqdm bar's loader holds the sampler and state
        self.loader_generators = loader_generators(self.loader)
        states, self.loader_rng_to_set = self.loader_rng_to_set, None
        restored = states is not None and len(states) == len(self.loader_generators)
        if restored:
            for generator, state in zip(self.loader_generators, states):  # type: ignore[arg-type]
                generator.set_state(state)
        if self.skip_batches == 0:
            self.loader_rng_epoch_start = [g.get_state() for g in self.loader_generators]
        else:  # a resumed epoch: its start is the state just put back (a later checkpoint of it records that)
            self.loader_rng_epoch_start = states if restored else None

    def at_last_boundary(self) -> bool:
        """After the epoch's last batch: a cut here would leave an epoch with nothing to train but
        its end (evaluation, anneal) still to run; a stop or a checkpoint waits for that end."""
        return self.steps_per_epoch is not None and self.step_in_epoch >= self.steps_per_epoch

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

    def skip_ahead(self, batches: int) -> None:
        """After :meth:`restore`: the resumed run also leaves out the next ``batches`` of the data
        order (a rollback's data skip). Inside an epoch they add to the batches skipped; at an
        epoch's start (an epoch's checkpoint) the next epoch starts that many batches in, its
        generators drawing as the epoch's start does, with nothing put back after the skip."""
        if batches <= 0:
            return
        if self.skip_batches == 0:
            self.epoch_start_rng = rng_state()  # restore() just set the generators to the epoch's start
            self.rng_after_skip = None
            self.loader_rng_after_skip = None
            self.step_in_epoch = 0
        self.skip_batches += batches
        self.step_in_epoch += batches

    def batches_skipped(self) -> None:
        """The batches already trained are skipped (by :meth:`iterate`, or by a framework's own
        loader when it resumes): put the generators back as they were at the cut."""
        self.skip_batches = 0
        if self.rng_after_skip is not None:
            set_rng_state(self.rng_after_skip)
            self.rng_after_skip = None
        after, self.loader_rng_after_skip = self.loader_rng_after_skip, None
        if after is not None and len(after) == len(self.loader_generators):
            for generator, state in zip(self.loader_generators, after):
                generator.set_state(state)

    def end_epoch(self, rng_at_end: dict[str, Any]) -> None:
        self.rng_at_epoch_end = rng_at_end
        self.next_epoch = self.epoch + 1

    def to_checkpoint(self, rng_now: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint keys that record this position (``rng_now``: the generators at the cut)."""
        return {
            KEY_RNG: rng_now,
            KEY_EPOCH_START_RNG: self.epoch_start_rng if self.epoch_start_rng is not None else rng_now,
            KEY_EPOCH: self.epoch, KEY_STEP: self.step, KEY_STEP_IN_EPOCH: self.step_in_epoch,
            KEY_LOADER_RNG: {"epoch_start": self.loader_rng_epoch_start,
                             "now": [g.get_state() for g in self.loader_generators]},
            KEY_LOADER_STATE: loader_skip.own_state(self.loader),
        }

    def restore(self, state: dict[str, Any], *, epoch_done: bool) -> None:
        """Go back to a checkpoint's position, generators included."""
        self.step = int(state[KEY_STEP])
        self.epoch = int(state[KEY_EPOCH])
        self.rng_at_epoch_end = None
        loader_rng = state.get(KEY_LOADER_RNG) or {}
        self.loader_state_to_load = state.get(KEY_LOADER_STATE)
        self.loader_state_batches = 0 if epoch_done else int(state[KEY_STEP_IN_EPOCH])
        if epoch_done:
            self.loader_rng_to_set, self.loader_rng_after_skip = loader_rng.get("now"), None
            self.next_epoch = self.epoch + 1
            self.step_in_epoch = self.skip_batches = 0
            self.rng_after_skip = None
            set_rng_state(state[KEY_RNG])
        else:
            self.next_epoch = self.epoch
            self.step_in_epoch = self.skip_batches = int(state[KEY_STEP_IN_EPOCH])
            self.loader_rng_to_set, self.loader_rng_after_skip = loader_rng.get("epoch_start"), loader_rng.get("now")
            self.epoch_start_rng = state[KEY_EPOCH_START_RNG]
            set_rng_state(state[KEY_EPOCH_START_RNG])
            self.rng_after_skip = state[KEY_RNG]


def loader_generators(loader: Any) -> tuple[torch.Generator, ...]:
    """The torch.Generator objects a DataLoader (its sampler, its batch sampler's sampler) draws from."""
    found: list[torch.Generator] = []
    for holder in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return tuple(found)
