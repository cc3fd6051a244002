"""Command types and their validation, shared by the CLI, the dashboard and the trainer.

A command is a row in the run store: written as ``pending`` by the CLI or the dashboard, checked
again and applied by the trainer at a step boundary, then marked ``applied`` (with the step) or
``rejected`` (with the reason). Every writer calls :func:`validate` before queueing, so a bad value
never reaches the queue; the trainer calls it again because the queue is a file anyone can write.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import CommandError

SET_LR = "set_lr"
SET_MOMENTUM = "set_momentum"
PAUSE = "pause"
RESUME = "resume"
CHECKPOINT = "checkpoint"
STOP = "stop"
ROLLBACK = "rollback"

KINDS = (SET_LR, SET_MOMENTUM, PAUSE, RESUME, CHECKPOINT, STOP, ROLLBACK)

# Rollback: restore the checkpoint's own lr and momentum, or keep the ones in use now.
HPARAMS_CHECKPOINT = "checkpoint"
HPARAMS_CURRENT = "current"
HPARAMS_CHOICES = (HPARAMS_CHECKPOINT, HPARAMS_CURRENT)

# Any finite lr > 0 is legitimate (20 is the default of well-known LSTM language-model scripts);
# one outside this range is applied, with a warning in its acknowledgement.
LR_USUAL_RANGE = (1e-7, 100.0)
MOMENTUM_MAX_EXCLUSIVE = 1.0

PENDING = "pending"
APPLIED = "applied"
REJECTED = "rejected"
EXPIRED = "expired"

_CHECKPOINT_ID = re.compile(r"^[0-9]{1,12}$")
# What a person types as a number: float() alone would also read "0_001" as 1.0 and "١" as 1.
_DECIMAL = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")


@dataclass(frozen=True)
class Command:
    """A validated command: its kind and its normalised arguments."""

    kind: str
    args: dict[str, Any]

    def describe(self) -> str:
        """A short human phrase: ``set lr 0.05``, ``rollback to #3 (checkpoint hparams)``."""
        return describe(self.kind, self.args)


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_number(raw: Any, what: str, accepted: str, error: type[Exception] = CommandError) -> float:
    """Turn ``raw`` (a number or the text a person typed) into a finite float, or raise ``error``
    (a CommandError for a command's value, a SettingsError for a setting's) saying what is accepted."""
    refused = error(f"{what} must be {accepted}, got {_show(raw)}")
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise refused
    if isinstance(raw, str) and not _DECIMAL.match(raw.strip()):
        raise refused
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (ValueError, OverflowError):  # text, or an integer too large for a float
        raise refused from None
    if not math.isfinite(value):
        raise refused
    return value


def validate_lr(raw: Any) -> float:
    accepted = "a finite number > 0 (for example 0.01)"
    value = parse_number(raw, "lr", accepted)
    if not value > 0.0:
        raise CommandError(f"lr must be {accepted}, got {_show(raw)}")
    return value


def lr_warning(value: float) -> str | None:
    """A note for an lr far outside the usual range: applied all the same, but worth a second look."""
    low, high = LR_USUAL_RANGE
    if value > high:
        return f"lr {value:g} is far above the usual range ({low:g} to {high:g}); applied as asked"
    if value < low:
        return f"lr {value:g} is far below the usual range ({low:g} to {high:g}); applied as asked"
    return None


def validate_momentum(raw: Any) -> float:
    accepted = "a finite number >= 0 and < 1 (for example 0.9)"
    value = parse_number(raw, "momentum", accepted)
    if not 0.0 <= value < MOMENTUM_MAX_EXCLUSIVE:
        raise CommandError(f"momentum must be {accepted}, got {_show(raw)}")
    return value


def validate_branch(raw: Any, kind: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise CommandError(f"{kind} branch must be a branch id, a whole number >= 1, got {_show(raw)}")
    return raw


def validate_checkpoint_id(raw: Any) -> int:
    """Checkpoints are named by their id only; anything shaped like a path is refused."""
    accepted = "a checkpoint id, a whole number such as 3 (see `python -m babysit status`)"
    if isinstance(raw, bool):
        raise CommandError(f"checkpoint must be {accepted}, got {_show(raw)}")
    if isinstance(raw, int):
        if raw < 1:
            raise CommandError(f"checkpoint must be {accepted}, got {_show(raw)}")
        return raw
    if isinstance(raw, str) and _CHECKPOINT_ID.match(raw.strip()) and int(raw) >= 1:
        return int(raw)
    raise CommandError(f"checkpoint must be {accepted}, got {_show(raw)}")


def validate(kind: Any, args: dict[str, Any] | None = None) -> Command:
    """Check a command and return it normalised; raise :class:`CommandError` naming the bad value."""
    if args is not None and not isinstance(args, dict):
        raise CommandError(f"{kind} arguments must be a mapping of names to values, got {_show(args)}")
    args = dict(args or {})
    if kind not in KINDS:
        raise CommandError(f"unknown command {_show(kind)}; accepted: {', '.join(KINDS)}")
    if kind == SET_LR:
        return Command(kind, {"value": validate_lr(args.get("value", ""))})
    if kind == SET_MOMENTUM:
        return Command(kind, {"value": validate_momentum(args.get("value", ""))})
    if kind == ROLLBACK:
        normalised: dict[str, Any] = {"checkpoint": validate_checkpoint_id(args.get("checkpoint", ""))}
        hparams = args.get("hparams", HPARAMS_CHECKPOINT)
        if hparams not in HPARAMS_CHOICES:
            raise CommandError(
                f"hparams must be one of {', '.join(HPARAMS_CHOICES)}, got {_show(hparams)}"
            )
        normalised["hparams"] = hparams
        # Optional explicit values applied on top of the chosen set (the divergence remedy uses lr).
        if args.get("lr") is not None:
            normalised["lr"] = validate_lr(args["lr"])
        if args.get("momentum") is not None:
            normalised["momentum"] = validate_momentum(args["momentum"])
        if args.get("branch") is not None:  # the guard's remedy names the branch it is for
            normalised["branch"] = validate_branch(args["branch"], "rollback")
        return Command(kind, normalised)
    if kind == PAUSE and (args.get("reason") is not None or args.get("branch") is not None):
        # The guard says why it paused the run, and for which branch; a person's pause needs neither.
        paused: dict[str, Any] = {}
        reason = args.get("reason")
        if reason is not None:
            if not isinstance(reason, str) or len(reason) > 300:
                raise CommandError(f"pause reason must be text of at most 300 characters, got {_show(reason)}")
            paused["reason"] = reason
        if args.get("branch") is not None:
            paused["branch"] = validate_branch(args["branch"], "pause")
        extra = sorted(k for k in args if k not in ("reason", "branch") and args[k] is not None)
        if extra:
            raise CommandError(f"pause takes only a reason and a branch, got {', '.join(extra)}")
        return Command(kind, paused)
    extra = sorted(k for k in args if args[k] is not None)
    if extra:
        raise CommandError(f"{kind} takes no arguments, got {', '.join(extra)}")
    return Command(kind, {})


def describe(kind: str, args: Any) -> str:
    """A short phrase for a command row, also for a malformed one (shown, never fatal)."""
    try:
        return _describe(kind, args)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        return f"{kind} {_show(args)}"


def _describe(kind: str, args: dict[str, Any]) -> str:
    if kind == SET_LR:
        return f"set lr {args.get('value'):g}"
    if kind == SET_MOMENTUM:
        return f"set momentum {args.get('value'):g}"
    if kind == ROLLBACK:
        text = f"rollback to #{args.get('checkpoint')} ({args.get('hparams')} hparams"
        if "lr" in args:
            text += f", lr {args['lr']:g}"
        if "momentum" in args:
            text += f", momentum {args['momentum']:g}"
        return text + ")"
    if kind == PAUSE and isinstance(args, dict) and args.get("reason"):
        return f"pause ({args['reason']})"
    return kind


def outcome(row: dict[str, Any], number: Callable[[Any], str] = str) -> str:
    """A queued command's fate, as the CLI and the page say it: "applied at step N (what it
    changed)", "pending", or "rejected: why" / "expired: why"; ``number`` formats the values."""
    if row["state"] == APPLIED:
        result = row.get("result") or {}
        details = ", ".join(f"{k} {number(v)}" for k, v in result.items() if k != "before" and v is not None)
        return f"applied at step {row['step']}" + (f" ({details})" if details else "")
    if row["state"] == PENDING:
        return "pending"
    return f"{row['state']}: {row.get('reason')}"
