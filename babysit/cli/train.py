"""``train`` and ``journal``: a built-in job in the foreground, and a checkpoint's panda journal."""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .. import cadence
from .. import commands as cmd
from .. import rundir
from ..errors import CheckpointError, CliError, SettingsError
from ..instruments import journal
from ..store import DB_NAME, LOG_NAME, NEW
from .common import open_store

# The `train` options that set a job's config field of the same name (each job takes some of them).
TRAIN_OPTIONS = ("epochs", "lr", "momentum", "optimizer", "seed", "batch_size", "seq_len", "steps_per_epoch",
                 "epoch_passes", "checkpoint_every_steps", "checkpoint_every_minutes")
# The options a resumed run takes from this command rather than keeping its own: how far to train,
# and how often to checkpoint (neither changes what is trained).
RESUME_OPTIONS = ("epochs", "checkpoint_every_steps", "checkpoint_every_minutes")


# -- train -------------------------------------------------------------------------------------
def train_command(args: argparse.Namespace) -> int:
    from ..jobs import JOBS
    from ..run import RunLockedError

    parse_cadence(args)
    replay = _replay_journal(args)
    stored = _stored_config(args.run_dir)
    _refuse_own_script_runs(args.run_dir, stored)
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
        ignored = {k: v for k, v in given.items() if k not in RESUME_OPTIONS and stored.get(k, v) != v}
        started = "this run was started" if resuming else "the journal's run was started"
        for key, value in ignored.items():
            print(f"babysit: {_option(key)} {value} ignored: {started} with "
                  f"{key} {stored[key]} and keeps it (nudge lr and momentum with `python -m babysit set`)")
        config_values.update({k: v for k, v in stored.items() if k in config_values})
        config_values.update({k: v for k, v in given.items() if k in RESUME_OPTIONS})
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
        every = cadence.describe(cadence.Cadence(config.checkpoint_every_steps, config.checkpoint_every_minutes).to_json())
        print(f"babysit: training in {args.run_dir} (pid {os.getpid()})"
              + (f"; a checkpoint {every}, and at each epoch's end" if every else ""), flush=True)

    narrate_to_console_and_log(args.run_dir)
    try:
        train(args.run_dir, config, on_run=on_run, **({"replay": replay} if replay is not None else {}))
    except RunLockedError as error:
        raise CliError(str(error)) from None
    except CheckpointError as error:  # a run whose checkpoints another script's model made, said in one line
        raise CliError(f"{error}; if its own training script made this run, run that script again to resume it") \
            from None
    return 0


def parse_cadence(args: argparse.Namespace) -> None:
    """--checkpoint-every-steps and --checkpoint-every-minutes as numbers, or a one-line refusal
    that names the value (before anything is created)."""
    steps, minutes = getattr(args, "checkpoint_every_steps", None), getattr(args, "checkpoint_every_minutes", None)
    if steps is not None:
        text = steps.strip().replace("_", "")
        if not text.isdigit() or int(text) < 1:
            raise CliError(f"--checkpoint-every-steps {steps!r}: give a whole number of steps >= 1, e.g. 500")
        args.checkpoint_every_steps = int(text)
    if minutes is not None:
        try:
            value = float(minutes)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise CliError(f"--checkpoint-every-minutes {minutes!r}: give a number of minutes > 0, e.g. 30 or 0.5")
        args.checkpoint_every_minutes = value


def _refuse_own_script_runs(run_dir: str, stored: dict[str, Any] | None) -> None:
    """``train`` resumes babysit's built-in jobs only: a run some script made with ``babysit.Run``
    (its config names no job and is not an old digits run's) is refused before anything loads."""
    from ..jobs import JOB_OF_UNNAMED_RUNS, JOBS

    if (stored and "job" in stored) or not (Path(run_dir) / DB_NAME).exists():
        return
    store = open_store(run_dir)
    if not store.checkpoints() and store.status().get("state") == NEW:
        return  # nothing was trained there yet: a new run
    config_class, _ = JOBS[JOB_OF_UNNAMED_RUNS].load()
    if stored and set(stored) <= {f.name for f in fields(config_class)}:
        return  # a digits run from before jobs were named
    raise CliError(f"the run in {run_dir} was made by its own training script (babysit.Run in a script), not by one "
                   f"of babysit's jobs ({', '.join(sorted(JOBS))}); `train` cannot resume it: run that script again "
                   "and it resumes from the latest checkpoint")


def narrate_to_console_and_log(run_dir: str) -> None:
    """The trainer's lines (babysit's loggers, INFO and up: an epoch, a command's fate, an event) on
    standard output and in the run directory's trainer.log, unless standard output is that file
    already (``demo`` starts its trainer so)."""
    logger = logging.getLogger("babysit")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # said here once, not again by a root handler the job may add
    formatter = logging.Formatter("%(message)s")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    file = rundir.open_file(Path(run_dir) / LOG_NAME, "ab")  # a planted link is refused, never appended to
    if _same_file(file.fileno(), sys.stdout):
        file.close()
        return
    to_log = logging.StreamHandler(io.TextIOWrapper(file, encoding="utf-8", line_buffering=True))
    to_log.setFormatter(formatter)
    logger.addHandler(to_log)


def _same_file(fd: int, stream: Any) -> bool:
    try:
        mine, theirs = os.fstat(fd), os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


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
