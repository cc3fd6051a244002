"""Starting a loader's epoch N batches in, at a cost that does not grow with N.

A resume inside an epoch (a crash, a stop, a rollback to a periodic checkpoint) must leave out the
batches the epoch already trained, and a rollback with ``--skip-batches`` leaves out more. Three
ways, the first the loader allows:

1. **The loader's own state** (``state_dict()``/``load_state_dict()``: torchdata's
   ``StatefulDataLoader``). Its state travels in every checkpoint and is loaded before ``iter()``;
   the loader puts itself where it was. A data skip on top of it reads those batches.
2. **The sampler's indices** (a ``torch.utils.data.DataLoader`` over a map-style dataset, the
   common case): the sampler draws its order as in the uninterrupted run (the same generator
   draws, in the same order), the indices of the first N batches are passed over, and no sample is
   fetched for them. With ``num_workers > 0`` the workers are handed the first index batch to train,
   never one of the skipped ones.
3. **Reading them** (an ``IterableDataset`` with no state, a generator, any other iterable): the N
   batches are drawn and thrown away, as every resume did before; the trainer says so once, with
   the count (:attr:`Skip.note`).

A progress bar around the loader (``run.enumerate(tqdm(loader))``, the tutorials' loop) is looked
through: the loader behind it is skipped in one of these ways (:func:`behind_bar`), and the bar
counts the skipped batches as done, so it reads as the index ``run.enumerate`` gives.

Exact as far as the batches are a function of the sampler's order and the generators babysit
restores (:mod:`babysit.position`); random augmentation drawn inside worker processes is not one:
each worker restarts from its seed, as with torchdata's own resume.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from torch.utils.data import BatchSampler, DataLoader
from torch.utils.data.dataloader import _DatasetKind

from . import user_state

BY_LOADER_STATE = "loader state"
BY_SAMPLER = "sampler"
BY_READING = "reading"


@dataclass(frozen=True)
class Skip:
    """How a resumed epoch got past its first ``batches``: ``how`` is one of :data:`BY_LOADER_STATE`,
    :data:`BY_SAMPLER`, :data:`BY_READING`; ``read`` of them were fetched and thrown away."""

    batches: int
    how: str
    read: int = 0

    @property
    def note(self) -> str | None:
        """What a person should hear: only when batches had to be read (the cost grows with them)."""
        if not self.read:
            return None
        if self.how == BY_LOADER_STATE:
            return (f"the loader resumed from its own state; the {self.read} batches skipped after it are read and "
                    "thrown away")
        return (f"resuming inside the epoch reads the {self.read} batches it already trained and throws them away: "
                "this loader has neither a map-style dataset with a sampler nor state_dict()/load_state_dict() "
                "(torchdata's StatefulDataLoader) to skip them without reading")


def has_own_state(loader: Any) -> bool:
    """A loader that saves and loads its position itself (torchdata's StatefulDataLoader)."""
    return user_state.is_stateful(loader)


def own_state(loader: Any) -> dict[str, Any] | None:
    """The loader's state as a checkpoint can hold it (plain data), or None if it has none or its
    state is not plain data (a resume then skips by the sampler or by reading)."""
    if loader is None or not has_own_state(loader):
        return None
    try:
        return user_state.plain_copy(loader.state_dict(), "the loader's state_dict()")
    except (TypeError, AttributeError):
        # AttributeError: accelerate's prepared DataLoader has state_dict() always, but it works only
        # when made with use_stateful_dataloader=True; otherwise it is an ordinary loader.
        return None


def behind_bar(loader: Any) -> Any:
    """The iterable a tqdm progress bar wraps (its sampler, generators and state are the data's),
    or ``loader`` itself when it is no such bar."""
    inner = getattr(loader, "iterable", None)
    if inner is not None and type(loader).__module__.split(".")[0] == "tqdm":
        return inner
    return loader


def start(loader: Iterable[Any], skip: int, *, state: dict[str, Any] | None = None,
          state_batches: int = 0) -> tuple[Iterator[Any], Skip | None]:
    """``iter(loader)``, the first ``skip`` batches of its epoch left out (the cheapest exact way it
    allows). ``state``: the loader's own saved state, which already stands ``state_batches`` into
    the epoch. Returns the iterator and how it skipped (None when nothing was skipped)."""
    inner = behind_bar(loader)
    if inner is not loader:
        iterator, how = start(inner, skip, state=state, state_batches=state_batches)
        if skip:  # the bar counts the batches trained before; its own loop goes on from its n and
            # last_print_n (an update() that did not redraw leaves the latter behind: counted twice)
            loader.n = loader.last_print_n = loader.initial = skip  # type: ignore[attr-defined]  # initial: no rate for them
            loader.refresh()  # type: ignore[attr-defined]
        loader.iterable = _HandOver(iterator, loader, inner)  # type: ignore[attr-defined]
        return iter(loader), how
    if state is not None and has_own_state(loader):
        loader.load_state_dict(state)  # type: ignore[attr-defined]
        iterator = iter(loader)
        extra = max(0, skip - state_batches)
        _consume(iterator, extra)
        return iterator, Skip(skip, BY_LOADER_STATE, read=extra) if skip else None
    if not skip:
        return iter(loader), None
    if _skips_by_sampler(loader):
        return _start_after_indices(loader, skip), Skip(skip, BY_SAMPLER)  # type: ignore[arg-type]
    iterator = iter(loader)
    _consume(iterator, skip)
    return iterator, Skip(skip, BY_READING, read=skip)


def _consume(iterator: Iterator[Any], count: int) -> None:
    if count > 0:
        next(itertools.islice(iterator, count, count), None)


def _skips_by_sampler(loader: Any) -> bool:
    """A DataLoader whose iteration is torch's own (not a subclass's) over a map-style dataset:
    its batches are the dataset's items at the sampler's indices."""
    return (isinstance(loader, DataLoader) and getattr(loader, "_dataset_kind", None) == _DatasetKind.Map
            and type(loader).__iter__ is DataLoader.__iter__ and type(loader)._get_iterator is DataLoader._get_iterator
            and not has_own_state(loader))


def _start_after_indices(loader: DataLoader, skip: int) -> Iterator[Any]:
    """``iter(loader)`` with an index sampler that passes over the first ``skip`` batches of
    indices. The skip runs at the iterator's first index draw (inside ``iter()`` with workers,
    which hand out indices at once; forced right after it without), so every generator draw of the
    sampler happens where it happens in an uninterrupted epoch."""
    attribute = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    live = loader._iterator if loader.persistent_workers and loader.num_workers > 0 else None
    if live is not None:
        # Persistent workers: the iterator made at the first epoch is reset, with the index sampler
        # it kept; the skip goes there (it only acts once, then is the sampler as it was).
        live._index_sampler = _SkipFirst(_unwrapped(live._index_sampler), skip)
        iterator = iter(loader)
    else:
        original = getattr(loader, attribute)
        # DataLoader refuses to have its samplers set after construction; this is for the one
        # iter() below only, and put back at once.
        object.__setattr__(loader, attribute, _SkipFirst(_unwrapped(original), skip))
        try:
            iterator = iter(loader)
        finally:
            object.__setattr__(loader, attribute, original)
    indices = getattr(iterator, "_sampler_iter", None)
    if isinstance(indices, _SkippingIndices):
        indices.start()
        if loader.num_workers == 0:
            iterator._sampler_iter = indices.inner  # type: ignore[union-attr]  # the plain index iterator from here on
    return iterator


def _unwrapped(sampler: Any) -> Any:
    return sampler.sampler if isinstance(sampler, _SkipFirst) else sampler


class _SkipFirst:
    """An index sampler whose first iteration that draws leaves out its first ``skip`` batches;
    later ones are the sampler's own (a persistent workers' iterator keeps it for the epochs after).
    Torch's iterators call ``iter()`` on it more than once before drawing (a multi-worker iterator
    makes one, then resets): the skip belongs to the one that draws."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler = sampler
        self.skip = skip

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        return _SkippingIndices(self) if self.skip else iter(self.sampler)


class _SkippingIndices:
    """The index iterator of :class:`_SkipFirst`: it draws the sampler's order and passes over the
    skipped indices at its first use (:meth:`start`), never earlier."""

    def __init__(self, owner: _SkipFirst) -> None:
        self.owner = owner
        self.inner: Iterator[Any] | None = None

    def start(self) -> None:
        if self.inner is not None:
            return
        sampler, skip = self.owner.sampler, self.owner.skip
        self.owner.skip = 0
        if type(sampler) is BatchSampler and skip:
            # Skip single indices (at C speed: no list per skipped batch), then batch the rest with
            # torch's own BatchSampler code over what is left of the very same index iterator.
            indices = iter(sampler.sampler)
            _consume(indices, skip * sampler.batch_size)
            self.inner = iter(BatchSampler(_Already(indices), sampler.batch_size, sampler.drop_last))
        else:
            self.inner = iter(sampler)
            _consume(self.inner, skip)

    def __iter__(self) -> "_SkippingIndices":
        return self

    def __next__(self) -> Any:
        if self.inner is None:
            self.start()
        return next(self.inner)  # type: ignore[arg-type]


class _HandOver:
    """Stands in for a progress bar's iterable until the bar starts iterating: hands it the
    iterator already past the skipped batches, and puts the bar's own iterable back."""

    def __init__(self, iterator: Iterator[Any], bar: Any, iterable: Any) -> None:
        self.iterator, self.bar, self.iterable = iterator, bar, iterable

    def __iter__(self) -> Iterator[Any]:
        self.bar.iterable = self.iterable
        return self.iterator


class _Already:
    """An index iterator in progress, as a sampler BatchSampler can iterate (once)."""

    def __init__(self, indices: Iterator[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return self.indices
