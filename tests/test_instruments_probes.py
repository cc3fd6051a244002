"""The probe and sweep readings (babysit.instruments.probes / .sweep): pure reads of a run store
written here by hand, and the sweep's analysis over synthetic curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from babysit.instruments import probes as pr
from babysit.instruments.sweep import SWEEP_WARMUP_POINTS, analyse_sweep, read_sweep
from babysit.store import PER_EPOCH, PER_STEP, RunStore


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    created = RunStore(tmp_path / "run", create=True)
    yield created
    created.close()


def _write(store: RunStore, name: str, branch: int, steps: list[int] | np.ndarray, values: list[float] | np.ndarray,
           per: str = PER_STEP) -> None:
    series = store.series_id(name, branch, per)
    steps_a = np.asarray(steps, dtype=np.int64)
    store.write_chunks([(series, steps_a, np.asarray(values, dtype=np.float64), 1000.0 + steps_a.astype(float))])


def _probe_set(store: RunStore, values: list[float], results: list[dict[str, Any]],
               losses: list[list[float]]) -> tuple[int, list[int]]:
    """A main branch forked at step 40 into probe branches with the given per-step losses."""
    main = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    _write(store, "loss", main, range(1, 41), [2.0] * 40)
    excursion = store.add_excursion(kind="probe", command=1, origin_branch=main, origin_step=40, from_checkpoint=3,
                                    return_checkpoint=3, spec={"param": "lr", "steps": len(losses[0])})
    branches = []
    for order, (value, result, loss) in enumerate(zip(values, results, losses)):
        branch = store.new_branch(parent=main, from_checkpoint=3, start_step=40, start_epoch=1, hparams={"lr": value})
        store.add_excursion_branch(excursion=excursion, branch=branch, ord=order, param="lr", value=value,
                                   steps=len(loss))
        _write(store, "lr", branch, [40], [value])
        _write(store, "loss", branch, range(41, 41 + len(loss)), loss)
        store.finish_excursion_branch(branch, end_checkpoint=10 + order, result=result)
        branches.append(branch)
    return excursion, branches


def test_step_metric_is_loss_if_logged_else_the_first_per_step_series(store: RunStore):
    branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    assert pr.step_metric(store, branch) is None
    _write(store, "lr", branch, [0], [0.1])
    assert pr.step_metric(store, branch) is None  # lr is an hparam, never a metric
    _write(store, "nll", branch, [1, 2], [3.0, 2.0])
    _write(store, "acc", branch, [1, 2], [0.1, 0.2])
    assert pr.step_metric(store, branch) == "nll"
    _write(store, "loss", branch, [1, 2], [3.0, 2.0])
    assert pr.step_metric(store, branch) == "loss"
    _write(store, "val_loss", branch, [2], [1.0], per=PER_EPOCH)
    assert pr.step_metric(store, branch) == "loss"


def test_read_probes_gives_each_probe_its_value_steps_ewma_and_results(store: RunStore):
    losses = [[1.0] * 10, [0.5] * 9 + [0.4], [2.0] * 4 + [math.nan]]
    results = [{"steps_done": 10, "evaluation": {"val_loss": 0.9}},
               {"steps_done": 10, "evaluation": {"val_loss": 0.7, "note": "text is left out"}},
               {"steps_done": 5, "diverged": True}]
    excursion, branches = _probe_set(store, [0.05, 0.1, 0.2], results, losses)
    _write(store, "val_acc", branches[1], [50], [0.8], per=PER_EPOCH)
    readings = pr.read_probes(store, excursion)
    assert [(r.branch, r.order, r.param, r.value, r.steps_planned, r.steps_done, r.start_step) for r in readings] == [
        (branches[0], 0, "lr", 0.05, 10, 10, 40), (branches[1], 1, "lr", 0.1, 10, 10, 40),
        (branches[2], 2, "lr", 0.2, 5, 5, 40)]
    assert readings[0].loss_ewma == pytest.approx(1.0)
    # The EWMA of 0.5 ×9 then 0.4, bias-corrected: (Σ 0.9^k·x) / (Σ 0.9^k) over the 10 points.
    weights = 0.9 ** np.arange(10)[::-1]
    assert readings[1].loss_ewma == pytest.approx(float(np.dot(weights, [0.5] * 9 + [0.4]) / weights.sum()))
    assert readings[1].evaluation == {"val_loss": 0.7}
    assert readings[1].epoch_metrics == {"val_acc": 0.8}
    assert [r.diverged for r in readings] == [False, False, True]
    assert [r.end_checkpoint for r in readings] == [10, 11, 12]
    assert pr.winner(readings).branch == branches[1]


def test_a_probe_still_running_reads_its_steps_from_its_curve(store: RunStore):
    excursion, branches = _probe_set(store, [0.1], [{}], [[1.0, 0.9, 0.8]])
    store.finish_excursion_branch(branches[0], end_checkpoint=None, result={})  # not finished: no result yet
    (reading,) = pr.read_probes(store, excursion)
    assert (reading.steps_done, reading.diverged, reading.evaluation, reading.end_checkpoint) == (3, False, {}, None)


def test_a_non_finite_last_loss_reads_as_diverged_even_without_the_flag(store: RunStore):
    excursion, _ = _probe_set(store, [1.0], [{"steps_done": 2}], [[1.0, math.inf]])
    (reading,) = pr.read_probes(store, excursion)
    assert reading.diverged


def _reading(order: int, loss: float | None, evaluation: dict[str, float] | None = None,
             diverged: bool = False) -> pr.ProbeReading:
    return pr.ProbeReading(branch=order + 2, order=order, param="lr", value=0.1 * (order + 1), steps_planned=10,
                           steps_done=10, start_step=0, loss_ewma=loss, diverged=diverged,
                           evaluation=evaluation or {})


def test_the_winner_is_the_lowest_evaluation_when_all_have_it_else_the_lowest_loss():
    by_eval = [_reading(0, 0.1, {"val_loss": 0.9}), _reading(1, 0.5, {"val_loss": 0.3})]
    assert pr.winner(by_eval).order == 1
    missing_one = [_reading(0, 0.1, {"val_loss": 0.9}), _reading(1, 0.5)]
    assert pr.winner(missing_one).order == 0
    # A "loss" number ranks before another one they all have.
    two_keys = [_reading(0, 0.1, {"err": 0.1, "val_loss": 0.9}), _reading(1, 0.5, {"err": 0.5, "val_loss": 0.2})]
    assert pr.winner(two_keys).order == 1


def test_the_winner_is_never_a_diverged_probe_and_may_be_none():
    assert pr.winner([_reading(0, 0.01, diverged=True), _reading(1, 0.5)]).order == 1
    assert pr.winner([_reading(0, 0.01, {"val_loss": 0.0}, diverged=True), _reading(1, 0.5, {"val_loss": 1.0})]).order == 1
    assert pr.winner([_reading(0, 0.01, diverged=True)]) is None
    assert pr.winner([_reading(0, None)]) is None
    assert pr.winner([]) is None


def test_an_unknown_excursion_reads_as_no_probes(store: RunStore):
    assert pr.read_probes(store, 99) == []
    assert pr.origin_evaluation(store, 99) == {}
    assert read_sweep(store, 99) is None


# -- the sweep ---------------------------------------------------------------------------------------
def _range_test(lrs: np.ndarray, centre: float = 1e-2, blow_up: float = 1.0, seed: int = 0) -> np.ndarray:
    """A synthetic range test: flat, a sigmoid descent in log-lr centred on ``centre``, then an
    explosion from ``blow_up``; a little noise."""
    x = np.log10(lrs)
    descent = 2.0 - 1.5 / (1 + np.exp(-(x - np.log10(centre)) * 4))
    explosion = np.where(lrs > blow_up, np.exp(6 * (x - np.log10(blow_up))) - 1, 0.0)
    return descent + explosion + np.random.default_rng(seed).normal(0, 0.01, len(lrs))


def test_the_sweep_marks_the_steepest_descent_the_minimum_and_the_divergence():
    lrs = 1e-4 * (1e6) ** (np.arange(200) / 199)
    reading = analyse_sweep(lrs, _range_test(lrs))
    # The EWMA lags by about 1/(1-β) = 10 steps, a quarter of a decade here: near 1e-2, above it.
    assert 1e-2 <= reading.steepest_lr <= 1e-2 * 10 ** 0.5
    assert reading.suggested_lr == reading.steepest_lr
    assert 0.3 < reading.min_loss_lr < 3.0
    assert reading.divergence_lr > reading.min_loss_lr
    first = int(np.flatnonzero(lrs == reading.divergence_lr)[0])
    after_warmup = reading.smoothed[SWEEP_WARMUP_POINTS:first]  # the minimum counts after the warm-up
    assert reading.smoothed[first] > 4 * np.min(after_warmup)
    assert reading.smoothed[first - 1] <= 4 * np.min(after_warmup)


def test_a_noisy_low_loss_late_in_training_is_no_divergence_until_it_blows_up():
    """Late in a run the loss is near 0.05 and its batches range over ×20: a lucky first batch or
    two must not make the next ordinary ones a "divergence" (the sweep would stop after 5 steps)."""
    steps = 150
    lrs = 5e-5 * (1e5) ** (np.arange(steps) / (steps - 1))
    losses = 0.05 * np.random.default_rng(3).lognormal(0.0, 1.0, steps)
    losses[:2] = 0.004                                    # two lucky batches first
    losses[120:] *= np.exp(np.arange(steps - 120) / 3.0)  # the real blow-up
    reading = analyse_sweep(lrs, losses)
    assert reading.divergence_lr is not None and reading.divergence_lr >= lrs[120]
    assert reading.min_loss_lr is not None and reading.min_loss_lr < lrs[120]


def test_a_non_finite_loss_is_the_divergence_point():
    lrs = np.geomspace(1e-3, 1.0, 50)
    losses = np.linspace(2.0, 1.0, 50)
    losses[30] = math.nan
    reading = analyse_sweep(lrs, losses)
    assert reading.divergence_lr == pytest.approx(lrs[30])
    assert reading.min_loss_lr == pytest.approx(lrs[29])


def test_a_loss_that_never_falls_suggests_nothing():
    lrs = np.geomspace(1e-3, 1.0, 50)
    reading = analyse_sweep(lrs, np.linspace(1.0, 3.0, 50))
    assert (reading.steepest_lr, reading.suggested_lr, reading.divergence_lr) == (None, None, None)
    # The lowest point is looked for after the warm-up (its first points are a batch or two's luck).
    assert reading.min_loss_lr == pytest.approx(lrs[SWEEP_WARMUP_POINTS])
    empty = analyse_sweep(np.empty(0), np.empty(0))
    assert (empty.steepest_lr, empty.divergence_lr, empty.min_loss_lr, empty.suggested_lr) == (None,) * 4
    nan_first = analyse_sweep(lrs, np.full(50, math.nan))
    assert (nan_first.divergence_lr, nan_first.suggested_lr) == (pytest.approx(1e-3), None)


def test_read_sweep_pairs_each_step_loss_with_the_lr_that_trained_it(store: RunStore):
    main = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    excursion = store.add_excursion(kind="sweep", command=1, origin_branch=main, origin_step=20, from_checkpoint=None,
                                    return_checkpoint=4, spec={"steps": 40, "lr_min": 1e-4, "lr_max": 1e2})
    branch = store.new_branch(parent=main, from_checkpoint=4, start_step=20, start_epoch=1)
    store.add_excursion_branch(excursion=excursion, branch=branch, ord=0, param="lr", value=1e-4, steps=40)
    lrs = 1e-4 * (1e6) ** (np.arange(40) / 39)
    # The branch starts with the run's own lr (logged at its start), then lr_i is set after step 20 + i.
    _write(store, "lr", branch, [20] + list(range(20, 60)), [0.1] + list(lrs))
    losses = _range_test(lrs)
    _write(store, "loss", branch, range(21, 61), losses)
    _write(store, "loss", main, range(1, 21), [9.0] * 20)  # the main line's loss is not the sweep's
    reading = read_sweep(store, excursion)
    np.testing.assert_allclose(reading.lrs, lrs)
    np.testing.assert_allclose(reading.losses, losses)
    assert reading.suggested_lr is not None and reading.suggested_lr == analyse_sweep(lrs, losses).suggested_lr


def test_a_noisy_first_step_is_not_taken_for_the_steepest_descent():
    lrs = 1e-4 * (1e6) ** (np.arange(200) / 199)
    losses = _range_test(lrs)
    losses[0] = 6.0  # one loud step at the start: the bias-corrected average falls fast right after it
    reading = analyse_sweep(lrs, losses)
    assert 1e-2 <= reading.steepest_lr <= 1e-2 * 10 ** 0.5


def test_a_lucky_first_batch_is_neither_the_lowest_loss_nor_the_suggestion():
    """A sweep late in a run: its first batch or two are low by luck, then the loss sits higher and
    falls with the lr, as a real digits sweep did; the suggestion is on that descent."""
    steps = 150
    lrs = 5e-5 * (1e4) ** (np.arange(steps) / (steps - 1))
    x = np.log10(lrs)
    descent = 0.45 - 0.25 / (1 + np.exp(-(x + 2.0) * 4))            # from 0.45 to 0.2, centred on lr 1e-2
    losses = descent * np.random.default_rng(5).lognormal(0.0, 0.3, steps)
    losses[:2] = 0.05
    losses[130:] *= np.exp(np.arange(steps - 130) / 2.0)
    reading = analyse_sweep(lrs, losses)
    assert reading.min_loss_lr > lrs[SWEEP_WARMUP_POINTS]
    assert 1e-3 < reading.suggested_lr < 1e-1
