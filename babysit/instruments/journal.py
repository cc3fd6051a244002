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
import os
import stat
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
# What a journal file may be. An export is a few KB per hundred decisions and nests six levels
# (history, an entry, its probes, their results); the limits refuse what is not one before it costs
# memory or time: a device such as /dev/zero, a FIFO (its read waits forever), deep brackets.
MAX_JOURNAL_BYTES = 16 * 2**20
MAX_NESTING = 32
_EXPORT_HINT = "export one with `python -m babysit journal --run-dir D > journal.json`"
# The keys of a run's config that babysit's own jobs read (`train --replay` starts a job from the
# journal's config), with what each must be; the config's other keys are the loop's own and are
# not judged here. The whole numbers are the jobs' config fields of type int (but the seed).
WHOLE_NUMBER_SETTINGS = ("epochs", "batch_size", "epoch_passes", "seq_len", "steps_per_epoch", "n_layer", "n_head",
                         "n_embd")
TEXT_SETTINGS = ("job", "optimizer")
SEED_RANGE = (-(2**63), 2**64)  # what torch.manual_seed takes


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
            {"step": c["step"], "at": at, "set": _setting_name(c["kind"]), "value": value, "from": f"command #{c['id']}",
             **_optimizer_of(c["args"])},
        ))
    return found


def _optimizer_of(args: Any) -> dict[str, Any]:
    """A nudge of a named optimizer (a run with several) keeps its name in the journal's setting."""
    name = args.get("optimizer") if isinstance(args, dict) else None
    return {"optimizer": name} if name is not None else {}


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
    # Another optimizer's values (a run with several) as the checkpoint holds them, by its name.
    current_others = current.pop("others", None) if isinstance(current.get("others"), dict) else {}
    settings: list[dict[str, Any]] = []

    def set_(name: str, value: Any, origin: str, optimizer: str | None = None) -> None:
        values = current if optimizer is None else current_others.setdefault(optimizer, {})
        if value is None or not isinstance(values, dict) or values.get(name) == value:
            return  # the checkpoint's own value: loading it did that already
        values[name] = value
        settings.append({"step": step, "at": at, "set": name, "value": value, "from": origin,
                         **({"optimizer": optimizer} if optimizer is not None else {})})

    rollback = next((c for c in commands if c["kind"] == cmd.ROLLBACK and c["state"] == cmd.APPLIED
                     and isinstance(c["result"], dict) and c["result"].get("branch") == branch["id"]), None)
    if rollback is not None:
        args = rollback["args"] if isinstance(rollback["args"], dict) else {}
        result = rollback["result"]
        origin = f"rollback #{rollback['id']}"
        if args.get("hparams") == cmd.HPARAMS_CURRENT:  # as the trainer does it: the cut's values, then any given
            before = result.get("before") if isinstance(result.get("before"), dict) else {}
            for name in ("lr", "momentum"):
                set_(name, before.get(name), origin)
            # A run with several optimizers keeps the others' values at the cut too (Trainables.hparams).
            others = before.get("others") if isinstance(before.get("others"), dict) else {}
            for optimizer, values in others.items():
                for name in ("lr", "momentum"):
                    if isinstance(values, dict):
                        set_(name, values.get(name), origin, str(optimizer))
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
    """A journal from a file path or an already loaded dict, checked (see :func:`check_journal`).

    A path must name a regular file (not a FIFO, a device or a directory) of at most
    :data:`MAX_JOURNAL_BYTES`; both are checked before anything is read. Raises SettingsError
    with a one-line message naming what was refused."""
    if isinstance(source, dict):
        return check_journal(source)
    if not isinstance(source, (str, Path)):
        raise SettingsError(f"replay must be the path of a journal file or its loaded dict, got {type(source).__name__}")
    path = Path(source)
    text = _read_text(path)
    try:
        loaded = json.loads(text)
    except RecursionError:
        raise SettingsError(f"journal {str(path)!r} nests deeper than {MAX_NESTING} levels; a journal nests a few "
                            f"levels: {_EXPORT_HINT}") from None
    except ValueError as error:
        raise SettingsError(f"journal {str(path)!r} is not JSON ({error}); {_EXPORT_HINT}") from None
    return check_journal(loaded, str(path))


def _read_text(path: Path) -> str:
    """The text of the journal file at ``path``, refused before reading if it is not a regular
    file or is larger than a journal is. Links are followed: the path is the user's own."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once (and is refused below) instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise SettingsError(f"journal {str(path)!r} cannot be read: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as handle:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise SettingsError(f"journal {str(path)!r} is {_file_kind(found.st_mode)}, not a regular file; a journal "
                                f"is a JSON file: {_EXPORT_HINT}")
        if found.st_size > MAX_JOURNAL_BYTES:
            raise SettingsError(f"journal {str(path)!r} is {found.st_size:,} bytes; a journal is at most "
                                f"{MAX_JOURNAL_BYTES // 2**20} MiB: {_EXPORT_HINT}")
        try:
            data = handle.read(MAX_JOURNAL_BYTES + 1)  # the file may have grown since fstat
        except OSError as error:
            raise SettingsError(f"journal {str(path)!r} cannot be read: {error.strerror or error}") from None
    if len(data) > MAX_JOURNAL_BYTES:
        raise SettingsError(f"journal {str(path)!r} is over {MAX_JOURNAL_BYTES // 2**20} MiB; a journal is at most "
                            f"{MAX_JOURNAL_BYTES // 2**20} MiB: {_EXPORT_HINT}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SettingsError(f"journal {str(path)!r} is not UTF-8 text (byte {error.start}); {_EXPORT_HINT}") from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_journal(journal: Any, name: str = "the journal") -> dict[str, Any]:
    """Refuse what is not a journal this babysit can replay: another format version, nesting deeper
    than :data:`MAX_NESTING`, a config value a built-in job reads of the wrong type, a target that is
    not whole numbers, a schedule entry without a step, a place, a setting name or a valid value (or
    a skip's whole number of batches). Returns it unchanged."""
    if not isinstance(journal, dict) or FORMAT_KEY not in journal:
        raise SettingsError(f"{name} is not a babysit journal (no {FORMAT_KEY!r} key); {_EXPORT_HINT}")
    _check_nesting(journal, name)
    version = journal[FORMAT_KEY]
    if version != VERSION or isinstance(version, bool):
        raise SettingsError(f"{name} is journal format version {_show(version)}; this babysit reads version "
                            f"{VERSION} only (a newer babysit wrote it?)")
    for part in ("run", "to"):
        if not isinstance(journal.get(part, {}), dict):
            raise SettingsError(f"{name}: {part!r} must be an object, got {_show(journal[part])}")
    if not isinstance((journal.get("run") or {}).get("config", {}), dict):
        raise SettingsError(f"{name}: the run's 'config' must be an object, got {_show(journal['run']['config'])}")
    _check_config((journal.get("run") or {}).get("config") or {}, name)
    _check_target(journal.get("to") or {}, name)
    schedule = journal.get("schedule")
    if not isinstance(schedule, list):
        raise SettingsError(f"{name}: 'schedule' must be a list of settings, got {type(schedule).__name__}")
    last = (-1, 0)
    for index, entry in enumerate(schedule):
        where = f"{name}: schedule[{index}]"
        if not isinstance(entry, dict):
            raise SettingsError(f"{where} must be an object, got {_show(entry)}")
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise SettingsError(f"{where}: step must be a whole number >= 0, got {_show(step)}")
        if entry.get("at") not in (AT_STEP, AT_EPOCH_START):
            raise SettingsError(f"{where}: at must be {AT_STEP!r} or {AT_EPOCH_START!r}, got {_show(entry.get('at'))}")
        try:
            if is_skip(entry):
                skip = entry["skip_batches"]
                if not isinstance(skip, int) or isinstance(skip, bool):  # JSON: no "200" for 200, no true
                    raise cmd.CommandError(f"skip_batches must be a whole number, got {_show(skip)}")
                cmd.validate_skip_batches(skip)
            elif entry.get("set") not in SETTABLE:
                raise SettingsError(f"{where}: set must be 'lr' or 'momentum' (or the entry a skip_batches), got "
                                    f"{_show(entry.get('set'))}")
            else:
                (cmd.validate_lr if entry["set"] == "lr" else cmd.validate_momentum)(entry.get("value"))
                if entry.get("optimizer") is not None:
                    cmd.validate_optimizer_name(entry["optimizer"])
        except cmd.CommandError as error:
            raise SettingsError(f"{where}: {error}") from None
        position = (step, _rank(entry["at"]))
        if position < last:
            raise SettingsError(f"{where} (step {step}, {entry['at']}) comes before the entry above it; the schedule "
                                "must be in the order the run meets its steps")
        last = position
    return journal


def _check_nesting(journal: dict[str, Any], name: str) -> None:
    """Refuse a journal nested deeper than :data:`MAX_NESTING`, walked without recursion (a loaded
    dict that contains itself is refused the same way), or holding more objects and lists than a
    journal file of :data:`MAX_JOURNAL_BYTES` could (a loaded dict sharing its parts many times)."""
    stack: list[tuple[Any, int]] = [(journal, 1)]
    budget = MAX_JOURNAL_BYTES // 2  # each takes at least two characters in a file
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise SettingsError(f"{name} nests deeper than {MAX_NESTING} levels; a journal nests a few levels: "
                                f"{_EXPORT_HINT}")
        budget -= 1
        if budget < 0:
            raise SettingsError(f"{name} holds more than {MAX_JOURNAL_BYTES // 2:,} objects and lists; a journal "
                                f"file is at most {MAX_JOURNAL_BYTES // 2**20} MiB: {_EXPORT_HINT}")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))


def _check_config(config: dict[str, Any], name: str) -> None:
    """The config keys a built-in job reads, if present, of the type it needs (a replay of one
    would fail deep inside torch, or run 'True epochs')."""
    where = f"{name}: the run's config:"
    for key in TEXT_SETTINGS:
        if key in config and not isinstance(config[key], str):
            raise SettingsError(f"{where} {key} must be text (a name such as 'digits' or 'sgd'), got {_show(config[key])}")
    if "seed" in config:
        seed = config["seed"]
        if not _whole(seed) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise SettingsError(f"{where} seed must be a whole number from -2**63 to 2**64 - 1 (what "
                                f"torch.manual_seed takes), got {_show(seed)}")
    for key, validate in (("lr", cmd.validate_lr), ("momentum", cmd.validate_momentum)):
        if key not in config:
            continue
        if not isinstance(config[key], (int, float)) or isinstance(config[key], bool):  # "0.1" is text in JSON
            raise SettingsError(f"{where} {key} must be a number (not text, not true or false), got {_show(config[key])}")
        try:
            validate(config[key])
        except cmd.CommandError as error:
            raise SettingsError(f"{where} {error}") from None
    for key in WHOLE_NUMBER_SETTINGS:
        if key in config and (not _whole(config[key]) or config[key] < 1):
            raise SettingsError(f"{where} {key} must be a whole number >= 1, got {_show(config[key])}")


def _check_target(target: dict[str, Any], name: str) -> None:
    """The checkpoint the journal leads to: its numbers whole, its reason text (a replay trains to its epoch)."""
    for key in ("checkpoint", "branch", "epoch", "step"):
        if target.get(key) is not None and (not _whole(target[key]) or target[key] < 0):
            raise SettingsError(f"{name}: to.{key} must be a whole number >= 0, got {_show(target[key])}")
    if target.get("reason") is not None and not isinstance(target["reason"], str):
        raise SettingsError(f"{name}: to.reason must be text (such as 'epoch'), got {_show(target['reason'])}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A value for a one-line message: its repr, cut short (a journal's value can be megabytes)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int of more digits than Python prints, a nest too deep
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
