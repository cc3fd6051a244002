"""``python -m babysit``: start the demo, serve the dashboard, and send commands from a terminal.

The rooms: :mod:`.parser` (the arguments), :mod:`.send` (queueing a command and following it),
:mod:`.report` (status, branches, hints, probes), :mod:`.train` (train, journal) and
:mod:`.serve` (dashboard, demo). This module dispatches and turns errors into one line and exit 2.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Sequence

from .. import commands as cmd
from .. import rundir
from ..errors import CliError
from ..store import DB_NAME, disk_full, disk_full_message
from .common import EXIT_USAGE, open_store
from .parser import build_parser
from .report import action_command, branches_command, format_status, hints_command, probes_command, status_object
from .send import cancel_command, probe_args, send, send_excursion
from .serve import demo_command, serve_dashboard, start_trainer
from .train import journal_command, train_command

__all__ = ["main", "action_command", "start_trainer", "status_object"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "run_dir", None) is not None:
            unusable = rundir.usable_run_dir(args.run_dir, must_exist=args.command not in ("train", "demo"))
            if unusable:
                raise CliError(unusable)
            if args.command in ("train", "demo") and Path(args.run_dir).is_dir() and rundir.read_only(args.run_dir):
                raise CliError(f"run directory {args.run_dir!r} is read-only; a trainer needs to write there")
        if args.command == "demo":
            return demo_command(args)
        if args.command == "dashboard":
            if args.run_dir is not None and not (Path(args.run_dir) / DB_NAME).is_file():
                raise CliError(f"{args.run_dir!r} is not a babysit run (it has no {DB_NAME})")
            root = args.root or (str(Path(args.run_dir).parent) if args.run_dir else "checkpoints")
            return serve_dashboard(root=root, run=args.run_dir, address=args.address, port=args.port,
                                   token=args.token, allow_hosts=args.allow_host)
        if args.command == "train":
            return train_command(args)
        if args.command == "journal":
            return journal_command(args)
        if args.command == "status":
            info = status_object(open_store(args.run_dir))
            print(json.dumps(info, indent=2) if args.json else format_status(info))
            return 0
        if args.command == "branches":
            return branches_command(args)
        if args.command == "hints":
            return hints_command(args)
        if args.command == "set":
            kind = cmd.SET_LR if args.name == "lr" else cmd.SET_MOMENTUM
            nudge = {"value": args.value, **({"optimizer": args.optimizer} if args.optimizer is not None else {})}
            return send(args.run_dir, kind, nudge, wait=args.wait, timeout=args.timeout)
        if args.command == "rollback":
            rollback_args = {"checkpoint": args.checkpoint, "hparams": args.hparams, "lr": args.lr,
                             "momentum": args.momentum, "skip_batches": args.skip_batches}
            return send(args.run_dir, cmd.ROLLBACK, rollback_args, wait=args.wait, timeout=args.timeout)
        if args.command == "probe":
            return send_excursion(args.run_dir, cmd.PROBE, probe_args(args), wait=args.wait, timeout=args.timeout)
        if args.command == "sweep":
            sweep_args = {"lr_min": args.lr_min, "lr_max": args.lr_max, "steps": args.steps}
            return send_excursion(args.run_dir, cmd.SWEEP, sweep_args, wait=args.wait, timeout=args.timeout)
        if args.command == "cancel":
            return cancel_command(args)
        if args.command == "probes":
            return probes_command(args)
        return send(args.run_dir, args.command, {}, wait=args.wait, timeout=args.timeout)
    except CliError as error:
        print(f"babysit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except rundir.RunDirError as error:
        print(f"babysit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.DatabaseError as error:
        run_dir = getattr(args, "run_dir", None) or getattr(args, "root", "")
        if disk_full(error):
            print(f"babysit: error: nothing was queued: {disk_full_message(Path(run_dir))} (a running trainer "
                  "pauses by itself meanwhile; Ctrl-C or `kill PID` stops it)", file=sys.stderr)
        elif rundir.read_only(run_dir):
            print(f"babysit: error: run directory {run_dir!r} is read-only; babysit needs to write there",
                  file=sys.stderr)
        else:  # a run.db damaged past its first page
            print(f"babysit: error: {str(Path(run_dir) / DB_NAME)!r} is not a readable babysit run database "
                  f"({error}); restore it from a backup or start a new run in another directory", file=sys.stderr)
        return EXIT_USAGE
