"""What ``python -m babysit probes`` prints: an excursion's readings as text (a probe set's table
with its winner, or a sweep's steepest descent, divergence and suggested lr), with the command
that acts on them."""

from __future__ import annotations

from typing import Any

from . import commands as cmd
from .instruments.probes import evaluation_key, origin_evaluation, read_probes, winner
from .instruments.sweep import read_sweep
from .store import RunStore
from .store.schema import EXCURSION_SWEEP


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def headline(store: RunStore, excursion: dict[str, Any]) -> str:
    """"excursion #N: what it tries — its state (its message)"."""
    row = store.command(excursion["command"]) if excursion.get("command") else None
    what = cmd.describe(row["kind"], row["args"]) if row else excursion["kind"]
    text = f"excursion #{excursion['id']}: {what} — {excursion['state']}"
    if excursion.get("message"):
        text += f" ({excursion['message']})"
    return text


def format_excursion(store: RunStore, excursion: dict[str, Any], run_dir: str) -> str:
    """The readings of one excursion, as a few lines of text."""
    lines = [headline(store, excursion),
             f"  forked from checkpoint #{excursion['from_checkpoint']}; the run's point: step "
             f"{excursion['origin_step']} on branch {excursion['origin_branch']} (checkpoint "
             f"#{excursion['return_checkpoint']})"]
    if excursion["kind"] == EXCURSION_SWEEP:
        return "\n".join(lines + _sweep_lines(store, excursion, run_dir))
    return "\n".join(lines + _probe_lines(store, excursion, run_dir))


def _probe_lines(store: RunStore, excursion: dict[str, Any], run_dir: str) -> list[str]:
    readings = read_probes(store, excursion["id"])
    if not readings:
        return ["  no probe has started yet"]
    best = winner(readings)
    key = evaluation_key([r for r in readings if not r.diverged])
    param = readings[0].param
    lines = [f"  {'#':<3}{'branch':<8}{param:<10}{'steps':<12}{'loss (EWMA)':<13}{key or '':<12}checkpoint"]
    for r in readings:
        loss = "diverged" if r.diverged else _number(r.loss_ewma)
        evaluation = _number(r.evaluation.get(key)) if key else ""
        end = f"#{r.end_checkpoint}" if r.end_checkpoint else "-"
        mark = "   <- winner" if best is not None and r.branch == best.branch else ""
        lines.append(f"  {r.order + 1:<3}{r.branch:<8}{r.value:<10.4g}{f'{r.steps_done}/{r.steps_planned}':<12}"
                     f"{loss:<13}{evaluation:<12}{end}{mark}")
    origin = origin_evaluation(store, excursion["id"])
    if origin:
        lines.append("  at the fork: " + ", ".join(f"{k} {_number(v)}" for k, v in origin.items()))
    if best is not None and excursion["state"] == "done":
        if best.end_checkpoint:
            lines.append(f"  continue from the winner: python -m babysit rollback {best.end_checkpoint} --run-dir "
                         f"{run_dir} --hparams checkpoint")
        lines.append(f"  or carry on with its {best.param}: python -m babysit set {best.param} {best.value:g} "
                     f"--run-dir {run_dir}")
    return lines


def _sweep_lines(store: RunStore, excursion: dict[str, Any], run_dir: str) -> list[str]:
    reading = read_sweep(store, excursion["id"])
    if reading is None or len(reading.lrs) == 0:
        return ["  no step of the sweep is logged yet"]
    lines = [f"  {len(reading.lrs)} steps, lr {reading.lrs[0]:.3g} to {reading.lrs[-1]:.3g}",
             f"  steepest descent: lr {_number(reading.steepest_lr)}   lowest loss: lr "
             f"{_number(reading.min_loss_lr)}   divergence: lr {_number(reading.divergence_lr)}"]
    if reading.suggested_lr is not None:
        lines.append(f"  suggested lr: {reading.suggested_lr:.3g} (python -m babysit set lr "
                     f"{reading.suggested_lr:.3g} --run-dir {run_dir})")
    else:
        lines.append("  no suggestion: the loss did not fall over the sweep's range (try a wider --lr-min/--lr-max)")
    return lines
