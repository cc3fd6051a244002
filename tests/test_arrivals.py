"""Ranks meeting through the job's key-value store (babysit/arrivals.py): every rank's value once all
came; a rank that does not come is named, on every rank alike, late ones included."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from babysit import arrivals
from babysit.arrivals import Arrivals
from babysit.errors import RanksOutOfStep


@pytest.fixture
def store() -> Any:
    return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))


def test_every_rank_gets_every_value_once_all_came(store: Any):
    ranks = [Arrivals(store, "t", rank, 3, timeout_s=60) for rank in range(3)]
    got: dict[int, Any] = {}
    threads = [threading.Thread(target=lambda r=r: got.__setitem__(r, ranks[r].all_arrive("1/a", {"rank": r}, "x")))
               for r in (1, 2)]
    for thread in threads:
        thread.start()
    got[0] = ranks[0].all_arrive("1/a", {"rank": 0}, "x")
    for thread in threads:
        thread.join(timeout=60)
    assert got == {r: [{"rank": 0}, {"rank": 1}, {"rank": 2}] for r in range(3)}


def test_a_rank_that_does_not_come_is_named_and_a_late_one_is_told_the_same(store: Any):
    early, late = Arrivals(store, "t", 0, 2, timeout_s=0.3), Arrivals(store, "t", 1, 2, timeout_s=0.3)
    message = r"^rank 1 did not arrive at an epoch's end after step 40 within 0 s \(stopped, killed, or stuck in a " \
              r"collective of its own\)$"
    with pytest.raises(RanksOutOfStep, match=message):
        early.all_arrive("2/epoch", None, "an epoch's end after step 40")
    with pytest.raises(RanksOutOfStep, match=message):  # everyone else is there, but the meeting is over
        late.all_arrive("2/epoch", None, "an epoch's end after step 40")


def test_a_long_wait_is_reported_naming_who_is_missing(store: Any, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(arrivals, "LATE_AFTER_S", 0.05)
    reported: list[tuple[list[int], float]] = []
    with pytest.raises(RanksOutOfStep, match="^ranks 1, 2 did not arrive"):
        Arrivals(store, "t", 0, 3, timeout_s=0.5).all_arrive("3/x", None, "x",
                                                            on_late=lambda missing, s: reported.append((missing, s)))
    assert [missing for missing, _ in reported] == [[1, 2]] and 0.05 <= reported[0][1] < 0.5


def test_reports_reach_the_leader_and_are_forgotten_after(store: Any):
    leader, follower = Arrivals(store, "t", 0, 2, timeout_s=60), Arrivals(store, "t", 1, 2, timeout_s=60)
    assert follower.report_to_leader("4/done", {"files": 1}, "x") == []  # at once
    assert leader.report_to_leader("4/done", {"files": 0}, "x") == [{"files": 0}, {"files": 1}]
    leader.forget("4/done")
    assert not store.check(["t/4/done/0"]) and not store.check(["t/4/done/1"])
    with pytest.raises(RanksOutOfStep, match="^rank 1 did not arrive at the end of a write within 0 s"):
        Arrivals(store, "t", 0, 2, timeout_s=0.2).report_to_leader("5/done", {}, "the end of a write")


def test_a_rank_says_it_came_without_waiting_and_the_missing_are_found(store: Any):
    ranks = [Arrivals(store, "t", rank, 3, timeout_s=60) for rank in range(3)]
    ranks[0].post("6", "an epoch's end")
    ranks[2].post("6")
    assert ranks[0].missing("6") == [1] and ranks[1].missing("7") == [0, 1, 2]
