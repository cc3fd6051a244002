"""The demo's learning curve facts, measured on the real job at the defaults a user gets.

    python -m bench.demo_curve [--out bench/DEMO.md]

Drives `python -m babysit train` (the default job, charlm, at its default settings) as a user
would, with the CLI, on fresh run directories:

1. **Keeps improving**: one run of ``PLATEAU_EPOCH + AFTER`` epochs; its validation loss per epoch.
2. **Halving lr at the plateau**: the same run is resumed, rolled back to its epoch
   ``PLATEAU_EPOCH`` checkpoint with lr × ½ (`rollback ID --lr X`), and trained ``AFTER`` epochs
   on the new branch. Its first branch's epochs after ``PLATEAU_EPOCH`` are the control: the same
   model, the same data order, the lr left alone.
3. **×4 lr from the start**: a fresh run with ``--lr`` four times the default, until the divergence
   guard pauses it or ``BAD_EPOCHS`` epochs end; compared with the default run at the same epoch.

On CPU a run is deterministic, so the numbers are the same on every run of this command on the
same machine and Python (the text is the running Python's standard library).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from babysit.jobs.charlm import CharLMConfig
from babysit.store import RunStore

REPO = Path(__file__).resolve().parent.parent
PLATEAU_EPOCH = 40  # where the README's walk-through halves the lr
AFTER = 2  # "a visible drop within 2 epochs"
BAD_EPOCHS = 10
DEFAULTS = CharLMConfig()


def babysit(*args: str, timeout: float = 3600) -> str:
    """Run ``python -m babysit ARGS`` to the end; its output, or an error with it."""
    result = subprocess.run([sys.executable, "-m", "babysit", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"babysit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def start_trainer(run_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "babysit", "train", "--run-dir", str(run_dir), *args],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_until(what: str, predicate: Any, timeout: float = 3600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def val_losses(store: RunStore, branch: int) -> dict[int, float]:
    """Epoch → validation loss of the epoch checkpoints along ``branch`` (its own epochs only)."""
    return {c["epoch"]: c["metrics"]["val_loss"] for c in store.checkpoints()
            if c["branch"] == branch and c["reason"] == "epoch" and "val_loss" in c["metrics"]}


def epoch_seconds(store: RunStore, branch: int) -> list[float]:
    ends = [c["created"] for c in store.checkpoints() if c["branch"] == branch and c["reason"] == "epoch"]
    return [b - a for a, b in zip(ends, ends[1:])]


def step_seconds(steps: int = 60) -> list[float]:
    """Seconds per training step of the job's model at the defaults, with nothing else of babysit's
    in this process (one thread, as the job runs): the floor under an epoch's length."""
    import torch

    from babysit.jobs import charlm

    charlm.configure_threads()
    torch.manual_seed(0)
    model = charlm.CharGPT(DEFAULTS)
    optimizer = charlm.build_optimizer(DEFAULTS, model)
    tokens = charlm.read_tokens(charlm.source_files()[0][:5])
    windows = charlm.Windows(tokens, DEFAULTS.seq_len)
    times = []
    for i in range(steps + 5):
        batch = [windows[j] for j in range(i * DEFAULTS.batch_size, (i + 1) * DEFAULTS.batch_size)]
        inputs, targets = (torch.stack(t) for t in zip(*batch))
        begin = time.perf_counter()
        loss = charlm.next_char_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - begin)
    return times[5:]


def measure(scratch: Path) -> dict[str, Any]:
    main_dir, bad_dir = scratch / "default", scratch / "x4"
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    steps = step_seconds()
    babysit("train", "--run-dir", str(main_dir), "--epochs", str(PLATEAU_EPOCH + AFTER))
    store = RunStore(main_dir)
    control = val_losses(store, 1)
    seconds = epoch_seconds(store, 1)
    at_plateau = next(c for c in store.checkpoints() if c["branch"] == 1 and c["epoch"] == PLATEAU_EPOCH)

    # Resume it, and roll back to the plateau's checkpoint with the lr halved (as a user would).
    # The run has finished its epochs: one more lets it resume; the rollback comes long before that
    # epoch ends, and the new branch then trains epochs PLATEAU_EPOCH + 1 ... + AFTER + 1.
    trainer = start_trainer(main_dir, "--epochs", str(PLATEAU_EPOCH + AFTER + 1))
    wait_until("the resumed trainer", lambda: store.status().get("alive") or trainer.poll() is not None)
    halved_lr = DEFAULTS.lr / 2
    rollback = babysit("rollback", str(at_plateau["id"]), "--lr", str(halved_lr), "--run-dir", str(main_dir),
                       "--wait", "--timeout", "600")
    if trainer.wait(timeout=3600) != 0:
        raise RuntimeError(f"the rolled-back trainer failed; see {main_dir.parent / 'default.log'}")
    branch = max(b["id"] for b in store.branches())
    halved = val_losses(store, branch)

    trainer = start_trainer(bad_dir, "--lr", str(4 * DEFAULTS.lr), "--epochs", str(BAD_EPOCHS))
    wait_until("the x4 run to diverge or end", lambda: trainer.poll() is not None or (
        (bad_dir / "run.db").exists() and RunStore(bad_dir).status().get("state") == "paused"))
    bad_store = RunStore(bad_dir)
    bad_status = bad_store.status()
    divergences = [e for e in bad_store.events() if e["kind"] == "divergence"]
    if trainer.poll() is None:
        babysit("stop", "--run-dir", str(bad_dir), "--wait")
        trainer.wait(timeout=600)
    return {"control": control, "halved": halved, "halved_branch": branch, "rollback": rollback.strip(),
            "epoch_seconds": seconds, "bad_val": val_losses(bad_store, 1), "bad_state": bad_status.get("state"),
            "bad_message": bad_status.get("message"), "divergences": divergences,
            "wall_s": time.monotonic() - started, "step_seconds": steps, "load": (load_before, os.getloadavg()[0])}


def facts(result: dict[str, Any]) -> dict[str, Any]:
    """The three claims, each with the numbers it rests on."""
    control, halved = result["control"], result["halved"]
    p = PLATEAU_EPOCH
    best = [min(control[e] for e in range(1, k + 1)) for k in range(1, p + 1)]
    last_new_best = max(e for e in range(1, p + 1) if control[e] == best[e - 1])
    before = control[p - AFTER] - control[p]  # what AFTER epochs bought just before the plateau
    control_gain = control[p] - control[p + AFTER]  # and what they buy after it, lr left alone
    halved_gain = control[p] - halved[p + AFTER]
    bad = result["bad_val"]
    diverged = bool(result["divergences"])
    return {
        "last_new_best": last_new_best, "best_at_30": best[29], "best_at_20": best[19], "best_at_p": best[-1],
        "keeps_improving": last_new_best >= 30 and best[29] < best[19] and best[-1] < best[29],
        "before": before, "control_gain": control_gain, "halved_gain": halved_gain,
        "drop_ratio": halved_gain / control_gain if control_gain > 0 else float("inf"),
        "visible_drop": halved_gain >= 3 * max(control_gain, 0.0) and halved_gain >= 0.02,
        "bad_diverged": diverged,
        "bad_stalled": bool(bad) and min(bad.values()) > control[min(max(bad), p)] + 0.1,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    f = facts(result)
    control, halved, bad = result["control"], result["halved"], result["bad_val"]
    p = PLATEAU_EPOCH
    seconds = result["epoch_seconds"]
    verdict = {True: "**holds**", False: "**does not hold**"}
    divergence = result["divergences"][0] if result["divergences"] else None
    lines = [
        "# The demo's learning curve (default job, default settings)",
        "",
        f"`python -m bench.demo_curve` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
        f"{platform.python_version()} (its standard library is the text), torch on CPU, {os.cpu_count()} cores "
        f"shared with other work; {result['wall_s'] / 60:.0f} min in all. The job: `python -m babysit train` "
        f"(charlm) with its defaults: `{json.dumps(asdict(DEFAULTS))}`.",
        "",
        f"Epoch length ({DEFAULTS.steps_per_epoch} steps of {DEFAULTS.batch_size}×{DEFAULTS.seq_len} tokens, and "
        f"the validation pass), between the run's checkpoints: median {statistics.median(seconds):.1f} s "
        f"({min(seconds):.1f}–{max(seconds):.1f} s), on cores shared with other work (load average "
        f"{result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end). One training step alone, "
        f"timed in this process before the runs: median {1000 * statistics.median(result['step_seconds']):.0f} ms "
        f"({1000 * min(result['step_seconds']):.0f}–{1000 * max(result['step_seconds']):.0f} ms, "
        f"{len(result['step_seconds'])} steps), so {DEFAULTS.steps_per_epoch} steps take "
        f"{DEFAULTS.steps_per_epoch * min(result['step_seconds']):.1f}–"
        f"{DEFAULTS.steps_per_epoch * statistics.median(result['step_seconds']):.1f} s.",
        "",
        "| claim | measured | |",
        "|---|---|---|",
        f"| the validation loss keeps improving for at least 30 epochs | best so far {f['best_at_20']:.3f} at epoch 20, "
        f"{f['best_at_30']:.3f} at 30, {f['best_at_p']:.3f} at {p}; the last new best at epoch {f['last_new_best']} "
        f"| {verdict[f['keeps_improving']]} |",
        f"| halving lr at the plateau (epoch {p}) gives a visible drop within {AFTER} epochs | {AFTER} epochs bought "
        f"{f['before']:.3f} just before epoch {p}; after it, lr {DEFAULTS.lr:g} (left alone): {f['control_gain']:.3f}, "
        f"lr {DEFAULTS.lr / 2:g}: **{f['halved_gain']:.3f}** ({f['drop_ratio']:.1f}×) | {verdict[f['visible_drop']]} |",
        f"| ×4 lr ({4 * DEFAULTS.lr:g}) from the start diverges or stalls | "
        + (f"diverged: the guard paused the run at step {divergence['step']} ({divergence['message']})"
           if divergence else f"no divergence; best validation loss {min(bad.values()):.3f} in {len(bad)} epochs "
                              f"against {control[min(max(bad), p)]:.3f} at the default")
        + f" | {verdict[f['bad_diverged'] or f['bad_stalled']]} |",
        "",
        "\"Visible\" here means the halved branch gains at least 3× what the same epochs gain with the lr left "
        "alone, and at least 0.02 nats. The control and the halved branch start from the same checkpoint "
        f"(the rollback: {result['rollback']}).",
        "",
        "Validation loss (nats per character; exp() of it is the perplexity) per epoch:",
        "",
        f"| epoch | lr {DEFAULTS.lr:g} | lr {DEFAULTS.lr / 2:g} from epoch {p} | lr {4 * DEFAULTS.lr:g} |",
        "|---|---|---|---|",
        *(f"| {e} | {control[e]:.3f} | {_cell(halved, e)} | {_cell(bad, e)} |" for e in range(1, p + AFTER + 1)),
        "",
        "– : no such epoch (before the rollback, or after the run diverged and was paused).",
        "",
    ]
    return "\n".join(lines)


def _cell(values: dict[int, float], epoch: int) -> str:
    return f"{values[epoch]:.3f}" if epoch in values else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "DEMO.md")
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = measure(args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="babysit-demo-curve-") as scratch:
            result = measure(Path(scratch))
    text = report(result, args)
    args.out.write_text(text)
    print(text)
    return 0 if all(facts(result)[k] for k in ("keeps_improving", "visible_drop")) else 1


if __name__ == "__main__":
    sys.exit(main())
