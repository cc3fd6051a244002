"""Hints from the notes (babysit/instruments/hints.py): synthetic curves in, which hint comes out
and which does not, with the numbers it cites; the dismissals in the run store; the CLI; and a
real trainer whose loss plateaus, seen through `python -m babysit hints`."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from babysit import commands as cmd
from babysit.instruments import hints as H
from babysit.store import CHUNK_POINTS, PER_EPOCH, PER_STEP, RunStore
from tests.conftest import babysit_cli, cli_here

PER = 100  # steps per epoch of the synthetic runs


def reference_ewma(values: np.ndarray, beta: float) -> np.ndarray:
    """The notes' formula, written out: v_t = β v_{t-1} + (1-β) θ_t, then v_t / (1 - β^t)."""
    out, v = [], 0.0
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta
        out.append(v / (1 - beta ** t))
    return np.array(out)


def noisy(curve: np.ndarray, spread: float | np.ndarray, seed: int = 0) -> np.ndarray:
    """The curve with multiplicative mini-batch noise of the given relative spread."""
    return curve * (1 + spread * np.random.default_rng(seed).standard_normal(len(curve)))


def inputs(losses: np.ndarray, *, epochs: int | None = None, validation: list[float] | None = None,
           checkpoints: list[dict] | None = None, lr: float | None = 0.05, momentum: float | None = 0.9,
           per: int = PER) -> H.HintInputs:
    steps = np.arange(1, len(losses) + 1)
    epochs = len(losses) // per if epochs is None else epochs
    return H.HintInputs(
        steps=steps, losses=losses, epoch_ends=[(e, e * per) for e in range(1, epochs + 1)],
        validation=[(e, v) for e, v in enumerate(validation or [], start=1)],
        checkpoints=checkpoints if checkpoints is not None else [
            {"id": e, "epoch": e, "step": e * per, "metrics": {}, "hparams": {"lr": 0.05}}
            for e in range(1, epochs + 1)],
        lr=lr, momentum=momentum, steps_per_epoch=per)


def healthy(n: int = 10 * PER) -> np.ndarray:
    x = np.arange(1, n + 1)
    return noisy(2.5 * np.exp(-x / 300) + 0.3, 0.1)


def rules(found: list[H.Hint]) -> list[str]:
    return [h.rule for h in found]


def ewma_at(losses: np.ndarray, step: int, per: int = PER) -> float:
    return float(reference_ewma(losses, H.ewma_beta(per))[step - 1])


# -- the smoothing ---------------------------------------------------------------------------------
def test_the_ewma_is_the_notes_formula_with_bias_correction() -> None:
    values = noisy(np.full(50, 2.0), 0.2)
    np.testing.assert_allclose(H.ewma(values, 0.9), reference_ewma(values, 0.9), rtol=1e-12)
    # Bias-corrected: a constant reads as itself from its first point on, not as a ramp up from 0.
    np.testing.assert_allclose(H.ewma(np.full(5, 3.0), 0.98), np.full(5, 3.0))
    assert H.ewma(np.array([1.0, 3.0]), 0.5).tolist() == pytest.approx([1.0, 1.75 / 0.75])
    # About an epoch of steps, bounded.
    assert H.ewma_beta(100) == pytest.approx(0.99)
    assert H.ewma_beta(3) == pytest.approx(1 - 1 / H.EWMA_MIN_WINDOW)
    assert H.ewma_beta(10**6) == pytest.approx(1 - 1 / H.EWMA_MAX_WINDOW)


# -- a healthy curve -------------------------------------------------------------------------------
def test_a_healthy_curve_gives_no_hint() -> None:
    val = [1.2, 0.9, 0.75, 0.66, 0.6, 0.56, 0.53, 0.51, 0.5, 0.49]
    assert H.hints(inputs(healthy(), validation=val)) == []


# The validation loss of a real digits run (lr 0.05, 45 steps an epoch, 360 held-out images): it
# improves while it jumps by a third from one epoch to the next.
DIGITS_VAL = [1.323, 1.207, 0.837, 0.817, 0.240, 0.283, 0.079, 0.102, 0.138, 0.108, 0.071, 0.103]


def test_a_healthy_but_jittery_run_gives_no_hint_at_any_epoch() -> None:
    per = 45
    x = np.arange(1, 12 * per + 1)
    jitter = np.exp(0.6 * np.random.default_rng(8).standard_normal(len(x)))  # a small loss's batches
    losses = (2.2 * np.exp(-x / 60) + 0.12) * jitter
    for epochs in range(1, 13):
        seen = inputs(losses[:epochs * per], validation=DIGITS_VAL[:epochs], per=per)
        assert H.hints(seen) == [], epochs


def test_too_little_data_gives_no_hint() -> None:
    flat = noisy(np.full(2 * PER + 50, 0.8), 0.1)
    assert H.hints(inputs(flat)) == []  # two epochs: a plateau needs three
    assert H.hints(inputs(np.empty(0), epochs=0, lr=None, momentum=None)) == []


def test_values_that_are_not_a_loss_never_break_the_rules() -> None:
    flat = noisy(np.full(5 * PER, 0.8), 0.1)
    flat[::7] = np.nan
    flat[3::11] = np.inf
    assert rules(H.hints(inputs(flat))) == [H.PLATEAU]  # the non-finite points are left out
    for odd in (np.zeros(9 * PER), np.full(9 * PER, -1.0), np.r_[np.ones(5 * PER), np.zeros(4 * PER)]):
        assert H.hints(inputs(odd, validation=[0.0, -1.0, 0.0, 0.0])) == []


def test_a_run_no_trainer_wrote_to_yet_has_no_hints(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "new", create=True)
    assert H.read_inputs(store) is None and H.read_hints(store) == []


# -- plateau ---------------------------------------------------------------------------------------
def test_a_plateau_asks_for_half_the_lr_and_cites_the_ewma() -> None:
    # Falling for three epochs, then flat for seven (the EWMA takes a few epochs to settle).
    x = np.arange(1, 10 * PER + 1)
    losses = noisy(np.where(x <= 3 * PER, 2.0 - 0.4 * x / PER, 0.8), 0.1, seed=1)
    found = H.hints(inputs(losses))
    assert rules(found) == [H.PLATEAU]
    hint = found[0]
    assert hint.id == "plateau@branch1:lr0.05"
    assert hint.title == "Plateau: try lr ×½"
    v0, v1 = ewma_at(losses, 7 * PER), ewma_at(losses, 10 * PER)
    assert f"moved {(v1 / v0 - 1) * 100:+.1f} % over the last 3 epochs ({v0:.4g} → {v1:.4g}, epochs 7 to 10)" \
        in hint.text, hint.text
    assert abs(v1 / v0 - 1) < H.PLATEAU_REL_CHANGE
    assert hint.text.endswith("; flat since epoch 7")
    assert hint.actions == (H.Action(cmd.SET_LR, {"value": 0.025}, "lr × ½ (0.025)"),)


def test_a_curve_flat_from_the_runs_first_steps_says_the_lr_is_too_low() -> None:
    """Flat at the level of its first steps: no progress at all, so ×10 or a sweep, not ×½."""
    flat = noisy(np.full(6 * PER, 2.3), 0.05, seed=4)
    found = H.hints(H.HintInputs(**{**inputs(flat, lr=1e-6).__dict__, "first_losses": flat[:20]}))
    assert rules(found) == [H.NO_PROGRESS]
    hint = found[0]
    assert hint.id == "no_progress@branch1:lr1e-06"
    assert hint.actions == (H.Action(cmd.SET_LR, {"value": 1e-5}, "lr × 10 (1e-05)"),
                            H.Action(cmd.SWEEP, {"steps": cmd.SWEEP_DEFAULT_STEPS}, "lr sweep"))
    # Not known to be the run's start (a resumed window, a rollback's branch): a plateau as before.
    assert rules(H.hints(inputs(flat, lr=1e-6))) == [H.PLATEAU]


def test_a_curve_that_fell_fast_then_flattened_is_a_plateau_not_a_lack_of_progress() -> None:
    x = np.arange(1, 9 * PER + 1)  # the epoch-long EWMA needs a few epochs to forget the fall
    fell = noisy(np.where(x <= PER // 2, 2.3 - 1.5 * x / (PER // 2), 0.8), 0.05, seed=5)  # down within epoch 1
    found = H.hints(H.HintInputs(**{**inputs(fell).__dict__, "first_losses": fell[:20]}))
    assert rules(found) == [H.PLATEAU]


def test_a_slow_but_steady_descent_is_no_plateau() -> None:
    # 2 % an epoch: slow, still going.
    x = np.arange(1, 8 * PER + 1)
    losses = noisy(0.8 * 0.98 ** (x / PER), 0.1, seed=2)
    assert H.PLATEAU not in rules(H.hints(inputs(losses)))


def test_a_plateau_without_a_known_lr_has_no_button() -> None:
    found = H.hints(inputs(noisy(np.full(5 * PER, 0.8), 0.1), lr=None))
    assert rules(found) == [H.PLATEAU] and found[0].actions == ()
    assert found[0].id == "plateau@branch1:lrunknown"


def test_after_a_nudge_a_plateau_waits_for_epochs_at_the_new_lr() -> None:
    flat = noisy(np.full(10 * PER, 0.8), 0.1, seed=6)
    assert rules(H.hints(inputs(flat, lr=0.025))) == [H.PLATEAU]
    # Halved at step 700: three epochs since, three epoch ends; a plateau needs three epochs between.
    at_new_lr = H.HintInputs(**{**inputs(flat, lr=0.025).__dict__, "lr_since": 700})
    assert H.hints(at_new_lr) == []
    longer = noisy(np.full(11 * PER, 0.8), 0.1, seed=6)
    found = H.hints(H.HintInputs(**{**inputs(longer, lr=0.025).__dict__, "lr_since": 700}))
    assert [h.id for h in found] == ["plateau@branch1:lr0.025"]
    assert "epochs 8 to 11" in found[0].text


# -- lr too high -----------------------------------------------------------------------------------
def rising_after(step: int, n: int = 9 * PER, seed: int = 3) -> np.ndarray:
    """Falling until ``step``, then (an lr nudged too high) rising and jumping about."""
    x = np.arange(1, n + 1)
    calm = 2.0 * np.exp(-x / 200) + 0.5
    low = 2.0 * np.exp(-step / 200) + 0.5
    rise = np.where(x > step, low * (1 + 0.4 * (x - step) / (n - step)), calm)
    spread = np.where(x > step, 0.3, 0.08)
    return noisy(rise, spread, seed=seed)


def test_a_noisy_rising_loss_says_the_lr_is_too_high_and_offers_the_checkpoint_before_it() -> None:
    losses = rising_after(560)
    found = H.hints(inputs(losses))
    assert rules(found) == [H.LR_TOO_HIGH]
    hint = found[0]
    smooth = reference_ewma(losses, H.ewma_beta(PER))
    window = round(1 / (1 - H.ewma_beta(PER)))
    low = window // 2 + int(np.argmin(smooth[window // 2:]))
    low_step = low + 1
    assert 560 < low_step < 560 + 2 * window  # the EWMA turns up about a window after the loss does
    # The last checkpoint (one per epoch end) a window before the EWMA's lowest point: #5, step 500.
    n = (low_step - window) // PER
    assert n == 5
    assert hint.title == f"lr likely too high: ×½ or roll back to #{n}"
    assert (f"rose {(smooth[-1] / smooth[low] - 1) * 100:+.1f} % since its lowest point at step {low_step} "
            f"({smooth[low]:.4g} → {smooth[-1]:.4g} at step {len(losses)})") in hint.text, hint.text
    assert f"checkpoint #{n} (epoch {n}, step {n * PER}, lr 0.05) is from before the rise" in hint.text
    assert hint.actions == (H.Action(cmd.SET_LR, {"value": 0.025}, "lr × ½ (0.025)"),
                            H.Action(cmd.ROLLBACK, {"checkpoint": n, "hparams": cmd.HPARAMS_CHECKPOINT},
                                     f"Roll back to #{n}"))
    assert hint.id == "lr_too_high@branch1:lr0.05"


def test_after_halving_the_lr_a_rise_is_said_again_only_if_it_goes_on() -> None:
    rising = rising_after(560)  # still rising at the end
    halved = H.HintInputs(**{**inputs(rising, lr=0.025).__dict__, "lr_since": 760})
    assert [h.id for h in H.hints(halved)] == ["lr_too_high@branch1:lr0.025"]
    calmer = rising.copy()
    calmer[760:] = noisy(np.linspace(rising[700:760].mean(), 0.7, len(rising) - 760), 0.1, seed=7)
    assert H.LR_TOO_HIGH not in rules(H.hints(H.HintInputs(**{**inputs(calmer, lr=0.025).__dict__,
                                                                "lr_since": 760})))
    too_soon = H.HintInputs(**{**inputs(rising, lr=0.025).__dict__, "lr_since": len(rising) - 10})
    assert H.LR_TOO_HIGH not in rules(H.hints(too_soon))


def test_a_smooth_rise_is_not_called_noisy() -> None:
    x = np.arange(1, 9 * PER + 1)
    losses = np.where(x > 560, 0.6 * (1 + 0.4 * (x - 560) / 340), 2.0 * np.exp(-x / 200) + 0.5)
    losses = noisy(losses, 0.08, seed=4)
    assert H.LR_TOO_HIGH not in rules(H.hints(inputs(losses)))


def test_one_bad_batch_is_not_a_rise() -> None:
    losses = healthy()
    losses[-3] = 50.0
    assert H.hints(inputs(losses)) == []


def test_a_few_huge_batches_lift_the_ewma_but_are_no_rise() -> None:
    losses = noisy(np.full(9 * PER, 0.5), 0.05, seed=9)
    losses[-150::15] = 6.0  # one batch in 15 is 12 times the others (the divergence guard's business)
    smooth = reference_ewma(losses, H.ewma_beta(PER))
    assert smooth[-1] > 1.5 * smooth[: -150].min()  # the average went up by half...
    assert H.LR_TOO_HIGH not in rules(H.hints(inputs(losses)))  # ...the median did not


def test_a_rise_with_no_checkpoint_before_it_offers_only_the_lr() -> None:
    found = H.hints(inputs(rising_after(560), checkpoints=[]))
    assert rules(found) == [H.LR_TOO_HIGH]
    assert found[0].title == "lr likely too high: try ×½"
    assert [a.kind for a in found[0].actions] == [cmd.SET_LR]


# -- overfitting -----------------------------------------------------------------------------------
VAL_OVERFIT = [1.0, 0.8, 0.7, 0.65, 0.68, 0.72, 0.75, 0.79, 0.84, 0.9]


def test_validation_rising_while_training_falls_is_overfitting_back_to_the_best_epoch() -> None:
    losses = healthy()
    checkpoints = [{"id": 10 + e, "epoch": e, "step": e * PER, "metrics": {"val_loss": v}, "hparams": {}}
                   for e, v in enumerate(VAL_OVERFIT, start=1)]
    found = H.hints(inputs(losses, validation=VAL_OVERFIT, checkpoints=checkpoints))
    assert rules(found) == [H.OVERFITTING]
    hint = found[0]
    assert hint.id == "overfitting@branch1:epoch4"
    assert hint.title == "Overfitting: roll back to the best epoch #14"
    then, now = ewma_at(losses, 4 * PER), ewma_at(losses, 10 * PER)
    assert hint.text == (f"val_loss rose from 0.65 at epoch 4 (its best) to 0.9 at epoch 10 (+38.5 %), while the "
                         f"loss EWMA fell from {then:.4g} to {now:.4g} ({(now / then - 1) * 100:+.1f} %); "
                         "checkpoint #14 holds epoch 4")
    assert hint.actions == (H.Action(cmd.ROLLBACK, {"checkpoint": 14, "hparams": cmd.HPARAMS_CHECKPOINT},
                                     "Roll back to #14"),)


def test_validation_that_wobbles_or_only_just_turned_is_not_overfitting() -> None:
    losses = healthy()
    wobble = [1.0, 0.8, 0.7, 0.65, 0.66, 0.655, 0.66, 0.658, 0.66, 0.659]  # within 2 % of the best
    assert H.hints(inputs(losses, validation=wobble)) == []
    just_turned = [1.0, 0.8, 0.7, 0.65, 0.6, 0.58, 0.56, 0.55, 0.54, 0.6]  # one worse epoch
    assert H.hints(inputs(losses, validation=just_turned)) == []


def test_validation_and_training_rising_together_is_not_overfitting() -> None:
    x = np.arange(1, 10 * PER + 1)
    losses = noisy(np.where(x <= 400, 1.0 - 0.5 * x / 400, 0.5 + 0.05 * (x - 400) / PER), 0.02, seed=5)
    assert H.OVERFITTING not in rules(H.hints(inputs(losses, validation=VAL_OVERFIT)))


def test_overfitting_without_the_best_epochs_checkpoint_says_so_and_offers_nothing() -> None:
    found = H.hints(inputs(healthy(), validation=VAL_OVERFIT, checkpoints=[]))
    assert rules(found) == [H.OVERFITTING]
    assert found[0].title == "Overfitting since epoch 4" and found[0].actions == ()
    assert found[0].text.endswith("no checkpoint of epoch 4 is among the newest 100")


# -- momentum --------------------------------------------------------------------------------------
def test_a_momentum_window_longer_than_an_epoch_is_said_with_a_beta_that_fits() -> None:
    found = H.hints(inputs(healthy(10 * 50), momentum=0.99, per=50))
    assert rules(found) == [H.MOMENTUM_WINDOW]
    hint = found[0]
    assert hint.id == "momentum_window@branch1:beta0.99"
    assert hint.text == ("momentum β 0.99 averages about the last 100 steps (1/(1-β)), more than an epoch (50 steps), "
                         "so a nudge takes over an epoch to show; β 0.98 averages about 50")
    assert hint.actions == (H.Action(cmd.SET_MOMENTUM, {"value": 0.98}, "β → 0.98"),)
    # The notes' default, 0.9 (~10 steps), fits in an epoch of 50; no momentum at all says nothing.
    assert H.hints(inputs(healthy(10 * 50), momentum=0.9, per=50)) == []
    assert H.hints(inputs(healthy(10 * 50), momentum=None, per=50)) == []


def test_tiny_epochs_get_a_beta_below_the_default() -> None:
    hint = H.momentum_hint(inputs(np.empty(0), epochs=0, momentum=0.9, per=8))
    assert hint is not None and hint.actions[0].args == {"value": 0.8}  # ~5 steps, inside 8


# -- the store -------------------------------------------------------------------------------------
def write(store: RunStore, name: str, branch: int, steps: np.ndarray, values: np.ndarray, per: str = PER_STEP) -> None:
    series = store.series_id(name, branch, per)
    walls = time.time() - 600 + steps * 0.01
    store.write_chunks([(series, steps[i:i + CHUNK_POINTS], values[i:i + CHUNK_POINTS], walls[i:i + CHUNK_POINTS])
                        for i in range(0, len(steps), CHUNK_POINTS)])


def overfit_run(run_dir: Path) -> RunStore:
    """A run as a trainer writes it: branch 1 for 3 epochs, a rollback to #2, then branch 2 that
    trains 10 epochs (falling loss) while its validation turns up after epoch 6."""
    store = RunStore(run_dir, create=True)
    one = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
    write(store, "loss", one, np.arange(1, 301), noisy(np.full(300, 2.0), 0.1))
    for epoch in (1, 2, 3):
        store.add_epoch(one, epoch, epoch * PER)
        store.add_checkpoint(branch=one, epoch=epoch, step=epoch * PER, step_in_epoch=PER, file=f"e{epoch}.pt",
                             sha256="0" * 64, size=1, hparams={"lr": 0.1, "momentum": 0.9},
                             metrics={"val_loss": 2.0}, reason="epoch")
    two = store.new_branch(parent=one, from_checkpoint=2, start_step=200, start_epoch=2)
    x = np.arange(201, 1201)
    losses = noisy(2.5 * np.exp(-x / 300) + 0.3, 0.1)
    write(store, "loss", two, x, losses)
    val = [1.0, 0.8, 0.7, 0.6, 0.62, 0.66, 0.7, 0.75, 0.8, 0.86]  # epochs 3..12; best: epoch 6
    for i, epoch in enumerate(range(3, 13)):
        store.add_epoch(two, epoch, epoch * PER)
        (run_dir / f"b{epoch}.pt").write_bytes(b"")  # rollback commands check that the file is there
        store.add_checkpoint(branch=two, epoch=epoch, step=epoch * PER, step_in_epoch=PER, file=f"b{epoch}.pt",
                             sha256="0" * 64, size=1, hparams={"lr": 0.05, "momentum": 0.9},
                             metrics={"val_loss": val[i]}, reason="epoch")
    write(store, "val_loss", two, np.arange(300, 1201, 100), np.array(val), per=PER_EPOCH)
    write(store, "lr", two, np.array([200, 700]), np.array([0.1, 0.05]))  # halved at step 700
    store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                       heartbeat=time.time(), epoch=12, max_epochs=30, step=1200,
                       step_in_epoch=0, steps_per_epoch=PER, branch=two, lr=0.05, momentum=0.9, optimizer="SGD")
    return store


def test_read_hints_takes_the_current_branch_from_the_store(tmp_path: Path) -> None:
    store = overfit_run(tmp_path / "run")
    found = H.read_hints(store)
    assert rules(found) == [H.OVERFITTING]
    hint = found[0]
    # Branch 2's own epochs and checkpoints: its best validation epoch is 6, checkpoint #7.
    assert hint.id == "overfitting@branch2:epoch6"
    assert hint.title == "Overfitting: roll back to the best epoch #7"
    assert "val_loss rose from 0.6 at epoch 6 (its best) to 0.86 at epoch 12 (+43.3 %)" in hint.text
    inputs_read = H.read_inputs(store)
    # Its last LOOKBACK_EPOCHS epochs (from the end of epoch 4), which hold the best one.
    assert inputs_read is not None and inputs_read.branch == 2 and inputs_read.steps[0] == 400
    assert inputs_read.lr_since == 700
    assert [c["id"] for c in inputs_read.checkpoints][:2] == [2, 4]  # the fork, then the branch's own


def test_a_dismissed_hint_stays_dismissed_and_a_new_occurrence_shows(tmp_path: Path) -> None:
    store = overfit_run(tmp_path / "run")
    assert store.dismissed_hints() == set()  # no table yet: none dismissed
    assert "dismissed_hints" not in {r[0] for r in store.conn().execute("SELECT name FROM sqlite_master")}
    store.dismiss_hint("overfitting@branch2:epoch6")
    reader = RunStore(tmp_path / "run")  # another process's view (the page after a reload)
    assert reader.dismissed_hints() == {"overfitting@branch2:epoch6"}
    assert H.read_hints(reader) == []
    assert rules(H.read_hints(reader, include_dismissed=True)) == [H.OVERFITTING]
    # A new best epoch later, then a new rise: a new occurrence, shown.
    write(store, "loss", 2, np.arange(1201, 1601), noisy(np.full(400, 0.31), 0.05) * np.linspace(1, 0.9, 400))
    for epoch, value in zip(range(13, 17), (0.5, 0.53, 0.56, 0.6)):
        store.add_epoch(2, epoch, epoch * PER)
        write(store, "val_loss", 2, np.array([epoch * PER]), np.array([value]), per=PER_EPOCH)
    assert [h.id for h in H.read_hints(reader) if h.rule == H.OVERFITTING] == ["overfitting@branch2:epoch13"]


def test_a_bad_hint_id_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    store = overfit_run(tmp_path / "run")
    for bad in ("", "x" * 121, "plateau\n@1", 7):
        with pytest.raises(ValueError, match="a hint id must be printable text of 1 to 120 characters, got"):
            store.dismiss_hint(bad)  # type: ignore[arg-type]
    assert store.dismissed_hints() == set()


# -- the CLI ---------------------------------------------------------------------------------------
def test_the_cli_lists_hints_with_their_commands_and_dismisses_one(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    overfit_run(tmp_path / "run").close()
    listed = cli_here("hints", "--run-dir", run)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "overfitting@branch2:epoch6  Overfitting: roll back to the best epoch #7"
    assert lines[1].startswith("  val_loss rose from 0.6 at epoch 6")
    assert lines[2] == f"  Roll back to #7: python -m babysit rollback --run-dir {run} 7"
    assert lines[3] == f"  dismiss: python -m babysit hints --run-dir {run} --dismiss overfitting@branch2:epoch6"
    as_json = json.loads(cli_here("hints", "--run-dir", run, "--json").stdout)
    assert [h["id"] for h in as_json] == ["overfitting@branch2:epoch6"]
    assert as_json[0]["actions"] == [{"kind": "rollback", "args": {"checkpoint": 7, "hparams": "checkpoint"},
                                      "label": "Roll back to #7", "command": "rollback to #7 (checkpoint hparams)",
                                      "cli": f"python -m babysit rollback --run-dir {run} 7"}]
    # A bad id: named, with the ids there are; nothing dismissed.
    refused = cli_here("hints", "--run-dir", run, "--dismiss", "plateau@branch9:lr1")
    assert refused.returncode == 2
    assert ("no current hint has the id 'plateau@branch9:lr1'; current hints: overfitting@branch2:epoch6"
            in refused.stderr)
    assert RunStore(run).dismissed_hints() == set()
    done = cli_here("hints", "--run-dir", run, "--dismiss", "overfitting@branch2:epoch6")
    assert done.returncode == 0 and done.stdout.startswith("dismissed overfitting@branch2:epoch6")
    assert cli_here("hints", "--run-dir", run).stdout == f"no hints for {run} now (dismissed ones are not listed)\n"
    assert json.loads(cli_here("hints", "--run-dir", run, "--json").stdout) == []


def test_the_cli_prints_set_commands_that_the_cli_takes(tmp_path: Path) -> None:
    from babysit.cli import action_command

    assert action_command(H.Action(cmd.SET_LR, {"value": 0.0123456789}, ""), "/r un") == \
        "python -m babysit set --run-dir '/r un' lr 0.0123456789"
    assert action_command(H.Action(cmd.SET_MOMENTUM, {"value": 0.98}, ""), "d") == \
        "python -m babysit set --run-dir d momentum 0.98"
    line = action_command(H.Action(cmd.ROLLBACK, {"checkpoint": 3, "hparams": "current", "lr": 0.01}, ""), "d")
    assert line == "python -m babysit rollback --run-dir d 3 --hparams current --lr 0.01"
    # And the CLI takes it: the same command is queued.
    store = overfit_run(tmp_path / "run")
    queued = cli_here(*line.replace("python -m babysit ", "").replace("--run-dir d", f"--run-dir {tmp_path / 'run'}")
                      .replace(" 3 ", " 7 ").split())
    assert queued.returncode == 0, queued.stderr
    assert store.pending_commands()[-1]["args"] == {"checkpoint": 7, "hparams": "current", "lr": 0.01}


def test_the_cli_refuses_a_directory_that_is_no_run(tmp_path: Path) -> None:
    result = cli_here("hints", "--run-dir", str(tmp_path))
    assert result.returncode == 2 and "is not a babysit run" in result.stderr


# -- end to end: a real trainer that plateaus ------------------------------------------------------
def test_a_real_run_with_a_tiny_lr_plateaus_and_the_cli_says_so(tmp_path: Path, trainers) -> None:  # noqa: ANN001
    run_dir = tmp_path / "digits"
    trainer = trainers(run_dir, "--job", "digits", "--lr", "1e-7", "--epochs", "4", "--epoch-passes", "1")
    assert trainer.wait_exit(timeout=300) == 0, trainer.output()
    result = babysit_cli("hints", "--run-dir", str(run_dir), check=True)
    lines = result.stdout.splitlines()
    # Flat from the first steps at lr 1e-7: the lr taught nothing, so halving it is not the advice.
    assert lines[0] == "no_progress@branch1:lr1e-07  No progress: lr likely too low, try ×10 or an lr sweep", \
        result.stdout
    assert "after 4 epochs, within 5% of its first 20 steps'" in lines[1] and "it never came down" in lines[1]
    assert lines[2] == f"  lr × 10 (1e-06): python -m babysit set --run-dir {run_dir} lr 1e-06"
    assert lines[3] == f"  lr sweep: python -m babysit sweep --run-dir {run_dir}"
    assert len(lines) == 5  # one hint: β 0.9's window (~10 steps) fits in an epoch of 45 steps
