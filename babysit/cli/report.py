"""What the CLI prints about a run: ``status``, ``branches``, ``hints`` and ``probes``."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from typing import Any

from .. import commands as cmd
from ..errors import CliError
from ..instruments.keeping import read_keeping
from ..probes_text import format_excursion
from ..store import RunStore, optimizers_of
from .common import open_store


# -- status ----------------------------------------------------------------------------------------
def status_object(store: RunStore) -> dict[str, Any]:
    """The run's state as a JSON-ready object (what ``status --json`` prints)."""
    status = store.status()
    keeping = read_keeping(store)
    checkpoints = [
        {"id": c["id"], "epoch": c["epoch"], "step": c["step"], "branch": c["branch"],
         "path": str(store.run_dir / c["file"]), "reason": c["reason"], "metrics": c["metrics"],
         "hparams": c["hparams"], "created": c["created"], "kept": keeping.kept.get(c["id"])}
        for c in store.checkpoints()
    ]
    pending = store.pending_commands()
    return {
        "run_dir": str(store.run_dir),
        "state": status.get("effective_state"),
        "pid": status.get("pid"),
        "host": status.get("host"),
        "heartbeat": status.get("heartbeat"),
        "epoch": status.get("epoch"),
        "max_epochs": status.get("max_epochs"),
        "step": status.get("step"),
        "step_in_epoch": status.get("step_in_epoch"),
        "steps_per_epoch": status.get("steps_per_epoch"),
        "branch": status.get("branch"),
        "lr": status.get("lr"),
        "momentum": status.get("momentum"),
        "optimizer": status.get("optimizer"),
        "optimizers": optimizers_of(status),  # several: each by name, with its lr and momentum
        "message": status.get("message"),
        "checkpoints": checkpoints,
        "cadence": keeping.cadence,
        "retention": keeping.retention,
        "pending_commands": [
            {"id": p["id"], "kind": p["kind"], "args": p["args"], "source": p["source"], "created": p["created"]}
            for p in pending
        ],
    }


def _optimizer_line(values: dict[str, Any]) -> str:
    parts = [str(values.get("type") or "?")]
    for hparam in ("lr", "momentum"):
        if isinstance(values.get(hparam), (int, float)):
            parts.append(f"{hparam} {values[hparam]:.6g}")
    return ", ".join(parts)


def format_status(info: dict[str, Any]) -> str:
    lines = [f"run          {info['run_dir']}"]
    state = info["state"]
    if info.get("heartbeat") and state in ("running", "paused", "not responding"):
        state += f" (pid {info['pid']}, heartbeat {time.time() - info['heartbeat']:.1f} s ago)"
    lines.append(f"state        {state}")
    if info.get("message"):
        lines.append(f"             {info['message']}")
    if info.get("epoch") is not None:
        progress = f"epoch {info['epoch']}/{info.get('max_epochs') or '?'}, step {info['step']}"
        if info.get("steps_per_epoch"):
            progress += f" ({info['step_in_epoch']}/{info['steps_per_epoch']} in this epoch)"
        lines.append(f"progress     {progress}, branch {info['branch']}")
    several = info.get("optimizers") or {}
    for index, (name, values) in enumerate(several.items()):  # the first's lr and momentum are the run's too
        lines.append(f"{'optimizers' if index == 0 else '':<13}{name}: {_optimizer_line(values)}"
                     + (" (the default of `set`)" if index == 0 else ""))
    if info.get("lr") is not None and not several:
        lines.append(f"lr           {info['lr']:.6g}")
    if info.get("momentum") is not None and not several:
        window = 1 / (1 - info["momentum"]) if info["momentum"] < 1 else float("inf")
        lines.append(f"momentum     {info['momentum']:.6g} (averages over ~{window:.0f} steps)")
    lines.append(f"pending      {len(info['pending_commands'])} command(s)")
    if info.get("cadence"):
        lines.append(f"cadence      {info['cadence']}")
    lines.append(f"checkpoints  {len(info['checkpoints'])}; kept: {info['retention']}")
    for c in info["checkpoints"][-10:]:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in c["metrics"].items() if isinstance(v, (int, float)))
        kept = f"  ({c['reason']}; {c['kept']})" if c.get("kept") else f"  ({c['reason']})"
        lines.append(f"  #{c['id']:<4} epoch {c['epoch']:<4} step {c['step']:<8} branch {c['branch']:<3} {metrics}{kept}")
    return "\n".join(lines)


# -- branches --------------------------------------------------------------------------------------
def branches_command(args: argparse.Namespace) -> int:
    """``branches``: the comparison table of the run's branches (babysit.instruments.compare)."""
    from ..instruments import compare

    store = open_store(args.run_dir)
    try:
        comparison = compare.compare_branches(store, args.branch)
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json.dumps({"run_dir": str(store.run_dir), "at_steps": comparison.at_steps,
                          "loss_metric": comparison.loss_metric, "best_metric": comparison.best_metric,
                          "left_out": {str(b): why for b, why in comparison.left_out.items()},
                          "branches": [compare.row_object(r) for r in comparison.rows]}, indent=2))
    else:
        print(compare.format_table(comparison))
    return 0


# -- hints ---------------------------------------------------------------------------------------
def action_command(action: Any, run_dir: str) -> str:
    """The ``python -m babysit ...`` line that sends a hint's action, for a terminal."""
    args, where = action.args, f"--run-dir {shlex.quote(run_dir)}"
    if action.kind in (cmd.SET_LR, cmd.SET_MOMENTUM):
        return f"python -m babysit set {where} {'lr' if action.kind == cmd.SET_LR else 'momentum'} {args['value']:.10g}"
    if action.kind == cmd.ROLLBACK:
        line = f"python -m babysit rollback {where} {args['checkpoint']}"
        if args.get("hparams") == cmd.HPARAMS_CURRENT:
            line += f" --hparams {cmd.HPARAMS_CURRENT}"
        for name in ("lr", "momentum"):
            if name in args:
                line += f" --{name} {args[name]:.10g}"
        return line
    return f"python -m babysit {action.kind} {where}"


def hints_command(args: argparse.Namespace) -> int:
    """List the run's current hints with the command that acts on each, or dismiss one."""
    from ..instruments.hints import read_hints

    store = open_store(args.run_dir)
    if args.dismiss is not None:
        shown = read_hints(store, include_dismissed=True)
        if args.dismiss not in {h.id for h in shown}:
            listed = ", ".join(h.id for h in shown) or "none now"
            raise CliError(f"no current hint has the id {args.dismiss!r}; current hints: {listed}")
        store.dismiss_hint(args.dismiss)
        print(f"dismissed {args.dismiss}: it is no longer shown here or on the page")
        return 0
    found = read_hints(store)
    if args.json:
        listed = []
        for hint in found:
            entry = hint.as_dict()
            for shown, act in zip(entry["actions"], hint.actions):
                shown["cli"] = action_command(act, args.run_dir)
            listed.append(entry)
        print(json.dumps(listed, indent=2))
        return 0
    if not found:
        print(f"no hints for {args.run_dir} now (dismissed ones are not listed)")
        return 0
    for hint in found:
        print(f"{hint.id}  {hint.title}")
        print(f"  {hint.text}")
        for act in hint.actions:
            print(f"  {act.label}: {action_command(act, args.run_dir)}")
        print(f"  dismiss: python -m babysit hints --run-dir {shlex.quote(args.run_dir)} --dismiss {hint.id}")
    return 0

def probes_command(args: argparse.Namespace) -> int:
    store = open_store(args.run_dir)
    if args.excursion is None:
        newest = store.excursions(limit=1)
        if not newest:
            raise CliError(f"run {args.run_dir!r} has no probe set or sweep yet (start one with `python -m babysit "
                           "probe` or `python -m babysit sweep`)")
        found = newest[0]
    else:
        found = store.excursion(int(args.excursion)) if re.fullmatch(r"[0-9]{1,12}", args.excursion) else None
        if found is None:
            known = ", ".join(f"#{e['id']}" for e in store.excursions(limit=12)) or "none yet"
            raise CliError(f"there is no excursion {args.excursion!r} in run {args.run_dir!r}; its excursions: {known}")
    print(format_excursion(store, found, args.run_dir))
    return 0
