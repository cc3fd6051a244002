"""The divergence guard: notice a loss that went non-finite or shot far above its recent average.

Two exponentially weighted averages of the loss, as in the course notes: a short one (β = 0.9,
about the last 10 steps) and a long one (β = 0.99, about the last 100), both bias-corrected. A
single noisy batch barely moves the short average; a run that is really blowing up drives it past
``spike_factor`` times the long one within a few steps.

Near convergence a loss of 0.05 with batches at 1.0 is ordinary noise, and a ratio alone would
cry wolf. So the gap between the two averages must also exceed ``noise_gate`` times its usual
size, learnt while the run was healthy (a blow-up does not teach the guard that blow-ups are
normal), and ``min_rise`` times the highest long average seen while healthy (in practice the
loss at the start; a resumed trainer is told it): a loss going from 0.01 to 0.04 late in training
is not a divergence, one climbing back towards where it started is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .commands import parse_number
from .errors import SettingsError


@dataclass(frozen=True)
class GuardConfig:
    """How the guard judges the loss and what it does when the loss diverges.

    ``metrics``: the names of the per-step values it watches, each judged on its own (``("loss_D",
    "loss_G")``); None (the default) watches every per-step value whose name contains "loss".
    ``metric``: one name, the older form of ``metrics=(name,)``.
    """

    metric: str | None = None
    metrics: tuple[str, ...] | None = None
    spike_factor: float = 3.0
    warmup_steps: int = 50
    short_beta: float = 0.9
    long_beta: float = 0.99
    noise_gate: float = 6.0
    min_rise: float = 0.1
    enabled: bool = True
    # Off by default: roll back to the last healthy checkpoint with the lr halved, at most N times.
    auto_remedy_max: int = 0

    def __post_init__(self) -> None:
        names_accepted = "a list of metric names, e.g. ('loss_D', 'loss_G'), or None for every name containing 'loss'"
        if self.metric is not None:
            if not isinstance(self.metric, str) or not self.metric.strip():
                raise SettingsError(f"metric must be a metric name, got {self.metric!r}")
            if self.metrics is not None:
                raise SettingsError(f"give metrics or metric, not both: got metrics={self.metrics!r} and "
                                    f"metric={self.metric!r}")
        if self.metrics is not None:
            if isinstance(self.metrics, str) or not isinstance(self.metrics, (list, tuple)) or not self.metrics \
                    or not all(isinstance(name, str) and name.strip() for name in self.metrics):
                raise SettingsError(f"metrics must be {names_accepted}, got {self.metrics!r}")
            object.__setattr__(self, "metrics", tuple(self.metrics))
        for name in ("short_beta", "long_beta"):
            beta = parse_number(getattr(self, name), name, "a number >= 0 and < 1 (for example 0.9)", SettingsError)
            if not 0 <= beta < 1:
                raise SettingsError(f"{name} must be a number >= 0 and < 1 (for example 0.9), got {getattr(self, name)!r}")
            object.__setattr__(self, name, beta)
        if self.short_beta >= self.long_beta:
            raise SettingsError(f"short_beta must be below long_beta, got {self.short_beta!r} and {self.long_beta!r}")
        # For losses >= 0 the short average can never exceed the long one by more than this.
        reachable = (1 - self.short_beta) / (1 - self.long_beta)
        accepted = f"a finite number > 1 and < {reachable:g} (for example 3)"
        factor = parse_number(self.spike_factor, "spike_factor", accepted, SettingsError)
        if not 1 < factor < reachable:
            raise SettingsError(f"spike_factor must be {accepted}, got {self.spike_factor!r}")
        object.__setattr__(self, "spike_factor", factor)
        if not isinstance(self.auto_remedy_max, int) or self.auto_remedy_max < 0:
            raise SettingsError(f"auto_remedy_max must be a whole number >= 0, got {self.auto_remedy_max!r}")
        gate = parse_number(self.noise_gate, "noise_gate", "a finite number >= 0 (for example 6)", SettingsError)
        if gate < 0:
            raise SettingsError(f"noise_gate must be a finite number >= 0 (for example 6), got {self.noise_gate!r}")
        object.__setattr__(self, "noise_gate", gate)
        rise = parse_number(self.min_rise, "min_rise", "a finite number >= 0 (for example 0.1)", SettingsError)
        if rise < 0:
            raise SettingsError(f"min_rise must be a finite number >= 0 (for example 0.1), got {self.min_rise!r}")
        object.__setattr__(self, "min_rise", rise)
        for name in ("enabled",):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.auto_remedy_max, bool):
            raise SettingsError(f"auto_remedy_max must be a whole number >= 0, got {self.auto_remedy_max!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise SettingsError(f"warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}")


@dataclass(frozen=True)
class Divergence:
    step: int
    value: float
    short_average: float | None
    long_average: float | None
    metric: str = "loss"

    def describe(self) -> str:
        if not math.isfinite(self.value):
            return f"{self.metric} became {self.value} at step {self.step}"
        return (
            f"{self.metric} jumped to {self.value:.4g} at step {self.step}: its 10-step average "
            f"{self.short_average:.4g} rose far above its 100-step average {self.long_average:.4g}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "step": self.step,
                "value": self.value if math.isfinite(self.value) else str(self.value),
                "short_average": self.short_average, "long_average": self.long_average}


# Chunks up to this long are judged value by value. Measured side by side (thread CPU time, the
# same process): the two cost the same at 256 values, numpy ~1.3x more at 500 (its fixed cost,
# some 70 calls), ~1.4x less at 2,000 and ~1.6x less at 10,000. Measured again under heavier load
# (200 interleaved chunks each): numpy/loop 4.5x at 64 values, 1.3x at 384, 1.0x at 512 (numpy's
# fixed cost suffers most from a busy machine). A 0.5 ms step flushes ~500 values every 0.25 s.
SCALAR_UP_TO = 512


class DivergenceGuard:
    """Feed it the loss step by step; it answers with a :class:`Divergence` once, then stays quiet
    until :meth:`reset` (a rollback or a resume re-arms it)."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.reset()

    def remember_scale(self, value: float) -> None:
        """Tell the guard the highest loss average the run has had (resuming, or after a
        rollback it would otherwise know only the low losses it sees from then on)."""
        if math.isfinite(value) and value > self._peak:
            self._peak = value

    def reset(self) -> None:
        self._count = 0
        self._short = 0.0
        self._long = 0.0
        self._short_power = 1.0  # short_beta ** count, kept as a running product
        self._long_power = 1.0
        self._gap_square = 0.0  # EW mean of (short - long)^2 over healthy steps
        self._gap_weight = 0.0
        self._peak = getattr(self, "_peak", 0.0)  # the highest long average so far: kept across resets
        self.tripped = False

    def averages(self) -> tuple[float | None, float | None]:
        if self._count == 0:
            return None, None
        return self._short / (1 - self._short_power), self._long / (1 - self._long_power)

    def feed(self, step: int, value: float) -> Divergence | None:
        return self.feed_many([step], [value])

    def feed_many(self, steps: Sequence[int], values: Sequence[float | None] | np.ndarray) -> Divergence | None:
        """Feed values in order (None is skipped; an array holds no None); the first divergence
        found, if any.

        This runs on the writer thread for each flushed chunk of the loss, and every moment it
        holds the GIL is a moment the training thread may wait for it. So its cost is bounded per
        chunk: a short chunk is judged value by value (below SCALAR_UP_TO values that costs less
        than numpy's fixed price); a long one with a fixed number of numpy calls, whatever its length
        (the averages are linear recurrences, computed by :func:`_ewma`; what the guard learns
        only from healthy steps is computed over those steps and carried to the others). Both
        reach the same verdict at the same step (``tests/test_guard.py`` checks it).
        """
        config = self.config
        if not config.enabled or self.tripped or not len(values):
            return None
        array = isinstance(values, np.ndarray)  # from the writer: floats, no None
        if len(values) <= SCALAR_UP_TO:
            return self._judge_one_by_one(steps, values.tolist() if array else values)
        losses = values.astype(np.float64, copy=False) if array else np.fromiter(values, np.float64, len(values))
        finite = np.isfinite(losses)  # (a None became NaN)
        if not finite.all() and not array:
            # A None is a value that was not a number (the writer reported it): not judged.
            missing = [i for i in np.flatnonzero(~finite).tolist() if values[i] is None]
            if missing:
                kept = np.ones(len(losses), dtype=bool)
                kept[missing] = False
                steps, losses, finite = np.asarray(steps)[kept], losses[kept], finite[kept]
        bad = None if finite.all() else int(np.argmin(finite))  # the first non-finite value
        judged = losses if bad is None else losses[:bad]
        found = self._judge(steps, judged) if len(judged) else None
        if found is None and bad is not None:
            found = Divergence(int(steps[bad]), float(losses[bad]), *self.averages())
        if found is not None:
            self.tripped = True
        return found

    def _judge_one_by_one(self, steps: Sequence[int], values: Sequence[float | None]) -> Divergence | None:
        """The rule itself, one value at a time; the state stays in locals (only arithmetic runs per value)."""
        config = self.config
        short_beta, long_beta = config.short_beta, config.long_beta
        short_rest, long_rest = 1 - short_beta, 1 - long_beta
        factor, warmup, min_rise = config.spike_factor, config.warmup_steps, config.min_rise
        gate_square = config.noise_gate * config.noise_gate
        count, short, long = self._count, self._short, self._long
        short_power, long_power = self._short_power, self._long_power
        gap_square, gap_weight, peak = self._gap_square, self._gap_weight, self._peak
        found = None
        try:  # one C call for the chunk instead of one per value: a NaN or an infinity makes the sum one
            checked = math.isfinite(sum(values))
        except TypeError:  # a None among them
            checked = False
        for step, value in zip(steps, values):
            if not checked:
                if value is None:
                    continue
                if not math.isfinite(value):
                    averages = (short / (1 - short_power), long / (1 - long_power)) if count else (None, None)
                    found = Divergence(step, value, *averages)
                    break
            count += 1
            short = short_beta * short + short_rest * value
            long = long_beta * long + long_rest * value
            short_power *= short_beta
            long_power *= long_beta
            short_average = short / (1 - short_power)
            long_average = long / (1 - long_power)
            gap = short_average - long_average
            if short_average > factor * long_average:
                usual_square = gap_square / gap_weight if gap_weight > 0 else 0.0
                if count > warmup and long_average > 0 and gap * gap > gate_square * usual_square \
                        and gap > min_rise * peak:
                    found = Divergence(step, value, short_average, long_average)
                    break
            else:  # healthy: learn how much the two averages usually differ, and how high they go
                gap_square = long_beta * gap_square + long_rest * gap * gap
                gap_weight = long_beta * gap_weight + long_rest
                if long_average > peak:
                    peak = long_average
        self._count, self._short, self._long = count, short, long
        self._short_power, self._long_power = short_power, long_power
        self._gap_square, self._gap_weight, self._peak = gap_square, gap_weight, peak
        if found is not None:
            self.tripped = True
        return found

    def _judge(self, steps: Sequence[int], losses: np.ndarray) -> Divergence | None:
        """The rule over a chunk of finite ``losses`` in numpy; stops at (and reports) the first spike."""
        config = self.config
        n = len(losses)
        betas = np.array([[config.short_beta], [config.long_beta]])
        with np.errstate(all="ignore"):  # a huge loss may overflow the products, as in plain floats
            # Row 0 the short average, row 1 the long one: raw, then bias-corrected.
            raw = _ewma(np.array([self._short, self._long]), betas, losses)  # one row per beta
            ahead = np.arange(1, n + 1, dtype=np.float64)
            powers = np.array([[self._short_power], [self._long_power]]) * betas ** ahead
            short_average, long_average = raw / (1 - powers)
            gap = short_average - long_average
            spiking = short_average > config.spike_factor * long_average
            # Learnt from healthy steps only: the usual squared gap, its weight, the peak. At a
            # spiking step each still holds its value from the last healthy step before it.
            healthy = ~spiking
            healthy_so_far = np.cumsum(healthy)
            on_healthy = _ewma(np.array([self._gap_square]), betas[1:], np.square(gap[healthy])[None, :])[0]
            gap_square = np.concatenate(([self._gap_square], on_healthy))[healthy_so_far]
            # The weight's recurrence w <- b w + (1 - b) has the closed form 1 - (1 - w0) b ** k.
            gap_weight = 1 - (1 - self._gap_weight) * config.long_beta ** healthy_so_far
            peak = np.fmax.accumulate(np.where(healthy, long_average, self._peak))  # fmax: as `>`, NaN-blind
            np.fmax(peak, self._peak, out=peak)
            usual_square = np.divide(gap_square, gap_weight, out=np.zeros(n), where=gap_weight > 0)
            trips = (spiking & (ahead > config.warmup_steps - self._count) & (long_average > 0)
                     & (gap * gap > config.noise_gate * config.noise_gate * usual_square)
                     & (gap > config.min_rise * peak))
        end = int(np.argmax(trips)) if trips.any() else n - 1
        self._count += end + 1
        self._short, self._long = float(raw[0, end]), float(raw[1, end])
        self._short_power, self._long_power = float(powers[0, end]), float(powers[1, end])
        self._gap_square, self._gap_weight = float(gap_square[end]), float(gap_weight[end])
        self._peak = float(peak[end])
        if not trips[end]:
            return None
        return Divergence(int(steps[end]), float(losses[end]), float(short_average[end]), float(long_average[end]))


def _ewma(start: np.ndarray, beta: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """``y[:, t] = beta * y[:, t-1] + (1 - beta) * inputs[:, t]`` from ``y[:, -1] = start``, for
    every t; one row per average (``beta`` a column; a 1-d ``inputs`` serves every row).

    A doubling scan: after the pass with offset d, y[:, t] sums the last 2d terms; log2(length)
    passes of two numpy calls each. Every factor is a power of beta in [0, 1), so nothing
    overflows or loses precision the way dividing by beta ** t would.
    """
    out = (1 - beta) * inputs
    if out.shape[1]:
        out[:, 0] += beta[:, 0] * start
    factor, offset = beta, 1
    while offset < out.shape[1]:
        out[:, offset:] += factor * out[:, :-offset]
        factor = factor * factor
        offset *= 2
    return out
