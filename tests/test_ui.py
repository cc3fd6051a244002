"""The dashboard's data windows and figure builders, as pure functions on a real run store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from babysit import commands as cmd
from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore
from babysit.ui.data import (ABANDONED, FULL, LIVE, MAX_FULL_BRANCHES, MAX_POINTS, RAW_CHUNK_BUDGET, RefreshLimits,
                             SummaryCache, aligned_minmax, epoch_lines, epochs_to_steps, read_view, read_window,
                             steps_to_epochs, throughput)
from babysit.ui.figure_delta import apply_delta, common_prefix, figure_delta
from babysit.ui.figures import (ChartOptions, branch_dash, build_figure, lr_ticks, metric_colour, momentum_range,
                                robust_range)
from tests import many_rollbacks


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


def test_the_live_line_is_one_curve_and_what_it_left_is_one_faint_legend_entry(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.new_branch(parent=1, from_checkpoint=1, start_step=50, start_epoch=1)
    write_series(store, "loss", 1, np.arange(1, 101), np.ones(100))
    write_series(store, "loss", 1, np.arange(31, 46), np.ones(15) * 2, segment=1)  # a crash, before the fork
    write_series(store, "loss", 2, np.arange(51, 151), np.ones(100) * 0.5)
    write_series(store, "val_loss", 2, np.array([100, 150]), np.array([0.4, 0.3]), per=PER_EPOCH)
    view = read_view(store, {"branch": 2, "steps_per_epoch": 50, "step": 150})
    live = next(w for w in view.windows if w.name == "loss" and w.role == LIVE)
    # Branch 1 up to the step branch 2 forked at, then branch 2: one curve, in step order.
    assert live.steps.tolist() == list(range(1, 151)) and live.pieces == ((1, 0), (2, 50))
    assert live.values.tolist() == [1.0] * 50 + [0.5] * 100
    figure = build_figure(view, ChartOptions(smoothing=0.9))
    names = [t["name"] for t in figure["data"]]
    assert names[:5] == ["1 abandoned branch", "superseded by a crash", "loss (raw)", "loss", "val_loss"]
    abandoned, superseded, _, loss, val = figure["data"][:5]
    # What branch 1 did after the fork is drawn faint, its branch named on each point for a click.
    assert [x for x in abandoned["x"] if x is not None] == [float(x) for x in range(51, 101)]
    assert set(abandoned["customdata"]) == {1} and abandoned["meta"]["role"] == ABANDONED
    # One colour per metric; superseded points dotted and faint, not hidden.
    assert superseded["line"]["color"] == loss["line"]["color"] == metric_colour("loss") != val["line"]["color"]
    assert superseded["line"]["dash"] == "dot" and abandoned["opacity"] <= superseded["opacity"] < loss["opacity"]
    assert loss["meta"]["pieces"] == [[1, 0], [2, 50]] and loss["x"][0] < 50 < loss["x"][-1]
    assert all(t["type"] == "scatter" for t in figure["data"])  # SVG: the chart's plotly.js has no WebGL
    assert val["x"] == [100.0, 150.0] and val["mode"] == "lines+markers"


def test_fifty_rollbacks_draw_a_figure_of_bounded_size(tmp_path: Path) -> None:
    store = many_rollbacks.build(tmp_path / "run", rollbacks=50)
    status = store.status()
    view = read_view(store, status)
    assert view.line is not None and view.line.branches[-1] == status["branch"] and len(view.line.branches) > 10
    live = next(w for w in view.windows if w.name == "loss" and w.role == LIVE)
    assert [b for b, _ in live.pieces] == list(view.line.branches)  # the whole line, oldest first
    figure = build_figure(view, ChartOptions())
    traces = figure["data"]
    legend = [t["name"] for t in traces if t.get("showlegend", True)]
    assert len(traces) <= 12 and legend == ["50 abandoned branches", "loss", "val_loss", "val_acc", "rollbacks"]
    assert sum(len(t["x"]) for t in traces) <= 20_000
    rollbacks = next(t for t in traces if t["name"] == "rollbacks")
    assert len(rollbacks["x"]) == 50 and len(figure["layout"]["shapes"]) == 5  # every marker, five lines
    # Branches in full on demand: each with its own dash and one legend entry; no longer a sketch.
    shown = build_figure(read_view(store, status, full_branches=[3, 5, 999]), ChartOptions())
    full = [t for t in shown["data"] if t["meta"].get("role") == FULL]
    assert {t["meta"]["branch"] for t in full} == {3, 5}  # 999 is no branch of this run
    assert [t["name"] for t in full if t["showlegend"]] == ["branch 3", "branch 5"]
    drawn = {t["line"]["dash"] for t in full if t["meta"]["branch"] == 3 and "raw ·" not in t["hovertemplate"]}
    assert drawn == {branch_dash(3)} != {"solid"}
    sketched = next(t for t in shown["data"] if t["meta"].get("role") == ABANDONED)
    assert {3, 5}.isdisjoint(sketched["customdata"]) and sketched["name"] == "48 abandoned branches"
    assert len(read_view(store, status, full_branches=range(1, 20)).full) == MAX_FULL_BRANCHES


def _statements(store: RunStore, read: Callable[[], Any]) -> int:
    """How many SQL statements ``read()`` runs on the store's connection."""
    seen: list[str] = []
    store.conn().set_trace_callback(seen.append)
    try:
        read()
    finally:
        store.conn().set_trace_callback(None)
    return len(seen)


def test_a_refresh_reads_the_store_a_fixed_number_of_times_however_many_branches(tmp_path: Path) -> None:
    """One query for the summaries of every series drawn, one for their raw points: not one (or
    more) per series, which made a refresh at fifty branches cost a hundred."""
    many = many_rollbacks.build(tmp_path / "many", rollbacks=50)
    one = many_rollbacks.build(tmp_path / "one", rollbacks=0)
    counts = {}
    for name, store in (("one", one), ("many", many)):
        status = store.status()
        read_view(store, status)  # the first refresh of a run reads every summary once
        counts[name] = _statements(store, lambda s=store, st=status: build_figure(read_view(s, st)))
    assert counts["many"] <= counts["one"] + 1, counts
    assert len(many.series()) == 51 * 5


def test_the_y_range_fits_the_live_curve_not_a_blow_up(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.new_branch(parent=1, from_checkpoint=1, start_step=500, start_epoch=1)
    steps = np.arange(1, 1001)
    descent = 2.3 * np.exp(-steps / 300.0) + 0.1
    blown = descent.copy()
    blown[700:] = 1e6  # branch 1 blew up after the fork; the rollback left it
    write_series(store, "loss", 1, steps, blown)
    live = descent[500:].copy()
    live[[100, 200, 300]] = [4e5, 6e5, 8e5]  # three spikes on the live line itself
    write_series(store, "loss", 2, steps[500:], live)
    figure = build_figure(read_view(store, {"branch": 2, "step": 1000}), ChartOptions())
    fit = figure["layout"]["meta"]["fit"]["yaxis"]
    low, high = fit["linear"]
    # The whole descent (from 2.4 at step 1) is in; the spikes and branch 1's blow-up are not.
    assert low < 0.1 + 2.3 * np.exp(-1000 / 300) and 2.3 < high < 3.0
    assert 0 < 10 ** fit["log"][1] < 3.0 and figure["layout"]["yaxis"]["range"] == fit["linear"]
    clipped = next(t for t in figure["data"] if t["meta"].get("clip") == "linear")
    assert clipped["x"] == [601.0, 701.0, 801.0] and clipped["y"] == [high] * 3
    assert clipped["text"][2] == "loss 8e+05 at step 801"
    notes = {a["name"]: a for a in figure["layout"]["annotations"]}
    assert notes["babysit-clip-linear-yaxis"]["text"] == "3 points off the scale (up to 1e+06) · show all"
    assert notes["babysit-clip-linear-yaxis"]["captureevents"] is True  # a click on it shows all
    assert notes["babysit-fit-yaxis"]["visible"] is False
    # The log scale fits the same way (in decades), with its own markers.
    log = build_figure(read_view(store, {"branch": 2, "step": 1000}), ChartOptions(log_loss=True))
    assert log["layout"]["yaxis"]["type"] == "log" and log["layout"]["yaxis"]["range"] == fit["log"]
    assert next(t for t in log["data"] if t["meta"].get("clip") == "log")["x"] == [601.0, 701.0, 801.0]


def test_robust_range_keeps_the_descent_and_leaves_out_what_is_orders_away() -> None:
    x = np.arange(1000.0)
    curve = 2.3 * np.exp(-x / 200) + 0.1
    span = curve.max() - curve.min()
    assert robust_range(curve) == pytest.approx((curve.min() - 0.05 * span, curve.max() + 0.05 * span))
    spiked = np.r_[curve, [1e6, np.nan, np.inf]]
    assert robust_range(spiked) == robust_range(curve)
    lo, hi = robust_range(spiked, log=True)
    assert lo < 0.1 < 2.4 < hi < 4
    assert robust_range(np.array([np.nan])) is None and robust_range(np.array([-1.0]), log=True) is None
    assert robust_range(np.array([0.5, 0.5])) == pytest.approx((0.475, 0.525))


def test_metrics_of_very_different_scales_get_their_own_axis(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    steps = np.arange(1, 201)
    write_series(store, "grad_norm", 1, steps, 1.0 + 0.2 * np.sin(steps / 10))
    write_series(store, "tokens_per_s", 1, steps, 50_000 + 500 * np.cos(steps / 7))
    figure = build_figure(read_view(store, {"branch": 1}), ChartOptions(smoothing=0))
    by_name = {t["name"]: t for t in figure["data"]}
    assert by_name["grad_norm (raw)"]["yaxis"] == "y2" and by_name["tokens_per_s (raw)"]["yaxis"] == "y5"
    layout = figure["layout"]
    assert layout["yaxis5"]["overlaying"] == "y2" and layout["yaxis5"]["side"] == "right"
    assert layout["yaxis2"]["title"]["text"] == "grad_norm" and layout["yaxis5"]["title"]["text"] == "tokens_per_s"
    low, high = layout["meta"]["fit"]["yaxis2"]["linear"]
    assert 0.7 < low < 0.8 and 1.2 < high < 1.3  # grad_norm is a curve, not a flat line at 0
    # A third scale: each is drawn normalised, its range in its name, its own numbers on hover.
    write_series(store, "lr_ratio", 1, steps, 1e-5 * (1 + 0.5 * np.sin(steps / 5)))
    figure = build_figure(read_view(store, {"branch": 1}), ChartOptions(smoothing=0))
    names = sorted(t["name"] for t in figure["data"] if t["yaxis"] == "y2")
    assert [n.split(" (")[0] for n in names] == ["grad_norm", "lr_ratio", "tokens_per_s"]
    tokens = next(t for t in figure["data"] if t["name"].startswith("tokens_per_s"))
    assert tokens["name"].startswith("tokens_per_s (4.95e+04–5.05e+04") and -0.1 < min(tokens["y"]) < max(tokens["y"]) < 1.1
    assert tokens["text"][0] == f"{50_000 + 500 * np.cos(1 / 7):.4g}" and "%{text}" in tokens["hovertemplate"]
    assert figure["layout"]["yaxis2"]["title"]["text"] == "metrics (0–1 of each)"


def test_a_damaged_line_of_descent_is_said_and_the_rest_drawn(store: RunStore) -> None:
    """Branches 1 and 2 name each other as parents (a forged run.db): the line ends where the
    cycle begins, the run still draws, and the chart says what is wrong."""
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.new_branch(parent=1, from_checkpoint=None, start_step=50, start_epoch=1)
    store.conn().execute("UPDATE branches SET parent = 2 WHERE id = 1")
    write_series(store, "loss", 1, np.arange(1, 101), np.ones(100))
    write_series(store, "loss", 2, np.arange(51, 151), np.ones(100) * 0.5)
    for epoch in range(1, 4):
        store.add_epoch(1, epoch, 25 * epoch)
        store.add_epoch(2, epoch + 2, 50 + 25 * epoch)
    view = read_view(store, {"branch": 2, "step": 150})
    assert view.notes == ["Damaged run: branches 1 and 2 name each other as parents. The chart draws branch 2's "
                          "line of descent up to there."]
    live = next(w for w in view.windows if w.name == "loss")
    assert live.pieces == ((1, 0), (2, 50)) and len(live.steps) == 150
    figure = build_figure(view, ChartOptions(x_axis="epoch"))
    assert "name each other as parents" in next(a["text"] for a in figure["layout"]["annotations"]
                                                if a["name"] == "babysit-notes")
    assert epoch_lines(store.epochs(), store.branches())[2] == [(1, 25), (2, 50), (3, 75), (4, 100), (5, 125)]


def test_a_refresh_is_bounded_and_one_past_its_time_is_cut_short(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    for name in ("loss", "val_loss", "grad_norm", "lr"):
        write_series(store, name, 1, np.arange(1, 11), np.ones(10))
    capped = read_view(store, {"branch": 1}, limits=RefreshLimits(series=3, metrics=2))
    assert "This run has more than 3 series; the chart reads the newest 3." in capped.notes
    assert "This run logs 3 metrics; the chart draws 2 of them." in capped.notes
    assert sorted(w.name for w in capped.windows) == ["lr", "val_loss"]  # the newest 3 read; losses, then lr, first
    few = read_view(store, {"branch": 1}, limits=RefreshLimits(summary_rows=2))
    assert "This run has more than 2 chunks to draw; the chart draws the first 2 of them." in few.notes
    assert len(few.windows) == 2
    late = read_view(store, {"branch": 1}, limits=RefreshLimits(seconds=0.0))
    assert late.notes == ["This refresh was cut short after 0 s (the run's database is too large or too slow to read "
                          "in time); the chart shows what was read by then."]
    assert late.windows == []


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
    lr = next(t for t in figure["data"] if t["name"] == "lr")
    assert lr["x"] == [0.0, 40.0, 100.0] and lr["y"] == [0.1, 0.02, 0.02]  # held to the last step
    assert lr["line"]["shape"] == "hv" and figure["layout"]["yaxis3"]["type"] == "log"


def test_a_nudge_is_marked_once_applied_though_its_row_was_read_while_pending(store: RunStore) -> None:
    """Marker rows are read a little at a time; a command read while pending is read again."""
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    store.write_status(state="running", pid=1, host="elsewhere", heartbeat=time.time(), branch=1, step=100)
    write_series(store, "loss", 1, np.arange(1, 101), np.ones(100))
    command = store.enqueue_command(cmd.SET_LR, {"value": 0.02}, source="cli")
    assert read_view(store, store.status()).markers == []
    store.finish_command(command, cmd.APPLIED, branch=1, step=40, result={"before": 0.1, "after": 0.02})
    store.add_event("divergence", "divergence: loss became nan at step 90", branch=1, step=90)
    assert [(m.kind, m.step) for m in read_view(store, store.status()).markers] == [("lr", 40), ("divergence", 90)]


def test_x_axis_by_epoch_and_wall_time(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    write_series(store, "loss", 1, np.arange(1, 151), np.ones(150))
    store.add_epoch(1, 1, 100)
    view = read_view(store, {"branch": 1, "steps_per_epoch": 100})
    by_epoch = build_figure(view, ChartOptions(x_axis="epoch", smoothing=0))
    raw = next(t for t in by_epoch["data"] if t["name"] == "loss (raw)")
    assert raw["x"][99] == 1.0 and raw["x"][149] == 1.5
    by_wall = build_figure(view, ChartOptions(x_axis="wall", smoothing=0))
    raw = next(t for t in by_wall["data"] if t["name"] == "loss (raw)")
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
    raw = next(t for t in figure["data"] if t["name"] == "loss (raw)")
    assert raw["y"] == [1.0, None, None]


def test_chart_options_are_checked() -> None:
    with pytest.raises(ValueError, match="x_axis must be one of step, epoch, wall, got 'time'"):
        ChartOptions(x_axis="time")
    with pytest.raises(ValueError, match="smoothing must be >= 0 and < 1, got 1.0"):
        ChartOptions(smoothing=1.0)


def test_lr_ticks_are_one_and_three_of_each_decade() -> None:
    values, texts, (lo, hi) = lr_ticks([0.025, 0.0125, 0.05])
    assert texts == ["0.01", "0.03", "0.1"] and values == [0.01, 0.03, 0.1]
    assert lo < np.log10(0.0125) and hi > np.log10(0.05)
    _, texts, _ = lr_ticks([2e-4, 5e-3])
    assert texts == ["1e-4", "3e-4", "1e-3", "3e-3", "0.01"]
    _, texts, _ = lr_ticks([1e-6, 20.0])  # seven decades: decades alone, still readable
    assert texts == ["1e-6", "1e-5", "1e-4", "1e-3", "0.01", "0.1", "1", "10"]
    assert lr_ticks([]) is None


def test_the_momentum_axis_fits_beta() -> None:
    assert momentum_range([0.9]) == pytest.approx([0.88, 0.92])
    assert momentum_range([0.5, 0.99]) == pytest.approx([0.5 - 0.0735, 1.0])  # never above 1
    assert momentum_range([0.0, 0.01])[0] == 0.0


def _lifecycle_store(store: RunStore) -> RunStore:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    write_series(store, "loss", 1, np.arange(1, 301), np.linspace(2.0, 0.5, 300))
    write_series(store, "lr", 1, np.array([0, 120]), np.array([0.1, 0.05]))
    write_series(store, "momentum", 1, np.array([0, 120]), np.array([0.9, 0.95]))
    store.add_event("start", "run started", branch=1, step=0)
    store.add_event("stopped", "stopped at step 100 with a final checkpoint", branch=1, step=100)
    store.add_event("resume", "resumed from checkpoint #1 after a clean stop", branch=1, step=100)
    store.add_event("hparams", "set by the scheduler", branch=1, step=120,
                    data={"before": {"lr": 0.1, "momentum": 0.9}, "after": {"lr": 0.05, "momentum": 0.95},
                          "by": "scheduler"})
    store.add_event("resume", "resumed from checkpoint #2 after the trainer died", branch=1, step=200)
    store.add_event("error", "RuntimeError: boom", branch=1, step=250)
    store.add_event("resume", "resumed from checkpoint #3 after the trainer died", branch=1, step=240)
    store.add_event("divergence", "divergence: loss became nan at step 290; run paused", branch=1, step=290)
    return store


def test_stops_crashes_restarts_and_changes_no_command_made_are_marked(store: RunStore) -> None:
    _lifecycle_store(store)
    figure = build_figure(read_view(store, {"branch": 1, "step": 300}), ChartOptions(smoothing=0))
    marks = {t["meta"]["markers"]: t for t in figure["data"] if "markers" in t.get("meta", {})}
    assert marks["stop"]["x"] == [100.0] and marks["restart"]["x"] == [100.0, 240.0]  # after a stop, after an error
    assert marks["crash"]["x"] == [200.0, 250.0]  # died without a word (seen at its restart), and an error
    assert marks["crash"]["text"][0].startswith("the trainer died; resumed from checkpoint #2")
    assert marks["divergence"]["x"] == [290.0]
    assert marks["stop"]["yaxis"] == "y" and marks["stop"]["y"] == [pytest.approx(2.0 - 1.5 * 100 / 299, abs=0.01)]
    assert marks["auto_lr"]["x"] == [120.0] and marks["auto_lr"]["y"] == [0.05] and marks["auto_lr"]["yaxis"] == "y3"
    assert marks["auto_lr"]["text"] == ["lr 0.1 → 0.05 at step 120 (by scheduler, no command)"]
    assert marks["auto_momentum"]["text"] == ["momentum 0.9 → 0.95 at step 120 (by scheduler, no command)"]
    assert marks["auto_lr"]["marker"]["symbol"] != "triangle-up"  # not drawn like a person's nudge
    assert len({t["marker"]["symbol"] for k, t in marks.items() if k != "auto_momentum"}) == 5  # one per kind
    # A scheduler stepping every epoch would fill the chart with lines: its changes get markers only,
    # and only the newest five of the others get one (the stop at step 100 is the oldest).
    assert sorted(s["x0"] for s in figure["layout"]["shapes"]) == [100.0, 200.0, 240.0, 250.0, 290.0]


def test_a_run_without_events_or_hparams_changes_has_no_such_markers(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    write_series(store, "loss", 1, np.arange(1, 11), np.ones(10))
    figure = build_figure(read_view(store, {"branch": 1}), ChartOptions())
    assert [t for t in figure["data"] if "markers" in t.get("meta", {})] == []
    # Panels with nothing to draw give their height to the loss.
    assert figure["layout"]["yaxis"]["domain"] == [0.0, 1.0] and figure["layout"]["xaxis"]["anchor"] == "y"
    assert figure["layout"]["yaxis3"]["visible"] is False


def test_exp_of_a_loss_is_its_perplexity_in_the_metrics_panel(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    write_series(store, "loss", 1, np.arange(1, 4), np.array([1.0, 2.0, 1000.0]))
    write_series(store, "val_loss", 1, np.array([3]), np.array([np.log(42.0)]), per=PER_EPOCH)
    figure = build_figure(read_view(store, {"branch": 1}), ChartOptions(smoothing=0, exp_of=("val_loss",)))
    by_name = {t["name"]: t for t in figure["data"]}
    assert by_name["exp(val_loss)"]["y"] == [pytest.approx(42.0)]
    assert by_name["exp(val_loss)"]["yaxis"] == "y2"
    assert by_name["loss (raw)"]["y"] == [1.0, 2.0, 1000.0]  # the others stay as they are
    overflow = build_figure(read_view(store, {"branch": 1}), ChartOptions(smoothing=0, exp_of=("loss",)))
    assert next(t for t in overflow["data"] if t["name"] == "exp(loss) (raw)")["y"][2] is None  # inf: a gap
    with pytest.raises(ValueError, match="exp\\(\\) is for loss-like metrics .*got 'val_acc'"):
        ChartOptions(exp_of=("val_acc",))


def test_throughput_comes_from_the_logged_steps_and_wall_times(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    series = store.series_id("loss", 1, PER_STEP)
    steps = np.arange(1, 1001)
    store.write_chunks([(series, steps[i:i + CHUNK_POINTS], np.ones(len(steps[i:i + CHUNK_POINTS])),
                         1000.0 + steps[i:i + CHUNK_POINTS] / 40.0) for i in range(0, 1000, CHUNK_POINTS)])
    rate = throughput(store, {"branch": 1, "step": 1000})
    assert rate is not None and rate.steps_per_s == pytest.approx(40.0) and rate.items_per_s is None
    rate = throughput(store, {"branch": 1, "step": 1000, "items_per_step": 64, "item_unit": "tokens"})
    assert rate.items_per_s == pytest.approx(2560.0) and rate.item_unit == "tokens"
    assert throughput(store, {"branch": 2, "step": 1000}) is None  # nothing logged there


@pytest.mark.parametrize("n", [20_000, 200_000])
def test_downsampled_points_stay_put_as_the_run_grows(store: RunStore, n: int) -> None:
    """Aligned buckets: a refresh changes only the end of the curve, so it can send only that."""
    rng = np.random.default_rng(1)
    values = rng.random(n + 3000)
    write_series(store, "loss", 1, np.arange(1, n + 1), values[:n])
    before = read_window(store, store.series()[0])
    write_series(store, "loss", 1, np.arange(n + 1, n + 3001), values[n:])
    after = read_window(store, store.series()[0])
    assert before.downsampled and after.downsampled
    kept = common_prefix(before.steps.tolist(), after.steps.tolist())
    assert kept >= len(before.steps) - 4 and len(after.steps) > kept
    assert common_prefix(before.mean_values.tolist(), after.mean_values.tolist()) >= len(before.mean_values) - 2


def test_aligned_minmax_keeps_spikes_and_gaps() -> None:
    x = np.arange(100_000)
    y = np.ones(100_000)
    y[31_337], y[77_001] = 50.0, -5.0
    y[90_000:90_100] = np.nan
    xs, ys = aligned_minmax(x, y, 1000)
    assert len(xs) <= 1000 and 31_337 in xs and 77_001 in xs and np.isnan(ys).sum() == 0
    y[60_000:] = np.nan  # buckets with no finite value keep their first point: a gap in the line
    xs, ys = aligned_minmax(x, y, 1000)
    assert np.isnan(ys).any() and np.isfinite(ys[xs < 60_000]).all()


def test_a_refresh_sends_only_what_changed(store: RunStore) -> None:
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    write_series(store, "loss", 1, np.arange(1, 30_001), np.random.default_rng(2).random(30_000))
    write_series(store, "lr", 1, np.array([0]), np.array([0.1]))
    first = build_figure(read_view(store, {"branch": 1, "step": 30_000}), ChartOptions())
    write_series(store, "loss", 1, np.arange(30_001, 30_301), np.random.default_rng(3).random(300))
    second = build_figure(read_view(store, {"branch": 1, "step": 30_300}), ChartOptions())
    delta = figure_delta(first, second)
    assert delta is not None and apply_delta(first, delta) == second
    assert delta["layout"] is None or delta["layout"] == second["layout"]
    sent = sum(len(change.get(k, {}).get("add", [])) for change in delta["traces"] for k in ("x", "y"))
    whole = sum(len(t["x"]) + len(t["y"]) for t in second["data"])
    assert 0 < sent < whole / 20
    assert figure_delta(first, first) == {"traces": [], "layout": None}
    assert figure_delta(first, {"data": second["data"][:1], "layout": {}}) is None  # other traces: send it whole


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([], [1]) == 0 and common_prefix([None, 1.0], [None, 1.0]) == 2
    assert all(common_prefix(list(range(50)), list(range(k)) + [-1] * (50 - k)) == k for k in range(51))


def test_cached_summaries_follow_new_points_and_a_crash(store: RunStore) -> None:
    """Whole-series reads re-read only the last known chunk and newer ones, and start afresh when
    a crash moves points to a superseded series."""
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    n = (RAW_CHUNK_BUDGET + 40) * CHUNK_POINTS
    write_series(store, "loss", 1, np.arange(1, n + 1), np.linspace(5.0, 1.0, n))
    cache = SummaryCache()
    series = store.series()[0].id
    first = cache.read(store, series)
    assert first.tolist() == store.chunk_summaries(series).tolist()
    # The trainer fills the last chunk and starts new ones: the cache sees both.
    write_series(store, "loss", 1, np.arange(n + 1, n + 3 * CHUNK_POINTS + 11), np.full(3 * CHUNK_POINTS + 10, 0.5))
    grown = cache.read(store, series)
    assert grown.tolist() == store.chunk_summaries(series).tolist() and len(grown) == len(first) + 4
    store.supersede_after(1, n // 2)  # a crash: points after the checkpoint move to a new series
    assert cache.read(store, series).tolist() == store.chunk_summaries(series).tolist()
    assert len(cache.read(store, series)) < len(first)


def test_typed_arrays_are_sent_whole() -> None:
    old = {"data": [{"x": {"dtype": "f8", "bdata": "AAAA"}, "y": [1.0]}], "layout": {}}
    new = {"data": [{"x": {"dtype": "f8", "bdata": "AAAB"}, "y": [1.0]}], "layout": {}}
    assert figure_delta(old, new) == {"traces": [{"i": 0, "trace": new["data"][0]}], "layout": None}
