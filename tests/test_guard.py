"""The divergence guard: non-finite losses, sustained blow-ups, noise, warm-up, reset, settings."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from babysit import guard as guard_module
from babysit.errors import SettingsError
from babysit.guard import Divergence, DivergenceGuard, GuardConfig
from bench.common import lines_run


def _feed(guard: DivergenceGuard, values: list[float], first_step: int = 1) -> list[Divergence]:
    found = []
    for step, value in enumerate(values, first_step):
        result = guard.feed(step, value)
        if result is not None:
            found.append(result)
    return found


def _ewma(values: list[float], beta: float) -> float:
    """Bias-corrected exponentially weighted average, computed the long way."""
    weights = [(1 - beta) * beta ** (len(values) - 1 - i) for i in range(len(values))]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


STEADY = [1.0] * 100
BLOW_UP = [1.5**k for k in range(1, 40)]  # the loss grows by half every step


# -- non-finite ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_trips_at_once_even_in_warm_up(bad: float):
    guard = DivergenceGuard(GuardConfig(warmup_steps=50))
    assert _feed(guard, [1.0, 1.0, 1.0]) == []
    found = guard.feed(4, bad)
    assert found is not None
    assert found.step == 4
    assert found.value == bad or (math.isnan(bad) and math.isnan(found.value))
    assert found.short_average == pytest.approx(1.0, rel=1e-12)
    assert found.long_average == pytest.approx(1.0, rel=1e-12)
    assert found.describe() == f"loss became {bad} at step 4"
    assert found.as_dict() == {"metric": "loss", "step": 4, "value": str(bad), "short_average": found.short_average,
                               "long_average": found.long_average}
    assert guard.tripped


def test_nan_as_the_very_first_value_has_no_averages():
    guard = DivergenceGuard(GuardConfig())
    found = guard.feed(1, math.nan)
    assert found is not None
    assert (found.step, found.short_average, found.long_average) == (1, None, None)
    assert guard.averages() == (None, None)


def test_the_guard_answers_once_then_stays_quiet():
    guard = DivergenceGuard(GuardConfig())
    assert guard.feed(1, math.nan) is not None
    assert _feed(guard, [math.inf, math.nan, 1e30, *BLOW_UP], first_step=2) == []


# -- blow-ups and noise ----------------------------------------------------------------------
def test_sustained_blow_up_trips_within_a_few_steps():
    guard = DivergenceGuard(GuardConfig())
    values = STEADY + BLOW_UP
    found = _feed(guard, values)
    assert len(found) == 1
    divergence = found[0]
    assert 100 < divergence.step <= 110
    assert divergence.value == values[divergence.step - 1]
    seen = values[: divergence.step]
    assert divergence.short_average == pytest.approx(_ewma(seen, 0.9), rel=1e-9)
    assert divergence.long_average == pytest.approx(_ewma(seen, 0.99), rel=1e-9)
    assert divergence.short_average > 3 * divergence.long_average
    assert divergence.as_dict() == {"metric": "loss", "step": divergence.step, "value": divergence.value,
                                    "short_average": divergence.short_average,
                                    "long_average": divergence.long_average}
    assert divergence.describe().startswith(f"loss jumped to {divergence.value:.4g} at step {divergence.step}: ")
    assert f"{divergence.short_average:.4g}" in divergence.describe()
    assert f"{divergence.long_average:.4g}" in divergence.describe()


def test_a_hundredfold_jump_that_stays_trips_on_its_first_step():
    guard = DivergenceGuard(GuardConfig())
    found = _feed(guard, STEADY + [100.0] * 50)
    assert [d.step for d in found] == [101]
    assert found[0].value == 100.0


def test_a_larger_spike_factor_tolerates_more():
    values = STEADY + BLOW_UP
    default = _feed(DivergenceGuard(GuardConfig(spike_factor=3)), values)
    lenient = _feed(DivergenceGuard(GuardConfig(spike_factor=5)), values)
    assert len(default) == 1 and len(lenient) == 1
    assert lenient[0].step > default[0].step
    assert lenient[0].short_average > 5 * lenient[0].long_average


@pytest.mark.parametrize("factor", [10, 12.5, 100])
def test_a_spike_factor_the_averages_can_never_reach_is_refused(factor: float):
    # short / long can never reach (1 - short_beta) / (1 - long_beta) = 10 for a finite loss (a jump
    # of any size moves short by 10 % of it and long by 1 %), so from 10 up the spike check is dead:
    # the guard would watch a loss grow 1.5x per step to 7e6 in silence. Refuse such a setting.
    with pytest.raises(SettingsError, match=rf"^spike_factor must be .*< 10.*, got {factor!r}$"):
        GuardConfig(spike_factor=factor)


@pytest.mark.parametrize("spike", [5.0, 10.0])
def test_a_single_noisy_spike_does_not_trip(spike: float):
    guard = DivergenceGuard(GuardConfig())
    assert _feed(guard, STEADY + [spike] + [1.0] * 300) == []
    assert not guard.tripped


def test_ordinary_noise_does_not_trip():
    rng = random.Random(0)
    noisy = [rng.uniform(0.5, 1.5) for _ in range(3000)]
    assert _feed(DivergenceGuard(GuardConfig()), noisy) == []
    decaying = [2.0 * 0.999**i * rng.uniform(0.7, 1.3) for i in range(3000)]
    assert _feed(DivergenceGuard(GuardConfig()), decaying) == []


def test_occasional_hard_batches_near_convergence_do_not_trip():
    rng = random.Random(1)
    values = STEADY + [1.0 if rng.random() < 0.02 else 0.05 for _ in range(3000)]
    assert _feed(DivergenceGuard(GuardConfig()), values) == []


# -- warm-up ---------------------------------------------------------------------------------
def test_warm_up_steps_are_not_judged():
    early_blow_up = [1.0] * 10 + [1.5**k for k in range(1, 41)]  # 50 values
    assert _feed(DivergenceGuard(GuardConfig(warmup_steps=50)), early_blow_up) == []
    found = _feed(DivergenceGuard(GuardConfig(warmup_steps=0)), early_blow_up)
    assert len(found) == 1 and found[0].step <= 50


def test_judging_starts_right_after_warm_up():
    early_blow_up = [1.0] * 10 + [1.5**k for k in range(1, 41)]
    unguarded = _feed(DivergenceGuard(GuardConfig(warmup_steps=0)), early_blow_up)[0].step
    found = _feed(DivergenceGuard(GuardConfig(warmup_steps=unguarded - 1)), early_blow_up)
    assert [d.step for d in found] == [unguarded]
    assert _feed(DivergenceGuard(GuardConfig(warmup_steps=unguarded)), early_blow_up[:unguarded]) == []


# -- reset and disable -----------------------------------------------------------------------
def test_reset_re_arms_and_forgets_the_averages():
    guard = DivergenceGuard(GuardConfig())
    _feed(guard, STEADY)
    assert guard.feed(101, math.nan) is not None
    assert guard.feed(102, math.nan) is None
    guard.reset()
    assert guard.tripped is False
    assert guard.averages() == (None, None)
    again = guard.feed(103, math.inf)
    assert again is not None and again.step == 103 and again.short_average is None


def test_reset_starts_a_new_warm_up():
    guard = DivergenceGuard(GuardConfig(warmup_steps=50))
    assert len(_feed(guard, STEADY + BLOW_UP)) == 1
    guard.reset()
    early_blow_up = [1.0] * 10 + [1.5**k for k in range(1, 41)]
    assert _feed(guard, early_blow_up, first_step=200) == []


def test_averages_are_the_bias_corrected_ewmas():
    guard = DivergenceGuard(GuardConfig())
    values = [3.0, 1.0, 2.0, 5.0, 4.0]
    _feed(guard, values)
    short, long = guard.averages()
    assert short == pytest.approx(_ewma(values, 0.9), rel=1e-12)
    assert long == pytest.approx(_ewma(values, 0.99), rel=1e-12)


def test_disabled_guard_never_trips():
    guard = DivergenceGuard(GuardConfig(enabled=False))
    assert _feed(guard, [math.nan, *STEADY, *BLOW_UP, math.inf]) == []
    assert not guard.tripped


# -- settings --------------------------------------------------------------------------------
def test_defaults():
    config = GuardConfig()
    assert (config.metrics, config.spike_factor, config.warmup_steps, config.enabled, config.auto_remedy_max) == (
        None, 3.0, 50, True, 0)


@pytest.mark.parametrize(("raw", "shown"), [(1, "1"), (1.0, "1.0"), (0.5, "0.5"), (-3, "-3"), (math.nan, "nan"),
                                            (math.inf, "inf"), ("big", "'big'"), (True, "True"), (None, "None")])
def test_spike_factor_must_be_above_one(raw, shown):
    with pytest.raises(SettingsError, match=rf"^spike_factor must be a finite number > 1 and < 10 \(for example 3\), got {shown}$"):
        GuardConfig(spike_factor=raw)


@pytest.mark.parametrize(("raw", "shown"), [(-1, "-1"), (1.5, "1.5"), ("2", "'2'"), (None, "None")])
def test_auto_remedy_max_must_be_a_whole_number(raw, shown):
    with pytest.raises(SettingsError, match=rf"^auto_remedy_max must be a whole number >= 0, got {shown}$"):
        GuardConfig(auto_remedy_max=raw)


@pytest.mark.parametrize(("raw", "shown"), [(-1, "-1"), (2.5, "2.5"), ("10", "'10'"), (None, "None")])
def test_warmup_steps_must_be_a_whole_number(raw, shown):
    with pytest.raises(SettingsError, match=rf"^warmup_steps must be a whole number >= 0, got {shown}$"):
        GuardConfig(warmup_steps=raw)


@pytest.mark.parametrize(("raw", "shown"), [(-1, "-1"), (math.nan, "nan"), ("loud", "'loud'")])
def test_noise_gate_must_be_a_number_at_least_zero(raw, shown):
    with pytest.raises(SettingsError, match=rf"^noise_gate must be a finite number >= 0 \(for example 6\), got {shown}$"):
        GuardConfig(noise_gate=raw)


def test_spike_factor_given_as_text_is_usable():
    # parse_number accepts "3" (it is what a command line gives), so the config must hold the number:
    # a guard built from it has to work like one built from 3.0 instead of failing on "3" * long.
    config = GuardConfig(spike_factor="3")
    assert config.spike_factor == 3.0
    guard = DivergenceGuard(config)
    found = _feed(guard, STEADY + BLOW_UP)
    assert [d.step for d in found] == [d.step for d in _feed(DivergenceGuard(GuardConfig()), STEADY + BLOW_UP)]


@pytest.mark.parametrize(("field", "raw"), [("short_beta", 1.0), ("short_beta", -0.5),
                                            ("long_beta", 1.0), ("long_beta", 1.5), ("long_beta", math.nan)])
def test_betas_must_be_between_zero_and_one(field: str, raw: float):
    # short_beta=1 makes every bias correction divide by zero at the first loss: refuse it up front,
    # naming the setting and the value, like every other setting.
    with pytest.raises(SettingsError, match=rf"^{field} must be .*, got {raw!r}$"):
        GuardConfig(**{field: raw})


def test_config_is_immutable():
    config = GuardConfig()
    with pytest.raises(AttributeError):
        config.spike_factor = 10  # type: ignore[misc]


# -- the loss scale a rise is judged against ---------------------------------------------------
def _late_noise(guard: DivergenceGuard, steps: int = 2000) -> int | None:
    """Feed a converged loss (~0.0075) with an occasional bad batch (+0.17); the step it trips at."""
    noise = random.Random(0)
    for step in range(steps):
        if guard.feed(step, 0.0075 * (1 + 0.5 * noise.random()) + (0.17 if noise.random() < 0.03 else 0)):
            return step
    return None


def test_a_guard_told_the_starting_loss_ignores_late_noise_but_not_a_blow_up() -> None:
    guard = DivergenceGuard(GuardConfig())
    guard.remember_scale(2.3)
    assert _late_noise(guard) is None
    loss = 0.0075
    for step in range(3000, 3300):
        loss *= 1.2
        if guard.feed(step, loss):
            break
    assert guard.tripped and loss < 1.0


def test_the_scale_survives_a_reset_and_a_blow_up_does_not_raise_it() -> None:
    guard = DivergenceGuard(GuardConfig(warmup_steps=0))
    for step in range(300):
        guard.feed(step, 1.0)
    for step in range(300, 400):  # a blow-up: the guard trips, and learns nothing from it
        guard.feed(step, 1.0 * 1.5 ** (step - 299))
    assert guard.tripped
    guard.reset()
    peak = guard._peak
    assert 1.0 <= peak < 1.5  # the first steps of the rise, before it looked like one; not 1.5**k
    guard.remember_scale(float("nan"))
    guard.remember_scale(0.5)
    assert guard._peak == peak


# -- chunks: the same verdicts as step by step, at a bounded cost per chunk -------------------
def _one_by_one(guard: DivergenceGuard, step: int, value: float | None) -> Divergence | None:
    """Feed one value through the guard's value-by-value path, whatever SCALAR_UP_TO says."""
    if not guard.config.enabled or guard.tripped:
        return None
    return guard._judge_one_by_one([step], [value])


def _scenarios() -> dict[str, list[Any]]:
    rng = random.Random(7)
    noisy = [rng.uniform(0.5, 1.5) for _ in range(3000)]
    converging = [2.3 * 0.998**i * rng.uniform(0.8, 1.2) for i in range(2500)]
    hard_batches = [1.0] * 100 + [1.0 if rng.random() < 0.02 else 0.05 for _ in range(2000)]
    late_blow_up = converging + [converging[-1] * 1.2**k for k in range(1, 60)]
    with_gaps = [None if rng.random() < 0.1 else v for v in STEADY * 3 + BLOW_UP]
    return {
        "steady, then a blow-up": STEADY + BLOW_UP,
        "a hundredfold jump": STEADY + [100.0] * 50,
        "single spikes": STEADY + [10.0] + [1.0] * 300 + [5.0] + [1.0] * 300,
        "noise": noisy,
        "hard batches near convergence": hard_batches,
        "a blow-up late in training": late_blow_up,
        "nan in the middle": noisy[:1234] + [math.nan] + noisy[:100],
        "inf after a spike": STEADY + [50.0] * 3 + [math.inf],
        "values that were not numbers": with_gaps,
        "negative losses": [-1.0 + 0.01 * rng.random() for _ in range(500)] + BLOW_UP,
        "huge losses": STEADY + [1e300, 1e305, 1e308, 1e308],
    }


CONFIGS = {
    "default": GuardConfig(),
    "no warm-up, no gates": GuardConfig(warmup_steps=0, noise_gate=0, min_rise=0),
    "short_beta 0": GuardConfig(short_beta=0.0, long_beta=0.95, spike_factor=5),
    "lenient": GuardConfig(spike_factor=5, noise_gate=10, min_rise=0.5),
    "long warm-up": GuardConfig(warmup_steps=1000),
}


def _chunks(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random chunk boundaries over n values: sizes from 1 to 700, as flushes of any length."""
    bounds, start = [], 0
    while start < n:
        size = rng.choice([1, 2, 3, rng.randint(4, 60), rng.randint(60, 700)])
        bounds.append((start, min(n, start + size)))
        start += size
    return bounds


@pytest.mark.parametrize("scalar_up_to", [0, guard_module.SCALAR_UP_TO])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("scenario", list(_scenarios()))
def test_chunks_of_any_size_reach_the_value_by_value_verdict(scenario: str, config_name: str, scalar_up_to: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # scalar_up_to 0: every chunk goes through numpy; the default: short chunks value by value.
    monkeypatch.setattr(guard_module, "SCALAR_UP_TO", scalar_up_to)
    values = _scenarios()[scenario]
    config = CONFIGS[config_name]
    steps = list(range(1, len(values) + 1))
    reference = DivergenceGuard(config)
    reference.remember_scale(0.5)
    expected = [d for d in (_one_by_one(reference, s, v) for s, v in zip(steps, values)) if d is not None]
    for seed in range(3):
        guard = DivergenceGuard(config)
        guard.remember_scale(0.5)
        shadow = DivergenceGuard(config)
        shadow.remember_scale(0.5)
        found = []
        for start, end in _chunks(len(values), random.Random(seed)):
            result = guard.feed_many(steps[start:end], values[start:end])
            if result is not None:
                found.append(result)
            for s, v in zip(steps[start:end], values[start:end]):
                _one_by_one(shadow, s, v)
            # The state the next chunk starts from is the one value-by-value feeding reaches.
            assert guard.averages() == pytest.approx(shadow.averages(), rel=1e-9)
            assert guard._peak == pytest.approx(shadow._peak, rel=1e-9)
            assert guard.tripped == shadow.tripped
        assert [d.step for d in found] == [d.step for d in expected]
        for got, want in zip(found, expected):
            assert got.value == want.value or (math.isnan(got.value) and math.isnan(want.value))
            assert (got.short_average, got.long_average) == pytest.approx((want.short_average, want.long_average),
                                                                          rel=1e-9)


@pytest.mark.parametrize("scalar_up_to", [0, guard_module.SCALAR_UP_TO])
def test_a_nan_or_a_spike_is_caught_at_the_same_step_in_one_chunk_as_value_by_value(
        scalar_up_to: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_module, "SCALAR_UP_TO", scalar_up_to)
    # Fed as one flush, the guard trips at the very step the step-by-step rule trips at: a NaN at
    # the step it appears, the steady-then-1.5x-per-step blow-up 8 steps into the rise (step 108),
    # a hundredfold jump on its first step. So the guard catches them within the flush that
    # carries them, as before, whatever the flush's length.
    cases = {"nan": (STEADY * 3 + [math.nan] + STEADY, 301), "blow-up": (STEADY + BLOW_UP, 108),
             "jump": (STEADY + [100.0] * 50, 101)}
    for name, (values, step) in cases.items():
        steps = list(range(1, len(values) + 1))
        whole = DivergenceGuard(GuardConfig()).feed_many(steps, values)
        reference = DivergenceGuard(GuardConfig())
        one_by_one = [d for d in (_one_by_one(reference, s, v) for s, v in zip(steps, values)) if d]
        assert whole is not None and [whole.step] == [d.step for d in one_by_one] == [step], name


def _lines_run_in_guard(feed: Any) -> int:
    """How many lines of babysit/guard.py run during ``feed()``."""
    return lines_run((guard_module.__file__,), feed)[guard_module.__file__]


@pytest.mark.parametrize("values_name", ["healthy", "spiking"])
def test_the_guards_python_work_per_chunk_does_not_grow_with_the_chunk(values_name: str) -> None:
    # The guard runs on the writer thread and the training thread waits for the GIL while it
    # runs; so a long chunk must cost a fixed handful of Python lines plus numpy calls, not lines
    # per value (the value-by-value loop runs ~20 lines per value, and is used only up to
    # SCALAR_UP_TO values). Counting lines instead of timing keeps this test independent of the
    # machine's speed and load.
    rng = random.Random(3)

    def chunk(n: int) -> tuple[list[int], list[float]]:
        if values_name == "healthy":
            return list(range(n)), [rng.uniform(0.9, 1.1) for _ in range(n)]
        return list(range(n)), [1.0 + (k % 50 == 49) * 20.0 for k in range(n)]  # spikes that never trip

    counts = {}
    small, large = 4 * guard_module.SCALAR_UP_TO, 400 * guard_module.SCALAR_UP_TO
    for n in (small, large):
        guard = DivergenceGuard(GuardConfig())
        steps, values = chunk(n)
        guard.feed_many(steps, values)  # warmed up: the chunk judged is past the warm-up
        steps, values = chunk(n)
        counts[n] = _lines_run_in_guard(lambda: guard.feed_many(steps, values))
        assert not guard.tripped
    # 100x the values: each of the two doubling scans takes 7 more passes (log2), nothing else grows.
    assert counts[large] - counts[small] <= 2 * 9 * 5, counts
    assert counts[large] < 0.01 * large, counts


def test_the_value_by_value_loop_runs_a_bounded_number_of_lines_per_value() -> None:
    # Short chunks (a slow loop's flushes) go value by value: there the Python work per value
    # must stay a small fixed number of lines (the rule's arithmetic), whatever the chunk's length.
    rng = random.Random(5)
    counts = {}
    for n in (100, guard_module.SCALAR_UP_TO):
        guard = DivergenceGuard(GuardConfig())
        guard.feed_many(list(range(200)), [rng.uniform(0.9, 1.1) for _ in range(200)])
        steps, values = list(range(200, 200 + n)), [rng.uniform(0.9, 1.1) for _ in range(n)]
        counts[n] = _lines_run_in_guard(lambda: guard.feed_many(steps, values))
        assert not guard.tripped
    per_value = (counts[guard_module.SCALAR_UP_TO] - counts[100]) / (guard_module.SCALAR_UP_TO - 100)
    assert per_value <= 16, counts


@pytest.mark.parametrize("bad, message", [
    (dict(metrics="loss"), r"metrics must be a list of metric names, .* got 'loss'"),
    (dict(metrics=[]), r"metrics must be a list of metric names, .* got \[\]"),
    (dict(metrics=["loss", 3]), r"metrics must be a list of metric names, .* got \['loss', 3\]"),
    (dict(metric=""), r"metric must be a metric name, got ''"),
    (dict(metric="a", metrics=["b"]), r"give metrics or metric, not both"),
])
def test_guard_metrics_are_checked(bad: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        GuardConfig(**bad)
    assert GuardConfig(metrics=["loss_D", "loss_G"]).metrics == ("loss_D", "loss_G")
