"""A resumed epoch starts N batches in without fetching them (babysit.loader_skip, through
babysit.position): the same batches, the same random draws after them, as the epoch that was never
cut — by the sampler's indices, by a StatefulDataLoader's own state, or by reading them."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from babysit import loader_skip
from babysit.checkpoint import FORMAT, KEY_FORMAT, read_verified, rng_state, write_atomic
from babysit.position import ResumePosition

N = 96  # samples; 12 batches of 8


class Augmented(Dataset):
    """Sample i is i plus noise drawn from the global generator (a random augmentation; none with
    ``noise=False``), and it refuses to be fetched for the indices in ``poisoned``: a skipped batch
    must never be fetched."""

    def __init__(self, poisoned: frozenset[int] = frozenset(), noise: bool = True) -> None:
        self.poisoned, self.noise = poisoned, noise
        self.armed = multiprocessing.Value("b", 1)  # shared with the workers: the poison can be lifted

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self.poisoned and self.armed.value:
            raise AssertionError(f"sample {index} of a skipped batch was fetched")
        return torch.tensor([float(index)]) + (torch.rand(1) if self.noise else 0.5)


class Stream(IterableDataset):
    def __iter__(self):  # noqa: ANN204
        generator = torch.Generator().manual_seed(5)
        return iter(torch.randn(40, 2, generator=generator))


LOADERS: dict[str, Callable[[Dataset], Any]] = {
    "shuffle": lambda data: DataLoader(data, batch_size=8, shuffle=True),
    "own generator, drop_last": lambda data: DataLoader(data, batch_size=7, shuffle=True, drop_last=True,
                                                        generator=torch.Generator().manual_seed(3)),
    "no batching": lambda data: DataLoader(data, batch_size=None, shuffle=True),
    "custom batch sampler": lambda data: DataLoader(data, batch_sampler=_Pairs(RandomSampler(data))),
    "two workers": lambda data: DataLoader(data, batch_size=8, shuffle=True, num_workers=2),
    "persistent workers": lambda data: DataLoader(data, batch_size=8, shuffle=True, num_workers=2,
                                                  persistent_workers=True),
}


class _Pairs(BatchSampler):
    """A batch sampler of its own (not torch's BatchSampler type): its batches are skipped whole."""

    def __init__(self, sampler: Any) -> None:
        super().__init__(sampler, 2, False)

    def __iter__(self):  # noqa: ANN204
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == 2:
                yield list(batch)
                batch = []


def epoch(position: ResumePosition, loader: Any, *, cut_at: int | None = None,
          draws: bool = True) -> tuple[list[Any], dict[str, Any] | None]:
    """One epoch as run.batches walks it: each batch, then a random draw (dropout); at ``cut_at``
    the checkpoint keys a snapshot would hold. Returns what each step saw, and the snapshot."""
    position.begin_epoch()
    seen: list[Any] = []
    snapshot = None
    for batch in position.iterate(loader):
        position.step += 1
        position.step_in_epoch += 1
        seen.append((batch if not isinstance(batch, torch.Tensor) else batch.tolist(),
                     torch.rand(1).item() if draws else None))
        if position.step_in_epoch == cut_at:
            snapshot = position.to_checkpoint(rng_state())
    position.end_epoch(rng_state())
    return seen, snapshot


def indices_of(seen: list[Any]) -> frozenset[int]:
    """The dataset indices of the batches seen (an Augmented sample is its index plus noise < 1)."""
    flat = torch.tensor([batch for batch, _ in seen], dtype=torch.float64).flatten()
    return frozenset(int(v) for v in flat.floor().tolist())


@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_resumed_epoch_skips_by_the_sampler_fetching_nothing_and_trains_what_the_uncut_one_did(kind: str) -> None:
    """In the main process, random augmentation draws as in the uncut epoch too; in worker
    processes it restarts from each worker's seed (the known limit): the workers' data has none."""
    make = LOADERS[kind]
    noise = "workers" not in kind
    torch.manual_seed(0)
    uncut = ResumePosition()
    loader = make(Augmented(noise=noise))
    first, snapshot = epoch(uncut, loader, cut_at=5)
    assert snapshot is not None
    second, _ = epoch(uncut, loader)
    # A new process: the loader is made again, the position restored from the snapshot; the
    # skipped batches' samples would raise if fetched.
    skipped = indices_of(first[:5])
    assert len(skipped) == sum(len(torch.tensor(batch).flatten()) for batch, _ in first[:5])
    torch.manual_seed(0)
    loader = make(Augmented(poisoned=skipped, noise=noise))
    torch.manual_seed(123)  # whatever the generators did since: the snapshot's states come back
    resumed = ResumePosition()
    resumed.restore(snapshot, epoch_done=False)
    rest, _ = epoch(resumed, loader)
    assert resumed.last_skip == loader_skip.Skip(5, loader_skip.BY_SAMPLER) and resumed.last_skip.note is None
    assert rest == first[5:]
    if kind == "persistent workers":  # the epoch after, from the same workers, is not skipped
        loader.dataset.armed.value = 0
        after, _ = epoch(resumed, loader)
        assert after == second


def test_a_stateful_data_loader_resumes_from_its_own_state_through_a_checkpoint_file(tmp_path: Path) -> None:
    def make(workers: int) -> StatefulDataLoader:
        return StatefulDataLoader(Augmented(noise=workers == 0), batch_size=8, shuffle=True, num_workers=workers,
                                  generator=torch.Generator().manual_seed(7))

    for workers in (0, 2):
        torch.manual_seed(0)
        uncut = ResumePosition()
        first, snapshot = epoch(uncut, make(workers), cut_at=4, draws=workers == 0)
        second, _ = epoch(uncut, make(workers), draws=workers == 0)
        assert snapshot is not None and snapshot["loader_state"] is not None
        sha, _ = write_atomic(tmp_path / f"w{workers}.pt", {KEY_FORMAT: FORMAT, **snapshot})
        loaded = read_verified(tmp_path / f"w{workers}.pt", sha)  # weights_only: the loader's state is plain data
        resumed = ResumePosition()
        resumed.restore(loaded, epoch_done=False)
        rest, _ = epoch(resumed, make(workers), draws=workers == 0)
        assert resumed.last_skip == loader_skip.Skip(4, loader_skip.BY_LOADER_STATE)
        assert rest == first[4:], f"num_workers={workers}"


def test_an_iterable_dataset_without_state_is_read_up_to_the_cut_and_says_so() -> None:
    torch.manual_seed(0)
    uncut = ResumePosition()
    first, snapshot = epoch(uncut, DataLoader(Stream(), batch_size=4), cut_at=3)
    resumed = ResumePosition()
    resumed.restore(snapshot, epoch_done=False)
    rest, _ = epoch(resumed, DataLoader(Stream(), batch_size=4))
    assert rest == first[3:]
    assert resumed.last_skip == loader_skip.Skip(3, loader_skip.BY_READING, read=3)
    assert resumed.last_skip.note is not None and resumed.last_skip.note.startswith(
        "resuming inside the epoch reads the 3 batches it already trained and throws them away")


def test_a_data_skip_leaves_out_the_next_batches_inside_an_epoch_and_at_an_epoch_s_start() -> None:
    def make() -> DataLoader:  # no augmentation: the batches skipped would have drawn noise
        return DataLoader(Augmented(noise=False), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    position, loader = ResumePosition(), make()
    first, inside = epoch(position, loader, cut_at=3, draws=False)
    at_end = position.to_checkpoint(rng_state())
    second, _ = epoch(position, loader, draws=False)
    resumed = ResumePosition()
    resumed.restore(inside, epoch_done=False)
    resumed.skip_ahead(4)
    assert (resumed.skip_batches, resumed.step_in_epoch, resumed.step) == (7, 7, 3)
    rest, _ = epoch(resumed, make(), draws=False)
    assert [batch for batch, _ in rest] == [batch for batch, _ in first[7:]]
    resumed = ResumePosition()
    resumed.restore({**at_end, "step_in_epoch": 12}, epoch_done=True)
    resumed.skip_ahead(2)
    rest, _ = epoch(resumed, make(), draws=False)
    assert [batch for batch, _ in rest] == [batch for batch, _ in second[2:]]


def test_a_checkpoint_taken_after_a_mid_epoch_resume_resumes_exactly_too() -> None:
    """Resumed inside epoch 2 from one snapshot, cut again later in that epoch: the second
    snapshot still knows how the epoch's shuffle started (the loader's own generator)."""
    def make() -> DataLoader:
        return DataLoader(Augmented(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    uncut, loader = ResumePosition(), make()
    epoch(uncut, loader)
    second, early = epoch(uncut, loader, cut_at=2)
    resumed = ResumePosition()
    resumed.restore(early, epoch_done=False)
    _, later = epoch(resumed, make(), cut_at=6)
    again = ResumePosition()
    again.restore(later, epoch_done=False)
    rest, _ = epoch(again, make())
    assert rest == second[6:]


def test_a_loader_behind_a_tqdm_bar_resumes_by_its_sampler_with_its_own_generator_and_the_bar_counts_on() -> None:
    """``run.enumerate(tqdm(loader))``, the tutorials' loop: the DataLoader behind the bar, with a
    generator of its own (PyTorch's reproducibility recipe), resumes exactly and without fetching
    the trained batches; the bar starts at the batches already trained and still advances."""
    import io

    from tqdm import tqdm

    def make(poisoned: frozenset[int] = frozenset()) -> DataLoader:
        return DataLoader(Augmented(poisoned), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))

    torch.manual_seed(0)
    uncut = ResumePosition()
    first, snapshot = epoch(uncut, tqdm(make(), file=io.StringIO()), cut_at=5)
    torch.manual_seed(0)
    loader = make(poisoned=indices_of(first[:5]))
    torch.manual_seed(123)
    resumed = ResumePosition()
    resumed.restore(snapshot, epoch_done=False)
    # The bar's first redraw comes after the skip: its count must not take the skipped batches twice.
    bar = tqdm(loader, file=io.StringIO(), mininterval=3600)
    resumed.begin_epoch()
    batches = resumed.iterate(bar)
    bar.mininterval = 0  # from here on it redraws at every batch (a slow loader, a long epoch)
    rest = []
    for batch in batches:
        resumed.step_in_epoch += 1
        rest.append((batch.tolist(), torch.rand(1).item()))
        assert bar.n == resumed.step_in_epoch - 1  # counted when the next batch is asked for
    assert rest == first[5:]
    assert resumed.last_skip == loader_skip.Skip(5, loader_skip.BY_SAMPLER)
    assert bar.n == len(loader) and bar.iterable is loader
