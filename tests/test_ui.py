"""The dashboard's data windows and figure builders, as pure functions on a real run store."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from babysit import commands as cmd
from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore
from babysit.ui.data import (MAX_POINTS, epoch_lines, epochs_to_steps, read_view, read_window, steps_to_epochs)
from babysit.ui.figures import SUPERSEDED_COLOUR, ChartOptions, branch_colour, build_figure


def write_series(store: RunStore, name: str, branch: int, steps: np.ndarray, values: np.ndarray,
                 per: str = PER_STEP, segment: int = 0) -> int:
    series = store.series_id(name, branch, per, segment)
    walls = 1_700_000_000.0 + steps.astype(float)
    chunks = [(series, steps[i:i + CHUNK_POINTS], values[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
              for i in range(0, len(steps), CHUNK_POINTS)]
    store.write_chunks(chunks)
    return series


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "run", create=True)


def test_a_short_series_comes_back_raw(store: RunStore) -> None:
    steps = np.arange(1, 1001)
    write_series(store, "loss", 1, steps, steps * 0.5)
    window = read_window(store, store.series()[0])
    assert not window.downsampled and window.raw_count == 1000
    assert window.steps.tolist() == steps.tolist() and window.values.tolist() == (steps * 0.5).tolist()


def test_a_window_is_exact_and_starts_with_the_point_before_it(store: RunStore) -> None:
    write_series(store, "lr", 1, np.array([0, 500, 900]), np.array([0.1, 0.05, 0.02]))
    write_series(store, "loss", 1, np.arange(1, 2001), np.arange(1, 2001, dtype=float))
    lr, loss = store.series()
    window = read_window(store, loss, 700, 800)
    assert window.steps.tolist() == [699] + list(range(700, 801))  # the point before: stepwise series
    lr_window = read_window(store, lr, 600, 800)
    assert lr_window.steps.tolist() == [500] and lr_window.values.tolist() == [0.05]


@pytest.mark.parametrize("n", [20_000, 200_000])
def test_long_series_are_bounded_and_keep_their_spikes(store: RunStore, n: int) -> None:
    rng = np.random.default_rng(0)
    values = rng.random(n)
    spike = n // 3
    values[spike] = 100.0
    write_series(store, "loss", 1, np.arange(1, n + 1), values)
    window = read_window(store, store.series()[0])
    assert window.downsampled and window.raw_count == n
    assert len(window.steps) <= MAX_POINTS
    assert spike + 1 in window.steps.tolist() and window.values.max() == 100.0
    assert len(window.mean_steps) <= MAX_POINTS


def test_a_zoomed_window_of_a_long_series_is_dense(store: RunStore) -> None:
    n = 200_000
    write_series(store, "loss", 1, np.arange(1, n + 1), np.arange(1, n + 1, dtype=float))
    window = read_window(store, store.series()[0], 100_000, 101_000)
    assert not window.downsampled
    assert window.steps[1:].tolist() == list(range(100_000, 101_001))


def test_superseded_pieces_and_branches_get_their_own_traces(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.new_branch(parent=1, from_checkpoint=1, start_step=50, start_epoch=1)
    write_series(store, "loss", 1, np.arange(1, 101), np.ones(100))
    write_series(store, "loss", 1, np.arange(101, 121), np.ones(20) * 2, segment=1)
    write_series(store, "loss", 2, np.arange(51, 151), np.ones(100) * 0.5)
    write_series(store, "val_loss", 2, np.array([100, 150]), np.array([0.4, 0.3]), per=PER_EPOCH)
    view = read_view(store, {"branch": 2, "steps_per_epoch": 50, "step": 150})
    figure = build_figure(view, ChartOptions(smoothing=0.9))
    names = [t["name"] for t in figure["data"]]
    assert names.index("loss · branch 1 · superseded") < names.index("loss · branch 1 (smoothed)") \
        < names.index("loss · branch 2 (smoothed)")  # superseded underneath, current branch on top
    superseded = next(t for t in figure["data"] if t["name"] == "loss · branch 1 · superseded")
    assert superseded["line"]["color"] == SUPERSEDED_COLOUR and superseded["line"]["dash"] == "dot"
    current = next(t for t in figure["data"] if t["name"] == "loss · branch 2 (smoothed)")
    old = next(t for t in figure["data"] if t["name"] == "loss · branch 1 (smoothed)")
    assert current["line"]["color"] == branch_colour(2) != old["line"]["color"]
    assert current["line"]["width"] > old["line"]["width"]
    val = next(t for t in figure["data"] if t["name"] == "val_loss · branch 2")
    assert val["x"] == [100.0, 150.0] and val["mode"] == "lines+markers"


def test_nudges_and_rollbacks_are_marked_with_before_and_after(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.write_status(state="running", pid=1, host="elsewhere", heartbeat=time.time(), branch=1, step=100)
    write_series(store, "loss", 1, np.arange(1, 101), np.ones(100))
    write_series(store, "lr", 1, np.array([0, 40]), np.array([0.1, 0.02]))
    command = store.enqueue_command(cmd.SET_LR, {"value": 0.02}, source="cli")
    store.finish_command(command, cmd.APPLIED, branch=1, step=40, result={"before": 0.1, "after": 0.02})
    figure = build_figure(read_view(store, store.status()), ChartOptions())
    marks = next(t for t in figure["data"] if t["name"] == "lr nudges")
    assert marks["x"] == [40.0] and marks["y"] == [0.02]
    assert marks["text"] == ["lr 0.1 → 0.02 at step 40 (#1, cli)"]
    assert [s["x0"] for s in figure["layout"]["shapes"]] == [40.0]
    lr = next(t for t in figure["data"] if t["name"] == "lr · branch 1")
    assert lr["x"] == [0.0, 40.0, 100.0] and lr["y"] == [0.1, 0.02, 0.02]  # held to the last step
    assert lr["line"]["shape"] == "hv" and figure["layout"]["yaxis3"]["type"] == "log"


def test_x_axis_by_epoch_and_wall_time(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    write_series(store, "loss", 1, np.arange(1, 151), np.ones(150))
    store.add_epoch(1, 1, 100)
    view = read_view(store, {"branch": 1, "steps_per_epoch": 100})
    by_epoch = build_figure(view, ChartOptions(x_axis="epoch", smoothing=0))
    raw = next(t for t in by_epoch["data"] if t["name"] == "loss · branch 1 (raw)")
    assert raw["x"][99] == 1.0 and raw["x"][149] == 1.5
    by_wall = build_figure(view, ChartOptions(x_axis="wall", smoothing=0))
    raw = next(t for t in by_wall["data"] if t["name"] == "loss · branch 1 (raw)")
    assert raw["x"][0] == (1_700_000_000.0 + 1) * 1000 and by_wall["layout"]["xaxis"]["type"] == "date"
    assert by_epoch["layout"]["uirevision"] != by_wall["layout"]["uirevision"]


def test_epoch_lines_follow_a_branch_back_to_its_parent() -> None:
    branches = [{"id": 1, "parent": None, "start_step": 0}, {"id": 2, "parent": 1, "start_step": 200}]
    lines = epoch_lines([(1, 1, 100), (1, 2, 200), (1, 3, 300), (2, 3, 310)], branches)
    assert lines[2] == [(1, 100), (2, 200), (3, 310)]
    assert steps_to_epochs(np.array([50, 255, 310]), lines[2], None).tolist() == [0.5, 2.5, 3.0]
    assert epochs_to_steps(np.array([0.5, 2.5]), lines[2], None).tolist() == [50.0, 255.0]


def test_non_finite_values_become_gaps(store: RunStore) -> None:
    write_series(store, "loss", 1, np.arange(1, 4), np.array([1.0, np.nan, np.inf]))
    figure = build_figure(read_view(store, {}), ChartOptions(smoothing=0))
    raw = next(t for t in figure["data"] if t["name"] == "loss · branch 1 (raw)")
    assert raw["y"] == [1.0, None, None]


def test_chart_options_are_checked() -> None:
    with pytest.raises(ValueError, match="x_axis must be one of step, epoch, wall, got 'time'"):
        ChartOptions(x_axis="time")
    with pytest.raises(ValueError, match="smoothing must be >= 0 and < 1, got 1.0"):
        ChartOptions(smoothing=1.0)
