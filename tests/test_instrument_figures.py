"""The instruments' figure builders (babysit/ui/instrument_figures.py): the branches aligned at
their fork and the lr sweep, as pure functions on a real run store, without Streamlit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from babysit.instruments.compare import compare_branches
from babysit.instruments.sweep import analyse_sweep
from babysit.ui.instrument_figures import (aligned_frame, branch_label, build_aligned_figure, build_sweep_figure,
                                           sweep_frame)
from tests.test_instruments_compare import build


@pytest.fixture
def store(tmp_path: Path):
    return build(tmp_path / "run")


def test_branches_are_drawn_from_their_fork_at_zero(store) -> None:
    rows = compare_branches(store, [1, 2, 3, 4]).rows
    frame = aligned_frame(store, rows, "loss")
    spans = frame.groupby("branch")["since_fork"].agg(["min", "max", "count"])
    assert spans.loc[1].tolist() == [1, 500, 500]
    assert spans.loc[2].tolist() == [1, 300, 300]  # branch 2 forked at step 200: its step 201 is +1
    assert spans.loc[3].tolist() == [1, 60, 60]
    first = frame[frame["since_fork"] == 1].set_index("branch")["value"]
    assert first[2] == pytest.approx(1.0 * math.exp(-1 / 100) + 0.4)  # the branch's own step 201, not the parent's
    assert first[4] == pytest.approx(0.9 - 0.004)
    assert set(frame[frame["branch"] == 3]["label"]) == {"branch 3 · probe #1 · lr 0.1 → 0.05"}
    # Up to a span since the fork, and a bounded number of points however long the branch.
    short = aligned_frame(store, rows, "loss", span=50, max_points=20)
    assert short["since_fork"].max() == 50 and (short.groupby("branch").size() <= 50).all()
    assert aligned_frame(store, rows, "no_such_metric").empty


def test_the_aligned_figure_has_a_raw_and_a_smoothed_line_per_branch(store) -> None:
    rows = compare_branches(store, [3, 4]).rows
    figure = build_aligned_figure(aligned_frame(store, rows, "loss"), highlight=4)
    json.dumps(figure)  # JSON-ready, as the chart component sends it
    smoothed = [t for t in figure["data"] if not t["meta"]["raw"]]
    raw = [t for t in figure["data"] if t["meta"]["raw"]]
    assert [t["meta"]["branch"] for t in smoothed] == [3, 4] and len(raw) == 2
    assert smoothed[0]["line"]["color"] != smoothed[1]["line"]["color"]
    assert smoothed[1]["name"].endswith("· winner") and smoothed[1]["line"]["width"] > smoothed[0]["line"]["width"]
    assert smoothed[0]["x"][0] == 1 and smoothed[0]["x"][-1] == 60
    # The EWMA of the raw points: it starts at the first point (bias-corrected) and lags a falling line.
    assert smoothed[0]["y"][0] == pytest.approx(raw[0]["y"][0])
    assert raw[0]["y"][-1] < smoothed[0]["y"][-1] < raw[0]["y"][0]
    assert figure["layout"]["xaxis"]["title"]["text"] == "steps since the fork"
    unsmoothed = build_aligned_figure(aligned_frame(store, rows, "loss"), smoothing=0)["data"]
    assert [(t["meta"]["raw"], t["showlegend"], t["y"]) for t in unsmoothed] == [(True, True, t["y"]) for t in raw]


def test_labels_say_what_changed_and_where_from(store) -> None:
    by = {r.branch: r for r in compare_branches(store).rows}
    assert branch_label(by[1]) == "branch 1"
    assert branch_label(by[2]) == "branch 2 · from #2 · lr 0.1 → 0.05"
    assert branch_label(by[5]) == "branch 5 · sweep #2 · lr 0.1 → 0.001"


def test_the_sweep_is_drawn_on_a_log_lr_axis_with_its_points_marked() -> None:
    lrs = np.geomspace(1e-4, 10, 120)
    log_lr = np.log10(lrs)
    losses = 2.0 - 1.5 / (1 + np.exp(-(log_lr + 2) * 3)) + np.where(log_lr > 0, 10 ** (2 * log_lr) - 1, 0)
    reading = analyse_sweep(lrs, losses)
    assert reading.steepest_lr is not None and reading.divergence_lr is not None
    figure = build_sweep_figure(sweep_frame(reading), reading)
    json.dumps(figure)
    assert figure["layout"]["xaxis"]["type"] == "log"
    ticks = figure["layout"]["xaxis"]["ticktext"]
    assert ticks == ["1e-4", "1e-3", "0.01", "0.1", "1", "10"]  # decades, read as the lr panel reads them
    marks = {t["meta"]["sweep"]: t for t in figure["data"]}
    assert set(marks) == {"raw", "smoothed", "steepest_lr", "divergence_lr", "suggested_lr"}
    assert marks["suggested_lr"]["x"] == [reading.suggested_lr]
    assert marks["steepest_lr"]["name"] == f"steepest descent: lr {reading.steepest_lr:.3g}"
    assert sorted(s["x0"] for s in figure["layout"]["shapes"]) == sorted(
        [reading.steepest_lr, reading.divergence_lr, reading.suggested_lr])
    # The diverged tail does not squash the descent: the y range shows the start of the sweep and
    # stops near 4× the lowest loss, far below the blow-up.
    low, high = figure["layout"]["yaxis"]["range"]
    smoothed = reading.smoothed
    assert low < float(smoothed.min()) and float(smoothed[0]) < high < 1.1 * 4 * float(smoothed.min())
    assert high < float(smoothed.max()) / 5


def test_a_sweep_that_never_fell_marks_nothing_it_did_not_see() -> None:
    reading = analyse_sweep(np.geomspace(1e-3, 1, 30), np.linspace(1.0, 1.2, 30))
    figure = build_sweep_figure(sweep_frame(reading), reading)
    assert reading.suggested_lr is None
    assert {t["meta"]["sweep"] for t in figure["data"]} == {"raw", "smoothed"}
    assert figure["layout"]["shapes"] == []
    empty = analyse_sweep(np.empty(0), np.empty(0))
    assert build_sweep_figure(sweep_frame(empty), empty)["data"][0]["x"] == []


def test_the_main_curve_leaves_the_excursion_branches_to_their_panel(store) -> None:
    from babysit.instruments.compare import excursion_side_branches
    from babysit.ui.data import read_view

    drawn = read_view(store, store.status()).drawn_branches()
    assert drawn == {1, 2, 3, 4, 5}
    hidden = read_view(store, store.status(), hidden_branches=excursion_side_branches(store))
    assert hidden.drawn_branches() == {1, 2}
    assert hidden.extent == (0, 500)  # the sweep's steps past 500 do not stretch the axis
