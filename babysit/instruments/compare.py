"""Branches side by side: where each came from, what changed at its fork, how it did since.

A branch starts at a fork: a checkpoint of its parent (a rollback, a probe, a sweep) or the run's
start. The table says, for each branch, its origin checkpoint, the hyperparameters that differ
from the parent's at that step, its best validation number (per epoch) and at which epoch, and
its loss at the same number of steps since the fork as every other branch compared (the
smoothed step metric at +N steps), so the numbers compare like with like. N is the shortest
compared branch's length, leaving out what would make it meaningless: a branch that diverged (a
blow-up after 6 steps compares nothing) and one shorter than :data:`MIN_COMPARE_STEPS` (the
EWMA of a few steps is mostly its first step's noise); those are named in the comparison. Excursion branches (probe sets, sweeps) are marked as such: they are never
the run's main line. Each row says whether the branch is on the trainer's line of descent (walked
by babysit.store.lineage, which ends at a damaged parent row and says so in ``damage``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..downsample import ewma
from ..store import EXCURSION_SWEEP, PER_EPOCH, PER_STEP, RunStore, SeriesInfo
from ..store.lineage import line_of
from .probes import HPARAM_SERIES

# The smoothing of the loss compared at equal steps: the course notes' β = 0.9 (about ten steps),
# bias-corrected, so a short branch's first steps are not pulled towards zero.
LOSS_BETA = 0.9
# A branch shorter than this does not set N (unless no branch is longer).
MIN_COMPARE_STEPS = 20
KIND_RUN, KIND_PROBE, KIND_SWEEP = "run", "probe", "sweep"
# Validation numbers that are better when higher; any other is better when lower (a loss, an error).
HIGHER_IS_BETTER = ("acc", "f1", "auc", "bleu", "precision", "recall")


@dataclass(frozen=True)
class BranchRow:
    """One branch of the run, as the comparison table shows it."""

    branch: int
    parent: int | None
    kind: str                                 # "run", "probe" or "sweep"
    excursion: int | None                     # the probe set or sweep it belongs to
    current: bool                             # the branch the trainer is on
    from_checkpoint: int | None
    fork_epoch: int                           # the epoch and step the branch started at
    fork_step: int
    changed: dict[str, tuple[float | None, float | None]]  # name -> (parent's at the fork, this branch's)
    length: int                               # steps trained since the fork
    best_metric: str | None = None            # the per-epoch validation number judged
    best_value: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    loss_metric: str | None = None            # the per-step series compared at +N steps
    loss_at: float | None = None              # its EWMA at fork + ``at_steps``
    at_steps: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    on_line: bool = False                     # on the trainer's line of descent (what the chart draws live)


@dataclass(frozen=True)
class Comparison:
    rows: list[BranchRow]
    at_steps: int | None   # N: the steps since the fork at which losses are compared (None: no data)
    loss_metric: str | None
    best_metric: str | None
    damage: str | None = None  # what is wrong with the run's parent rows, when its line of descent ends at damage
    left_out: dict[int, str] = field(default_factory=dict)  # branch -> why it did not set N ("diverged after 6 steps")

    def row(self, branch: int) -> BranchRow | None:
        return next((r for r in self.rows if r.branch == branch), None)


def excursion_side_branches(store: RunStore) -> frozenset[int]:
    """The excursion branches no branch of the run went on from: probes and sweeps that stay
    excursions (a winner the run continued from is part of its history). One small query when
    the run has no excursion."""
    excursion_of = store.excursion_branch_ids()
    if not excursion_of:
        return frozenset()
    parents = {b["parent"] for b in store.branches() if b["id"] not in excursion_of}
    return frozenset(b for b in excursion_of if b not in parents)


def branch_kinds(store: RunStore) -> dict[int, tuple[str, int | None]]:
    """Each excursion branch's kind ("probe" or "sweep") and excursion; a branch not listed is
    the run's own ("run")."""
    excursion_of = store.excursion_branch_ids()
    if not excursion_of:
        return {}
    kinds = {e["id"]: e["kind"] for e in store.excursions(limit=10_000)}
    return {b: (KIND_SWEEP if kinds.get(e) == EXCURSION_SWEEP else KIND_PROBE, e) for b, e in excursion_of.items()}


def higher_is_better(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in HIGHER_IS_BETTER)


def choose_step_metric(series: Iterable[SeriesInfo]) -> str | None:
    """"loss" when the run logs it per step, else the first per-step series that is not a setting."""
    names = [s.name for s in series if s.per == PER_STEP and s.segment == 0 and s.name not in HPARAM_SERIES]
    if "loss" in names:
        return "loss"
    return names[0] if names else None


def choose_epoch_metric(series: Iterable[SeriesInfo]) -> str | None:
    """The validation number to judge branches by: val_loss, else a val_* series, else any per epoch."""
    names = sorted({s.name for s in series if s.per == PER_EPOCH and s.segment == 0})
    for wanted in (lambda n: n == "val_loss", lambda n: n.startswith("val") and "loss" in n,
                   lambda n: n.startswith("val"), lambda n: True):
        found = [n for n in names if wanted(n)]
        if found:
            return found[0]
    return None


def compare_branches(store: RunStore, branches: Iterable[int] | None = None, *, metric: str | None = None,
                     best_metric: str | None = None, at_steps: int | None = None) -> Comparison:
    """The comparison table of ``branches`` (all of the run's when None), oldest first.

    ``metric`` is the per-step series compared at equal steps (default :func:`choose_step_metric`),
    ``best_metric`` the per-epoch one judged best (default :func:`choose_epoch_metric`), and
    ``at_steps`` the N of "loss at +N steps since the fork" (default: the shortest compared branch's
    length, sweeps left out: their lr is not one value).
    """
    every = store.branches()
    if branches is not None:
        wanted = set(branches)
        unknown = sorted(wanted - {b["id"] for b in every})
        if unknown:
            known = ", ".join(str(b["id"]) for b in every) or "none"
            raise ValueError(f"branch {unknown[0]} is not in this run; its branches: {known}")
        chosen = [b for b in every if b["id"] in wanted]
    else:
        chosen = every
    series = store.series()
    metric = metric or choose_step_metric(series)
    best_metric = best_metric or choose_epoch_metric(series)
    kind_of = branch_kinds(store)
    status = store.status()
    by_id = {b["id"]: b for b in every}
    own = {(s.name, s.branch, s.per): s for s in series if s.segment == 0}
    epochs = store.epochs()
    line = line_of(by_id, status["branch"]) if isinstance(status.get("branch"), int) else None
    on_line = set(line.branches) if line is not None else set()

    lengths = {b["id"]: _length(store, b, own, status) for b in chosen}
    partial = []
    for b in chosen:
        kind, excursion = kind_of.get(b["id"], (KIND_RUN, None))
        checkpoint = store.checkpoint(b["from_checkpoint"]) if b["from_checkpoint"] else None
        ends = [(e, end) for branch, e, end in epochs if branch == b["id"]]
        best = _best(store, own.get((best_metric, b["id"], PER_EPOCH)), best_metric, ends) if best_metric else None
        partial.append((b, kind, excursion, checkpoint, best))
    left_out: dict[int, str] = {}
    if at_steps is None:
        at_steps, left_out = _meaningful_length(store, [(b["id"], lengths[b["id"]]) for b, kind, *_ in partial
                                                        if kind != KIND_SWEEP and lengths[b["id"]] > 0])
    rows = []
    for b, kind, excursion, checkpoint, best in partial:
        info = own.get((metric, b["id"], PER_STEP)) if metric else None
        loss = _loss_at(store, info, b["start_step"], at_steps) if at_steps and lengths[b["id"]] >= at_steps else None
        rows.append(BranchRow(
            branch=b["id"], parent=b["parent"], kind=kind, excursion=excursion,
            current=b["id"] == status.get("branch"), from_checkpoint=b["from_checkpoint"],
            fork_epoch=int(checkpoint["epoch"]) if checkpoint else int(b["start_epoch"]),
            fork_step=int(b["start_step"]),
            changed=_changed(store, b, by_id.get(b["parent"]), checkpoint, own),
            length=lengths[b["id"]],
            best_metric=best_metric if best else None, best_value=best[0] if best else None,
            best_epoch=best[1] if best else None, best_step=best[2] if best else None,
            loss_metric=metric if loss is not None else None, loss_at=loss,
            at_steps=at_steps if loss is not None else None, hparams=dict(b["hparams"]), on_line=b["id"] in on_line,
        ))
    return Comparison(rows=rows, at_steps=at_steps, loss_metric=metric, best_metric=best_metric,
                      damage=line.damage if line is not None else None, left_out=left_out)


def _meaningful_length(store: RunStore, lengths: list[tuple[int, int]]) -> tuple[int | None, dict[int, str]]:
    """N, the steps since the fork at which the branches' losses are compared, and the branches
    left out of choosing it, with why: N is the shortest length among the branches that did not
    diverge and ran at least MIN_COMPARE_STEPS (if none did: among all)."""
    if not lengths:
        return None, {}
    diverged = {e["branch"] for e in store.events(kinds=["divergence"]) if e.get("branch") is not None}
    floor = min(MIN_COMPARE_STEPS, max(length for _, length in lengths))
    left_out = {branch: f"diverged after {length} steps" if branch in diverged else f"only {length} steps"
                for branch, length in lengths if branch in diverged or length < floor}
    kept = [length for branch, length in lengths if branch not in left_out]
    if not kept:
        return min(length for _, length in lengths), {}
    return min(kept), left_out


def _length(store: RunStore, branch: dict[str, Any], own: dict[tuple[str, int, str], SeriesInfo],
            status: dict[str, Any]) -> int:
    """Steps since the fork: the last step any per-step series of the branch logged (or the
    trainer's step, on the branch it is on)."""
    last = int(branch["start_step"])
    for (name, b, per), info in own.items():
        if b == branch["id"] and per == PER_STEP:
            extent = store.series_extent(info.id)
            if extent is not None:
                last = max(last, extent[1])
    if status.get("branch") == branch["id"] and isinstance(status.get("step"), int):
        last = max(last, status["step"])
    return last - int(branch["start_step"])


def _best(store: RunStore, info: SeriesInfo | None, name: str,
          epoch_ends: list[tuple[int, int]]) -> tuple[float, int | None, int] | None:
    """(best value, its epoch, its step) of a per-epoch series (logged at the epoch's last step;
    the epoch is the branch's first whose end is at or after that step, None when unrecorded)."""
    if info is None:
        return None
    steps, values, _ = store.chunk_points(info.id)
    finite = np.isfinite(values)
    if not finite.any():
        return None
    steps, values = steps[finite], values[finite]
    i = int(values.argmax() if higher_is_better(name) else values.argmin())
    step = int(steps[i])
    epoch = next((e for e, end in sorted(epoch_ends, key=lambda item: item[1]) if end >= step), None)
    return float(values[i]), epoch, step


def _loss_at(store: RunStore, info: SeriesInfo | None, start: int, steps: int) -> float | None:
    """The EWMA of the branch's own points (after its fork) at fork + ``steps``."""
    if info is None:
        return None
    xs, ys, _ = store.chunk_points(info.id, start + 1, start + steps)
    inside = (xs > start) & (xs <= start + steps)
    xs, ys = xs[inside], ys[inside]
    if not len(xs):
        return None
    smoothed = ewma(xs, ys, LOSS_BETA)
    value = float(smoothed[-1])
    return value if math.isfinite(value) else None


def _changed(store: RunStore, branch: dict[str, Any], parent: dict[str, Any] | None,
             checkpoint: dict[str, Any] | None,
             own: dict[tuple[str, int, str], SeriesInfo]) -> dict[str, tuple[float | None, float | None]]:
    """The hyperparameters that differ between the branch's start and its parent at the fork step
    (the fork checkpoint's, else the parent's logged lr and momentum at that step)."""
    if parent is None:
        return {}
    before: dict[str, Any] = dict(checkpoint["hparams"]) if checkpoint else {}
    for name in ("lr", "momentum"):
        if before.get(name) is None:
            before[name] = _value_at(store, own.get((name, parent["id"], PER_STEP)), int(branch["start_step"]))
    before, after = _flat(before), _flat(branch["hparams"])
    changed = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if isinstance(old, (int, float)) and isinstance(new, (int, float)):
            if not math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0):
                changed[name] = (float(old), float(new))
        elif new is not None and old != new:
            changed[name] = (old, new)
    return changed


def _flat(hparams: Any) -> dict[str, Any]:
    """Hyperparameters with a run's other optimizers' (``{"others": {"G": {"lr": ...}}}``) as ``lr/G``,
    the names of their chart series."""
    if not isinstance(hparams, dict):
        return {}
    flat = {name: value for name, value in hparams.items() if name != "others"}
    others = hparams.get("others")
    for optimizer, values in (others.items() if isinstance(others, dict) else ()):
        for name, value in (values.items() if isinstance(values, dict) else ()):
            flat[f"{name}/{optimizer}"] = value
    return flat


def _value_at(store: RunStore, info: SeriesInfo | None, step: int) -> float | None:
    """The last value a stepwise series (lr, momentum) took at or before ``step``."""
    if info is None:
        return None
    xs, ys, _ = store.chunk_points(info.id, None, step)
    before = xs <= step
    return float(ys[before][-1]) if before.any() else None


def describe_change(changed: dict[str, tuple[Any, Any]]) -> str:
    """"lr 0.1 → 0.05, momentum 0.9 → 0.8" (or "" when nothing changed)."""
    return ", ".join(f"{name} {_number(old)} → {_number(new)}" for name, (old, new) in changed.items())


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "?" if value is None else str(value)


def row_object(row: BranchRow) -> dict[str, Any]:
    """A row as a JSON-ready object (what ``branches --json`` prints)."""
    return {
        "branch": row.branch, "parent": row.parent, "kind": row.kind, "excursion": row.excursion,
        "current": row.current, "from_checkpoint": row.from_checkpoint, "fork_epoch": row.fork_epoch,
        "fork_step": row.fork_step, "length": row.length,
        "changed": {k: {"before": v[0], "after": v[1]} for k, v in row.changed.items()},
        "best": None if row.best_value is None else {"metric": row.best_metric, "value": row.best_value,
                                                     "epoch": row.best_epoch, "step": row.best_step},
        "loss_at": None if row.loss_at is None else {"metric": row.loss_metric, "steps": row.at_steps,
                                                     "value": row.loss_at},
        "hparams": row.hparams, "on_line": row.on_line,
    }


def describe_n(comparison: Comparison) -> str:
    """How N was chosen, and which branches did not set it: what the CLI and the page say under the table."""
    said = f"N = {comparison.at_steps}: the shortest compared branch"
    if comparison.left_out:
        said += ", leaving out " + ", ".join(f"branch {b} ({why})" for b, why in sorted(comparison.left_out.items()))
    return said


def format_table(comparison: Comparison) -> str:
    """The comparison as a plain-text table for a terminal."""
    if not comparison.rows:
        return "no branches yet"
    n = comparison.at_steps
    loss_head = f"{comparison.loss_metric or 'loss'}@+{n}" if n else "loss@+N"
    best_head = f"best {comparison.best_metric}" if comparison.best_metric else "best"
    header = ["branch", "kind", "parent", "from", "fork at", "length", loss_head, best_head, "changed at the fork"]
    lines = []
    for r in comparison.rows:
        kind = r.kind + (f" #{r.excursion}" if r.excursion else "")
        origin = f"#{r.from_checkpoint}" if r.from_checkpoint else "start"
        best = "–" if r.best_value is None else f"{r.best_value:.4g} " + (
            f"(epoch {r.best_epoch})" if r.best_epoch is not None else f"(step {r.best_step})")
        lines.append([f"{r.branch}{' *' if r.current else ''}", kind, str(r.parent or "–"), origin,
                      f"epoch {r.fork_epoch}, step {r.fork_step}", str(r.length),
                      f"{r.loss_at:.4g}" if r.loss_at is not None else "–", best, describe_change(r.changed) or "–"])
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    note = (f"{loss_head}: the EWMA (β {LOSS_BETA:g}) of {comparison.loss_metric} {n} steps after each branch's fork"
            f" ({describe_n(comparison)}); * the trainer's branch") if n else \
        "* the trainer's branch; no branch has logged a step since its fork yet"
    damage = [f"damaged run: {comparison.damage}"] if comparison.damage else []
    return "\n".join(out + ["", note] + damage)
