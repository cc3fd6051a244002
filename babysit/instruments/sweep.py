"""Reading of an lr sweep (the lr range test): loss against lr on a log scale, where it falls
fastest, where it diverges, and the lr it suggests.

Pure (numpy over the store's series; no torch), shared by the CLI and the page. The sweep branch
logs its loss per step and its lr as the lr series (a point at step s is the lr set after step s,
used from step s + 1), so each step's loss is read against the lr that trained it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..downsample import ewma
from ..store import RunStore
from .probes import branch_points, step_metric

# The smoothing of the sweep's loss (over its steps, bias-corrected, as the trainer's early stop).
SWEEP_EWMA_BETA = 0.9
# Points at the sweep's start whose average is still mostly the first step (about 1 / (1 - β)).
SWEEP_WARMUP_POINTS = 10
# The sweep has clearly diverged once its smoothed loss is this many times its minimum so far.
DIVERGENCE_FACTOR = 4.0


@dataclass(frozen=True)
class SweepReading:
    lrs: np.ndarray        # the lr of each step, in the order trained (rising)
    losses: np.ndarray     # the step metric at each step
    smoothed: np.ndarray   # its EWMA
    steepest_lr: float | None    # where the smoothed loss falls fastest per log-lr
    divergence_lr: float | None  # the first lr where the smoothed loss exceeds 4× its minimum so far (or is not finite)
    min_loss_lr: float | None
    suggested_lr: float | None   # the steepest descent point (see analyse_sweep)


def diverged(smoothed_now: float, smoothed_min: float, raw_now: float, points: int) -> bool:
    """The sweep's stop rule: the loss is not finite, or (after its first ``SWEEP_WARMUP_POINTS``
    points) its EWMA is above 4× its minimum since then. ``points``: how many it has seen, this
    one included. The warm-up matters late in training: a loss near 0.05 whose batches range from
    0.01 to 0.5 has an EWMA of its first few steps that is one lucky batch, and 4× that is no
    divergence."""
    # math, not numpy: the trainer calls this once per logged loss while an excursion runs.
    if not math.isfinite(raw_now) or not math.isfinite(smoothed_now):
        return True
    return (points > SWEEP_WARMUP_POINTS and math.isfinite(smoothed_min) and smoothed_min > 0
            and smoothed_now > DIVERGENCE_FACTOR * smoothed_min)


def counts_for_minimum(points: int) -> bool:
    """Whether the point ``points`` (1-based) is past the warm-up, so its EWMA counts for the minimum."""
    return points > SWEEP_WARMUP_POINTS


def analyse_sweep(lrs: np.ndarray, losses: np.ndarray) -> SweepReading:
    """Read a sweep's (lr, loss) points, in the order trained.

    The suggestion is the steepest descent point, not the minimum. The notes tune lr on a log
    scale, so "fastest" is per log-lr: there a change of lr buys the most loss, training is fast
    and still far from unstable. The minimum of a rising-lr curve is already at the edge of
    divergence (the smoothed loss lags the lr, and each higher lr was tried only a step), so it
    is too hot to train with; the steepest point leaves the ×2 nudges of the panda room both ways.
    Only points before the divergence count; none is suggested when the loss never fell.
    """
    lrs = np.asarray(lrs, dtype=float)
    losses = np.asarray(losses, dtype=float)
    usable = np.isfinite(lrs) & (lrs > 0)
    lrs, losses = lrs[usable], losses[usable]
    smoothed = ewma(np.arange(len(losses)), losses, SWEEP_EWMA_BETA) if len(losses) else np.empty(0)
    end = len(losses)  # the first diverged point (or past the end)
    running_min = np.inf
    for i in range(len(losses)):
        if diverged(smoothed[i], running_min, losses[i], i + 1):
            end = i
            break
        if counts_for_minimum(i + 1):
            running_min = min(running_min, smoothed[i])
    divergence_lr = float(lrs[end]) if end < len(losses) else None
    if end == 0:
        return SweepReading(lrs, losses, smoothed, None, divergence_lr, None, None)
    # The lowest point after the warm-up (where the average is still a lucky batch or two), unless
    # the sweep ended within it.
    start = SWEEP_WARMUP_POINTS if end > SWEEP_WARMUP_POINTS + 1 else 0
    lowest = start + int(np.argmin(smoothed[start:end]))
    min_loss_lr = float(lrs[lowest])
    return SweepReading(lrs, losses, smoothed, (steepest := _steepest(lrs, smoothed, lowest)), divergence_lr,
                        min_loss_lr, steepest)


def _steepest(lrs: np.ndarray, smoothed: np.ndarray, lowest: int) -> float | None:
    """The lr where the smoothed loss falls fastest per log-lr, before its minimum. The first
    points are left out (the average of a few steps is mostly the first step's noise), and each
    slope is taken across a window of about 5 % of the descent, not between two neighbours."""
    if lowest < 2:
        return None
    log_lr = np.log(lrs[:lowest + 1])
    first = min(SWEEP_WARMUP_POINTS, lowest // 2)
    half = max(1, (lowest + 1) // 20)
    best, best_slope = None, 0.0
    for i in range(first, lowest + 1):
        a, b = max(first, i - half), min(lowest, i + half)
        if log_lr[b] <= log_lr[a]:
            continue
        slope = (smoothed[b] - smoothed[a]) / (log_lr[b] - log_lr[a])
        if slope < best_slope:
            best, best_slope = i, slope
    return None if best is None else float(lrs[best])


def read_sweep(store: RunStore, excursion_id: int, metric: str | None = None) -> SweepReading | None:
    """The reading of sweep ``excursion_id`` (as far as it got), or None if it has no branch yet."""
    excursion = store.excursion(excursion_id)
    if excursion is None or not excursion["branches"]:
        return None
    branch_id = excursion["branches"][0]["branch"]
    branch = store.branch(branch_id)
    start = int(branch["start_step"]) if branch else int(excursion["origin_step"])
    name = metric or step_metric(store, branch_id)
    if name is None:
        return analyse_sweep(np.empty(0), np.empty(0))
    steps, losses = branch_points(store, branch_id, name, after=start)
    lr_steps, lr_values = branch_points(store, branch_id, "lr")
    if len(lr_steps) == 0 or len(steps) == 0:
        return analyse_sweep(np.empty(0), np.empty(0))
    # The lr that trained step t: the last one set at a step boundary before it (step <= t - 1).
    index = np.searchsorted(lr_steps, steps - 1, side="right") - 1
    known = index >= 0
    return analyse_sweep(lr_values[index[known]], losses[known])
