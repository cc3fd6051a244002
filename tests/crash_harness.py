"""Kill a real digits trainer with SIGKILL at random moments, restart it, and compare the result
with a plain PyTorch loop that was never interrupted and got the same nudges at the same steps.

Used by tests/test_crash.py (a few kills in CI) and tests/soak_kills.py (50+ kills, written down in
tests/SOAK.md). The random moments come from a seeded generator, so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from babysit import commands as cmd
from babysit.checkpoint import KEY_MODEL, TEMP_MARK, CheckpointError, read_verified
from babysit.jobs.digits import (DigitsConfig, augment, build_model, build_optimizer, configure_threads,
                                 load_digits_split)
from babysit.store import RunStore

REPO = Path(__file__).resolve().parent.parent
FAST_CONFIG = DigitsConfig(epochs=8, epoch_passes=1, batch_size=64)  # 23 steps per epoch


def train_args(config: DigitsConfig) -> list[str]:
    return ["--epochs", str(config.epochs), "--epoch-passes", str(config.epoch_passes),
            "--batch-size", str(config.batch_size), "--seed", str(config.seed), "--job", "digits"]


@dataclass
class KillReport:
    seed: int
    epochs: int
    kills: int = 0
    kills_mid_checkpoint_write: int = 0
    kills_before_first_step: int = 0
    restarts: int = 0
    resume_events: int = 0
    nudges_acknowledged: int = 0
    acknowledged_nudges_lost: int = 0
    checkpoints_listed: int = 0
    corrupt_checkpoints_listed: int = 0
    temp_files_left: int = 0
    superseded_points: int = 0
    identical_weights: bool = False
    identical_losses: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _start(run_dir: Path, config: DigitsConfig, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "babysit", "train", "--run-dir", str(run_dir), *train_args(config)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _status(run_dir: Path) -> dict[str, Any]:
    try:
        return RunStore(run_dir).status() if (run_dir / "run.db").exists() else {}
    except Exception:  # the database may be mid-creation in a process about to die
        return {}


def _temp_files(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(f".*{TEMP_MARK}*")) if run_dir.exists() else []


def _nudge(run_dir: Path, rng: random.Random) -> dict[str, Any] | None:
    """Send a nudge with --wait; return it if the trainer acknowledged it as applied."""
    if rng.random() < 0.7:
        kind, value = "lr", rng.choice(["0.02", "0.03", "0.05", "0.08"])
    else:
        kind, value = "momentum", rng.choice(["0.8", "0.85", "0.9", "0.95"])
    result = subprocess.run([sys.executable, "-m", "babysit", "set", kind, value, "--run-dir", str(run_dir), "--wait",
                             "--timeout", "20"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or "applied at step" not in result.stdout:
        return None
    command_id = int(result.stdout.split()[0].lstrip("#"))
    step = int(result.stdout.split("applied at step ")[1].split()[0])
    return {"id": command_id, "kind": cmd.SET_LR if kind == "lr" else cmd.SET_MOMENTUM, "value": float(value), "step": step}


def train_with_kills(run_dir: Path, config: DigitsConfig, kills: int, rng: random.Random, report: KillReport,
                     log_path: Path) -> list[dict[str, Any]]:
    """Train to the end, SIGKILLing the trainer ``kills`` times at random moments; returns the
    nudges the trainer acknowledged as applied along the way."""
    acknowledged: list[dict[str, Any]] = []
    with open(log_path, "ab") as log:
        while report.kills < kills:
            process = _start(run_dir, config, log)
            report.restarts += 1
            mode = rng.random()
            try:
                if mode < 0.15:
                    time.sleep(rng.uniform(0.0, 3.0))  # anywhere in start-up, or just after
                elif mode < 0.5:
                    _wait_for_temp_file(run_dir, process, timeout=rng.uniform(3.0, 12.0))
                else:
                    # Let it train past its latest checkpoint first, so that the run makes progress
                    # from kill to kill whatever the machine's speed.
                    _wait_running(run_dir, process, timeout=120)
                    _wait_past_checkpoint(run_dir, process, extra_steps=rng.randint(1, 40), timeout=120)
                    if rng.random() < 0.6:
                        nudge = _nudge(run_dir, rng)
                        if nudge is not None:
                            acknowledged.append(nudge)
                    time.sleep(rng.uniform(0.0, 0.5))
            finally:
                if process.poll() is None:
                    mid_write = bool(_temp_files(run_dir))
                    step_before = _status(run_dir).get("step") or 0
                    process.send_signal(signal.SIGKILL)
                    process.wait(timeout=30)
                    report.kills += 1
                    report.kills_mid_checkpoint_write += mid_write
                    report.kills_before_first_step += step_before == 0
            if process.returncode == 0:  # it finished before the kill came: start over on a longer run
                report.notes.append("a trainer finished before its kill; the run was already complete")
                break
        process = _start(run_dir, config, log)
        report.restarts += 1
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            # A random lr may make the run diverge, and the guard pause it: a pause changes no
            # weight, so resume and let it finish.
            if _status(run_dir).get("state") == "paused":
                report.notes.append("the divergence guard paused the final run; it was resumed")
                subprocess.run([sys.executable, "-m", "babysit", "resume", "--run-dir", str(run_dir), "--wait"],
                               cwd=REPO, capture_output=True, timeout=120)
            time.sleep(0.5)
        if process.poll() != 0:
            process.kill()
            raise AssertionError(f"the final trainer failed or did not finish; see {log_path}")
    return acknowledged


def _wait_running(run_dir: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        status = _status(run_dir)
        if status.get("alive") and status.get("pid") == process.pid:
            return
        time.sleep(0.05)


def _wait_past_checkpoint(run_dir: Path, process: subprocess.Popen[bytes], extra_steps: int, timeout: float) -> None:
    """Wait until the trainer is ``extra_steps`` past the latest checkpoint it resumed from."""
    try:
        listed = RunStore(run_dir).checkpoints()
    except Exception:
        listed = []
    target = (listed[-1]["step"] if listed else 0) + extra_steps
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (_status(run_dir).get("step") or 0) >= target:
            return
        time.sleep(0.02)


def _wait_for_temp_file(run_dir: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll for a checkpoint being written (its temporary file), to kill in the middle of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _temp_files(run_dir):
            return
        time.sleep(0.0005)


def plain_reference(config: DigitsConfig, nudges: dict[int, list[tuple[str, float]]]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The digits job as a plain PyTorch loop with no babysit at all, nudged at the given steps
    (after that step's optimizer.step, as babysit does): the ground truth for a killed run."""
    configure_threads()  # the trainer's thread count: float sums depend on it
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    train_data, _ = load_digits_split(config.seed)
    loader = DataLoader(train_data, batch_size=config.batch_size,
                        sampler=RandomSampler(train_data, num_samples=config.epoch_passes * len(train_data)))
    model = build_model()
    optimizer = build_optimizer(config, model)
    step, losses = 0, []
    for _epoch in range(config.epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(augment(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            for kind, value in nudges.get(step, []):
                for group in optimizer.param_groups:
                    if kind == cmd.SET_LR:
                        group["lr"] = value
                    elif "betas" in group:
                        group["betas"] = (value, group["betas"][1])
                    else:
                        group["momentum"] = value
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[float], RunStore]:
    store = RunStore(run_dir)
    last = store.checkpoints()[-1]
    state = read_verified(run_dir / last["file"], last["sha256"])
    info = next(s for s in store.series() if s.name == "loss" and s.branch == 1 and s.segment == 0)
    _, values, _ = store.chunk_points(info.id)
    return state[KEY_MODEL], values.tolist(), store


def check(run_dir: Path, config: DigitsConfig, acknowledged: list[dict[str, Any]], report: KillReport) -> None:
    """Fill in the report: checkpoints verified, nudges kept, bit-identical to the plain loop."""
    weights, losses, store = final_state(run_dir)
    applied = [c for c in store.commands() if c["state"] == cmd.APPLIED and c["kind"] in (cmd.SET_LR, cmd.SET_MOMENTUM)]
    by_id = {c["id"]: c for c in applied}
    report.nudges_acknowledged = len(acknowledged)
    report.acknowledged_nudges_lost = sum(
        1 for a in acknowledged
        if a["id"] not in by_id or by_id[a["id"]]["step"] != a["step"] or by_id[a["id"]]["args"]["value"] != a["value"])
    nudges: dict[int, list[tuple[str, float]]] = {}
    for c in sorted(applied, key=lambda c: (c["step"], c["id"])):
        nudges.setdefault(c["step"], []).append((c["kind"], c["args"]["value"]))
    reference_weights, reference_losses = plain_reference(config, nudges)
    report.identical_weights = weights.keys() == reference_weights.keys() and all(
        torch.equal(weights[k], reference_weights[k]) for k in weights)
    report.identical_losses = losses == reference_losses
    if not report.identical_losses:
        first = next((i for i, (a, b) in enumerate(zip(losses, reference_losses)) if a != b), min(len(losses), len(reference_losses)))
        report.notes.append(f"losses differ: {len(losses)} logged vs {len(reference_losses)} in the plain loop; "
                            f"first difference at step {first + 1}")
    listed = store.checkpoints()
    report.checkpoints_listed = len(listed)
    for c in listed:
        try:
            read_verified(run_dir / c["file"], c["sha256"])
        except CheckpointError:
            report.corrupt_checkpoints_listed += 1
    report.temp_files_left = len(_temp_files(run_dir))
    report.resume_events = sum(1 for e in store.events() if e["kind"] == "resume")
    report.superseded_points = sum(
        store.series_extent(s.id)[2] for s in store.series() if s.segment > 0 and store.series_extent(s.id))


def soak(work_dir: Path, *, kills: int, seed: int, config: DigitsConfig = FAST_CONFIG) -> KillReport:
    rng = random.Random(seed)
    report = KillReport(seed=seed, epochs=config.epochs)
    started = time.monotonic()
    run_dir = work_dir / f"killed-{seed}"
    acknowledged = train_with_kills(run_dir, config, kills, rng, report, work_dir / f"killed-{seed}.log")
    check(run_dir, config, acknowledged, report)
    report.seconds = round(time.monotonic() - started, 1)
    return report


if __name__ == "__main__":  # python tests/crash_harness.py WORK_DIR KILLS SEED EPOCHS
    work, kills, seed, epochs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    work.mkdir(parents=True, exist_ok=True)
    config = DigitsConfig(epochs=epochs, epoch_passes=1, batch_size=64)
    print(soak(work, kills=kills, seed=seed, config=config).as_json())
    os._exit(0)
