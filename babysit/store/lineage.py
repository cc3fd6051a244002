"""Lines of descent in a run: which branch came from which, walked in one bounded, cycle-safe place.

Every walk over rows a run directory supplies (a branch's parent, a fork checkpoint's branch, an
excursion leg's way back to the main line) goes through :func:`ancestry`. The rows are not
trusted: a forged or damaged ``run.db`` may name a parent that is not there, or make two branches
each other's parent; a walk that followed such rows naively would never end and keep growing what
it collects. Here each walk stops at the first repeat, at a parent that is missing, or after
``limit`` generations, and says which it was (:attr:`Walk.damage`), so the page, the CLI and the
trainer can report "branches 1 and 2 name each other as parents" and carry on with the rest.

    ancestry(parents, start)      the chain start, parent, grandparent, ... and what stopped it
    line_of(branches, branch)     a branch's line of descent as stretches of steps, oldest first
    read_branches(store)          the newest branch rows, at most ``limit`` of them
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Hashable, Iterable, Mapping, TypeVar

from .rows import BRANCH_COLUMNS, branch_row

if TYPE_CHECKING:
    from . import RunStore

K = TypeVar("K", bound=Hashable)

# No real run has a line of descent this long (a rollback a minute for two months); a forged one
# stops here instead of walking on.
MAX_GENERATIONS = 100_000
# The branch rows a reader takes at once: the newest ones (the trainer's branch is the newest).
MAX_BRANCH_ROWS = 20_000


@dataclass(frozen=True)
class Walk(Generic[K]):
    """A walk up a chain of parents: ``chain`` is start, its parent, its parent's parent, ...
    Only one of ``cycle``, ``missing`` and ``cut`` is set, when the walk ended other than at a root."""

    chain: tuple[K, ...]
    cycle: tuple[K, ...] = ()   # the members of the loop the walk ran into, in walking order
    missing: K | None = None    # the parent the last member named, which is not in the rows
    cut: bool = False           # stopped after ``limit`` generations
    noun: str = "branch"

    @property
    def damage(self) -> str | None:
        """What is wrong with the rows, in words; None when the walk reached a root."""
        if self.cycle:
            if len(self.cycle) == 1:
                return f"{self.noun} {self.cycle[0]} names itself as its parent"
            names = sorted(self.cycle, key=_sort_key)
            listed = ", ".join(str(n) for n in names[:-1]) + f" and {names[-1]}"
            if len(names) == 2:
                return f"{self.noun}es {listed} name each other as parents"
            return f"{self.noun}es {listed} name each other as parents in a cycle"
        if self.missing is not None:
            return (f"{self.noun} {self.chain[-1]} names {self.noun} {self.missing} as its parent, "
                    "which is not in the run")
        if self.cut:
            return (f"{self.noun} {self.chain[0]}'s line of descent is longer than {len(self.chain) - 1:,} "
                    "generations; it is followed no further")
        return None


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def ancestry(parents: Mapping[K, K | None], start: K, *, limit: int = MAX_GENERATIONS,
             noun: str = "branch") -> Walk[K]:
    """``start``, its parent, its parent's parent, ... as ``parents`` names them (None: a root).

    Bounded and cycle-safe whatever the rows say: at most ``limit`` generations, each member
    once. A ``start`` that is not in ``parents`` is a chain of itself alone (nothing is known of
    it); a parent that is not in ``parents`` ends the walk as ``missing``.
    """
    chain = [start]
    seen = {start: 0}
    node = start
    while node in parents:
        parent = parents[node]
        if parent is None:
            return Walk(tuple(chain), noun=noun)
        if parent in seen:
            return Walk(tuple(chain), cycle=tuple(chain[seen[parent]:]), noun=noun)
        if parent not in parents:
            return Walk(tuple(chain), missing=parent, noun=noun)
        if len(chain) > limit:  # ``limit`` generations walked, and more named
            return Walk(tuple(chain), cut=True, noun=noun)
        seen[parent] = len(chain)
        chain.append(parent)
        node = parent
    return Walk(tuple(chain), noun=noun)


@dataclass(frozen=True)
class Stretch:
    """The steps of one branch on a line of descent: those after its ``start`` and up to
    ``until`` (None: to its last step, on the line's own branch)."""

    branch: int
    start: int
    until: int | None

    def holds(self, step: float) -> bool:
        return self.until is None or step <= self.until


@dataclass(frozen=True)
class Line:
    """A branch's line of descent: the root's stretch first, the branch's own last."""

    branch: int
    stretches: tuple[Stretch, ...]
    damage: str | None = None

    @property
    def branches(self) -> tuple[int, ...]:
        return tuple(s.branch for s in self.stretches)

    def stretch_of(self, branch: int) -> Stretch | None:
        return next((s for s in self.stretches if s.branch == branch), None)


def _by_id(branches: Iterable[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]]) -> Mapping[int, Mapping[str, Any]]:
    if isinstance(branches, Mapping):
        return branches
    return {b["id"]: b for b in branches}


def parents_of(branches: Iterable[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]]) -> dict[int, int | None]:
    """branch id -> its parent's id (None for a root), from branch rows."""
    return {i: (b["parent"] if b["parent"] is not None else None) for i, b in _by_id(branches).items()}


def line_of(branches: Iterable[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]], branch: int, *,
            fork_step: Callable[[Mapping[str, Any]], int] | None = None, limit: int = MAX_GENERATIONS,
            parents: Mapping[int, int | None] | None = None) -> Line:
    """``branch``'s line of descent: each ancestor holds its steps up to the step its child
    forked at (``fork_step(child row)``, by default the child's ``start_step``), the branch
    itself all of its own. A branch with no row is a line of itself alone; damaged rows (a
    cycle, a missing parent) end the line where they begin and are named in ``damage``.

    The trainer's walks (the checkpoints before a point on the line, a resume's fallback) want
    the fork checkpoint's step: ``fork_step=lambda child: <step of child["from_checkpoint"]>``.
    """
    by_id = _by_id(branches)
    walk = ancestry(parents if parents is not None else parents_of(by_id), branch, limit=limit)
    fork = fork_step or _start_step
    stretches = []
    child: Mapping[str, Any] | None = None
    for member in walk.chain:
        row = by_id.get(member)
        start = _start_step(row) if row is not None else 0
        stretches.append(Stretch(member, start, None if child is None else int(fork(child))))
        child = row if row is not None else {"start_step": start}
    return Line(branch, tuple(reversed(stretches)), walk.damage)


def _start_step(row: Mapping[str, Any]) -> int:
    """A row's start step; one that is not a whole number (a forged row) reads as 0."""
    value = row.get("start_step")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def read_branches(store: "RunStore", limit: int = MAX_BRANCH_ROWS, *, hparams: bool = True
                  ) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` branch rows (oldest first) and how many the run has, so a reader's
    cost stays bounded however many rows a run directory holds. ``hparams=False``: their lines of
    descent only (each row's hparams an empty dict, not decoded)."""
    connection = store.conn()
    total = int(connection.execute("SELECT count(*) FROM branches").fetchone()[0])
    columns = BRANCH_COLUMNS if hparams else BRANCH_COLUMNS.replace("hparams", "'{}'")
    rows = connection.execute(
        f"SELECT * FROM (SELECT {columns} FROM branches ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,)
    ).fetchall()
    return [branch_row(row) for row in rows], total


__all__ = ["MAX_GENERATIONS", "MAX_BRANCH_ROWS", "Walk", "Stretch", "Line", "ancestry", "parents_of", "line_of",
           "read_branches"]
