"""Which checkpoints a run keeps, and why: a pure policy over the run's checkpoint rows.

Always kept (pinned), whatever the policy:
- the newest checkpoint (what a resume loads);
- every one a branch starts from (a rollback's origin; a probe's branch pins nothing);
- every one an excursion in progress needs: its fork and its return point.

By default (``keep_last=None``): every epoch's checkpoint and every one a person asked for
("checkpoint now") is kept too; the automatic ones — periodic checkpoints, a stop's final one, an
ended excursion's return point — are thinned: the newest :data:`DEFAULT_KEEP_RECENT`, then the
newest of each hour for a day, then the newest of each day for a week. So the disk grows with the
epochs and with what a person asked for, never with the steps or the hours.

``keep_last=N``: a hard bound, as before: the newest N checkpoints of any kind, plus the pinned.

``max_bytes`` (a disk budget, optional): when what is kept takes more, the oldest unpinned ones go
(thinned automatic ones first, then the newest automatic ones, then epochs'), never what a person
asked for; if the pinned and asked-for alone exceed it, the plan says so (``over_budget``) and the
trainer writes no more periodic checkpoints until there is room (an event, never a crash).

Probe checkpoints (on an excursion's own branches) are not this policy's: the next excursion
retires them (see babysit.excursion_runner).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import SettingsError
from .rundir import remove_checkpoint_files

# Why a checkpoint was taken (its ``reason`` in the store), as this policy sorts them.
REASON_EPOCH = "epoch"
REASON_COMMAND = "command"      # "checkpoint now": a person asked for it
REASON_PERIODIC = "periodic"    # the checkpoint cadence (every N steps, every M minutes)
REASON_STOP = "stop"            # a stop's final checkpoint
REASON_EXCURSION = "excursion"  # a probe set's or sweep's return point
AUTOMATIC = (REASON_PERIODIC, REASON_STOP, REASON_EXCURSION)

DEFAULT_KEEP_RECENT = 5
DEFAULT_HOURLY = 24
DEFAULT_DAILY = 7
# A periodic checkpoint is not written when the disk would keep less than this many times its size
# free: the epoch's and the stop's checkpoints, which a resume needs, must still fit.
FREE_SPACE_MARGIN = 2.0

# Why a checkpoint is kept: what the page and `status` show beside it.
NEWEST = "the newest"
BRANCH_ORIGIN = "a branch starts from it"
EPOCH = "an epoch's end"
ASKED = "asked for"
RECENT = "recent"
HOURLY = "the last of its hour"
DAILY = "the last of its day"
KEEP_LAST = "among the newest {n}"
UNKNOWN = "kept (reason {reason!r} not known to this version)"


@dataclass(frozen=True)
class RetentionPolicy:
    """What a run keeps (see the module's docstring). ``keep_last``: None for the default policy,
    or the newest N of any kind; ``keep_recent``, ``hourly``, ``daily``: the default policy's
    thinning of automatic checkpoints; ``max_bytes``: the disk budget, None for none."""

    keep_last: int | None = None
    keep_recent: int = DEFAULT_KEEP_RECENT
    hourly: int = DEFAULT_HOURLY
    daily: int = DEFAULT_DAILY
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and (not _whole(self.keep_last) or self.keep_last < 1):
            raise SettingsError(f"keep_last must be a whole number >= 1 or None, got {self.keep_last!r}")
        for name in ("keep_recent", "hourly", "daily"):
            value = getattr(self, name)
            if not _whole(value) or value < 0:
                raise SettingsError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.max_bytes is not None and (not _whole(self.max_bytes) or self.max_bytes < 1):
            raise SettingsError(f"the disk budget must be a whole number of bytes >= 1 or None, got {self.max_bytes!r}")

    def describe(self) -> str:
        """One line for `status` and the page."""
        if self.keep_last is not None:
            text = f"the newest {self.keep_last} checkpoints, and those branches start from"
        else:
            text = (f"every epoch's and every asked-for checkpoint; periodic ones thinned to the newest "
                    f"{self.keep_recent}, one an hour for {self.hourly} h, one a day for {self.daily} days")
        if self.max_bytes is not None:
            text += f"; at most {human_bytes(self.max_bytes)}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"keep_last": self.keep_last, "keep_recent": self.keep_recent, "hourly": self.hourly,
                "daily": self.daily, "max_bytes": self.max_bytes}

    @classmethod
    def from_json(cls, raw: Any) -> "RetentionPolicy":
        """The policy a trainer recorded (the run's meta), or the default one for anything else."""
        if not isinstance(raw, dict):
            return cls()
        try:
            return cls(**{key: raw[key] for key in ("keep_last", "keep_recent", "hourly", "daily", "max_bytes")
                          if key in raw})
        except (SettingsError, TypeError):
            return cls()


@dataclass
class Plan:
    """What :func:`plan` decided: ``kept`` (id → why), ``retired`` (the rows, oldest first),
    ``kept_bytes`` and ``over_budget`` (the pinned and asked-for alone exceed the budget)."""

    kept: dict[int, str] = field(default_factory=dict)
    retired: list[dict[str, Any]] = field(default_factory=list)
    kept_bytes: int = 0
    over_budget: bool = False


def plan(checkpoints: Iterable[dict[str, Any]], policy: RetentionPolicy, *, now: float,
         pinned: dict[int, str] | None = None) -> Plan:
    """Sort ``checkpoints`` (the listed rows of the run's own branches: ``id``, ``created``,
    ``reason``, ``size``) into kept and retired. ``pinned``: id → why, for those a branch starts
    from and those an excursion in progress needs (see :func:`pins`)."""
    rows = sorted(checkpoints, key=lambda c: c["id"])
    result = Plan()
    if not rows:
        return result
    why: dict[int, str] = {}
    for checkpoint_id, reason in (pinned or {}).items():
        why.setdefault(checkpoint_id, reason)
    why.setdefault(rows[-1]["id"], NEWEST)
    present = {c["id"] for c in rows}
    why = {k: v for k, v in why.items() if k in present}
    # What may go under the budget, in the order it goes (first in the list goes first).
    spare_order: list[int] = []
    if policy.keep_last is not None:
        for c in rows[-policy.keep_last:]:
            why.setdefault(c["id"], KEEP_LAST.format(n=policy.keep_last))
        spare_order = [c["id"] for c in rows if why.get(c["id"]) == KEEP_LAST.format(n=policy.keep_last)]
    else:
        automatic = [c for c in reversed(rows) if c["reason"] in AUTOMATIC and c["id"] not in why]
        recent = automatic[:policy.keep_recent]
        thinned: dict[int, str] = {}
        _last_of_each(automatic, 3600, policy.hourly, now, thinned, HOURLY)
        _last_of_each(automatic, 86400, policy.daily, now, thinned, DAILY)
        for c in recent:
            why[c["id"]] = RECENT
        for checkpoint_id, reason in thinned.items():
            why.setdefault(checkpoint_id, reason)
        epochs = []
        for c in rows:
            if c["id"] in why or c["reason"] in AUTOMATIC:
                continue
            if c["reason"] == REASON_EPOCH:
                why[c["id"]] = EPOCH
                epochs.append(c["id"])
            elif c["reason"] == REASON_COMMAND:
                why[c["id"]] = ASKED
            else:
                why[c["id"]] = UNKNOWN.format(reason=c["reason"])
        recent_ids = {c["id"] for c in recent}
        spare_order = ([c["id"] for c in rows if why.get(c["id"]) in (HOURLY, DAILY) and c["id"] not in recent_ids]
                       + [c["id"] for c in rows if c["id"] in recent_ids] + epochs)
    size = {c["id"]: int(c.get("size") or 0) for c in rows}
    kept_bytes = sum(size[k] for k in why)
    if policy.max_bytes is not None:
        for checkpoint_id in spare_order:
            if kept_bytes <= policy.max_bytes:
                break
            del why[checkpoint_id]
            kept_bytes -= size[checkpoint_id]
        result.over_budget = kept_bytes > policy.max_bytes
    result.kept = {c["id"]: why[c["id"]] for c in rows if c["id"] in why}
    result.retired = [c for c in rows if c["id"] not in why]
    result.kept_bytes = kept_bytes
    return result


def pins(branches: Iterable[dict[str, Any]], excursion_branches: Iterable[int],
         running_excursion: dict[str, Any] | None) -> dict[int, str]:
    """Checkpoint id → why it is pinned: the origins of the run's branches (not of a probe's own
    branch: its fork is pinned while its excursion runs), the fork and return point of the
    excursion in progress."""
    legs = set(excursion_branches)
    found: dict[int, str] = {}
    for branch in branches:
        origin = branch.get("from_checkpoint")
        if origin and branch["id"] not in legs:
            found.setdefault(int(origin), BRANCH_ORIGIN)
    if running_excursion is not None:
        number = running_excursion["id"]
        for key, role in (("return_checkpoint", "its return point"), ("from_checkpoint", "its fork")):
            if running_excursion.get(key):
                found.setdefault(int(running_excursion[key]), f"excursion #{number} runs from it ({role})")
    return found


def apply(store: Any, policy: RetentionPolicy, *, now: float, extra_pins: dict[int, str] | None = None) -> Plan:
    """Plan over the run's own checkpoints in ``store`` and retire what the plan retires (the file
    goes, the row is marked deleted). ``extra_pins``: checkpoints the trainer is about to rely on
    that no row pins yet (an excursion's fork while its return point is being written)."""
    legs = store.excursion_branch_ids()
    rows = [c for c in store.checkpoints() if c["branch"] not in legs]
    pinned = {**pins(store.branches(), legs, store.running_excursion()), **(extra_pins or {})}
    result = plan(rows, policy, now=now, pinned=pinned)
    for old in result.retired:
        remove_checkpoint_files(store.run_dir, old["file"])  # a file, or a sharded checkpoint's whole folder
        store.mark_checkpoint_deleted(old["id"])
    return result


def explain(store: Any, *, now: float) -> tuple[RetentionPolicy, dict[int, str]]:
    """For `status` and the page: the run's policy (as its trainer recorded it) and why each of
    its own listed checkpoints is kept (id → why); probe checkpoints are not in it."""
    policy = RetentionPolicy.from_json(store.get_meta("retention", None))
    legs = store.excursion_branch_ids()
    rows = [c for c in store.checkpoints() if c["branch"] not in legs]
    return policy, plan(rows, policy, now=now, pinned=pins(store.branches(), legs, store.running_excursion())).kept


def refuse_periodic(checkpoints: list[dict[str, Any]], policy: RetentionPolicy, *, now: float,
                    pinned: dict[int, str], next_bytes: int, free_bytes: int | None) -> str | None:
    """Why the periodic checkpoint about to be taken must not be written, or None: it would put
    what is kept over the disk budget, or leave the disk with less than
    :data:`FREE_SPACE_MARGIN` times its size free."""
    if policy.max_bytes is not None:
        candidate = {"id": max((c["id"] for c in checkpoints), default=0) + 1, "created": now,
                     "reason": REASON_PERIODIC, "size": next_bytes}
        after = plan([*checkpoints, candidate], policy, now=now, pinned=pinned)
        if after.over_budget:
            return (f"the checkpoints that must be kept already take {human_bytes(after.kept_bytes - next_bytes)} of "
                    f"the {human_bytes(policy.max_bytes)} disk budget, and the next takes about "
                    f"{human_bytes(next_bytes)}; periodic checkpoints wait until there is room (epoch checkpoints, "
                    "stops and those you ask for are still written)")
    if free_bytes is not None and free_bytes < FREE_SPACE_MARGIN * next_bytes:
        return (f"the disk holding the run has {human_bytes(free_bytes)} free, less than {FREE_SPACE_MARGIN:g} × the "
                f"next checkpoint's {human_bytes(next_bytes)}; periodic checkpoints wait until space is freed "
                "(epoch checkpoints, stops and those you ask for are still written)")
    return None


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _last_of_each(automatic: list[dict[str, Any]], seconds: int, buckets: int, now: float,
                  chosen: dict[int, str], why: str) -> None:
    """Into ``chosen``: the newest of ``automatic`` (newest first) in each of the last ``buckets``
    periods of ``seconds`` (the current one included)."""
    if buckets <= 0:
        return
    first = int(now // seconds) - buckets + 1
    seen: set[int] = set()
    for c in automatic:
        bucket = int(c["created"] // seconds)
        if bucket >= first and bucket not in seen:
            seen.add(bucket)
            chosen.setdefault(c["id"], why)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
