"""Sending a command from a terminal: queue it, and with ``--wait`` follow it to its outcome."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import commands as cmd
from ..errors import CliError
from ..probes_text import format_excursion
from ..store import NEW, optimizers_of
from .common import EXIT_NOT_APPLIED, open_store


# -- sending commands --------------------------------------------------------------------------
def send(run_dir: str, kind: str, args: dict[str, Any], *, wait: bool, timeout: float,
         after: Any = None) -> int:
    """Queue a command; with ``wait``, print its outcome (and, once applied, hand its row to ``after``,
    which returns the exit code)."""
    store = open_store(run_dir)
    if args.get("optimizer") is not None:
        _check_optimizer(store, run_dir, args["optimizer"])
    try:
        command_id = store.enqueue_command(kind, args, source="cli")
    except cmd.CommandError as error:
        raise CliError(str(error)) from None
    description = cmd.describe(kind, cmd.validate(kind, args).args)
    if not wait:
        print(f"queued #{command_id}: {description} (see `python -m babysit status --run-dir {run_dir}`)")
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.command(command_id)
        if row and row["state"] != cmd.PENDING:
            code = _report(row, description)
            return after(row, deadline) if after is not None and code == 0 else code
        time.sleep(0.05)
    print(f"#{command_id} {description}: still pending after {timeout:g} s; the trainer may be busy "
          "in a long step or paused in its evaluation"
          + (", or paused after an epoch's last batch, where the epoch's own checkpoint answers it once the run "
             "resumes" if kind == cmd.CHECKPOINT else ""), file=sys.stderr)
    return EXIT_NOT_APPLIED


def _check_optimizer(store: Any, run_dir: str, name: Any) -> None:
    """Refuse, before queueing, a name that is not one of the run's optimizers (as its status lists
    them); a run that has not said yet is left to the trainer, which refuses it the same way."""
    status = store.status()
    if status.get("effective_state") == NEW:
        return
    known = optimizers_of(status)
    if name not in known:
        has = ", ".join(known) if known else "one optimizer, unnamed (leave --optimizer out)"
        raise CliError(f"unknown optimizer {name!r}; the run in {run_dir!r} has {has}")


# -- probes and sweeps ---------------------------------------------------------------------------
def send_excursion(run_dir: str, kind: str, args: dict[str, Any], *, wait: bool, timeout: float) -> int:
    """Queue a probe set or a sweep; with ``wait``, also wait for it to end and print its readings."""
    args = {k: v for k, v in args.items() if v is not None}  # what is left out takes its default
    return send(run_dir, kind, args, wait=wait, timeout=timeout,
                after=lambda row, deadline: _wait_excursion(run_dir, row, deadline, timeout))


def _wait_excursion(run_dir: str, row: dict[str, Any], deadline: float, timeout: float) -> int:
    store = open_store(run_dir)
    excursion_id = (row.get("result") or {}).get("excursion")
    if excursion_id is None:
        return 0
    while time.monotonic() < deadline:
        found = store.excursion(int(excursion_id))
        if found is not None and found["state"] != "running":
            print(format_excursion(store, found, run_dir))
            return 0
        time.sleep(0.1)
    print(f"excursion #{excursion_id} is still running after {timeout:g} s; `python -m babysit probes --run-dir "
          f"{run_dir} {excursion_id}` shows how far it got", file=sys.stderr)
    return EXIT_NOT_APPLIED


def probe_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"param": args.param, "factors": args.factors, "values": args.values, "steps": args.steps,
            "checkpoint": getattr(args, "from"), "then": args.then}


def cancel_command(args: argparse.Namespace) -> int:
    excursion = args.excursion
    if excursion is None:
        running = open_store(args.run_dir).running_excursion()
        if running is None:
            raise CliError(f"no probe set or sweep is running in {args.run_dir!r}; nothing to cancel")
        excursion = running["id"]
    return send(args.run_dir, cmd.CANCEL, {"excursion": excursion}, wait=args.wait, timeout=args.timeout)



def _report(row: dict[str, Any], description: str) -> int:
    applied = row["state"] == cmd.APPLIED
    print(f"#{row['id']} {description}: {cmd.outcome(row)}", file=sys.stdout if applied else sys.stderr)
    return 0 if applied else EXIT_NOT_APPLIED
