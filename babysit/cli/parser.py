"""The CLI's arguments: one subcommand per thing a person does to a run."""

from __future__ import annotations

import argparse
import os
import re

from .. import commands as cmd
from ..serving import TOKEN_ENV
from .common import DEFAULT_PORT, DEFAULT_RUN_DIR, LOCALHOST


# -- argument parsing -------------------------------------------------------------------------
def _accept_negative_values(parser: argparse.ArgumentParser) -> None:
    """Let `set lr -1e-3` reach our validation (and its clear message) instead of argparse taking
    `-1e-3` for an option: argparse already does this for plain negative numbers like -1; this
    widens its pattern (our options all start with --, so nothing is shadowed)."""
    parser._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf\b|nan\b|infinity\b)", re.IGNORECASE)  # noqa: SLF001
    parser._has_negative_number_optionals = []  # noqa: SLF001


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m babysit",
        description="Babysit one long training run: watch its curve, nudge lr and momentum, roll back.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def run_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"run directory (default {DEFAULT_RUN_DIR})")

    def serve_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"dashboard port (default {DEFAULT_PORT})")
        p.add_argument("--address", default=LOCALHOST, help=f"address to listen on (default {LOCALHOST})")
        p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"access token, required off localhost (or set {TOKEN_ENV})")
        p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another host name the page may be opened at (repeatable), e.g. this machine's DNS name")

    def job_arg(p: argparse.ArgumentParser) -> None:
        from ..jobs import DEFAULT_JOB, JOBS

        p.add_argument("--job", choices=sorted(JOBS), help=f"what to train (default {DEFAULT_JOB}): " + "; ".join(
            f"{job.name}, {job.summary}" for job in JOBS.values()) + "; a resumed run keeps its own")

    def cadence_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint-every-steps", metavar="N",
                       help="also a checkpoint every N steps (at the multiples of N), an exact resume point and a "
                            "rollback target inside the epoch; a resumed run keeps the cadence it was started with "
                            "unless given")
        p.add_argument("--checkpoint-every-minutes", metavar="M",
                       help="also a checkpoint every M minutes (a number > 0, e.g. 30 or 0.5) after the last one")

    p = sub.add_parser("demo", help="start (or resume) the demo trainer and serve its dashboard")
    run_dir_arg(p)
    job_arg(p)
    serve_args(p)
    p.add_argument("--epochs", type=int, help="epochs for the demo trainer (default 100)")
    cadence_args(p)

    p = sub.add_parser("dashboard", help="serve the dashboard for the runs under a directory, or for one run")
    p.add_argument("--root", help="directory holding run directories, at any depth (default checkpoints; with "
                   "--run-dir, that run's parent)")
    p.add_argument("--run-dir", help="open this run (the others under --root stay in the picker)")
    serve_args(p)

    p = sub.add_parser("train", help="train (or resume) a built-in job in the foreground")
    run_dir_arg(p)
    job_arg(p)
    p.add_argument("--epochs", type=int, help="number of epochs (default 100; raise it to train further)")
    p.add_argument("--lr", type=float, help="initial learning rate (default: the job's; charlm 0.3, digits 0.05)")
    p.add_argument("--momentum", type=float, help="initial momentum, SGD momentum or Adam beta1 (default 0.9)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="optimizer (default sgd)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, help="batch size (default 32)")
    p.add_argument("--seq-len", type=int, help="charlm: characters per training window (default 64)")
    p.add_argument("--steps-per-epoch", type=int, help="charlm: batches per epoch (default 100)")
    p.add_argument("--epoch-passes", type=int, help="digits: passes over the training images per epoch (default 6)")
    cadence_args(p)
    p.add_argument("--replay", metavar="JOURNAL",
                   help="a new run replays a panda journal (`journal` writes one): its job, its config and its lr "
                        "and momentum settings at their steps, up to its checkpoint's epoch unless --epochs says more")

    p = sub.add_parser("journal", help="print the panda journal of a checkpoint (JSON): the decisions that led to it")
    run_dir_arg(p)
    p.add_argument("--to", type=int, metavar="CHECKPOINT",
                   help="checkpoint id (default: the newest checkpoint of the current branch)")

    p = sub.add_parser("status", help="show the run's state, hyperparameters and checkpoints")
    run_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("branches", help="compare the run's branches: origin, what changed, best epoch, loss since the fork")
    run_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--branch", action="append", type=int, metavar="ID", help="only this branch (repeatable)")

    def command_args(p: argparse.ArgumentParser) -> None:
        run_dir_arg(p)
        p.add_argument("--wait", action="store_true", help="block until applied (exit 0) or rejected (exit 1)")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")

    p = sub.add_parser("hints", help="hints from the course notes (plateau, lr too high, overfitting, momentum)")
    run_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print them as a JSON list")
    p.add_argument("--dismiss", metavar="ID", help="stop showing the hint with this id (here and on the page)")

    p = sub.add_parser("set", help="set the learning rate or the momentum")
    _accept_negative_values(p)
    p.add_argument("name", choices=("lr", "momentum"), help="what to set")
    p.add_argument("value", help="the new value")
    p.add_argument("--optimizer", metavar="NAME", help="which optimizer, for a run with several (Run(optimizers={...}) "
                   "names them; `status` lists them); default the first")
    command_args(p)

    p = sub.add_parser("rollback", help="roll back to a checkpoint and continue on a new branch")
    _accept_negative_values(p)
    p.add_argument("checkpoint", help="checkpoint id (see `status`)")
    p.add_argument("--hparams", choices=cmd.HPARAMS_CHOICES, default=cmd.HPARAMS_CHECKPOINT,
                   help="restore the checkpoint's lr and momentum (default) or keep the current ones")
    p.add_argument("--lr", help="then set this lr (of the first optimizer, in a run with several)")
    p.add_argument("--momentum", help="then set this momentum")
    p.add_argument("--skip-batches", metavar="N", help="then leave out the next N batches of the data order (a loss "
                   "spike's remedy: roll back ~100 steps before it and skip the batches that came next)")
    command_args(p)

    p = sub.add_parser("probe", help="try a few lr (or momentum) values for N steps each, from now or a checkpoint, "
                       "on probe branches; the run comes back exactly where it was")
    p.add_argument("--param", choices=cmd.PROBE_PARAMS, default="lr", help="what to probe (default lr)")
    tried = p.add_mutually_exclusive_group()
    tried.add_argument("--factors", "--lr-factors", dest="factors", metavar="LIST",
                       help="factors of the value in use, e.g. 0.5,1,2 (the default); momentum factors scale 1 - β")
    tried.add_argument("--values", metavar="LIST", help="the values themselves, e.g. 0.05,0.1,0.2")
    p.add_argument("--steps", help=f"steps each probe trains (default {cmd.PROBE_DEFAULT_STEPS})")
    p.add_argument("--from", metavar="CHECKPOINT", help="fork from this checkpoint instead of now")
    p.add_argument("--then", choices=cmd.THEN_CHOICES, help="after the probes: pause (default) or continue")
    command_args(p)

    p = sub.add_parser("sweep", help="the lr range test from here: lr rising on a log scale over N steps on a "
                       "throwaway branch, then back exactly to where the run was")
    p.add_argument("--lr-min", help="the first lr (default the current lr × 1e-3)")
    p.add_argument("--lr-max", help="the last lr (default the current lr × 100)")
    p.add_argument("--steps", help=f"steps of the sweep (default {cmd.SWEEP_DEFAULT_STEPS})")
    command_args(p)

    p = sub.add_parser("cancel", help="end the probe set or sweep in progress; the run goes back to where it was")
    p.add_argument("excursion", nargs="?", help="its id (default: the one running)")
    command_args(p)

    p = sub.add_parser("probes", help="show a probe set's results (or a sweep's suggested lr)")
    run_dir_arg(p)
    p.add_argument("excursion", nargs="?", help="its id (default: the newest)")

    for name, text in (("pause", "pause at the next step"), ("resume", "resume a paused run"),
                       ("checkpoint", "write a checkpoint now"), ("stop", "stop with a final checkpoint")):
        command_args(sub.add_parser(name, help=text))
    return parser
