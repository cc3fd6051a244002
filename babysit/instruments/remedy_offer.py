"""The divergence remedy's lr: roll back to the last healthy checkpoint with half of *its* lr, or
half of the newest lr set since that checkpoint when that one is lower.

Half of the lr that diverged is no remedy: after ``set lr 500`` blew up a run that was healthy at
0.3, it offers 250, which diverges at once. The checkpoint's own lr is the one known to have been
healthy there; a person who lowered the lr since (a nudge while the run is paused) asked for less,
and gets half of that. A rollback sets an lr too, so a remedy that diverges again is answered from
the remedy's own lr: it halves again, it does not start over from the checkpoint.

One rule, :func:`remedy_offer`, used by the trainer's remedy (babysit/remedy.py: the automatic
rollback and the paused run's message) and by the page's remedy button, so both say the same
numbers; :func:`read_offer` gathers its inputs from a run store.

With several optimizers (a GAN's D and G) the lr halved is the first's, and only its own nudges
count as "set since"; the others go back to their lr and momentum at the healthy checkpoint
(the rollback takes the checkpoint's hparams), since keeping theirs could keep the very lr that
blew the run up (``set lr 500 --optimizer G``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from .. import commands as cmd
from ..store import RunStore

# The commands that set an lr a person (or the guard's remedy) chose: a nudge, and a rollback,
# which restores its checkpoint's lr or applies the one it names.
LR_SETTING_KINDS = (cmd.SET_LR, cmd.ROLLBACK)
# How many of the newest such commands are read: the newest applied one is what counts.
SETTINGS_READ = 50


@dataclass(frozen=True)
class RemedyOffer:
    """Roll back to ``checkpoint`` with ``lr`` = ½ × ``halved``."""

    checkpoint: int
    checkpoint_lr: float | None  # the lr the checkpoint was taken with
    halved: float | None         # the lr halved: the checkpoint's, or a lower one set since
    set_since: bool              # ``halved`` is an lr set since the checkpoint
    others: bool = False         # the run has other optimizers: they take the checkpoint's hparams

    @property
    def lr(self) -> float | None:
        return self.halved / 2 if self.halved is not None else None

    def describe(self) -> str:
        """``lr 0.15 (½ × 0.3, its lr)``, or ``lr 0.05 (½ × 0.1 set since; its lr 0.3)``."""
        if self.lr is None:
            return "its own hyperparameters"
        others = "; the other optimizers' lr and momentum as at it" if self.others else ""
        if self.set_since:
            return (f"lr {self.lr:.4g} (½ × {self.halved:.4g} set since; its lr {_number(self.checkpoint_lr)}"
                    f"{others})")
        return f"lr {self.lr:.4g} (½ × {self.halved:.4g}, its lr{others})"

    def command_args(self) -> dict[str, Any]:
        """The rollback command's arguments: the current momentum, this lr (with other optimizers:
        the checkpoint's hparams, this lr for the first)."""
        if self.lr is None:
            return {"checkpoint": self.checkpoint, "hparams": cmd.HPARAMS_CHECKPOINT}
        return {"checkpoint": self.checkpoint, "hparams": cmd.HPARAMS_CHECKPOINT if self.others else cmd.HPARAMS_CURRENT,
                "lr": self.lr}


def remedy_offer(checkpoint: dict[str, Any], settings: Iterable[dict[str, Any]]) -> RemedyOffer:
    """The remedy for a run whose last healthy checkpoint is ``checkpoint`` (a checkpoint row),
    given the run's lr-setting commands ``settings`` (command rows of :data:`LR_SETTING_KINDS`, in
    any order; those not applied, or applied before the checkpoint, count for nothing).

    "Since the checkpoint": acknowledged after its row was written, or applied on its branch at a
    later step (its file may still have been on its way to the disk).
    """
    hparams = checkpoint.get("hparams") if isinstance(checkpoint.get("hparams"), dict) else {}
    own = _lr(hparams.get("lr"))
    others = hparams.get("others") if isinstance(hparams.get("others"), dict) else {}
    newest: tuple[tuple[float, float], float] | None = None  # ((done_at, id), lr)
    for row in settings:
        lr = _set_lr(row)
        if lr is None or not _after(row, checkpoint) or _for_another(row, others):
            continue
        order = (_real(row["done_at"]), _real(row.get("id")))
        if newest is None or order > newest[0]:
            newest = (order, lr)
    set_since = newest is not None and (own is None or newest[1] < own)
    halved = newest[1] if newest is not None and set_since else own
    return RemedyOffer(checkpoint=checkpoint["id"], checkpoint_lr=own, halved=halved, set_since=set_since,
                       others=bool(others))


def read_offer(store: RunStore, checkpoint: int | dict[str, Any]) -> RemedyOffer | None:
    """:func:`remedy_offer` for ``checkpoint`` (an id or a row) of ``store``; None when that
    checkpoint is not listed (retired, or never written)."""
    row = store.checkpoint(checkpoint) if isinstance(checkpoint, int) else checkpoint
    if row is None:
        return None
    return remedy_offer(row, store.commands(kinds=LR_SETTING_KINDS, limit=SETTINGS_READ))


def _set_lr(row: dict[str, Any]) -> float | None:
    """The lr an applied command left the optimizer with (None: not applied, or no lr known)."""
    if row.get("state") != cmd.APPLIED or not math.isfinite(_real(row.get("done_at"))):
        return None
    result = row.get("result") if isinstance(row.get("result"), dict) else {}
    if row.get("kind") == cmd.SET_LR:
        return _lr(result.get("after", (row.get("args") or {}).get("value")))
    if row.get("kind") == cmd.ROLLBACK:
        return _lr(result.get("lr"))
    return None


def _for_another(row: dict[str, Any], others: dict[str, Any]) -> bool:
    """A nudge of another optimizer than the first (``set lr ... --optimizer G``)."""
    args = row.get("args") if isinstance(row.get("args"), dict) else {}
    return row.get("kind") == cmd.SET_LR and isinstance(args.get("optimizer"), str) and args["optimizer"] in others


def _after(row: dict[str, Any], checkpoint: dict[str, Any]) -> bool:
    if _real(row.get("done_at")) > _real(checkpoint.get("created")):
        return True
    return row.get("branch") == checkpoint.get("branch") and _real(row.get("step")) > _real(checkpoint.get("step"))


def _real(value: Any) -> float:
    """A number from a row anyone could have written; what is not one compares as -inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return -math.inf
    return float(value)


def _lr(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _number(value: float | None) -> str:
    return f"{value:.4g}" if value is not None else "unknown"
