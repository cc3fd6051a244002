"""What babysit runs per training step when nothing is due, counted in Python lines rather than
timed (bench/step_overhead.py times it): `run.batches` and `run.log` stay a handful of lines of
babysit/run.py, and nothing else of babysit runs on the training thread."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import babysit
from babysit import commands as cmd
from bench.common import lines_run

BABYSIT_FILES = tuple(str(p) for p in Path(babysit.__file__).parent.rglob("*.py"))
RUN_FILE = str(Path(babysit.__file__).parent / "run.py")
LINES_PER_STEP = 20  # measured: 20 (the batches loop 4, step_boundary 10, run.log 6: its try is a line)


def test_a_step_with_nothing_due_runs_a_bounded_number_of_lines_and_a_nudge_still_lands_at_the_next_boundary(
        tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with babysit.Run(tmp_path / "r", model, optimizer) as run:
        for _ in run.epochs(1):
            batches = run.batches(range(1_000))
            next(batches)  # the first boundary looks at the queue once

            def steps(n: int) -> None:
                for _ in range(n):
                    run.log(loss=model(torch.ones(1, 2)).sum())
                    next(batches)

            quiet = lines_run(BABYSIT_FILES, lambda: steps(100))
            assert {f for f, n in quiet.items() if n} == {RUN_FILE}, quiet
            assert quiet[RUN_FILE] <= LINES_PER_STEP * 100, quiet[RUN_FILE]

            run.store.enqueue_command(cmd.SET_MOMENTUM, {"value": 0.5}, source="test")
            at = run.step
            nudged = lines_run(BABYSIT_FILES, lambda: steps(1))
            assert optimizer.param_groups[0]["momentum"] == 0.5 and run.step == at + 1
            assert sum(nudged.values()) > LINES_PER_STEP  # the count sees the boundary's work when there is some
            for _ in batches:
                pass
