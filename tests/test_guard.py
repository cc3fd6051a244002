"""The divergence guard: non-finite losses, sustained blow-ups, noise, warm-up, reset, settings."""

from __future__ import annotations

import math
import random

import pytest

from babysit.commands import CommandError
from babysit.guard import Divergence, DivergenceGuard, GuardConfig


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
    assert found.as_dict() == {"step": 4, "value": str(bad), "short_average": found.short_average,
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
    assert divergence.as_dict() == {"step": divergence.step, "value": divergence.value,
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
    with pytest.raises(CommandError, match=rf"^spike_factor must be .*< 10.*, got {factor!r}$"):
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
    assert (config.metric, config.spike_factor, config.warmup_steps, config.enabled, config.auto_remedy_max) == (
        "loss", 3.0, 50, True, 0)


@pytest.mark.parametrize(("raw", "shown"), [(1, "1"), (1.0, "1.0"), (0.5, "0.5"), (-3, "-3"), (math.nan, "nan"),
                                            (math.inf, "inf"), ("big", "'big'"), (True, "True"), (None, "None")])
def test_spike_factor_must_be_above_one(raw, shown):
    with pytest.raises(CommandError, match=rf"^spike_factor must be a finite number > 1 and < 10 \(for example 3\), got {shown}$"):
        GuardConfig(spike_factor=raw)


@pytest.mark.parametrize(("raw", "shown"), [(-1, "-1"), (1.5, "1.5"), ("2", "'2'"), (None, "None")])
def test_auto_remedy_max_must_be_a_whole_number(raw, shown):
    with pytest.raises(CommandError, match=rf"^auto_remedy_max must be a whole number >= 0, got {shown}$"):
        GuardConfig(auto_remedy_max=raw)


@pytest.mark.parametrize(("raw", "shown"), [(-1, "-1"), (2.5, "2.5"), ("10", "'10'"), (None, "None")])
def test_warmup_steps_must_be_a_whole_number(raw, shown):
    with pytest.raises(CommandError, match=rf"^warmup_steps must be a whole number >= 0, got {shown}$"):
        GuardConfig(warmup_steps=raw)


@pytest.mark.parametrize(("raw", "shown"), [(-1, "-1"), (math.nan, "nan"), ("loud", "'loud'")])
def test_noise_gate_must_be_a_number_at_least_zero(raw, shown):
    with pytest.raises(CommandError, match=rf"^noise_gate must be a finite number >= 0 \(for example 6\), got {shown}$"):
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
    with pytest.raises(CommandError, match=rf"^{field} must be .*, got {raw!r}$"):
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
