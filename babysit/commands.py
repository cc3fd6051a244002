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
PROBE = "probe"      # try K values of lr (or momentum) for N steps each, from a checkpoint or from now
SWEEP = "sweep"      # the lr range test from the current weights, on a throwaway branch
CANCEL = "cancel"    # end the probe set or sweep in progress; the run goes back to where it was

KINDS = (SET_LR, SET_MOMENTUM, PAUSE, RESUME, CHECKPOINT, STOP, ROLLBACK, PROBE, SWEEP, CANCEL)

# Probes: what they vary, how many, how long; what the run does once they are done.
PROBE_PARAMS = ("lr", "momentum")
PROBE_DEFAULT_FACTORS = (0.5, 1.0, 2.0)
PROBE_MAX_COUNT = 8
PROBE_DEFAULT_STEPS = 100
PROBE_MAX_STEPS = 100_000
THEN_PAUSE = "pause"        # wait at the point the run left, for the person to choose
THEN_CONTINUE = "continue"  # carry on as before; the results stay on the page
THEN_CHOICES = (THEN_PAUSE, THEN_CONTINUE)
# The lr sweep: how many steps, over which range (by default from the current lr ×1e-3 to ×1e2).
SWEEP_DEFAULT_STEPS = 200
SWEEP_STEPS_RANGE = (10, 10_000)
SWEEP_DEFAULT_SPAN = (1e-3, 1e2)

# Rollback: restore the checkpoint's own lr and momentum, or keep the ones in use now.
HPARAMS_CHECKPOINT = "checkpoint"
HPARAMS_CURRENT = "current"
HPARAMS_CHOICES = (HPARAMS_CHECKPOINT, HPARAMS_CURRENT)
# Rollback with a data skip (the PaLM remedy for a loss spike: restart ~100 steps earlier and skip
# 200-500 batches): the branch resumes from the checkpoint and leaves out the next N batches of the
# data order. The trainer checks N against what is left of the checkpoint's epoch.
SKIP_BATCHES_MAX = 10**9

# Any finite lr > 0 is legitimate (20 is the default of well-known LSTM language-model scripts);
# one outside this range is applied, with a warning in its acknowledgement.
LR_USUAL_RANGE = (1e-7, 100.0)
MOMENTUM_MAX_EXCLUSIVE = 1.0

PENDING = "pending"
APPLIED = "applied"
REJECTED = "rejected"
EXPIRED = "expired"

# A run's optimizer names (``Run(optimizers={"D": ..., "G": ...})``), as a nudge names one: no dots
# (nn.ModuleDict refuses them), no slashes (a series is named lr/<name>), no spaces.
OPTIMIZER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
OPTIMIZER_NAME_ACCEPTED = "1 to 32 letters, digits, '_' or '-'"

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


def validate_optimizer_name(raw: Any) -> str:
    if not isinstance(raw, str) or not OPTIMIZER_NAME.match(raw):
        raise CommandError(f"optimizer must be the name of one of the run's optimizers ({OPTIMIZER_NAME_ACCEPTED}), "
                           f"got {_show(raw)}")
    return raw


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
    if kind in (SET_LR, SET_MOMENTUM):
        check = validate_lr if kind == SET_LR else validate_momentum
        nudge: dict[str, Any] = {"value": check(args.get("value", ""))}
        if args.get("optimizer") is not None:  # which of a run's optimizers (the trainer knows their names)
            nudge["optimizer"] = validate_optimizer_name(args["optimizer"])
        return Command(kind, nudge)
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
        if args.get("skip_batches") is not None:
            normalised["skip_batches"] = validate_skip_batches(args["skip_batches"])
        return Command(kind, normalised)
    if kind == PROBE:
        return Command(kind, _validate_probe(args))
    if kind == SWEEP:
        return Command(kind, _validate_sweep(args))
    if kind == CANCEL:
        _only(kind, args, ("excursion",))
        return Command(kind, {"excursion": validate_whole(args.get("excursion", ""), "cancel excursion",
                                                          "an excursion id, a whole number >= 1", 1, None)})
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


def validate_skip_batches(raw: Any) -> int:
    """How many batches of the data order a rollback leaves out: a whole number >= 1 (0 is no skip:
    leave the option out)."""
    return validate_whole(raw, "skip_batches", f"a whole number of batches from 1 to {SKIP_BATCHES_MAX}",
                          1, SKIP_BATCHES_MAX)


def validate_whole(raw: Any, what: str, accepted: str, low: int, high: int | None) -> int:
    """A whole number in [low, high] (a number or the text a person typed: "200", "2e2" is refused)."""
    value: Any = raw
    if isinstance(raw, str) and re.fullmatch(r"\s*[0-9]{1,12}\s*", raw):
        value = int(raw)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise CommandError(f"{what} must be {accepted}, got {_show(raw)}")
    return value


def _only(kind: str, args: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(k for k in args if k not in allowed and args[k] is not None)
    if extra:
        raise CommandError(f"{kind} takes only {', '.join(allowed)}; got {', '.join(extra)}")


def _number_list(raw: Any, what: str) -> list[Any]:
    """A list of values, or the text a person typed ("0.5, 1, 2" or "0.5 1 2")."""
    if isinstance(raw, str):
        raw = [part for part in re.split(r"[\s,]+", raw.strip()) if part]
    if not isinstance(raw, (list, tuple)) or not 1 <= len(raw) <= PROBE_MAX_COUNT:
        raise CommandError(f"{what} must be a list of 1 to {PROBE_MAX_COUNT} numbers (for example 0.5, 1, 2), "
                           f"got {_show(raw)}")
    return list(raw)


def _validate_probe(args: dict[str, Any]) -> dict[str, Any]:
    _only(PROBE, args, ("param", "factors", "values", "steps", "checkpoint", "then"))
    param = args.get("param") or "lr"
    if param not in PROBE_PARAMS:
        raise CommandError(f"probe param must be one of {', '.join(PROBE_PARAMS)}, got {_show(param)}")
    if args.get("factors") is not None and args.get("values") is not None:
        raise CommandError("probe takes factors (of the value in use) or values, not both")
    normalised: dict[str, Any] = {"param": param}
    if args.get("values") is not None:
        check = validate_lr if param == "lr" else validate_momentum
        values = [check(v) for v in _number_list(args["values"], "probe values")]
        if len(set(values)) != len(values):
            raise CommandError(f"probe values must differ from each other, got {_show(args['values'])}")
        normalised["values"] = values
    else:
        raw = PROBE_DEFAULT_FACTORS if args.get("factors") is None else args["factors"]
        factors = [parse_number(f, "probe factor", "a finite number > 0 (for example 0.5)")
                   for f in _number_list(raw, "probe factors")]
        if any(f <= 0 for f in factors):
            raise CommandError(f"probe factors must be finite numbers > 0 (for example 0.5, 1, 2), got {_show(raw)}")
        if len(set(factors)) != len(factors):
            raise CommandError(f"probe factors must differ from each other, got {_show(raw)}")
        normalised["factors"] = factors
    normalised["steps"] = validate_whole(args.get("steps", PROBE_DEFAULT_STEPS), "probe steps",
                                         f"a whole number of steps from 1 to {PROBE_MAX_STEPS}", 1, PROBE_MAX_STEPS)
    if args.get("checkpoint") is not None:
        normalised["checkpoint"] = validate_checkpoint_id(args["checkpoint"])
    then = args.get("then") or THEN_PAUSE
    if then not in THEN_CHOICES:
        raise CommandError(f"probe then must be one of {', '.join(THEN_CHOICES)}, got {_show(then)}")
    normalised["then"] = then
    return normalised


def _validate_sweep(args: dict[str, Any]) -> dict[str, Any]:
    _only(SWEEP, args, ("lr_min", "lr_max", "steps"))
    low, high = SWEEP_STEPS_RANGE
    normalised: dict[str, Any] = {
        "steps": validate_whole(args.get("steps", SWEEP_DEFAULT_STEPS), "sweep steps",
                                f"a whole number of steps from {low} to {high}", low, high)}
    for end in ("lr_min", "lr_max"):
        if args.get(end) is not None:
            normalised[end] = validate_lr(args[end])
    if "lr_min" in normalised and "lr_max" in normalised and not normalised["lr_min"] < normalised["lr_max"]:
        raise CommandError(f"sweep lr_min must be below lr_max, got lr_min {normalised['lr_min']:g} and "
                           f"lr_max {normalised['lr_max']:g}")
    return normalised


def describe(kind: str, args: Any) -> str:
    """A short phrase for a command row, also for a malformed one (shown, never fatal)."""
    try:
        return _describe(kind, args)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        return f"{kind} {_show(args)}"


def _describe(kind: str, args: dict[str, Any]) -> str:
    if kind in (SET_LR, SET_MOMENTUM):
        which = f" of optimizer {args['optimizer']}" if args.get("optimizer") is not None else ""
        return f"set {'lr' if kind == SET_LR else 'momentum'}{which} {args.get('value'):g}"
    if kind == ROLLBACK:
        text = f"rollback to #{args.get('checkpoint')} ({args.get('hparams')} hparams"
        if "lr" in args:
            text += f", lr {args['lr']:g}"
        if "momentum" in args:
            text += f", momentum {args['momentum']:g}"
        if "skip_batches" in args:
            text += f", skipping {args['skip_batches']} batches"
        return text + ")"
    if kind == PAUSE and isinstance(args, dict) and args.get("reason"):
        return f"pause ({args['reason']})"
    if kind == PROBE:
        tried = (", ".join(f"{v:g}" for v in args["values"]) if "values" in args
                 else ", ".join(f"×{f:g}" for f in args["factors"]))
        origin = f"from #{args['checkpoint']}" if "checkpoint" in args else "from now"
        return f"probe {args['param']} {tried} for {args['steps']} steps {origin}"
    if kind == SWEEP:
        span = ""
        if "lr_min" in args or "lr_max" in args:
            span = f" {args.get('lr_min', 'auto')!s:.8} to {args.get('lr_max', 'auto')!s:.8}"
        return f"lr sweep{span} over {args['steps']} steps"
    if kind == CANCEL:
        return f"cancel excursion #{args['excursion']}"
    return kind


# Kept in a result for the record (the value before, where in the epoch a nudge landed, which
# journal entry a replay applied), not said in its outcome.
_NOT_SHOWN = ("before", "step_in_epoch", "journal_entry")


def _shown(value: Any) -> str:
    """A result's value as read: a float to 6 significant digits (an lr scaled by a schedule is
    9.372421213165785e-05 in full), anything else as it is."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def outcome(row: dict[str, Any], number: Callable[[Any], str] = _shown) -> str:
    """A queued command's fate, as the CLI and the page say it: "applied at step N (what it
    changed)", "pending", or "rejected: why" / "expired: why"; ``number`` formats the values."""
    if row["state"] == APPLIED:
        result = row.get("result") or {}
        details = ", ".join(f"{k} {number(v)}" for k, v in result.items() if k not in _NOT_SHOWN and v is not None)
        return f"applied at step {row['step']}" + (f" ({details})" if details else "")
    if row["state"] == PENDING:
        return "pending"
    return f"{row['state']}: {row.get('reason')}"
