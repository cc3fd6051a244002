"""babysit.store.lineage: walks up parents that end, whatever the rows of a run directory say."""

from __future__ import annotations

from pathlib import Path

import pytest

from babysit.store import RunStore
from babysit.store.lineage import Line, Stretch, Walk, ancestry, line_of, read_branches


def rows(*parents: tuple[int, int | None, int]) -> list[dict]:
    """Branch rows from (id, parent, start_step)."""
    return [{"id": i, "parent": p, "start_step": s} for i, p, s in parents]


def test_a_walk_ends_at_a_root() -> None:
    walk = ancestry({3: 2, 2: 1, 1: None}, 3)
    assert walk == Walk((3, 2, 1)) and walk.damage is None
    assert ancestry({1: None}, 7).chain == (7,)  # nothing known of it: itself alone, nothing wrong


@pytest.mark.parametrize("parents, start, chain, damage", [
    ({1: 2, 2: 1}, 2, (2, 1), "branches 1 and 2 name each other as parents"),
    ({5: 5}, 5, (5,), "branch 5 names itself as its parent"),
    ({4: 3, 3: 2, 2: 1, 1: 3}, 4, (4, 3, 2, 1), "branches 1, 2 and 3 name each other as parents in a cycle"),
    ({4: 3, 3: 9}, 4, (4, 3), "branch 3 names branch 9 as its parent, which is not in the run"),
])
def test_a_walk_stops_at_damage_and_says_what_it_is(parents: dict, start: int, chain: tuple, damage: str) -> None:
    walk = ancestry(parents, start)
    assert walk.chain == chain and walk.damage == damage


def test_a_walk_is_bounded_whatever_the_length_of_the_chain() -> None:
    parents = {i: i - 1 for i in range(1, 1_000_001)}
    parents[0] = None
    walk = ancestry(parents, 1_000_000, limit=1000)
    assert len(walk.chain) == 1001 and walk.cut
    assert walk.damage == "branch 1000000's line of descent is longer than 1,000 generations; it is followed no further"


def test_a_line_holds_each_ancestor_up_to_where_its_child_forked() -> None:
    branches = rows((1, None, 0), (2, 1, 300), (3, 2, 450), (4, 1, 100))
    assert line_of(branches, 3) == Line(3, (Stretch(1, 0, 300), Stretch(2, 300, 450), Stretch(3, 450, None)))
    assert line_of(branches, 4).branches == (1, 4)
    # The trainer's walks fork at the origin checkpoint's step instead of the branch's start.
    assert line_of(branches, 3, fork_step=lambda child: child["start_step"] - 1).stretches[0] == Stretch(1, 0, 299)
    assert line_of(branches, 9) == Line(9, (Stretch(9, 0, None),))  # no row: itself alone
    assert Stretch(1, 0, 300).holds(300) and not Stretch(1, 0, 300).holds(301) and Stretch(3, 450, None).holds(10**9)


def test_a_line_through_a_cycle_ends_where_the_cycle_begins() -> None:
    branches = rows((1, 2, 0), (2, 1, 50), (3, 2, 80))
    line = line_of(branches, 3)
    assert line.branches == (1, 2, 3) and line.damage == "branches 1 and 2 name each other as parents"
    assert [s.until for s in line.stretches] == [50, 80, None]
    forged = rows((1, None, "x"), (2, 1, 10))  # a start step that is no number reads as 0
    assert line_of(forged, 2).stretches == (Stretch(1, 0, 10), Stretch(2, 10, None))


def test_read_branches_takes_the_newest_rows_only(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run", create=True)
    for i in range(1, 8):
        store.new_branch(parent=i - 1 or None, from_checkpoint=None, start_step=10 * i, start_epoch=i)
    found, total = read_branches(store, limit=3)
    assert total == 7 and [b["id"] for b in found] == [5, 6, 7]
    assert found[0]["parent"] == 4 and found[0]["start_step"] == 50
