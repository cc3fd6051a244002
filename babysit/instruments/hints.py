"""Hints from the course notes: rules over a run's curve that a person reads and acts on.

Four rules, each over the current branch (``hints`` takes plain data; ``read_hints`` gathers it
from a run store):

- plateau: the loss EWMA moved less than ``PLATEAU_REL_CHANGE`` over the last ``PLATEAU_EPOCHS``
  epochs at the lr in use → try lr ×½ (the notes: lr is the knob that matters most);
- lr too high: the loss EWMA rose ``RISE_REL`` above its lowest point and got noisier on the way
  → lr ×½, or roll back to the last checkpoint before the rise ("go back to yesterday's model");
- overfitting: validation rose ``VAL_RISE_REL`` above its best epoch while the training loss kept
  falling → roll back to the checkpoint of the best epoch;
- momentum window: β averages over about 1/(1-β) steps; longer than an epoch, a nudge takes more
  than an epoch to show → a β whose window fits in an epoch.

The loss is smoothed by an exponentially weighted average with bias correction, as the notes
define it, over about an epoch of steps. A hint cites the numbers it saw, carries at most two
actions (commands checked by :func:`babysit.commands.validate`) and is never applied by itself:
a person clicks, or runs the command the CLI prints. Its id names the rule and what it fired for
(``plateau@branch1:lr0.05``, ``overfitting@branch2:epoch7``), so a dismissed hint stays dismissed
while a later occurrence (after a nudge, on a new branch, a new best epoch) shows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import commands as cmd
from ..store import PER_EPOCH, PER_STEP

if TYPE_CHECKING:
    from ..store import RunStore

PLATEAU = "plateau"
LR_TOO_HIGH = "lr_too_high"
OVERFITTING = "overfitting"
MOMENTUM_WINDOW = "momentum_window"
NO_PROGRESS = "no_progress"  # flat from the branch's start: the lr is too low, not spent
RULES = (PLATEAU, NO_PROGRESS, LR_TOO_HIGH, OVERFITTING, MOMENTUM_WINDOW)

# -- thresholds ------------------------------------------------------------------------------------
# The EWMA averages over about an epoch of steps: a value read at an epoch's end then sums up that
# epoch, and mini-batch noise (often ±20 % from one batch to the next) averages down to well under
# the 1 % a plateau is judged by. Bounded, so that tiny epochs still smooth over a few batches and
# huge ones still follow the curve within a thousand steps.
EWMA_MIN_WINDOW = 10
EWMA_MAX_WINDOW = 1000
# Plateau: less than 1 % over 3 epochs is a third of a percent an epoch; at that pace halving the
# loss would take some 200 epochs, while a healthy curve in its long tail still drops a few
# percent an epoch. Three epochs, so one slow epoch is not yet a plateau.
PLATEAU_EPOCHS = 3
PLATEAU_REL_CHANGE = 0.01
# No progress: a plateau whose loss is within 5 % of what the branch's first steps gave never came
# down at all. Halving an lr that taught nothing is the wrong advice: the notes' remedy for an lr
# of unknown scale is a coarse search on a log scale (×10, or the lr sweep). A curve that fell
# fast in its first epoch and then flattened has its first steps far above the plateau.
NO_PROGRESS_REL = 0.05
NO_PROGRESS_FIRST_POINTS = 20  # the first steps' average (raw, not the EWMA's warm-up)
NO_PROGRESS_LR_FACTOR = 10.0
# lr too high: the EWMA 10 % above its lowest point is far beyond what an epoch-long average
# wanders by on a healthy curve (about 1 %); held for at least one EWMA window, so one bad batch
# is not a rise. Noisy: the batch-to-batch spread around the EWMA after the lowest point is 1.25×
# the spread before it (a too-large step makes the loss jump about, not just drift up).
RISE_REL = 0.10
NOISE_GROWTH = 1.25
# ... and at least 4 standard deviations of the EWMA's own wobble (the batch spread times
# sqrt((1-β)/(1+β))): at a small loss the batches spread by 50 % or more, and an epoch-long EWMA
# then wanders by several percent on a healthy curve; its lowest point is an outlier of that.
RISE_NOISE_SIGMAS = 4.0
# (The median of the last window's batches must have risen by RISE_REL too: see lr_too_high_hint.)
# Overfitting: validation 2 % above its best, at least 2 epochs after the best (one worse epoch is
# noise), while the training loss EWMA fell by at least 1 % over the same epochs.
VAL_RISE_REL = 0.02
OVERFIT_EPOCHS = 2
TRAIN_FALL_REL = 0.01
# ... and by 3 standard deviations of the validation's own epoch-to-epoch jitter, read from the
# second differences of the epochs up to the best (a trend hardly moves them; a small validation
# set's jumps do): the best epoch of a jittery validation is a low outlier, not a turning point.
VAL_NOISE_SIGMAS = 3.0
VAL_NOISE_EPOCHS = 8  # six second differences: enough for a median, recent enough to be today's jitter
# Momentum: a window longer than this many epochs is worth saying (the notes: β 0.9 ≈ 10 steps).
MOMENTUM_WINDOW_EPOCHS = 1.0
# The β a momentum hint suggests: 1-β on a log scale with round numbers, as the notes sample it.
ONE_MINUS_BETA_STOPS = tuple(sorted({round(m * 10.0 ** -e, 12) for e in range(0, 6) for m in (1, 2, 5)} - {2.0, 5.0}))
# What read_hints reads: the last few epochs of the branch (and its best validation epoch), at
# most this many points, so a hint costs the same on a long run as on a short one.
LOOKBACK_EPOCHS = 8
LOOKBACK_MAX_POINTS = 20_000
CHECKPOINTS_READ = 100  # as many as the page lists: the hints' checkpoints are recent ones
# The training loss (the "loss" a loop logs, else another per-step loss) and the validation loss
# (val_loss, valid_loss, validation_loss, eval_loss, test_loss: lower is better).
TRAINING_LOSS = "loss"
VALIDATION_NAME = re.compile(r"^(val|valid|validation|eval|test)[_/ ]?loss$", re.IGNORECASE)


@dataclass(frozen=True)
class Action:
    """What a hint's button does: one command, already validated, and the button's label."""

    kind: str
    args: dict[str, Any]
    label: str

    def describe(self) -> str:
        return cmd.describe(self.kind, self.args)


@dataclass(frozen=True)
class Hint:
    """One hint: a stable id (rule@what), a title, a text citing its numbers, its actions."""

    id: str
    rule: str
    title: str
    text: str
    actions: tuple[Action, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "rule": self.rule, "title": self.title, "text": self.text,
                "actions": [{"kind": a.kind, "args": a.args, "label": a.label, "command": a.describe()}
                            for a in self.actions]}


@dataclass(frozen=True)
class HintInputs:
    """What the rules look at, as plain data (all of the current branch)."""

    steps: np.ndarray                              # steps of the per-step training loss
    losses: np.ndarray                             # its values
    epoch_ends: Sequence[tuple[int, int]] = ()     # (epoch, end step) of each finished epoch
    validation: Sequence[tuple[int, float]] = ()   # (epoch, value) of the validation loss
    checkpoints: Sequence[dict[str, Any]] = ()     # {"id", "epoch", "step", "metrics", "hparams"}
    lr: float | None = None
    lr_since: int | None = None                    # the step the lr in use was set at (None: all along)
    # The run's first steps' losses, when this branch is the run's first (from step 0, from its
    # initial weights) and still trains at the lr it started with; None otherwise.
    first_losses: np.ndarray | None = None
    momentum: float | None = None
    steps_per_epoch: int | None = None
    branch: int = 1
    loss_name: str = TRAINING_LOSS
    validation_name: str = "val_loss"


def action(kind: str, args: dict[str, Any], label: str) -> Action | None:
    """An action whose command passes validation, else None (a hint then offers no button)."""
    try:
        command = cmd.validate(kind, args)
    except cmd.CommandError:
        return None
    return Action(command.kind, command.args, label)


def _actions(*found: Action | None) -> tuple[Action, ...]:
    return tuple(a for a in found if a is not None)


# -- smoothing -------------------------------------------------------------------------------------
def ewma_beta(steps_per_epoch: int | None) -> float:
    """The EWMA's β: a window of about an epoch (bounded by EWMA_MIN_WINDOW and EWMA_MAX_WINDOW)."""
    window = min(max(steps_per_epoch or EWMA_MIN_WINDOW, EWMA_MIN_WINDOW), EWMA_MAX_WINDOW)
    return 1.0 - 1.0 / window


def beta_of(window: int) -> float:
    return 1.0 - 1.0 / window


def ewma(values: np.ndarray, beta: float) -> np.ndarray:
    """The exponentially weighted average v_t = β v_{t-1} + (1-β) x_t, bias-corrected by 1-β^t."""
    out = np.empty(len(values))
    average, weight = 0.0, 1.0
    for t, x in enumerate(np.asarray(values, dtype=float).tolist()):
        average = beta * average + (1.0 - beta) * x
        weight *= beta
        out[t] = average / (1.0 - weight)
    return out


def _id(rule: str, inputs: HintInputs) -> str:
    """A plateau or a rise is one occurrence for as long as the branch keeps its lr: dismissed, it
    stays dismissed until a nudge or a rollback, after which a new one shows. (Where it began moves
    as the rules' window slides along a long run; the lr in use does not.)"""
    lr = f"{inputs.lr:g}" if isinstance(inputs.lr, (int, float)) else "unknown"
    return f"{rule}@branch{inputs.branch}:lr{lr}"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:+.1f} %"


def _num(value: float) -> str:
    return f"{value:.4g}"


# -- the rules -------------------------------------------------------------------------------------
def hints(inputs: HintInputs) -> list[Hint]:
    """Every hint the rules give for ``inputs`` (none applied: they are for a person to read)."""
    steps = np.asarray(inputs.steps, dtype=np.int64)
    losses = np.asarray(inputs.losses, dtype=float)
    finite = np.isfinite(losses)
    steps, losses = steps[finite], losses[finite]
    beta = ewma_beta(inputs.steps_per_epoch)
    window = int(round(1.0 / (1.0 - beta)))
    smooth = ewma(losses, beta)
    found: list[Hint] = []
    too_high = lr_too_high_hint(inputs, steps, losses, smooth, window)
    if too_high is not None:
        found.append(too_high)
    else:  # a loss that rose and stays up is flat too, but the rise is what to say
        # A plateau at the lr in use: the points since it was set, smoothed afresh, so that right
        # after a nudge the hint waits for epochs at the new lr instead of asking again at once.
        since = steps > inputs.lr_since if inputs.lr_since is not None else np.ones(len(steps), dtype=bool)
        plateau = plateau_hint(inputs, steps[since], ewma(losses[since], beta), window)
        found += [plateau] if plateau is not None else []
    found += [h for h in (overfitting_hint(inputs, steps, smooth), momentum_hint(inputs)) if h is not None]
    return found


def _at(steps: np.ndarray, smooth: np.ndarray, step: int) -> float | None:
    """The EWMA at ``step`` (at its last point at or before it), None before the first point."""
    index = int(np.searchsorted(steps, step, side="right")) - 1
    return float(smooth[index]) if index >= 0 else None


def plateau_hint(inputs: HintInputs, steps: np.ndarray, smooth: np.ndarray, window: int) -> Hint | None:
    """The EWMA flat (within PLATEAU_REL_CHANGE) over the last PLATEAU_EPOCHS epochs → lr ×½; or,
    when it is still at the level of the run's first steps (``inputs.first_losses``), no progress
    at all → lr ×10 or an lr sweep."""
    k = PLATEAU_EPOCHS
    if not len(smooth) or len(inputs.epoch_ends) <= k:
        return None
    # Epoch ends the EWMA has warmed up for (half a window of points behind it).
    at = np.searchsorted(steps, [s for _, s in inputs.epoch_ends], side="right") - 1
    ends = [(e, s, float(smooth[i])) for (e, s), i in zip(inputs.epoch_ends, at.tolist())
            if i >= max(window // 2, 1) - 1 and smooth[i] > 0]
    if len(ends) <= k:
        return None

    def flat(i: int) -> bool:
        return abs(ends[i][2] / ends[i - k][2] - 1.0) < PLATEAU_REL_CHANGE

    last = len(ends) - 1
    if not flat(last):
        return None
    first_flat = last
    while first_flat - 1 >= k and flat(first_flat - 1):
        first_flat -= 1
    since = ends[first_flat - k][0]
    (e0, _, v0), (e1, _, v1) = ends[last - k], ends[last]
    text = (f"the {inputs.loss_name} EWMA moved {_pct(v1 / v0 - 1)} over the last {k} epochs "
            f"({_num(v0)} → {_num(v1)}, epochs {e0} to {e1}); flat since epoch {since}")
    lr = inputs.lr
    first_losses = inputs.first_losses
    first_losses = first_losses[np.isfinite(first_losses)] if first_losses is not None else None
    first = float(np.mean(first_losses)) if first_losses is not None and len(first_losses) else None
    if first is not None and first > 0 and v1 >= first * (1.0 - NO_PROGRESS_REL):
        text = (f"the {inputs.loss_name} EWMA is {_num(v1)} after {e1} epochs, within {NO_PROGRESS_REL:.0%} of its "
                f"first {len(first_losses)} steps' {_num(first)}, and moved {_pct(v1 / v0 - 1)} over the last "
                f"{k} epochs: it never came down")
        raised = float(f"{lr * NO_PROGRESS_LR_FACTOR:.12g}") if lr else None  # 1e-6 × 10 is 1e-05, not 9.99…e-06
        return Hint(_id(NO_PROGRESS, inputs), NO_PROGRESS, "No progress: lr likely too low, try ×10 or an lr sweep",
                    text, _actions(
                        action(cmd.SET_LR, {"value": raised}, f"lr × 10 ({_num(raised)})") if raised else None,
                        action(cmd.SWEEP, {}, "lr sweep")))
    return Hint(_id(PLATEAU, inputs), PLATEAU, "Plateau: try lr ×½", text,
                _actions(action(cmd.SET_LR, {"value": lr / 2}, f"lr × ½ ({_num(lr / 2)})") if lr else None))


def lr_too_high_hint(inputs: HintInputs, steps: np.ndarray, losses: np.ndarray, smooth: np.ndarray,
                     window: int) -> Hint | None:
    """The EWMA RISE_REL above its lowest point for at least a window, and noisier since → lr ×½,
    or roll back to the last checkpoint before the rise."""
    warm = window // 2
    if len(smooth) < warm + window + 1:
        return None
    low = warm + int(np.argmin(smooth[warm:]))
    now, lowest = float(smooth[-1]), float(smooth[low])
    after = len(smooth) - 1 - low
    if lowest <= 0 or after < window or now / lowest - 1.0 < RISE_REL:
        return None
    if inputs.lr_since is not None and inputs.lr_since > int(steps[low]):
        # The lr was changed during the rise: say it again only once the loss has had a window
        # of steps at the new lr and is still no lower than when it was changed.
        at_change = int(np.searchsorted(steps, inputs.lr_since, side="right")) - 1
        if len(steps) - 1 - at_change < window or now < float(smooth[max(at_change, 0)]):
            return None
    with np.errstate(divide="ignore", invalid="ignore"):  # a loss that reaches 0 has no relative spread
        residual = np.where(smooth > 0, losses / smooth - 1.0, np.nan)
    spread_after = float(np.nanstd(residual[low + 1:]))
    before = residual[max(warm, low + 1 - after):low + 1]
    spread_before = float(np.nanstd(before)) if np.isfinite(before).sum() >= 2 else 0.0
    if not math.isfinite(spread_after):
        return None
    if spread_after < NOISE_GROWTH * spread_before:
        return None
    wobble = spread_before * math.sqrt((1.0 - beta_of(window)) / (1.0 + beta_of(window)))
    if now / lowest - 1.0 < RISE_NOISE_SIGMAS * wobble:
        return None
    # A few huge batches lift an average, not a median: the last window's median must have risen
    # as much above the median of the window that ends at the lowest point.
    if np.median(losses[-window:]) < (1.0 + RISE_REL) * np.median(losses[max(0, low + 1 - window):low + 1]):
        return None
    low_step = int(steps[low])
    text = (f"the {inputs.loss_name} EWMA rose {_pct(now / lowest - 1)} since its lowest point at step {low_step} "
            f"({_num(lowest)} → {_num(now)} at step {int(steps[-1])}), and its batch-to-batch spread grew from "
            f"{spread_before * 100:.1f} % to {spread_after * 100:.1f} %")
    # The EWMA turns about a window after the loss itself does: the checkpoint to go back to is
    # one from before that.
    earlier = [c for c in inputs.checkpoints if c["step"] <= low_step - window]
    target = max(earlier, key=lambda c: (c["step"], c["id"])) if earlier else None
    lr = inputs.lr
    if target is not None:
        was = target.get("hparams", {}).get("lr")
        text += (f"; checkpoint #{target['id']} (epoch {target['epoch']}, step {target['step']}"
                 + (f", lr {_num(was)}" if isinstance(was, (int, float)) else "") + ") is from before the rise")
        title = f"lr likely too high: ×½ or roll back to #{target['id']}"
    else:
        text += "; no checkpoint is from before the rise"
        title = "lr likely too high: try ×½"
    return Hint(_id(LR_TOO_HIGH, inputs), LR_TOO_HIGH, title, text, _actions(
        action(cmd.SET_LR, {"value": lr / 2}, f"lr × ½ ({_num(lr / 2)})") if lr else None,
        action(cmd.ROLLBACK, {"checkpoint": target["id"]}, f"Roll back to #{target['id']}") if target else None))


def overfitting_hint(inputs: HintInputs, steps: np.ndarray, smooth: np.ndarray) -> Hint | None:
    """Validation VAL_RISE_REL above its best epoch, OVERFIT_EPOCHS or more later, while the training
    EWMA fell → roll back to the checkpoint of the best epoch."""
    values = [(e, float(v)) for e, v in inputs.validation if math.isfinite(v)]
    if len(values) < 2:
        return None
    best_epoch, best = min(values, key=lambda item: (item[1], item[0]))
    last_epoch, last = values[-1]
    if last_epoch - best_epoch < OVERFIT_EPOCHS or best <= 0 or last / best - 1.0 < VAL_RISE_REL:
        return None
    if last - best < VAL_NOISE_SIGMAS * validation_jitter([v for e, v in values if e <= best_epoch]):
        return None
    end_of = dict(inputs.epoch_ends)
    if best_epoch not in end_of or last_epoch not in end_of:
        return None
    train_then, train_now = _at(steps, smooth, end_of[best_epoch]), _at(steps, smooth, end_of[last_epoch])
    if train_then is None or train_now is None or train_then <= 0 or train_now / train_then - 1.0 > -TRAIN_FALL_REL:
        return None
    text = (f"{inputs.validation_name} rose from {_num(best)} at epoch {best_epoch} (its best) to {_num(last)} at "
            f"epoch {last_epoch} ({_pct(last / best - 1)}), while the {inputs.loss_name} EWMA fell from "
            f"{_num(train_then)} to {_num(train_now)} ({_pct(train_now / train_then - 1)})")
    target = _best_epoch_checkpoint(inputs, best_epoch, end_of[best_epoch])
    if target is not None:
        text += f"; checkpoint #{target['id']} holds epoch {best_epoch}"
        title = f"Overfitting: roll back to the best epoch #{target['id']}"
    else:
        text += f"; no checkpoint of epoch {best_epoch} is among the newest {CHECKPOINTS_READ}"
        title = f"Overfitting since epoch {best_epoch}"
    return Hint(f"{OVERFITTING}@branch{inputs.branch}:epoch{best_epoch}", OVERFITTING, title, text, _actions(
        action(cmd.ROLLBACK, {"checkpoint": target["id"]}, f"Roll back to #{target['id']}") if target else None))


def validation_jitter(values: list[float]) -> float:
    """The epoch-to-epoch noise (a standard deviation) of the last VAL_NOISE_EPOCHS ``values``, from
    the median of their absolute second differences (which a smooth trend hardly moves): for
    independent noise σ each has a spread of √6 σ, and the median of its absolute value is
    0.6745 × √6 σ."""
    tail = np.asarray(values[-VAL_NOISE_EPOCHS:], dtype=float)
    if len(tail) < 3:
        return 0.0
    return float(np.median(np.abs(np.diff(tail, 2)))) / (0.6745 * math.sqrt(6.0))


def _best_epoch_checkpoint(inputs: HintInputs, epoch: int, end_step: int) -> dict[str, Any] | None:
    """The checkpoint written at the end of ``epoch`` (the newest, if several)."""
    at_end = [c for c in inputs.checkpoints if c["epoch"] == epoch and c["step"] == end_step]
    return max(at_end, key=lambda c: c["id"]) if at_end else None


def momentum_hint(inputs: HintInputs) -> Hint | None:
    """β's window 1/(1-β) longer than MOMENTUM_WINDOW_EPOCHS epochs → a β whose window fits."""
    beta, per_epoch = inputs.momentum, inputs.steps_per_epoch
    if beta is None or not per_epoch or not 0.0 <= beta < 1.0:
        return None
    window = 1.0 / (1.0 - beta)
    if window <= MOMENTUM_WINDOW_EPOCHS * per_epoch:
        return None
    fits = [v for v in ONE_MINUS_BETA_STOPS if 1.0 / v <= MOMENTUM_WINDOW_EPOCHS * per_epoch]
    suggested = round(1.0 - min(fits), 12)
    text = (f"momentum β {beta:g} averages about the last {window:.0f} steps (1/(1-β)), more than an epoch "
            f"({per_epoch} steps), so a nudge takes over an epoch to show; β {suggested:g} averages about "
            f"{1 / (1 - suggested):.0f}")
    return Hint(f"{MOMENTUM_WINDOW}@branch{inputs.branch}:beta{beta:g}", MOMENTUM_WINDOW,
                "Momentum window longer than an epoch", text,
                _actions(action(cmd.SET_MOMENTUM, {"value": suggested}, f"β → {suggested:g}")
                         if suggested < beta else None))


# -- from a run store --------------------------------------------------------------------------------
def read_inputs(store: RunStore, status: dict[str, Any] | None = None) -> HintInputs | None:
    """The current branch's data the rules need, read from ``store`` (None before any branch)."""
    status = store.status() if status is None else status
    branch = status.get("branch")
    if not isinstance(branch, int):
        return None
    own = [i for i in store.series() if i.branch == branch and i.segment == 0]
    per_step = [i for i in own if i.per == PER_STEP and "loss" in i.name]
    loss = next((i for i in per_step if i.name == TRAINING_LOSS), per_step[0] if per_step else None)
    validation = next((i for i in own if i.per == PER_EPOCH and VALIDATION_NAME.match(i.name)), None)
    lr_series = next((i for i in own if i.per == PER_STEP and i.name == "lr"), None)
    lr_extent = store.series_extent(lr_series.id) if lr_series is not None else None  # logged as it changes
    epoch_ends = [(e, s) for b, e, s in store.epochs() if b == branch]
    checkpoints = [c for c in store.checkpoints(limit=CHECKPOINTS_READ) if c["branch"] == branch]
    fork = (store.branch(branch) or {}).get("from_checkpoint")
    if fork is not None and (origin := store.checkpoint(int(fork))) is not None and not origin["deleted"]:
        checkpoints.insert(0, origin)
    val_points: list[tuple[int, float]] = []
    if validation is not None:
        val_steps, val_values, _ = store.chunk_points(validation.id)
        val_points = _by_epoch(val_steps, val_values, epoch_ends)
    steps = np.empty(0, dtype=np.int64)
    losses = np.empty(0)
    if loss is not None:
        lo = _lookback_start(epoch_ends, val_points)
        steps, losses, _ = store.chunk_points(loss.id, lo, None)
        keep = steps >= lo if lo is not None else np.ones(len(steps), dtype=bool)
        steps, losses = steps[keep][-LOOKBACK_MAX_POINTS:], losses[keep][-LOOKBACK_MAX_POINTS:]
    return HintInputs(
        steps=steps, losses=losses, epoch_ends=epoch_ends, validation=val_points, checkpoints=checkpoints,
        lr=status.get("lr"), lr_since=lr_extent[1] if lr_extent else None, momentum=status.get("momentum"),
        first_losses=_first_losses(store, loss, branch, fork, lr_extent),
        steps_per_epoch=status.get("steps_per_epoch"), branch=branch, loss_name=loss.name if loss else TRAINING_LOSS,
        validation_name=validation.name if validation else "val_loss",
    )


def _first_losses(store: RunStore, loss: Any, branch: int, fork: Any,
                  lr_extent: tuple[int, int, int] | None) -> np.ndarray | None:
    """The run's first NO_PROGRESS_FIRST_POINTS losses, if ``branch`` is its first (no fork, from
    step 0) and its lr was never changed (its lr series has no point after the start)."""
    start = (store.branch(branch) or {}).get("start_step")
    if loss is None or fork is not None or start != 0 or (lr_extent is not None and lr_extent[1] > 0):
        return None
    steps, values, _ = store.chunk_points(loss.id, None, NO_PROGRESS_FIRST_POINTS)
    return values[steps <= NO_PROGRESS_FIRST_POINTS]


def _by_epoch(steps: np.ndarray, values: np.ndarray, epoch_ends: list[tuple[int, int]]) -> list[tuple[int, float]]:
    """Per-epoch values as (epoch, value): each belongs to the last epoch ended at or before its step."""
    if not epoch_ends:
        return []
    epochs = [e for e, _ in epoch_ends]
    at = np.searchsorted([s for _, s in epoch_ends], steps, side="right") - 1
    out: dict[int, float] = {}
    for index, value in zip(at.tolist(), values.tolist()):
        if index >= 0:
            out[epochs[index]] = value  # the last value logged for that epoch
    return sorted(out.items())


def _lookback_start(epoch_ends: list[tuple[int, int]], validation: list[tuple[int, float]]) -> int | None:
    """The first step to read: LOOKBACK_EPOCHS epochs back, or the best validation epoch's start."""
    if len(epoch_ends) <= LOOKBACK_EPOCHS:
        return None
    starts = [epoch_ends[-LOOKBACK_EPOCHS - 1][1]]
    finite = [(e, v) for e, v in validation if math.isfinite(v)]
    if finite:
        best_epoch = min(finite, key=lambda item: (item[1], item[0]))[0]
        index = next((i for i, (e, _) in enumerate(epoch_ends) if e == best_epoch), None)
        if index is not None:
            starts.append(epoch_ends[index - 1][1] if index > 0 else 0)
    return min(starts)


def read_hints(store: RunStore, status: dict[str, Any] | None = None, *, include_dismissed: bool = False) -> list[Hint]:
    """The current hints of the run in ``store`` (without the dismissed ones, unless asked)."""
    inputs = read_inputs(store, status)
    if inputs is None:
        return []
    found = hints(inputs)
    if include_dismissed:
        return found
    dismissed = store.dismissed_hints()
    return [h for h in found if h.id not in dismissed]


__all__ = ["Action", "Hint", "HintInputs", "RULES", "action", "ewma", "ewma_beta", "hints", "read_hints",
           "read_inputs"]
