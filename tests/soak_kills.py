"""The crash soak: SIGKILL a real digits trainer many times, then check it against a plain loop.

    python tests/soak_kills.py [--kills 50] [--seed 2026] [--epochs 40]

Writes the figures to tests/SOAK.md (kills, resumes, corrupt checkpoints listed, acknowledged
nudges lost, bit-identical or not). The same harness runs with 3 kills in CI (tests/test_crash.py).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from babysit.jobs.digits import DigitsConfig  # noqa: E402
from tests.crash_harness import REPO, soak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "SOAK.md")
    args = parser.parse_args()
    config = DigitsConfig(epochs=args.epochs, epoch_passes=1, batch_size=64)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as work:
        report = soak(Path(work), kills=args.kills, seed=args.seed, config=config)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    verdict = "passed" if (report.corrupt_checkpoints_listed == 0 and report.acknowledged_nudges_lost == 0
                           and report.identical_weights and report.identical_losses) else "FAILED"
    rows = [
        ("kills (SIGKILL)", report.kills),
        ("… of which in the middle of a checkpoint write (a temporary file existed)", report.kills_mid_checkpoint_write),
        ("… of which before the first training step (start-up, imports, database creation)", report.kills_before_first_step),
        ("trainer starts", report.restarts),
        ("resumes recorded by the trainer", report.resume_events),
        ("checkpoints listed at the end", report.checkpoints_listed),
        ("corrupt checkpoints listed", report.corrupt_checkpoints_listed),
        ("temporary files left behind", report.temp_files_left),
        ("nudges acknowledged as applied (`set … --wait`) before a kill", report.nudges_acknowledged),
        ("acknowledged nudges lost", report.acknowledged_nudges_lost),
        ("points logged by killed trainers, kept as superseded", report.superseded_points),
        ("final weights bit-identical to a plain, never-killed loop with the same nudges", report.identical_weights),
        ("every step's loss bit-identical to that loop", report.identical_losses),
        ("wall time (s)", report.seconds),
    ]
    text = [
        "# Crash soak",
        "",
        f"`python tests/soak_kills.py --kills {args.kills} --seed {args.seed} --epochs {args.epochs}` — {verdict}.",
        "",
        f"Run on {started}, commit {commit}, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}. The digits job (CNN on the bundled digits, 23 steps per epoch here) is "
        "started with `python -m babysit train`, killed with SIGKILL at seeded random moments (during start-up, "
        "while a checkpoint's temporary file exists, or after a nudge sent with `--wait`), started again, and "
        "finally left to finish. Its final checkpoint and per-step losses are then compared with a plain "
        "PyTorch loop that was never interrupted and applies the same nudges at the steps babysit recorded.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {label} | {value} |" for label, value in rows],
    ]
    if report.notes:
        text += ["", "Notes: " + "; ".join(report.notes)]
    args.out.write_text("\n".join(text) + "\n")
    print(report.as_json())
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
