"""The branch comparison (babysit.instruments.compare) on a real run store filled as a trainer
fills it: a main line, a rollback branch with a lower lr, a probe set and a sweep; and the
`branches` CLI that prints it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from babysit.instruments.compare import compare_branches, format_table, higher_is_better
from babysit.store import CHUNK_POINTS, EXCURSION_DONE, EXCURSION_PROBE, EXCURSION_SWEEP, PER_EPOCH, PER_STEP, RunStore
from tests.conftest import cli_here


def write(store: RunStore, name: str, branch: int, steps: np.ndarray, values: np.ndarray, per: str = PER_STEP) -> None:
    series = store.series_id(name, branch, per)
    walls = 1_700_000_000.0 + steps.astype(float)
    store.write_chunks([(series, steps[i:i + CHUNK_POINTS], values[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                        for i in range(0, len(steps), CHUNK_POINTS)])


def checkpoint(store: RunStore, branch: int, epoch: int, step: int, lr: float, reason: str = "epoch") -> int:
    (store.run_dir / f"c{step}-{branch}.pt").write_bytes(b"weights")  # a rollback to it finds its file
    return store.add_checkpoint(branch=branch, epoch=epoch, step=step, step_in_epoch=100, file=f"c{step}-{branch}.pt",
                                sha256="0" * 64, size=1, hparams={"lr": lr, "momentum": 0.9}, metrics={},
                                reason=reason)


def reference_ewma(values: np.ndarray, beta: float = 0.9) -> float:
    """The course notes' v_t = β·v_{t-1} + (1-β)·y_t, bias-corrected, one value per step."""
    v = 0.0
    for t, y in enumerate(values, start=1):
        v = beta * v + (1 - beta) * y
    return v / (1 - beta ** len(values))


def build(run_dir: Path) -> RunStore:
    """Branch 1: 500 steps at lr 0.1 (epochs of 100, val_loss lowest at epoch 4, checkpoints at
    each epoch). Branch 2: a rollback to #2 (step 200) at lr 0.05, 300 steps. Excursion 1, a probe
    set from #3 (step 300) on branch 1: branches 3 (lr 0.05) and 4 (lr 0.2), 60 steps each.
    Excursion 2, a sweep from #5 (step 500): branch 5, 30 steps from lr 1e-3 to 10. The trainer is on branch 2."""
    store = RunStore(run_dir, create=True)
    one = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0,
                           hparams={"lr": 0.1, "momentum": 0.9})
    x = np.arange(1, 501)
    write(store, "loss", one, x, 2.0 * np.exp(-x / 150) + 0.5)
    write(store, "lr", one, np.array([0]), np.array([0.1]))
    for epoch in range(1, 6):
        store.add_epoch(one, epoch, 100 * epoch)
        checkpoint(store, one, epoch, 100 * epoch, 0.1)
    write(store, "val_loss", one, np.arange(100, 501, 100), np.array([1.5, 1.1, 0.9, 0.8, 0.85]), per=PER_EPOCH)
    two = store.new_branch(parent=one, from_checkpoint=2, start_step=200, start_epoch=2,
                           hparams={"lr": 0.05, "momentum": 0.9})
    x2 = np.arange(201, 501)
    write(store, "loss", two, x2, 1.0 * np.exp(-(x2 - 200) / 100) + 0.4)
    write(store, "lr", two, np.array([200]), np.array([0.05]))
    for epoch in (3, 4, 5):
        store.add_epoch(two, epoch, 100 * epoch)
    write(store, "val_loss", two, np.array([300, 400, 500]), np.array([0.95, 0.7, 0.75]), per=PER_EPOCH)
    probe = store.add_excursion(kind=EXCURSION_PROBE, command=None, origin_branch=one, origin_step=500,
                                from_checkpoint=3, return_checkpoint=5, spec={"param": "lr", "steps": 60})
    for order, lr, slope in ((0, 0.05, 0.001), (1, 0.2, 0.004)):
        branch = store.new_branch(parent=one, from_checkpoint=3, start_step=300, start_epoch=3,
                                  hparams={"lr": lr, "momentum": 0.9})
        store.add_excursion_branch(excursion=probe, branch=branch, ord=order, param="lr", value=lr, steps=60)
        xp = np.arange(301, 361)
        write(store, "loss", branch, xp, 0.9 - slope * (xp - 300))
        store.finish_excursion_branch(branch, end_checkpoint=checkpoint(store, branch, 3, 360, lr, "probe"))
    store.finish_excursion(probe, EXCURSION_DONE)
    sweep = store.add_excursion(kind=EXCURSION_SWEEP, command=None, origin_branch=one, origin_step=500,
                                from_checkpoint=5, return_checkpoint=5, spec={"steps": 30})
    swept = store.new_branch(parent=one, from_checkpoint=5, start_step=500, start_epoch=5,
                             hparams={"lr": 1e-3, "momentum": 0.9})
    store.add_excursion_branch(excursion=sweep, branch=swept, ord=0, param="lr", value=1e-3, steps=30)
    # The lr set after step s trains step s + 1; the loss falls fastest near lr 0.06, blows up past 1.
    lrs = np.geomspace(1e-3, 10, 30)
    write(store, "lr", swept, np.arange(500, 530), lrs)
    write(store, "loss", swept, np.arange(501, 531),
          1.0 - 0.6 / (1 + np.exp(-(np.log10(lrs) + 1.5) * 4)) + np.where(lrs > 1, 30 * np.log10(lrs) ** 2, 0))
    store.finish_excursion(sweep, EXCURSION_DONE)
    store.write_status(state="stopped", branch=two, step=500, epoch=5)
    return store


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return build(tmp_path / "run")


def test_every_branch_says_where_it_came_from_and_what_changed(store: RunStore) -> None:
    table = compare_branches(store)
    by = {r.branch: r for r in table.rows}
    assert [r.branch for r in table.rows] == [1, 2, 3, 4, 5]
    assert by[1].parent is None and by[1].from_checkpoint is None and by[1].changed == {}
    assert (by[2].parent, by[2].from_checkpoint, by[2].fork_epoch, by[2].fork_step) == (1, 2, 2, 200)
    assert by[2].changed == {"lr": (0.1, 0.05)}  # momentum stayed: not listed
    assert by[4].changed == {"lr": (0.1, 0.2)} and by[4].fork_step == 300
    assert [r.length for r in table.rows] == [500, 300, 60, 60, 30]
    assert [r.current for r in table.rows] == [False, True, False, False, False]


def test_excursion_branches_are_marked_never_the_main_line(store: RunStore) -> None:
    rows = compare_branches(store).rows
    assert [(r.kind, r.excursion) for r in rows] == [("run", None), ("run", None), ("probe", 1), ("probe", 1),
                                                      ("sweep", 2)]


def test_losses_are_compared_at_the_same_steps_since_each_fork(store: RunStore) -> None:
    table = compare_branches(store)
    assert table.at_steps == 60  # the shortest probe; the sweep (30 steps) is left out of N
    by = {r.branch: r for r in table.rows}
    x = np.arange(1, 61)
    assert by[1].loss_at == pytest.approx(reference_ewma(2.0 * np.exp(-x / 150) + 0.5), rel=1e-6)
    assert by[2].loss_at == pytest.approx(reference_ewma(1.0 * np.exp(-x / 100) + 0.4), rel=1e-6)
    assert by[3].loss_at == pytest.approx(reference_ewma(0.9 - 0.001 * x), rel=1e-6)
    assert by[4].loss_at < by[3].loss_at  # lr 0.2 fell faster
    assert by[5].loss_at is None and by[5].at_steps is None  # 30 steps: nothing at +60
    # A chosen set compares at its own shortest length.
    chosen = compare_branches(store, [1, 2])
    assert chosen.at_steps == 300 and [r.branch for r in chosen.rows] == [1, 2]
    assert chosen.rows[1].loss_at == pytest.approx(reference_ewma(1.0 * np.exp(-np.arange(1, 301) / 100) + 0.4))


def test_a_diverged_or_very_short_branch_does_not_set_the_comparison_length(store: RunStore) -> None:
    """A rollback that blew up after 6 steps (a divergence on it) and one rolled back again after 4
    steps would compare every branch at +4 steps, which means nothing: N stays the shortest
    branch that ran, and the two are named with why."""
    blown = store.new_branch(parent=1, from_checkpoint=4, start_step=400, start_epoch=4, hparams={"lr": 500.0})
    write(store, "loss", blown, np.arange(401, 407), np.array([0.8, 3.0, 40.0, 9e3, 7e6, np.nan]))
    store.add_event("divergence", "divergence: loss is NaN at step 406; run paused", branch=blown, step=406)
    brief = store.new_branch(parent=1, from_checkpoint=4, start_step=400, start_epoch=4, hparams={"lr": 0.1})
    write(store, "loss", brief, np.arange(401, 405), np.array([0.80, 0.79, 0.79, 0.78]))
    table = compare_branches(store)
    assert table.at_steps == 60, "the probes' 60 steps, not the 4 of a branch rolled back at once"
    assert table.left_out == {blown: "diverged after 6 steps", brief: "only 4 steps"}
    assert table.row(blown).loss_at is None and table.row(brief).loss_at is None
    note = format_table(table).splitlines()[-1]
    assert note.endswith(f"(N = 60: the shortest compared branch, leaving out branch {blown} (diverged after 6 steps), "
                         f"branch {brief} (only 4 steps)); * the trainer's branch"), note
    # Compared alone, a short branch is still compared with what it has.
    assert compare_branches(store, [brief]).at_steps == 4


def test_the_best_validation_number_and_its_epoch(store: RunStore) -> None:
    by = {r.branch: r for r in compare_branches(store).rows}
    assert (by[1].best_metric, by[1].best_value, by[1].best_epoch) == ("val_loss", 0.8, 4)
    assert (by[2].best_value, by[2].best_epoch, by[2].best_step) == (0.7, 4, 400)
    assert by[3].best_value is None  # no epoch ended on the probe
    assert higher_is_better("val_acc") and not higher_is_better("val_loss")
    write(store, "val_acc", 1, np.array([100, 200, 300]), np.array([0.5, 0.9, 0.7]), per=PER_EPOCH)
    by = {r.branch: r for r in compare_branches(store, best_metric="val_acc").rows}
    assert (by[1].best_value, by[1].best_epoch) == (0.9, 2)  # accuracy: the highest


def test_an_unknown_branch_is_refused_by_name(store: RunStore) -> None:
    with pytest.raises(ValueError, match="branch 9 is not in this run; its branches: 1, 2, 3, 4, 5"):
        compare_branches(store, [1, 9])


def test_a_new_run_compares_without_data(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "new", create=True)
    assert compare_branches(store).rows == [] and format_table(compare_branches(store)) == "no branches yet"
    store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    table = compare_branches(store)
    assert table.at_steps is None and table.rows[0].loss_at is None and table.rows[0].length == 0


def test_the_cli_prints_the_table_and_its_json(store: RunStore) -> None:
    result = cli_here("branches", "--run-dir", str(store.run_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:8] == ["branch", "kind", "parent", "from", "fork", "at", "length", "loss@+60"]
    assert lines[2].startswith("2 *") and "lr 0.1 → 0.05" in lines[2] and "0.7 (epoch 4)" in lines[2]
    assert "probe #1" in lines[3] and "sweep #2" in lines[5]
    result = cli_here("branches", "--run-dir", str(store.run_dir), "--json", "--branch", "3", "--branch", "4")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["at_steps"] == 60 and [b["branch"] for b in found["branches"]] == [3, 4]
    assert found["branches"][1]["changed"] == {"lr": {"before": 0.1, "after": 0.2}}
    assert found["branches"][0]["kind"] == "probe" and found["branches"][0]["excursion"] == 1
    bad = cli_here("branches", "--run-dir", str(store.run_dir), "--branch", "9")
    assert bad.returncode == 2 and "branch 9 is not in this run" in bad.stderr and bad.stdout == ""


def test_probes_and_sweeps_stay_off_the_main_line_unless_the_run_went_on_from_one(store: RunStore) -> None:
    from babysit.instruments.compare import excursion_side_branches

    assert excursion_side_branches(store) == {3, 4, 5}
    # "Continue from the winner": a rollback to probe 4's end checkpoint makes it part of the history.
    store.new_branch(parent=4, from_checkpoint=7, start_step=360, start_epoch=3, hparams={"lr": 0.2, "momentum": 0.9})
    assert excursion_side_branches(store) == {3, 5}
    assert excursion_side_branches(RunStore(store.run_dir.parent / "plain", create=True)) == frozenset()


def test_rows_say_which_branches_the_trainer_descends_from_and_a_damaged_line_is_named(store: RunStore) -> None:
    table = compare_branches(store)
    assert [r.branch for r in table.rows if r.on_line] == [1, 2] and table.damage is None  # the trainer is on 2
    store.conn().execute("UPDATE branches SET parent = 2 WHERE id = 1")  # forged: 1 and 2 each other's parent
    damaged = compare_branches(store)
    assert damaged.damage == "branches 1 and 2 name each other as parents"
    assert [r.branch for r in damaged.rows if r.on_line] == [1, 2]
    assert format_table(damaged).endswith("\ndamaged run: branches 1 and 2 name each other as parents")
