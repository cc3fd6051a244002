"""``train`` and ``journal``: a built-in job in the foreground, and a checkpoint's panda journal."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .. import commands as cmd
from ..errors import CliError, SettingsError
from ..instruments import journal
from ..store import DB_NAME
from .common import open_store

# The `train` options that set a job's config field of the same name (each job takes some of them).
TRAIN_OPTIONS = ("epochs", "lr", "momentum", "optimizer", "seed", "batch_size", "seq_len", "steps_per_epoch",
                 "epoch_passes")


# -- train -------------------------------------------------------------------------------------
def train_command(args: argparse.Namespace) -> int:
    from ..jobs import JOBS
    from ..run import RunLockedError

    replay = _replay_journal(args)
    stored = _stored_config(args.run_dir)
    resuming = bool(stored)
    if replay is not None and not stored:
        # A replay starts as the journal's run started: its job and config (an option given here
        # that differs is ignored, as it is when a run resumes), trained to the journal's checkpoint.
        stored = dict((replay.get("run") or {}).get("config") or {})
        target = replay.get("to") or {}
        if args.epochs is None and target.get("reason") == "epoch" and isinstance(target.get("epoch"), int):
            stored["epochs"] = target["epoch"]
    job = _choose_job(args, stored)
    config_class, train = JOBS[job].load()
    names = [f.name for f in fields(config_class)]
    given = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name, None) is not None}
    foreign = [name for name in given if name not in names]
    if foreign:
        accepted = ", ".join(_option(name) for name in TRAIN_OPTIONS if name in names)
        raise CliError(f"{', '.join(map(_option, foreign))} is not an option of job {job} "
                       f"(its options: {accepted})")
    config_values = dict(asdict(config_class()))
    if stored:
        ignored = {k: v for k, v in given.items() if k != "epochs" and stored.get(k, v) != v}
        started = "this run was started" if resuming else "the journal's run was started"
        for key, value in ignored.items():
            print(f"babysit: {_option(key)} {value} ignored: {started} with "
                  f"{key} {stored[key]} and keeps it (nudge lr and momentum with `python -m babysit set`)")
        config_values.update({k: v for k, v in stored.items() if k in config_values})
        config_values.update({k: v for k, v in given.items() if k == "epochs"})
    else:
        config_values.update(given)
    try:
        config = config_class(**config_values)
    except (SettingsError, cmd.CommandError) as error:  # a bad setting, or a bad lr/momentum in it
        raise CliError(str(error)) from None
    if resuming:
        status = open_store(args.run_dir).status()
        if status.get("state") == "finished" and (status.get("epoch") or 0) >= config.epochs:
            print(f"run {args.run_dir} already finished {status.get('epoch')} epochs; "
                  f"pass --epochs N (N > {status.get('epoch')}) to train it further")
            return 0

    def on_run(run: Any) -> None:
        print(f"babysit: training in {args.run_dir} (pid {os.getpid()}): {run.message}", flush=True)

    try:
        run = train(args.run_dir, config, on_run=on_run, **({"replay": replay} if replay is not None else {}))
    except RunLockedError as error:
        raise CliError(str(error)) from None
    print(f"babysit: {run.status}: {run.message}", flush=True)
    return 0


def _replay_journal(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "replay", None):
        return None
    try:
        return journal.read_journal(args.replay)
    except SettingsError as error:
        raise CliError(f"--replay: {error}") from None


def journal_command(args: argparse.Namespace) -> int:
    """Print the journal of a checkpoint (default: the newest of the current branch) as JSON."""
    store = open_store(args.run_dir)
    try:
        found = journal.export_journal(store, args.to)
    except SettingsError as error:
        raise CliError(str(error)) from None
    sys.stdout.write(journal.to_json(found))
    return 0


def _choose_job(args: argparse.Namespace, stored: dict[str, Any] | None) -> str:
    """The job a run directory holds (a resumed run keeps its own), else ``--job``, else the default."""
    from ..jobs import DEFAULT_JOB, JOB_OF_UNNAMED_RUNS, JOBS

    if not stored:
        return args.job or DEFAULT_JOB
    job = stored.get("job", JOB_OF_UNNAMED_RUNS)
    if job not in JOBS:
        raise CliError(f"the run in {args.run_dir} was started by job {job!r}, which is not one of babysit's "
                       f"({', '.join(sorted(JOBS))}); resume it by running its own training script")
    if args.job and args.job != job:
        raise CliError(f"--job {args.job}: the run in {args.run_dir} is a {job} run and can only resume as one; "
                       f"pass --job {job}, or another --run-dir for a new {args.job} run")
    return job


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _stored_config(run_dir: str) -> dict[str, Any] | None:
    if not (Path(run_dir) / DB_NAME).exists():
        return None
    return open_store(run_dir).get_meta("config")
