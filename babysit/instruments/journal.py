"""The panda journal: the human decisions that led to a checkpoint, as one versioned JSON document.

A checkpoint sits at the end of a line of descent: the first branch, then each branch a rollback
(or a resume that had to fall back) started from a checkpoint of the one before. The journal walks
that line from the first branch and, on each branch, takes what a person did up to the point where
the next branch left it. It has two parts:

- ``history``: readable, what was done, when, where, and by whom (the command's source): lr and
  momentum nudges, the rollbacks between branches (with their choice of hyperparameters), and
  the probes and sweeps run on the way with what came of them (for the record only);
- ``schedule``: what a replay applies (``babysit.Run(..., replay=...)``, ``train --replay``): each
  lr or momentum setting at its step along the flattened line. A rollback that restores its
  checkpoint's hyperparameters needs nothing (the replay is at that state already); one that kept
  the current ones or set new ones is a setting at the fork; one that skipped batches of the data
  order (``rollback --skip-batches N``) is a skip at the fork: ``{"step", "at", "skip_batches": N}``.

Where in a step's boundary a setting lands matters at an epoch's end: the boundary after the
epoch's last step comes before the loop's epoch-end code (its evaluation, its own anneal), the
first boundary of the next epoch (the same step) after it. Each setting says which (``at``):
:data:`AT_STEP` (the boundary after ``step``) or :data:`AT_EPOCH_START` (the first boundary of the
epoch that begins after ``step``). Nudges record their ``step_in_epoch`` when applied, which is
how the two are told apart.

Pure: reads a :class:`~babysit.store.RunStore`, never torch.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import commands as cmd
from ..errors import SettingsError

FORMAT_KEY = "babysit_journal"
VERSION = 1
AT_STEP = "step"                 # at the boundary after the step (an epoch's last: before its end code)
AT_EPOCH_START = "epoch_start"   # at the first boundary of the epoch after the step (after its end code)
SETTABLE = {"lr": cmd.SET_LR, "momentum": cmd.SET_MOMENTUM}
NUDGES = tuple(SETTABLE.values())
_REASON_EPOCH = "epoch"          # babysit.checkpoint.REASON_EPOCH (that module loads torch)
_LATEST = math.inf


def at_of(step_in_epoch: Any) -> str:
    """Where a setting recorded at ``step_in_epoch`` lands: 0 is an epoch's first boundary (after
    the previous epoch's end); anything else, or nothing recorded, the boundary after its step."""
    return AT_EPOCH_START if step_in_epoch == 0 and not isinstance(step_in_epoch, bool) else AT_STEP


def is_skip(entry: dict[str, Any]) -> bool:
    """A schedule entry that skips batches of the data order (a rollback's ``--skip-batches``),
    rather than setting lr or momentum."""
    return "skip_batches" in entry


def _rank(at: str) -> int:
    return 1 if at == AT_EPOCH_START else 0


# -- export ------------------------------------------------------------------------------------
def export_journal(store: Any, to: int | None = None) -> dict[str, Any]:
    """The journal of checkpoint ``to`` (default: the newest checkpoint of the current branch, or
    the one it started from) in the run of ``store``. Raises SettingsError for an unknown
    checkpoint or a run without checkpoints."""
    target = _target(store, to)
    branches = {b["id"]: b for b in store.branches()}
    commands = store.commands(limit=2**62)
    excursion_of = store.excursion_branch_ids()
    segments = _lineage(store, branches, target)

    history: list[dict[str, Any]] = []
    schedule: list[dict[str, Any]] = []
    lineage = []
    for index, (branch_id, limit) in enumerate(segments):
        branch = branches.get(branch_id, {"id": branch_id, "parent": None, "from_checkpoint": None, "start_step": 0})
        lineage.append({"branch": branch_id, "parent": branch["parent"], "from_checkpoint": branch["from_checkpoint"],
                        "start_step": branch["start_step"], "until_step": limit[0]})
        if index > 0:
            fork = store.checkpoint(branch["from_checkpoint"]) if branch["from_checkpoint"] else None
            fork_entries, fork_settings = _fork(store, branch, fork, commands, excursion_of)
            history.extend(fork_entries)
            schedule.extend(fork_settings)
        for entry, setting in _nudges(branch_id, limit, commands):
            history.append(entry)
            schedule.append(setting)
        history.extend(_excursions(store, branch_id, limit, commands))
    history.sort(key=lambda h: (_lineage_index(lineage, h["branch"]), h["step"], _rank(h.get("at", AT_STEP)),
                                0 if h["kind"] in (cmd.ROLLBACK, "resumed_from") else 1, h.get("command") or 0))
    return {
        FORMAT_KEY: VERSION,
        "run": {"run_dir": str(store.run_dir), "config": store.get_meta("config", {})},
        "to": {"checkpoint": target["id"], "branch": target["branch"], "epoch": target["epoch"],
               "step": target["step"], "reason": target["reason"], "metrics": target["metrics"],
               "hparams": target["hparams"]},
        "lineage": lineage,
        "history": history,
        "schedule": schedule,
    }


def _nudges(branch_id: int, limit: tuple[Any, ...], commands: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(history entry, schedule setting) of each lr / momentum nudge applied on the branch up to ``limit``."""
    applied = [c for c in commands if c["branch"] == branch_id and c["state"] == cmd.APPLIED and c["kind"] in NUDGES
               and _command_key(c) <= limit]
    found = []
    for c in sorted(applied, key=_command_key):
        result = c["result"] if isinstance(c["result"], dict) else {}
        at = at_of(result.get("step_in_epoch"))
        value = result.get("after", c["args"].get("value") if isinstance(c["args"], dict) else None)
        found.append((
            {"kind": c["kind"], "value": value, "before": result.get("before"), "step": c["step"], "at": at,
             "branch": branch_id, "source": c["source"], "command": c["id"], "time": _iso(c["done_at"]),
             "text": cmd.describe(c["kind"], c["args"])},
            {"step": c["step"], "at": at, "set": _setting_name(c["kind"]), "value": value, "from": f"command #{c['id']}"},
        ))
    return found


def _lineage_index(lineage: list[dict[str, Any]], branch: int) -> int:
    for index, segment in enumerate(lineage):
        if segment["branch"] == branch:
            return index
    return len(lineage)


def _target(store: Any, to: int | None) -> dict[str, Any]:
    listed = store.checkpoints()
    if to is not None:
        found = store.checkpoint(to)
        if found is None:
            known = ", ".join(f"#{c['id']}" for c in listed[-12:]) or "none yet"
            raise SettingsError(f"checkpoint #{to} does not exist in run {str(store.run_dir)!r}; available: {known}")
        return found
    if not listed:
        raise SettingsError(f"run {str(store.run_dir)!r} has no checkpoint yet; a journal leads to one: wait for the "
                            "first epoch's end, or write one now with `python -m babysit checkpoint`")
    branch_id = store.status().get("branch")
    own = [c for c in listed if c["branch"] == branch_id]
    if own:
        return own[-1]
    branch = store.branch(branch_id) if branch_id is not None else None
    origin = store.checkpoint(branch["from_checkpoint"]) if branch and branch["from_checkpoint"] else None
    return origin or listed[-1]


def _lineage(store: Any, branches: dict[int, dict[str, Any]], target: dict[str, Any]) -> list[tuple[int, tuple[Any, ...]]]:
    """(branch, the position up to which its decisions count), from the first branch to the target's."""
    segments = [(target["branch"], _checkpoint_limit(target, store))]
    seen = {target["branch"]}
    branch = branches.get(target["branch"])
    while branch is not None and branch["parent"] is not None and branch["from_checkpoint"]:
        fork = store.checkpoint(branch["from_checkpoint"])
        if fork is None or fork["branch"] in seen:  # a forged or damaged line: stop where it breaks
            break
        seen.add(fork["branch"])
        segments.append((fork["branch"], _checkpoint_limit(fork, store)))
        branch = branches.get(fork["branch"])
    return list(reversed(segments))


def _command_key(c: dict[str, Any]) -> tuple[Any, ...]:
    result = c["result"] if isinstance(c["result"], dict) else {}
    return (c["step"] if isinstance(c["step"], int) else 0, _rank(at_of(result.get("step_in_epoch"))), c["id"])


def _checkpoint_limit(checkpoint: dict[str, Any], store: Any) -> tuple[Any, ...]:
    """The last position a checkpoint holds, comparable with :func:`_command_key`. An epoch's
    checkpoint holds all that its last boundary applied; one taken inside a boundary (a "checkpoint
    now", a stop) holds the nudges applied there before the command that asked for it."""
    step = checkpoint["step"]
    if checkpoint["reason"] == _REASON_EPOCH:
        return (step, _rank(AT_STEP), _LATEST)
    asked = [c["id"] for c in store.commands(kinds=(cmd.CHECKPOINT, cmd.STOP), limit=2**62)
             if isinstance(c["result"], dict) and c["result"].get("checkpoint") == checkpoint["id"]]
    return (step, _rank(at_of(checkpoint["step_in_epoch"])), min(asked) if asked else _LATEST)


def _fork_at(fork: dict[str, Any] | None) -> str:
    """Where a branch started from ``fork`` resumes: after the epoch's end for an epoch's checkpoint."""
    if fork is None or fork["reason"] == _REASON_EPOCH:
        return AT_EPOCH_START
    return at_of(fork["step_in_epoch"])


def _fork(store: Any, branch: dict[str, Any], fork: dict[str, Any] | None, commands: list[dict[str, Any]],
          excursion_of: dict[int, int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The history entry and the schedule's settings of the start of ``branch`` at ``fork``."""
    step = fork["step"] if fork else branch["start_step"]
    at = _fork_at(fork)
    current = dict(fork["hparams"]) if fork else {}
    settings: list[dict[str, Any]] = []

    def set_(name: str, value: Any, origin: str) -> None:
        if value is None or current.get(name) == value:
            return  # the checkpoint's own value: loading it did that already
        current[name] = value
        settings.append({"step": step, "at": at, "set": name, "value": value, "from": origin})

    rollback = next((c for c in commands if c["kind"] == cmd.ROLLBACK and c["state"] == cmd.APPLIED
                     and isinstance(c["result"], dict) and c["result"].get("branch") == branch["id"]), None)
    if rollback is not None:
        args = rollback["args"] if isinstance(rollback["args"], dict) else {}
        result = rollback["result"]
        origin = f"rollback #{rollback['id']}"
        if args.get("hparams") == cmd.HPARAMS_CURRENT:  # as the trainer does it: the cut's values, then any given
            for name in ("lr", "momentum"):
                set_(name, (result.get("before") or {}).get(name), origin)
        for name in ("lr", "momentum"):
            set_(name, args.get(name), origin)
        skip = args.get("skip_batches")
        if isinstance(skip, int) and not isinstance(skip, bool) and skip > 0:
            settings.append({"step": step, "at": at, "skip_batches": skip, "from": origin})
        entry = {"kind": cmd.ROLLBACK, "checkpoint": fork["id"] if fork else None, "step": step, "at": at,
                 "branch": branch["id"], "from_branch": rollback["branch"], "from_step": rollback["step"],
                 "hparams": args.get("hparams", cmd.HPARAMS_CHECKPOINT),
                 **{name: args[name] for name in ("lr", "momentum", "skip_batches") if args.get(name) is not None},
                 "after": {"lr": result.get("lr"), "momentum": result.get("momentum")},
                 "source": rollback["source"], "command": rollback["id"], "time": _iso(rollback["done_at"]),
                 "text": cmd.describe(cmd.ROLLBACK, args)}
        return [entry], settings
    if branch["id"] in excursion_of:  # the main line went on from a probe: the probe's value is its setting
        excursion = store.excursion(excursion_of[branch["id"]]) or {"branches": [], "kind": "probe"}
        row = next((b for b in excursion["branches"] if b["branch"] == branch["id"]), None)
        if row is not None:
            set_(row["param"], row["value"], f"{excursion['kind']} #{excursion_of[branch['id']]}")
        return [], settings
    # A resume that fell back to an older checkpoint: nobody chose anything; the branch's own values
    # (the checkpoint's) need no setting.
    for name in ("lr", "momentum"):
        set_(name, (branch.get("hparams") or {}).get(name), f"branch {branch['id']}")
    entry = {"kind": "resumed_from", "checkpoint": fork["id"] if fork else None, "step": step, "at": at,
             "branch": branch["id"], "source": "trainer", "time": _iso(branch.get("created"))}
    return [entry], settings


def _excursions(store: Any, branch_id: int, limit: tuple[Any, ...], commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Probes and sweeps run from this branch before the line left it: history only."""
    found = []
    source_of = {c["id"]: c["source"] for c in commands}
    for excursion in reversed(store.excursions(limit=10_000)):
        if excursion["origin_branch"] != branch_id or excursion["origin_step"] > limit[0]:
            continue
        found.append({
            "kind": excursion["kind"], "excursion": excursion["id"], "step": excursion["origin_step"], "at": AT_STEP,
            "branch": branch_id, "state": excursion["state"], "spec": excursion["spec"],
            "tried": [{"branch": b["branch"], "param": b["param"], "value": b["value"], "steps": b["steps"],
                       "result": b["result"]} for b in excursion["branches"]],
            "result": excursion["result"], "message": excursion["message"],
            "source": source_of.get(excursion["command"], "trainer"), "command": excursion["command"],
            "time": _iso(excursion["created"]),
        })
    return found


def _setting_name(kind: str) -> str:
    return next(name for name, k in SETTABLE.items() if k == kind)


def _iso(wall: Any) -> str | None:
    if not isinstance(wall, (int, float)) or isinstance(wall, bool):
        return None
    return datetime.fromtimestamp(wall, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_json(journal: dict[str, Any]) -> str:
    """The journal as the file it is exported to (indented, one trailing newline)."""
    return json.dumps(journal, indent=2) + "\n"


# -- reading -----------------------------------------------------------------------------------
def read_journal(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A journal from a file path or an already loaded dict, checked (see :func:`check_journal`)."""
    if isinstance(source, dict):
        return check_journal(source)
    if not isinstance(source, (str, Path)):
        raise SettingsError(f"replay must be the path of a journal file or its loaded dict, got {type(source).__name__}")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SettingsError(f"journal {str(path)!r} cannot be read: {error.strerror or error}") from None
    try:
        loaded = json.loads(text)
    except ValueError as error:
        raise SettingsError(f"journal {str(path)!r} is not JSON ({error}); export one with "
                            "`python -m babysit journal --run-dir D > journal.json`") from None
    return check_journal(loaded, str(path))


def check_journal(journal: Any, name: str = "the journal") -> dict[str, Any]:
    """Refuse what is not a journal this babysit can replay: another format version, a schedule
    entry without a step, a place, a setting name or a valid value (or a skip's whole number of
    batches). Returns it unchanged."""
    if not isinstance(journal, dict) or FORMAT_KEY not in journal:
        raise SettingsError(f"{name} is not a babysit journal (no {FORMAT_KEY!r} key); export one with "
                            "`python -m babysit journal --run-dir D > journal.json`")
    version = journal[FORMAT_KEY]
    if version != VERSION or isinstance(version, bool):
        raise SettingsError(f"{name} is journal format version {version!r}; this babysit reads version {VERSION} "
                            "only (a newer babysit wrote it?)")
    for part in ("run", "to"):
        if not isinstance(journal.get(part, {}), dict):
            raise SettingsError(f"{name}: {part!r} must be an object, got {journal[part]!r}")
    if not isinstance((journal.get("run") or {}).get("config", {}), dict):
        raise SettingsError(f"{name}: the run's 'config' must be an object, got {journal['run']['config']!r}")
    schedule = journal.get("schedule")
    if not isinstance(schedule, list):
        raise SettingsError(f"{name}: 'schedule' must be a list of settings, got {type(schedule).__name__}")
    last = (-1, 0)
    for index, entry in enumerate(schedule):
        where = f"{name}: schedule[{index}]"
        if not isinstance(entry, dict):
            raise SettingsError(f"{where} must be an object, got {entry!r}")
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise SettingsError(f"{where}: step must be a whole number >= 0, got {step!r}")
        if entry.get("at") not in (AT_STEP, AT_EPOCH_START):
            raise SettingsError(f"{where}: at must be {AT_STEP!r} or {AT_EPOCH_START!r}, got {entry.get('at')!r}")
        try:
            if is_skip(entry):
                skip = entry["skip_batches"]
                if not isinstance(skip, int) or isinstance(skip, bool):  # JSON: no "200" for 200, no true
                    raise cmd.CommandError(f"skip_batches must be a whole number, got {skip!r}")
                cmd.validate_skip_batches(skip)
            elif entry.get("set") not in SETTABLE:
                raise SettingsError(f"{where}: set must be 'lr' or 'momentum' (or the entry a skip_batches), got "
                                    f"{entry.get('set')!r}")
            else:
                (cmd.validate_lr if entry["set"] == "lr" else cmd.validate_momentum)(entry.get("value"))
        except cmd.CommandError as error:
            raise SettingsError(f"{where}: {error}") from None
        position = (step, _rank(entry["at"]))
        if position < last:
            raise SettingsError(f"{where} (step {step}, {entry['at']}) comes before the entry above it; the schedule "
                                "must be in the order the run meets its steps")
        last = position
    return journal
