"""The background metrics writer, against a real run store in tmp_path."""

from __future__ import annotations

import collections
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from babysit import store as st
from babysit.guard import Divergence, DivergenceGuard, GuardConfig
from babysit.guard_watch import NOTHING_WATCHED_AFTER, WatchedGuards
from babysit.store import CHUNK_POINTS, RunStore
from babysit.writer import MetricsWriter, to_float
from bench.common import lines_run
from tests.conftest import wait_for

QUIET = 3600.0  # the background thread sleeps; the tests flush by hand


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    created = RunStore(tmp_path / "run", create=True)
    yield created
    created.close()


class _Harness:
    def __init__(self, store: RunStore, **kwargs: Any) -> None:
        self.store = store
        self.status: dict[str, Any] = {"state": st.RUNNING, "epoch": 1, "step": 0, "branch": 1}
        self.divergences: list[tuple[Divergence, int]] = []
        kwargs.setdefault("interval", QUIET)
        self.writer = MetricsWriter(store, status=lambda: dict(self.status),
                                    on_divergence=lambda found, branch: self.divergences.append((found, branch)),
                                    **kwargs)

    def log(self, step: int, branch: int = 1, per: str = st.PER_STEP, wall: float | None = None, **metrics: Any) -> None:
        self.writer.queue.append((per, branch, step, 1000.0 + step if wall is None else wall, metrics))

    def points(self, name: str, branch: int = 1, per: str = st.PER_STEP) -> tuple[list[int], list[float]]:
        steps, vals, _ = self.store.chunk_points(self.store.series_id(name, branch, per))
        return steps.tolist(), vals.tolist()

    def chunk_sizes(self, name: str, branch: int = 1, per: str = st.PER_STEP) -> list[int]:
        return [int(row[2]) for row in self.store.chunk_summaries(self.store.series_id(name, branch, per))]


@pytest.fixture
def harness(store: RunStore) -> _Harness:
    made = _Harness(store)
    yield made
    made.writer.close()


def test_to_float():
    assert to_float(1.5) == 1.5
    assert to_float(3) == 3.0 and type(to_float(3)) is float
    assert to_float(np.float32(0.25)) == 0.25
    assert to_float(torch.tensor(0.5)) == 0.5
    assert to_float(torch.tensor([2.0], requires_grad=True) * 2) == 4.0
    assert to_float(torch.tensor(1.5, dtype=torch.bfloat16)) == 1.5
    assert to_float(torch.tensor(7)) == 7.0
    with pytest.raises(ValueError):
        to_float("abc")
    with pytest.raises(RuntimeError):
        to_float(torch.ones(3))


def test_floats_and_tensors_are_stored_in_order(harness: _Harness):
    weight = torch.nn.Parameter(torch.tensor(2.0))
    for step in range(1, 6):
        loss = weight * step if step % 2 else float(step) / 10
        harness.log(step, loss=loss, lr=0.1)
    harness.writer.flush()
    assert harness.points("loss") == ([1, 2, 3, 4, 5], [2.0, 0.2, 6.0, 0.4, 10.0])
    assert harness.points("lr") == ([1, 2, 3, 4, 5], [0.1] * 5)
    _, _, walls = harness.store.chunk_points(harness.store.series_id("loss", 1, st.PER_STEP))
    assert walls.tolist() == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]


def test_later_flushes_extend_the_open_chunk(harness: _Harness):
    harness.log(1, loss=1.0)
    harness.writer.flush()
    harness.log(2, loss=2.0)
    harness.log(3, loss=3.0)
    harness.writer.flush()
    assert harness.points("loss") == ([1, 2, 3], [1.0, 2.0, 3.0])
    assert harness.chunk_sizes("loss") == [3]


def test_branches_and_per_epoch_values_go_to_their_own_series(harness: _Harness):
    harness.log(10, loss=1.0)
    harness.log(10, per=st.PER_EPOCH, val_loss=0.5, val_acc=0.9)
    harness.log(11, branch=2, loss=3.0)
    harness.writer.flush()
    assert harness.points("loss") == ([10], [1.0])
    assert harness.points("loss", branch=2) == ([11], [3.0])
    assert harness.points("val_loss", per=st.PER_EPOCH) == ([10], [0.5])
    assert harness.points("val_acc", per=st.PER_EPOCH) == ([10], [0.9])


def test_chunk_rolls_over_at_chunk_points(harness: _Harness):
    for step in range(1, CHUNK_POINTS + 1):
        harness.log(step, loss=float(step))
    harness.writer.flush()
    assert harness.chunk_sizes("loss") == [CHUNK_POINTS]
    for step in range(CHUNK_POINTS + 1, CHUNK_POINTS + 11):
        harness.log(step, loss=float(step))
    harness.writer.flush()
    harness.log(CHUNK_POINTS + 11, loss=0.0)
    harness.writer.flush()
    assert harness.chunk_sizes("loss") == [CHUNK_POINTS, 11]
    summaries = harness.store.chunk_summaries(harness.store.series_id("loss", 1, st.PER_STEP))
    assert summaries[:, :2].tolist() == [[1, CHUNK_POINTS], [CHUNK_POINTS + 1, CHUNK_POINTS + 11]]
    steps, vals = harness.points("loss")
    assert steps == list(range(1, CHUNK_POINTS + 12))
    assert vals == [float(s) for s in range(1, CHUNK_POINTS + 11)] + [0.0]


def test_no_chunk_holds_more_than_chunk_points_even_after_a_long_gap(harness: _Harness):
    # A fast loop can queue thousands of values between two flushes; the store's promise is chunks
    # of *up to* CHUNK_POINTS points, so they must be split.
    total = 2 * CHUNK_POINTS + 88
    for step in range(1, total + 1):
        harness.log(step, loss=float(step))
    harness.writer.flush()
    assert harness.chunk_sizes("loss") == [CHUNK_POINTS, CHUNK_POINTS, 88]
    assert harness.points("loss")[0] == list(range(1, total + 1))


def test_non_numeric_value_records_one_error_event_and_the_writer_goes_on(harness: _Harness):
    harness.log(1, loss=1.0, note="warming up")
    harness.log(2, loss=2.0, note="still warming", vec=torch.ones(3))
    harness.log(3, loss=3.0, note=None)
    harness.writer.flush()
    harness.log(4, loss=4.0, note=5.0)
    harness.writer.flush()
    assert harness.points("loss") == ([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    assert harness.points("note") == ([4], [5.0])
    events = harness.store.events()
    assert [(e["kind"], e["branch"], e["step"]) for e in events] == [("error", 1, 1), ("error", 1, 2)]
    assert events[0]["message"] == ("metric 'note' at step 1: value 'warming up' is not a number; such values are not "
                                    "stored (log numbers or one-element tensors)")
    assert events[1]["message"] == ("metric 'vec' at step 2: value tensor([1., 1., 1.]) is a tensor of 3 elements "
                                    "(shape (3,)), not one number; such values are not stored (log numbers or "
                                    "one-element tensors)")
    assert harness.writer.last_flush_error is None


def test_an_int_too_large_for_a_float_is_dropped_alone_and_named_with_its_step(harness: _Harness):
    for step in range(1, 33):
        harness.log(step, loss=float(step), big=10**400 if step == 5 else step, huge=-(10**5000))
    harness.writer.flush()  # float(10**400) raises OverflowError; the flush must not
    assert harness.points("loss") == (list(range(1, 33)), [float(s) for s in range(1, 33)])
    assert harness.points("big")[0] == [s for s in range(1, 33) if s != 5]
    assert harness.points("huge") == ([], [])
    assert [(e["kind"], e["step"], e["message"]) for e in harness.store.events()] == [
        ("error", 5, "metric 'big' at step 5: value (an int of about 401 digits) is too large for a float; such "
                     "values are not stored (log numbers or one-element tensors)"),
        ("error", 1, "metric 'huge' at step 1: value (an int of about 5001 digits) is too large for a float; such "
                     "values are not stored (log numbers or one-element tensors)"),
    ]


def test_the_event_for_a_bad_value_is_kept_with_its_values_when_the_store_refuses_them(
        harness: _Harness, monkeypatch: pytest.MonkeyPatch):
    _fail_once(harness.store, monkeypatch)
    harness.log(1, loss=1.0, note="warming up")
    harness.log(2, loss=2.0)
    with pytest.raises(sqlite3.OperationalError):
        harness.writer.flush()
    assert harness.store.events() == []
    harness.writer.flush()
    assert harness.points("loss") == ([1, 2], [1.0, 2.0])
    assert [(e["step"], e["message"][:32]) for e in harness.store.events()] == [(1, "metric 'note' at step 1: value '")]


def test_values_lost_to_a_failure_while_sorting_them_are_counted_not_called_stored(
        store: RunStore, monkeypatch: pytest.MonkeyPatch):
    real = MetricsWriter._floats
    failures: list[int] = []

    def fails_once_on_acc(self: MetricsWriter, name: str, *args: Any) -> Any:
        if name == "acc" and not failures:
            failures.append(1)
            raise MemoryError("no room to sort them")
        return real(self, name, *args)

    monkeypatch.setattr(MetricsWriter, "_floats", fails_once_on_acc)
    queued = collections.deque((st.PER_STEP, 1, step, 1.0, {"loss": float(step), "acc": 0.5}) for step in (1, 2, 3))
    writer = MetricsWriter(store, queue=queued, status=lambda: {"state": st.RUNNING}, interval=0.01)
    event = wait_for(lambda: store.events(kinds=["store_trouble"]), timeout=30, what="the outage's event")[-1]
    writer.queue.append((st.PER_STEP, 1, 4, 1.0, {"loss": 4.0, "acc": 0.5}))
    writer.close()
    assert "MemoryError: no room to sort them" in event["message"] and "nothing was lost" not in event["message"]
    assert event["message"].endswith("; 3 logged values were lost; the values logged since are stored"), event
    assert store.chunk_points(store.series_id("loss", 1, st.PER_STEP))[1].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert store.chunk_points(store.series_id("acc", 1, st.PER_STEP))[1].tolist() == [0.5]


def test_status_and_heartbeat_are_written(harness: _Harness):
    harness.status.update(step=42, epoch=3, lr=0.05, momentum=0.9, message="hello")
    before = time.time()
    harness.writer.flush()
    after = time.time()
    status = harness.store.status()
    assert (status["state"], status["step"], status["epoch"], status["lr"], status["momentum"], status["message"]) == (
        "running", 42, 3, 0.05, 0.9, "hello")
    assert before <= status["heartbeat"] <= after
    harness.status.update(state=st.PAUSED, step=43)
    harness.writer.flush()
    assert (harness.store.status()["state"], harness.store.status()["step"]) == ("paused", 43)
    assert harness.store.status()["heartbeat"] >= status["heartbeat"]


def test_guard_callback_fires_for_a_nan_loss(store: RunStore):
    harness = _Harness(store, guard=WatchedGuards(GuardConfig()))
    harness.log(1, loss=1.0, acc=math.nan)  # only the guarded metric is judged
    harness.log(2, per=st.PER_EPOCH, loss=math.nan)  # per-epoch values are not fed to the guard
    harness.writer.flush()
    assert harness.divergences == []
    harness.log(3, loss=torch.tensor(float("nan")))
    harness.log(4, loss=math.nan)
    harness.writer.flush()
    harness.writer.close()
    assert len(harness.divergences) == 1
    found, branch = harness.divergences[0]
    assert (found.step, branch, math.isnan(found.value)) == (3, 1, True)
    assert found.describe() == "loss became nan at step 3"
    steps, vals = harness.points("loss")
    assert steps == [1, 3, 4] and vals[0] == 1.0 and math.isnan(vals[1]) and math.isnan(vals[2])


def test_guard_watches_the_configured_metric(store: RunStore):
    harness = _Harness(store, guard=WatchedGuards(GuardConfig(metric="train_loss")))
    harness.log(1, loss=math.nan)
    harness.writer.flush()
    assert harness.divergences == []
    harness.log(2, train_loss=math.inf)
    harness.writer.flush()
    harness.writer.close()
    assert [(d.step, b) for d, b in harness.divergences] == [(2, 1)]


def test_the_guard_watches_every_loss_by_default_each_on_its_own(store: RunStore):
    """A GAN's two losses on their scales: loss_G going NaN is found though loss_D stays healthy;
    a value without "loss" in its name is not judged, nor one GuardConfig(metrics=) leaves out."""
    harness = _Harness(store, guard=WatchedGuards(GuardConfig()))
    for step in range(1, 30):
        harness.log(step, loss_D=0.7, loss_G=5.0 if step < 21 else math.nan, grad=math.inf)
    harness.writer.flush()
    harness.writer.close()
    [(found, branch)] = harness.divergences
    assert (found.metric, found.step, branch) == ("loss_G", 21, 1)
    assert found.describe() == "loss_G became nan at step 21"

    named = _Harness(store, guard=WatchedGuards(GuardConfig(metrics=["loss_D"])))
    for step in range(1, 30):
        named.log(step, loss_D=0.7, loss_G=math.nan)
    named.writer.flush()
    named.writer.close()
    assert named.divergences == []


def test_a_guard_that_watches_nothing_says_so_once(store: RunStore, caplog):
    harness = _Harness(store, guard=WatchedGuards(GuardConfig()))
    for step in range(1, NOTHING_WATCHED_AFTER):
        harness.log(step, err_D=0.5, err_G=1.0)
    harness.writer.flush()
    assert not [e for e in store.events() if e["kind"] == "guard"]
    for step in range(NOTHING_WATCHED_AFTER, 3 * NOTHING_WATCHED_AFTER):
        harness.log(step, err_D=0.5, err_G=math.nan)
        harness.writer.flush()
    harness.writer.close()
    [event] = [e for e in store.events() if e["kind"] == "guard"]
    assert event["step"] == NOTHING_WATCHED_AFTER + 1
    assert "guard watches nothing" in event["message"] and "'err_D', 'err_G'" in event["message"]
    assert "GuardConfig(metrics=[...])" in event["message"]
    assert [r for r in caplog.records if "guard watches nothing" in r.getMessage()]
    assert harness.divergences == []

    watched = _Harness(store, guard=WatchedGuards(GuardConfig()))
    for step in range(1, 3 * NOTHING_WATCHED_AFTER):
        watched.log(step, acc=0.5, **({"loss": 1.0} if step % 10 == 0 else {}))
        watched.writer.flush()
    watched.writer.close()
    assert len([e for e in store.events() if e["kind"] == "guard"]) == 1


def test_the_guard_judges_each_flush_in_one_call(store: RunStore):
    # The guard's cost must stay per flush, not per value (it holds the GIL on the writer thread):
    # all of a flush's losses reach it in one call, and a jump in the middle of a long flush is
    # still reported at the step it happened.
    calls: list[int] = []

    class CountingGuard(DivergenceGuard):
        def feed_many(self, steps: Any, values: Any) -> Divergence | None:
            calls.append(len(values))
            return super().feed_many(steps, values)

    harness = _Harness(store, guard=WatchedGuards(GuardConfig(), make=CountingGuard))
    for step in range(1, 2001):
        harness.log(step, loss=1.0 + (step % 7) * 0.01, lr=0.1)
    harness.writer.flush()
    for step in range(2001, 2101):
        harness.log(step, loss=100.0 if step >= 2050 else 1.0, lr=0.1)
    harness.writer.flush()
    harness.writer.close()
    assert calls == [2000, 100]
    assert [(d.step, d.value, b) for d, b in harness.divergences] == [(2050, 100.0, 1)]


def test_close_flushes_what_is_queued_and_stops_the_thread(store: RunStore):
    harness = _Harness(store)
    harness.log(1, loss=1.0)
    harness.log(2, loss=2.0)
    harness.writer.close()
    assert harness.points("loss") == ([1, 2], [1.0, 2.0])
    assert not harness.writer._thread.is_alive()


def test_the_thread_flushes_when_woken(store: RunStore):
    ticked = threading.Event()
    harness = _Harness(store, on_tick=ticked.set)
    harness.log(1, loss=1.0)
    harness.writer.wake()
    assert ticked.wait(30)
    assert harness.points("loss") == ([1], [1.0])
    harness.writer.close()


# -- failed flushes --------------------------------------------------------------------------
def _fail_once(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    real: Callable[..., None] = store.write_chunks
    calls: list[int] = []

    def flaky(chunks: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        real(chunks)

    monkeypatch.setattr(store, "write_chunks", flaky)
    return calls


def test_a_store_outage_is_logged_once_and_told_on_the_page_when_it_ends(store: RunStore, caplog: pytest.LogCaptureFixture):
    ticked = threading.Event()
    failures: list[int] = []

    def status() -> dict[str, Any]:
        if len(failures) < 3:  # three flushes in a row fail: one outage
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        return {"state": st.RUNNING, "step": 7}

    with caplog.at_level("WARNING", logger="babysit.writer"):
        writer = MetricsWriter(store, status=status, on_tick=ticked.set, interval=0.01)
        assert ticked.wait(30)
        writer.close()
    said = [r.getMessage() for r in caplog.records if r.name == "babysit.writer"]
    assert sum("storing the run's values failed (OperationalError: database is locked)" in m for m in said) == 1
    event = store.events(kinds=["store_trouble"])[-1]
    assert "database is locked" in event["message"] and "nothing was lost" in event["message"]


def test_the_thread_survives_a_failed_flush(store: RunStore):
    ticked = threading.Event()
    failures: list[int] = []

    def status() -> dict[str, Any]:
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        return {"state": st.RUNNING, "step": 7}

    writer = MetricsWriter(store, status=status, on_tick=ticked.set, interval=0.01)
    assert ticked.wait(30)  # the first flush failed, a later one succeeded
    assert failures == [1]
    writer.queue.append((st.PER_STEP, 1, 7, 1.0, {"loss": 0.5}))
    ticked.clear()
    assert ticked.wait(30)
    writer.close()
    assert store.chunk_points(store.series_id("loss", 1, st.PER_STEP))[1].tolist() == [0.5]
    assert store.status()["step"] == 7
    assert writer.last_flush_error is None


def test_values_of_a_failed_flush_are_written_by_the_next_one(harness: _Harness, monkeypatch: pytest.MonkeyPatch):
    # "a busy or full disk must not kill the writer; retry next tick": the retry must write what
    # the failed attempt had taken off the queue, even if nothing new was logged since.
    calls = _fail_once(harness.store, monkeypatch)
    for step in (1, 2, 3):
        harness.log(step, loss=float(step))
    with pytest.raises(sqlite3.OperationalError):
        harness.writer.flush()
    harness.writer.flush()
    assert len(calls) == 2
    assert harness.points("loss") == ([1, 2, 3], [1.0, 2.0, 3.0])


def test_a_full_chunk_is_not_lost_when_its_flush_fails(harness: _Harness, monkeypatch: pytest.MonkeyPatch):
    _fail_once(harness.store, monkeypatch)
    for step in range(1, CHUNK_POINTS + 1):
        harness.log(step, loss=float(step))
    with pytest.raises(sqlite3.OperationalError):
        harness.writer.flush()
    harness.log(CHUNK_POINTS + 1, loss=0.0)
    harness.writer.flush()
    assert harness.points("loss")[0] == list(range(1, CHUNK_POINTS + 2))


def test_a_divergence_found_during_a_failed_flush_is_still_reported(store: RunStore, monkeypatch: pytest.MonkeyPatch):
    # The guard trips once; if the flush that tripped it fails, the report must come with the retry,
    # or a NaN loss would never pause the run.
    harness = _Harness(store, guard=WatchedGuards(GuardConfig()))
    _fail_once(store, monkeypatch)
    harness.log(1, loss=1.0)
    harness.log(2, loss=math.nan)
    with pytest.raises(sqlite3.OperationalError):
        harness.writer.flush()
    harness.writer.flush()
    harness.writer.close()
    assert [(d.step, b) for d, b in harness.divergences] == [(2, 1)]


# -- what a flush costs the training thread ----------------------------------------------------
def test_names_logged_on_some_steps_only_are_each_stored_at_their_steps(harness: _Harness):
    # The usual flush is one run of items with the same names, gathered in C; anything else
    # (a metric every third step, one that appears later, a different set of the same size)
    # must still land in its own series at its own steps.
    for step in range(1, 13):
        metrics: dict[str, Any] = {"loss": float(step)}
        if step % 3 == 0:
            metrics["acc"] = step / 100
        if step == 7:
            metrics = {"lr": 0.5, "momentum": 0.9}  # as many names as {loss, acc}, not the same ones
        harness.log(step, **metrics)
    harness.writer.flush()
    assert harness.points("loss") == ([1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12])
    assert harness.points("acc") == ([3, 6, 9, 12], [0.03, 0.06, 0.09, 0.12])
    assert harness.points("lr") == ([7], [0.5]) and harness.points("momentum") == ([7], [0.9])


def test_a_nan_in_the_middle_of_a_long_flush_is_reported_at_its_step(store: RunStore):
    # Fed a whole flush at once, the guard still reports the very step of a NaN or of a jump,
    # at the end of the flush that carries it (within one flush interval of being logged).
    harness = _Harness(store, guard=WatchedGuards(GuardConfig()))
    for step in range(1, 3001):
        harness.log(step, loss=math.nan if step == 2345 else 1.0 + (step % 5) * 0.01)
    harness.writer.flush()
    harness.writer.close()
    assert [(d.step, math.isnan(d.value), b) for d, b in harness.divergences] == [(2345, True, 1)]
    assert harness.points("loss")[0] == list(range(1, 3001))


def test_a_flushs_python_work_grows_with_its_chunks_not_with_its_values(store: RunStore):
    # Whatever the writer thread runs while holding the GIL, the training thread waits for (it
    # needs the GIL between any two torch calls), so a flush must not run Python per logged
    # value: the values are gathered, converted and packed in C, and Python runs per chunk of
    # CHUNK_POINTS values (its summary row) plus a fixed amount per flush. Counting the lines
    # run instead of timing keeps this independent of the machine's speed and load. (The
    # guard's own short-chunk loop is bounded in tests/test_guard.py.)
    from babysit import guard as guard_module, writer as writer_module

    files = (writer_module.__file__, guard_module.__file__, st.__file__)
    harness = _Harness(store, guard=WatchedGuards(GuardConfig()))
    step = 0

    def flush_of(n: int) -> dict[str, int]:
        nonlocal step
        for _ in range(n):
            step += 1
            harness.log(step, loss=1.0 + (step % 7) * 0.01, lr=0.1)
        return lines_run(files, harness.writer.flush)

    flush_of(3000)  # past the guard's warm-up, the series known to the store
    sizes = (1_000, 10_000)
    lines = {n: flush_of(n) for n in sizes}
    harness.writer.close()
    assert harness.divergences == []
    chunks = {n: 2 * math.ceil(n / CHUNK_POINTS) for n in sizes}  # two metrics
    per_chunk = 45  # measured: ~25 in writer.py (fill, then pack the chunk), ~15 in store.py (its row)
    grew = sum(lines[10_000].values()) - sum(lines[1_000].values())
    # Beyond the chunks, only the guard's doubling scans grow (log2 of the chunk, ~4 lines a pass).
    assert grew <= per_chunk * (chunks[10_000] - chunks[1_000]) + 2 * 4 * 4, lines
    writer_lines = lines[10_000][writer_module.__file__]
    assert writer_lines <= 60 + 30 * chunks[10_000], lines
    assert sum(lines[10_000].values()) < 0.25 * 2 * 10_000, lines  # a quarter of a line per logged value (was 7)


def test_the_lr_a_scheduler_moves_every_step_is_no_reason_to_say_the_guard_watches_nothing(tmp_path: Path):
    """A loop that logs its loss every 50 steps, with a scheduler that moves the lr every step:
    babysit's own lr series arrives every step, but the loss is watched when it comes."""
    import torch

    import babysit

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    with babysit.Run(tmp_path / "r", model, optimizer, scheduler) as run:
        for _ in run.epochs(1):
            for _ in run.batches(range(3 * NOTHING_WATCHED_AFTER + 10)):
                optimizer.step()
                scheduler.step()
                if run.step % 50 == 0:
                    run.log(loss=1.0)
                run.writer.flush()
    events = RunStore(tmp_path / "r").events()
    assert not [e for e in events if e["kind"] == "guard"], [e["message"] for e in events if e["kind"] == "guard"]
