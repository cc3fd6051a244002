"""``python -m babysit``: start the demo, serve the dashboard, and send commands from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

from . import commands as cmd
from . import rundir, serving
from .serving import TOKEN_ENV
from .errors import CliError, SettingsError
from .probes_text import format_excursion
from .instruments import journal
from .store import DB_NAME, LOG_NAME, RunStore, StoreError, disk_full, disk_full_message, list_runs

DEFAULT_RUN_DIR = "checkpoints/demo"
DEFAULT_PORT = 8501
LOCALHOST = "127.0.0.1"
EXIT_USAGE = 2
EXIT_NOT_APPLIED = 1


# The `train` options that set a job's config field of the same name (each job takes some of them).
TRAIN_OPTIONS = ("epochs", "lr", "momentum", "optimizer", "seed", "batch_size", "seq_len", "steps_per_epoch",
                 "epoch_passes")


# -- status ----------------------------------------------------------------------------------------
def status_object(store: RunStore) -> dict[str, Any]:
    """The run's state as a JSON-ready object (what ``status --json`` prints)."""
    status = store.status()
    checkpoints = [
        {"id": c["id"], "epoch": c["epoch"], "step": c["step"], "branch": c["branch"],
         "path": str(store.run_dir / c["file"]), "reason": c["reason"], "metrics": c["metrics"],
         "hparams": c["hparams"], "created": c["created"]}
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
        "message": status.get("message"),
        "checkpoints": checkpoints,
        "pending_commands": [
            {"id": p["id"], "kind": p["kind"], "args": p["args"], "source": p["source"], "created": p["created"]}
            for p in pending
        ],
    }


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
    if info.get("lr") is not None:
        lines.append(f"lr           {info['lr']:.6g}")
    if info.get("momentum") is not None:
        window = 1 / (1 - info["momentum"]) if info["momentum"] < 1 else float("inf")
        lines.append(f"momentum     {info['momentum']:.6g} (averages over ~{window:.0f} steps)")
    lines.append(f"pending      {len(info['pending_commands'])} command(s)")
    lines.append(f"checkpoints  {len(info['checkpoints'])}")
    for c in info["checkpoints"][-10:]:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in c["metrics"].items() if isinstance(v, (int, float)))
        lines.append(f"  #{c['id']:<4} epoch {c['epoch']:<4} step {c['step']:<8} branch {c['branch']:<3} {metrics}")
    return "\n".join(lines)


# -- branches --------------------------------------------------------------------------------------
def branches_command(args: argparse.Namespace) -> int:
    """``branches``: the comparison table of the run's branches (babysit.instruments.compare)."""
    from .instruments import compare

    store = _open_store(args.run_dir)
    try:
        comparison = compare.compare_branches(store, args.branch)
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json.dumps({"run_dir": str(store.run_dir), "at_steps": comparison.at_steps,
                          "loss_metric": comparison.loss_metric, "best_metric": comparison.best_metric,
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
    from .instruments.hints import read_hints

    store = _open_store(args.run_dir)
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


# -- sending commands --------------------------------------------------------------------------
def send(run_dir: str, kind: str, args: dict[str, Any], *, wait: bool, timeout: float,
         after: Any = None) -> int:
    """Queue a command; with ``wait``, print its outcome (and, once applied, hand its row to ``after``,
    which returns the exit code)."""
    store = _open_store(run_dir)
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


# -- probes and sweeps ---------------------------------------------------------------------------
def send_excursion(run_dir: str, kind: str, args: dict[str, Any], *, wait: bool, timeout: float) -> int:
    """Queue a probe set or a sweep; with ``wait``, also wait for it to end and print its readings."""
    args = {k: v for k, v in args.items() if v is not None}  # what is left out takes its default
    return send(run_dir, kind, args, wait=wait, timeout=timeout,
                after=lambda row, deadline: _wait_excursion(run_dir, row, deadline, timeout))


def _wait_excursion(run_dir: str, row: dict[str, Any], deadline: float, timeout: float) -> int:
    store = _open_store(run_dir)
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
        running = _open_store(args.run_dir).running_excursion()
        if running is None:
            raise CliError(f"no probe set or sweep is running in {args.run_dir!r}; nothing to cancel")
        excursion = running["id"]
    return send(args.run_dir, cmd.CANCEL, {"excursion": excursion}, wait=args.wait, timeout=args.timeout)


def probes_command(args: argparse.Namespace) -> int:
    store = _open_store(args.run_dir)
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


def _report(row: dict[str, Any], description: str) -> int:
    applied = row["state"] == cmd.APPLIED
    print(f"#{row['id']} {description}: {cmd.outcome(row)}", file=sys.stdout if applied else sys.stderr)
    return 0 if applied else EXIT_NOT_APPLIED


def _open_store(run_dir: str) -> RunStore:
    try:
        return RunStore(run_dir)
    except StoreError as error:
        raise CliError(str(error)) from None


# -- train -------------------------------------------------------------------------------------
def train_command(args: argparse.Namespace) -> int:
    from .jobs import JOBS
    from .run import RunLockedError

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
        status = _open_store(args.run_dir).status()
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
    store = _open_store(args.run_dir)
    try:
        found = journal.export_journal(store, args.to)
    except SettingsError as error:
        raise CliError(str(error)) from None
    sys.stdout.write(journal.to_json(found))
    return 0


def _choose_job(args: argparse.Namespace, stored: dict[str, Any] | None) -> str:
    """The job a run directory holds (a resumed run keeps its own), else ``--job``, else the default."""
    from .jobs import DEFAULT_JOB, JOB_OF_UNNAMED_RUNS, JOBS

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
    return _open_store(run_dir).get_meta("config")


# -- dashboard and demo ------------------------------------------------------------------------
def app_path() -> Path:
    path = Path(__file__).resolve().parent.parent / "app.py"
    if not path.is_file():
        raise CliError(f"the dashboard script {path} is missing; install babysit from a clone with `pip install -e .`")
    return path


def check_serving(address: str, port: int, token: str | None) -> None:
    """Refuse to serve off loopback without a token, with a weak token, or on a busy port (before
    starting anything)."""
    problem = serving.token_problem(token, address)
    if problem:
        raise CliError(problem)
    if _port_in_use(address, port):
        raise CliError(f"port {port} on {address} is already in use; pass --port with a free port")


def serve_dashboard(*, root: str, run: str | None, address: str, port: int, token: str | None,
                    allow_hosts: Sequence[str] = ()) -> int:
    """Run the Streamlit dashboard in the foreground until Ctrl-C. ``allow_hosts``: more names it
    answers to (besides loopback and ``address``), such as the machine's DNS name."""
    check_serving(address, port, token)
    for host in allow_hosts:
        problem = serving.host_name_problem(host)
        if problem:
            raise CliError(problem)
    env = dict(os.environ)
    if token:
        env[TOKEN_ENV] = token
    hosts = [arg for host in serving.allowed_hosts(address, allow_hosts) for arg in ("--server.allowedHosts", host)]
    command = [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", address, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.enableXsrfProtection", "true",
        "--server.enableCORS", "true", "--server.fileWatcherType", "none", "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal", *hosts,
        "--", "--root", root,
    ] + (["--run", run] if run else [])
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", preexec_fn=_die_with_parent)
    output = serving.OutputPump(server.stdout)  # read for as long as it runs: a full pipe freezes it
    # SIGTERM (a service manager, `kill`) ends the server with us instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    url = f"http://{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:{port}"
    try:
        if not _wait_healthy(url, server, timeout=60):
            if server.poll() is not None:
                output.join(timeout=5)
            raise CliError(f"the dashboard did not start:\n{output.text()}")
        print(f"babysit: dashboard at {url}" + ("  (token required)" if token else ""), flush=True)
        output.forward()
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _die_with_parent() -> None:
    """In the server's process: ask Linux to end it if the babysit process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C and SIGTERM are still handled by the parent


def _port_in_use(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return True
    return False


def _wait_healthy(url: str, server: subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def start_trainer(run_dir: str, extra: Sequence[str] = ()) -> int:
    """Start ``python -m babysit train`` detached (its own session), logging to the run directory."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    log = rundir.open_file(Path(run_dir) / LOG_NAME, "ab")  # a planted link is refused, never appended to
    process = subprocess.Popen(
        [sys.executable, "-m", "babysit", "train", "--run-dir", run_dir, *extra],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    return process.pid


def demo_command(args: argparse.Namespace) -> int:
    run_dir = args.run_dir
    check_serving(args.address, args.port, args.token)
    existing = RunStore(run_dir).status() if (Path(run_dir) / DB_NAME).exists() else {"alive": False}
    if existing.get("alive"):
        pid = existing.get("pid")
        print(f"babysit: demo trainer already running in {run_dir} (pid {pid})")
    else:
        extra = (["--job", args.job] if args.job else []) + (["--epochs", str(args.epochs)] if args.epochs else [])
        pid = start_trainer(run_dir, extra)
        _wait_for_trainer(run_dir, pid)
        print(f"babysit: demo trainer started in {run_dir} (pid {pid}, log {Path(run_dir) / LOG_NAME})")
    print("babysit: stopping the dashboard (Ctrl-C) leaves the trainer training, so the run outlives the page; "
          f"stop the trainer with `python -m babysit stop --run-dir {run_dir}`", flush=True)
    root = str(Path(run_dir).parent)
    code = serve_dashboard(root=root, run=run_dir, address=args.address, port=args.port, token=args.token,
                           allow_hosts=args.allow_host)
    print(f"\nbabysit: dashboard stopped; the trainer (pid {pid}) keeps training in {run_dir}. "
          f"Stop it with `python -m babysit stop --run-dir {run_dir}`", flush=True)
    return code


def _wait_for_trainer(run_dir: str, pid: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if (Path(run_dir) / DB_NAME).exists():
            try:
                status = RunStore(run_dir).status()
            except StoreError:
                status = {}
            if status.get("alive") and status.get("pid") == pid:
                return
        time.sleep(0.2)
    log = Path(run_dir) / LOG_NAME
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise CliError(f"the demo trainer did not start; the end of {log}:\n{tail}")


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
        from .jobs import DEFAULT_JOB, JOBS

        p.add_argument("--job", choices=sorted(JOBS), help=f"what to train (default {DEFAULT_JOB}): " + "; ".join(
            f"{job.name}, {job.summary}" for job in JOBS.values()) + "; a resumed run keeps its own")

    p = sub.add_parser("demo", help="start (or resume) the demo trainer and serve its dashboard")
    run_dir_arg(p)
    job_arg(p)
    serve_args(p)
    p.add_argument("--epochs", type=int, help="epochs for the demo trainer (default 100)")

    p = sub.add_parser("dashboard", help="serve the dashboard for the runs under a directory")
    p.add_argument("--root", default="checkpoints", help="directory holding run directories (default checkpoints)")
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
    command_args(p)

    p = sub.add_parser("rollback", help="roll back to a checkpoint and continue on a new branch")
    _accept_negative_values(p)
    p.add_argument("checkpoint", help="checkpoint id (see `status`)")
    p.add_argument("--hparams", choices=cmd.HPARAMS_CHOICES, default=cmd.HPARAMS_CHECKPOINT,
                   help="restore the checkpoint's lr and momentum (default) or keep the current ones")
    p.add_argument("--lr", help="then set this lr")
    p.add_argument("--momentum", help="then set this momentum")
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
            return serve_dashboard(root=args.root, run=None, address=args.address, port=args.port, token=args.token,
                                   allow_hosts=args.allow_host)
        if args.command == "train":
            return train_command(args)
        if args.command == "journal":
            return journal_command(args)
        if args.command == "status":
            info = status_object(_open_store(args.run_dir))
            print(json.dumps(info, indent=2) if args.json else format_status(info))
            return 0
        if args.command == "branches":
            return branches_command(args)
        if args.command == "hints":
            return hints_command(args)
        if args.command == "set":
            kind = cmd.SET_LR if args.name == "lr" else cmd.SET_MOMENTUM
            return send(args.run_dir, kind, {"value": args.value}, wait=args.wait, timeout=args.timeout)
        if args.command == "rollback":
            rollback_args = {"checkpoint": args.checkpoint, "hparams": args.hparams, "lr": args.lr,
                             "momentum": args.momentum}
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
