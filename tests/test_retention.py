"""The retention policy (babysit.retention): which checkpoints a run keeps and why, decided from the
rows alone, and applied to a real run store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from babysit import retention
from babysit.errors import SettingsError
from babysit.retention import RetentionPolicy, pins, plan, refuse_periodic
from babysit.store import RunStore

HOUR = 3600.0
NOW = 100 * 24 * HOUR  # day 100, 00:00


def rows(*spec: tuple[str, float], size: int = 10) -> list[dict[str, Any]]:
    """Checkpoint rows, ids 1.. in order: (reason, hours before NOW)."""
    return [{"id": i, "reason": reason, "created": NOW - hours * HOUR, "size": size}
            for i, (reason, hours) in enumerate(spec, start=1)]


def test_by_default_epochs_and_asked_ones_stay_and_periodic_ones_thin_to_recent_hourly_daily() -> None:
    # Periodic checkpoints every 20 minutes for 10 days up to 20 minutes before midnight (newest
    # last), with an epoch's 5 days before, a "checkpoint now" 9 days before, a stop's 30 hours
    # before and a return point 4 hours before, each the first of its hour.
    spec = [("periodic", h / 3) for h in range(10 * 24 * 3, 0, -1)]
    spec[24 * 3 * 5] = ("epoch", spec[24 * 3 * 5][1])
    spec[24 * 3 * 1] = ("command", spec[24 * 3 * 1][1])
    spec[-30 * 3] = ("stop", spec[-30 * 3][1])
    spec[-4 * 3] = ("excursion", spec[-4 * 3][1])
    found = plan(rows(*spec), RetentionPolicy(), now=NOW)
    why = found.kept
    by_reason: dict[str, int] = {}
    for reason in why.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    newest = len(spec)
    assert why[newest] == "the newest"
    assert why[24 * 3 * 5 + 1] == "an epoch's end" and why[24 * 3 * 1 + 1] == "asked for"
    assert [why[i] for i in range(newest - 5, newest)] == ["recent"] * 5
    # The last of each of the last 24 hours (the current one has none; the last two hours' are the
    # newest and a recent one), the last of each of the last 7 days (the current one has none; the
    # day before's is the newest).
    assert by_reason == {"the newest": 1, "recent": 5, "the last of its hour": 21, "the last of its day": 5,
                         "an epoch's end": 1, "asked for": 1}
    assert len(found.retired) == newest - sum(by_reason.values())
    assert all(c["reason"] in retention.AUTOMATIC for c in found.retired)
    # The stop's and the return point's are thinned like the periodic ones.
    assert len(spec) - 30 * 3 + 1 not in why and len(spec) - 4 * 3 + 1 not in why


def test_keep_last_is_a_hard_bound_on_every_kind_with_branch_origins_and_excursion_needs_on_top() -> None:
    checkpoints = rows(("epoch", 9), ("command", 8), ("periodic", 7), ("excursion", 6), ("periodic", 5),
                       ("epoch", 4), ("stop", 3))
    pinned = pins(branches=[{"id": 1, "from_checkpoint": None}, {"id": 2, "from_checkpoint": 2},
                            {"id": 3, "from_checkpoint": 4}],  # branch 3 is a probe's own: it pins nothing
                  excursion_branches=[3], running_excursion={"id": 4, "from_checkpoint": 1, "return_checkpoint": 5})
    found = plan(checkpoints, RetentionPolicy(keep_last=2), now=NOW, pinned=pinned)
    assert found.kept == {1: "excursion #4 runs from it (its fork)", 2: "a branch starts from it",
                          5: "excursion #4 runs from it (its return point)", 6: "among the newest 2", 7: "the newest"}
    assert [c["id"] for c in found.retired] == [3, 4]


def test_thirty_sweeps_leave_keep_last_return_points_not_thirty() -> None:
    """Each sweep's return point is on the run's branch and its legs start from it: only the
    excursion in progress pins it."""
    checkpoints = rows(("epoch", 40), *[("excursion", (30 - i) / 30) for i in range(30)])  # 30 sweeps in an hour
    legs = list(range(2, 32))
    branches = [{"id": 1, "from_checkpoint": None}, *({"id": b, "from_checkpoint": b} for b in legs)]
    for policy, kept in ((RetentionPolicy(keep_last=2), 2), (RetentionPolicy(), 1 + 5 + 1)):
        found = plan(checkpoints, policy, now=NOW, pinned=pins(branches, legs, None))
        assert len(found.kept) == kept, policy
    running = {"id": 30, "from_checkpoint": 31, "return_checkpoint": 31}
    found = plan(checkpoints, RetentionPolicy(keep_last=1), now=NOW, pinned=pins(branches, legs, running))
    assert found.kept == {31: "excursion #30 runs from it (its return point)"}


def test_a_disk_budget_retires_the_oldest_spare_ones_first_and_never_what_a_person_asked_for() -> None:
    checkpoints = rows(("epoch", 50), ("command", 40), ("periodic", 30), ("epoch", 20), ("periodic", 3),
                       ("periodic", 2), ("periodic", 1), size=100)
    found = plan(checkpoints, RetentionPolicy(max_bytes=450), now=NOW)
    # Over budget by the hourly keeper (#3 at 30 h is the last of its day), then the recent ones
    # from the oldest, then the epochs' from the oldest: 7 × 100 > 450 → 3 go.
    assert [c["id"] for c in found.retired] == [3, 5, 6]
    assert found.kept_bytes == 400 and not found.over_budget
    tight = plan(checkpoints, RetentionPolicy(max_bytes=150), now=NOW)
    assert tight.kept == {2: "asked for", 7: "the newest"} and tight.over_budget


def test_a_periodic_checkpoint_is_refused_over_the_budget_or_when_the_disk_is_nearly_full() -> None:
    checkpoints = rows(("command", 5), ("epoch", 4), size=100)
    policy = RetentionPolicy(max_bytes=250)
    assert refuse_periodic(checkpoints, policy, now=NOW, pinned={}, next_bytes=100, free_bytes=10**9) is None
    over = refuse_periodic(checkpoints, RetentionPolicy(max_bytes=150), now=NOW, pinned={}, next_bytes=100,
                           free_bytes=10**9)
    assert over == ("the checkpoints that must be kept already take 100 B of the 150 B disk budget, and the next "
                    "takes about 100 B; periodic checkpoints wait until there is room (epoch checkpoints, stops and "
                    "those you ask for are still written)")
    full = refuse_periodic(checkpoints, RetentionPolicy(), now=NOW, pinned={}, next_bytes=2_000_000_000,
                           free_bytes=3_000_000_000)
    assert full is not None and full.startswith("the disk holding the run has 3.0 GB free, less than 2 × the next "
                                                "checkpoint's 2.0 GB")


@pytest.mark.parametrize("settings, message", [
    ({"keep_last": 0}, "keep_last must be a whole number >= 1 or None, got 0"),
    ({"keep_last": True}, "keep_last must be a whole number >= 1 or None, got True"),
    ({"hourly": -1}, "hourly must be a whole number >= 0, got -1"),
    ({"keep_recent": 2.5}, "keep_recent must be a whole number >= 0, got 2.5"),
    ({"max_bytes": 0}, "the disk budget must be a whole number of bytes >= 1 or None, got 0"),
])
def test_a_bad_policy_is_refused_naming_the_value(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=f"^{message}$"):
        RetentionPolicy(**settings)


def test_the_policy_round_trips_through_the_run_s_meta_and_a_forged_one_reads_as_the_default() -> None:
    policy = RetentionPolicy(keep_last=3, max_bytes=10**9)
    assert RetentionPolicy.from_json(policy.to_json()) == policy
    assert RetentionPolicy.from_json({"keep_last": -4}) == RetentionPolicy()
    assert RetentionPolicy.from_json("x") == RetentionPolicy()
    assert policy.describe() == "the newest 3 checkpoints, and those branches start from; at most 1.0 GB"


def test_applied_to_a_store_the_files_go_and_the_rows_are_marked(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run", create=True)
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    ids = []
    for step in range(1, 10):  # #1 a branch's origin, #2 pinned by the caller, #3, #4-#8 recent, #9 the newest
        name = f"c{step}.pt"
        (tmp_path / "run" / name).write_bytes(b"x")
        ids.append(store.add_checkpoint(branch=branch, epoch=1, step=step, step_in_epoch=step, file=name,
                                        sha256="0" * 64, size=1, hparams={}, metrics={}, reason="periodic"))
    store.new_branch(parent=branch, from_checkpoint=ids[0], start_step=1, start_epoch=1)
    found = retention.apply(store, RetentionPolicy(), now=time.time(), extra_pins={ids[1]: "about to be a fork"})
    assert [c["id"] for c in found.retired] == [ids[2]]
    assert not (tmp_path / "run" / "c3.pt").exists() and (tmp_path / "run" / "c2.pt").exists()
    assert [c["id"] for c in store.checkpoints()] == [i for i in ids if i != ids[2]]
