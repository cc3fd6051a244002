"""Downsampling keeps the count bounded and the spikes; the weighted average matches the seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from babysit.downsample import bucket_means, ewma, minmax


@pytest.mark.parametrize("n", [10_001, 123_457, 1_000_000])
def test_minmax_bounds_the_count_and_keeps_every_extreme(n: int) -> None:
    rng = np.random.default_rng(0)
    x = np.arange(n)
    y = rng.normal(size=n)
    spikes = rng.choice(n, 20, replace=False)
    y[spikes] = 50 + np.arange(20)
    dips = rng.choice(np.setdiff1d(x, spikes), 20, replace=False)
    y[dips] = -50 - np.arange(20)
    kept_x, kept_y = minmax(x, y, 5000)
    assert len(kept_x) <= 5000
    assert set(spikes.tolist()) <= set(kept_x.tolist()) and set(dips.tolist()) <= set(kept_x.tolist())
    assert (np.diff(kept_x) > 0).all()
    assert kept_y.max() == y.max() and kept_y.min() == y.min()
    assert np.array_equal(y[kept_x], kept_y)


def test_minmax_leaves_short_series_alone() -> None:
    x, y = np.arange(10), np.arange(10.0)
    kept_x, kept_y = minmax(x, y, 5000)
    assert kept_x is x and kept_y is y


def test_minmax_never_prefers_nan_but_keeps_a_gap() -> None:
    x = np.arange(100)
    y = np.ones(100)
    y[10] = 9.0
    y[20:30] = np.nan  # one whole bucket of NaN (size 10)
    kept_x, kept_y = minmax(x, y, 20)
    assert 10 in kept_x.tolist()
    assert np.isnan(kept_y).sum() == 1  # the NaN bucket shows up once, as a gap


def test_bucket_means() -> None:
    x = np.arange(10)
    y = np.arange(10.0)
    y[3] = np.nan
    xs, means, counts = bucket_means(x, y, 2)
    assert xs.tolist() == [2.0, 7.0]
    assert means.tolist() == [(0 + 1 + 2 + 4) / 4, 7.0] and counts.tolist() == [4, 5]


def test_ewma_is_the_bias_corrected_average_of_the_seeds() -> None:
    y = np.array([4.0, 2.0, 6.0, 1.0])
    beta = 0.9
    expected, v = [], 0.0
    for t, value in enumerate(y, start=1):
        v = beta * v + (1 - beta) * value
        expected.append(v / (1 - beta**t))
    assert ewma(np.arange(4), y, beta) == pytest.approx(expected, rel=1e-6)  # pandas counts time in ns
    assert ewma(np.arange(4), y, 0.0).tolist() == y.tolist()


def test_ewma_over_bucket_means_matches_the_raw_average() -> None:
    # 1000 raw steps vs 100 means of 10 steps: the smoothed curves agree where they meet.
    rng = np.random.default_rng(1)
    raw = 1.0 + 0.1 * rng.normal(size=1000)
    raw_smooth = ewma(np.arange(1000), raw, 0.99)
    centres = np.arange(100) * 10 + 4.5
    means = raw.reshape(100, 10).mean(axis=1)
    bucket_smooth = ewma(centres, means, 0.99)
    assert bucket_smooth[-1] == pytest.approx(raw_smooth[-1], rel=0.01)


def test_ewma_skips_non_finite_and_refuses_bad_beta() -> None:
    out = ewma(np.arange(3), np.array([1.0, math.nan, 1.0]), 0.5)
    assert out.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="beta must be >= 0 and < 1, got 1.0"):
        ewma(np.arange(3), np.ones(3), 1.0)
