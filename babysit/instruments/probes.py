"""Readings of a probe set: for each probe branch, the value it tried, how far it got, its loss
after its steps (an EWMA, as the chart draws it), its evaluation and the winner.

Pure reads of the run store (no torch), shared by the CLI (``python -m babysit probes``) and the
page. The trainer writes what a probe cannot be read back from its curve alone into its
``excursion_branches.result``: ``steps_done``, ``diverged``, ``evaluation`` (the numbers of
``Run(evaluate=)`` at the probe's end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..downsample import ewma
from ..store import PER_EPOCH, PER_STEP, RunStore, SeriesInfo

# The smoothing of a probe's loss: about its last 10 steps, the page's default view.
PROBE_EWMA_BETA = 0.9
# Logged only when they change: never a probe's step metric.
HPARAM_SERIES = ("lr", "momentum")


@dataclass(frozen=True)
class ProbeReading:
    """One probe branch of a probe set, as it stands (a probe still running reads as far as it got)."""

    branch: int
    order: int
    param: str                      # "lr" or "momentum"
    value: float                    # the value the probe trained with
    steps_planned: int
    steps_done: int
    start_step: int                 # the fork step (x = step - start_step aligns the probes)
    loss_ewma: float | None         # EWMA (β 0.9, bias-corrected) of the step metric at the probe's last step
    diverged: bool
    evaluation: dict[str, float] = field(default_factory=dict)     # Run(evaluate=) at the probe's end
    epoch_metrics: dict[str, float] = field(default_factory=dict)  # the last per-epoch values on the branch
    end_checkpoint: int | None = None


def live_series(store: RunStore, branch: int, per: str) -> list[SeriesInfo]:
    """The series of ``branch`` logged ``per`` step or epoch (not the pieces a crash superseded)."""
    return [i for i in store.series() if i.branch == branch and i.segment == 0 and i.per == per]


def step_metric(store: RunStore, branch: int) -> str | None:
    """The per-step metric a branch is judged by: "loss" if it logged one, else its first per-step
    series (lr and momentum aside); None when it logged none."""
    names = [i.name for i in live_series(store, branch, PER_STEP) if i.name not in HPARAM_SERIES]
    if not names:
        return None
    return "loss" if "loss" in names else names[0]


def branch_points(store: RunStore, branch: int, name: str, per: str = PER_STEP,
                  after: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the series ``name`` on ``branch``, only the steps after ``after`` if given."""
    info = next((i for i in live_series(store, branch, per) if i.name == name), None)
    if info is None:
        return np.empty(0, dtype=np.int64), np.empty(0)
    steps, values, _ = store.chunk_points(info.id, None if after is None else after + 1, None)
    if after is not None:
        keep = steps > after
        steps, values = steps[keep], values[keep]
    return steps, values


def last_epoch_values(store: RunStore, branch: int) -> dict[str, float]:
    """The last value of each per-epoch series logged on ``branch``."""
    found: dict[str, float] = {}
    for info in live_series(store, branch, PER_EPOCH):
        _, values, _ = store.chunk_points(info.id)
        if len(values):
            found[info.name] = float(values[-1])
    return found


def smoothed_last(steps: np.ndarray, values: np.ndarray, beta: float = PROBE_EWMA_BETA) -> float | None:
    """The bias-corrected EWMA at the last point (non-finite values skipped); None if none is finite."""
    if len(values) == 0:
        return None
    last = float(ewma(steps, values, beta)[-1])
    return last if math.isfinite(last) else None


def _numbers(raw: Any) -> dict[str, float]:
    """A JSON object's numeric entries (anything else, from an old or forged row, is left out)."""
    if not isinstance(raw, dict):
        return {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_probes(store: RunStore, excursion_id: int, metric: str | None = None) -> list[ProbeReading]:
    """The probes of excursion ``excursion_id`` in the order they ran (none if it has none yet,
    or is not a probe set). ``metric`` is the per-step series the loss is read from (default:
    :func:`step_metric` of each probe branch)."""
    excursion = store.excursion(excursion_id)
    if excursion is None:
        return []
    readings = []
    for row in excursion["branches"]:
        branch = store.branch(row["branch"])
        start_step = int(branch["start_step"]) if branch else int(excursion["origin_step"])
        name = metric or step_metric(store, row["branch"])
        steps, values = (branch_points(store, row["branch"], name, after=start_step) if name
                         else (np.empty(0, dtype=np.int64), np.empty(0)))
        result = row["result"]
        done = result.get("steps_done")
        steps_done = int(done) if isinstance(done, int) else (int(steps[-1]) - start_step if len(steps) else 0)
        diverged = bool(result.get("diverged")) or (len(values) > 0 and not math.isfinite(float(values[-1])))
        readings.append(ProbeReading(
            branch=int(row["branch"]), order=int(row["ord"]), param=str(row["param"]), value=float(row["value"]),
            steps_planned=int(row["steps"]), steps_done=steps_done, start_step=start_step,
            loss_ewma=smoothed_last(steps, values), diverged=diverged,
            evaluation=_numbers(result.get("evaluation")), epoch_metrics=last_epoch_values(store, row["branch"]),
            end_checkpoint=row["end_checkpoint"],
        ))
    return readings


def origin_evaluation(store: RunStore, excursion_id: int) -> dict[str, float]:
    """``Run(evaluate=)``'s numbers at the excursion's fork, to compare the probes against."""
    excursion = store.excursion(excursion_id)
    return {} if excursion is None else _numbers(excursion["result"].get("origin_evaluation"))


def evaluation_key(readings: list[ProbeReading]) -> str | None:
    """The evaluation number that ranks ``readings``: one every reading has (a name with "loss" in
    it first, else the first of the first reading's); None when they do not all have one."""
    if not readings:
        return None
    common = [k for k in readings[0].evaluation if all(math.isfinite(r.evaluation.get(k, math.nan)) for r in readings)]
    if not common:
        return None
    return next((k for k in common if "loss" in k.lower()), common[0])


def winner(readings: list[ProbeReading]) -> ProbeReading | None:
    """The best probe: the lowest evaluation when every candidate has the same one (lower is better,
    as for a loss), else the lowest loss EWMA; never a diverged probe, never one with no loss."""
    candidates = [r for r in readings if not r.diverged and r.steps_done > 0]
    key = evaluation_key(candidates)
    if key is not None:
        return min(candidates, key=lambda r: r.evaluation[key])
    scored = [r for r in candidates if r.loss_ewma is not None]
    return min(scored, key=lambda r: r.loss_ewma) if scored else None  # type: ignore[arg-type, return-value]
