"""Downsampling that keeps the spikes, and the exponentially weighted average of the seeds.

Pure numpy and pandas functions, shared by the dashboard and the benchmarks.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def minmax(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of (x, y): per bucket of consecutive points, the lowest and
    the highest, in x order. A spike in the raw curve is always one of the points kept.

    Non-finite values (a diverged loss) are never chosen over finite ones, and a bucket with no
    finite value keeps its first point, so a NaN still shows up as a gap.
    """
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    size = math.ceil(n / buckets)
    buckets = math.ceil(n / size)
    padded = buckets * size
    finite = np.isfinite(y)
    low = np.full(padded, np.inf)
    high = np.full(padded, -np.inf)
    low[:n] = np.where(finite, y, np.inf)
    high[:n] = np.where(finite, y, -np.inf)
    offsets = np.arange(buckets) * size
    i_low = low.reshape(buckets, size).argmin(axis=1) + offsets
    i_high = high.reshape(buckets, size).argmax(axis=1) + offsets
    picked = np.unique(np.concatenate([np.minimum(i_low, n - 1), np.minimum(i_high, n - 1)]))
    return x[picked], y[picked]


def bucket_means(
    x: np.ndarray, y: np.ndarray, buckets: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean x, mean y, count) of the finite values in ``buckets`` runs of consecutive points."""
    n = len(x)
    if n == 0:
        empty = np.empty(0)
        return empty, empty, empty
    buckets = max(1, min(buckets, n))
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    starts = edges[:-1]
    finite = np.isfinite(y)
    counts = np.add.reduceat(finite.astype(np.int64), starts)
    sums = np.add.reduceat(np.where(finite, y, 0.0), starts)
    xs = np.add.reduceat(x.astype(np.float64), starts) / np.diff(edges)
    keep = counts > 0
    return xs[keep], sums[keep] / counts[keep], counts[keep]


def ewma(x: np.ndarray, y: np.ndarray, beta: float) -> np.ndarray:
    """The bias-corrected exponentially weighted average of ``y`` with weight ``beta`` per step.

    ``x`` holds the step of each value. A value ``gap`` steps older weighs ``beta ** gap`` less,
    so the curve is the same whether it is computed from raw points or from bucket means (each
    standing for the steps around it). With one value per step this is the course notes'
    v_t = β·v_{t-1} + (1-β)·y_t divided by 1 - β^t. Non-finite values are skipped.
    """
    y = np.asarray(y, dtype=float)
    if len(y) == 0:
        return np.full(0, np.nan)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be >= 0 and < 1, got {beta!r}")
    if beta == 0:
        return np.where(np.isfinite(y), y, np.nan)
    # pandas does the weighted average in compiled code, decaying by elapsed "time" (the step).
    halflife = math.log(0.5) / math.log(beta)
    times = pd.to_datetime(np.asarray(x, dtype=float), unit="s")
    series = pd.Series(np.where(np.isfinite(y), y, np.nan))
    return series.ewm(halflife=pd.Timedelta(seconds=halflife), times=times, ignore_na=True).mean().to_numpy()
