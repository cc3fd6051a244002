"""Excursions on the trainer side: a probe set ("what would lr ×½, ×1, ×2 do from here?") or an
lr sweep (the range test), trained on short-lived branches of their own, after which the run
goes back to exactly where it was, on its own branch.

An excursion is a sequence of automatic rollbacks, so it is as exact as a rollback: model,
optimizer, scheduler, ``run.state``, RNGs and the loader's position all come from checkpoints.

1. The command is applied at a step boundary (step S, branch B): a checkpoint of *now* is taken
   on B (the return point) and the excursion is recorded. A probe set from now starts its first
   probe in place (the state is the return point's: nothing to load); one from a checkpoint cuts
   the epoch, like a rollback, and loads it as the loop leaves the epoch.
2. Each leg (a probe, or the sweep) is a branch of its own (parent: the fork checkpoint's
   branch) with the probe's value set (the lr scheduler-aware; momentum by scaling 1 - β, as the
   notes prescribe). A probe that has trained its steps is checkpointed (so a person can continue
   from the winner) and evaluated (``Run(evaluate=)``); the epoch is cut; the next probe loads the
   fork. A sweep sets lr_i = lr_min·(lr_max/lr_min)^(i/(steps-1)) at each step boundary and stops
   once its loss has clearly diverged.
3. After the last leg the return point is loaded and the run goes on ON BRANCH B ITSELF: nothing
   was written on B after S, so B's history is untouched. Then it pauses (``then="pause"``, the
   default, and always after a sweep) for the person to choose, or carries on.

While one runs: pause and resume work as usual; a stop returns to B first (the final checkpoint
is the return point's state); a rollback cancels it; ``cancel`` ends it and returns to B; nudges,
"checkpoint now" and another excursion are refused. The divergence guard never pauses or rolls
back for an excursion's loss (a sweep is meant to diverge; a probe that does just ends early).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import commands as cmd
from .checkpoint import read_verified, rng_state, set_rng_state
from .control import RunControl
from .errors import CommandError
from .guard_watch import WatchedGuards
from .hparam_watch import COMMAND, HparamWatch
from .instruments.probes import HPARAM_SERIES, ProbeReading, winner
from .instruments.sweep import SWEEP_EWMA_BETA, counts_for_minimum, diverged
from .position import ResumePosition
from .resume import Loader
from .rundir import unlink_in
from .snapshots import Snapshots
from .store import PER_STEP, RunStore
from .store.schema import (
    EXCURSION_CANCELLED, EXCURSION_DONE, EXCURSION_PROBE, EXCURSION_SWEEP,
)
from .trainables import Trainables
from .writer import LogQueue, to_float

REASON_EXCURSION = "excursion"  # the return point, taken on the run's own branch
REASON_PROBE = "probe"          # a probe's end, on its branch (to continue from the winner)

NOT_UNDER_RANKS = ("probes and sweeps do not run under torch.distributed: every rank would have to change branch and "
                   "load the same checkpoint at the same step; they work in a single-process run (your own loop "
                   "around babysit.Run)")
NOT_SHARDED = ("probes and sweeps do not run on a sharded (FSDP) model yet: they fork from checkpoints of the whole "
               "model; they work in a single-process run of an unsharded model")


@dataclass
class Leg:
    """One probe (or the sweep) of an excursion, as it is trained."""

    order: int
    param: str
    value: float
    steps: int
    branch: int | None = None
    start_step: int = 0
    steps_done: int = 0
    diverged: bool = False
    loss_ewma: float | None = None
    evaluation: dict[str, float] = field(default_factory=dict)
    end_checkpoint: int | None = None
    note: str = ""


class LossTap:
    """Sits in front of the run's log queue while an excursion runs: reads each step's metric
    ("loss" if logged, else the first per-step value) into a bias-corrected EWMA, and says when
    it has clearly diverged (not finite, or 4× its minimum: the sweep's rule). Costs nothing when
    no excursion runs (it is not there)."""

    def __init__(self, append: Callable[[Any], None]) -> None:
        self.append = append
        self.reset()

    def reset(self) -> None:
        self.metric: str | None = None
        self._average = 0.0
        self._count = 0
        self.smoothed: float | None = None
        self._lowest = math.inf
        self.diverged = False

    def __call__(self, item: Any) -> None:
        self.append(item)
        if item[0] != PER_STEP or self.diverged:
            return
        metrics = item[4]
        if self.metric is None:
            names = [k for k in metrics if k not in HPARAM_SERIES]
            if not names:
                return
            self.metric = "loss" if "loss" in names else names[0]
        value = metrics.get(self.metric)
        if value is None:
            return
        raw = to_float(value)
        if math.isfinite(raw):
            self._count += 1
            self._average = SWEEP_EWMA_BETA * self._average + (1 - SWEEP_EWMA_BETA) * raw
            self.smoothed = self._average / (1 - SWEEP_EWMA_BETA ** self._count)
        if diverged(self.smoothed if self.smoothed is not None else math.nan, self._lowest, raw, self._count):
            self.diverged = True
        elif self.smoothed is not None and counts_for_minimum(self._count):
            self._lowest = min(self._lowest, self.smoothed)


def sweep_lr(lr_min: float, lr_max: float, steps: int, i: int) -> float:
    """The lr of the sweep's step i (0-based): from lr_min to lr_max, evenly on a log scale."""
    return lr_min * (lr_max / lr_min) ** (i / (steps - 1))


def probe_values(hparams: dict[str, Any], optimizer_name: str, args: dict[str, Any]) -> list[float]:
    """The values a probe command tries, checked against what this optimizer has (``hparams`` now)."""
    param = args["param"]
    current = hparams[param]
    if param == "momentum" and current is None:
        raise CommandError(f"this optimizer ({optimizer_name}) has no momentum to probe; probe lr instead")
    if "values" in args:
        return list(args["values"])
    if param == "lr":
        return [cmd.validate_lr(current * f) for f in args["factors"]]
    # Momentum moves as 1 - β (its averaging window is 1/(1 - β)): ×2 of β = 0.9 is 0.8.
    values = []
    for factor in args["factors"]:
        beta = 1 - factor * (1 - current)
        if not 0 <= beta < 1:
            raise CommandError(f"probe momentum ×{factor:g} scales 1 - β = {1 - current:g} to {factor * (1 - current):g}, "
                               f"which is momentum {beta:g}: momentum must be >= 0 and < 1; use smaller factors, or "
                               "give values")
        values.append(beta)
    return values


class Excursions:
    """What excursions need of one run (single process), and the start of one."""

    def __init__(self, run_dir: Path, store: RunStore, control: RunControl, position: ResumePosition,
                 trainables: Trainables, snapshots: Snapshots, loader: Loader, hparams: HparamWatch,
                 guard: WatchedGuards, queue: LogQueue, *, flush_logged: Callable[[], None],
                 evaluate: Callable[[], dict[str, Any]] | None, status_fields: Callable[[], dict[str, Any]],
                 under_ranks: bool) -> None:
        self.run_dir = run_dir
        self.store = store
        self.control = control
        self.position = position
        self.trainables = trainables
        self.snapshots = snapshots
        self.loader = loader
        self.hparams = hparams
        self.guard = guard
        self.queue = queue
        self.flush_logged = flush_logged
        self.user_evaluate = evaluate
        self.status_fields = status_fields
        # Why this run's driver cannot take one (a framework's callback says so), or None.
        self.refused: str | None = NOT_UNDER_RANKS if under_ranks else None

    def refuse(self, why: str) -> None:
        """A driver that cannot make excursions exact (a framework's loop) refuses them, saying why."""
        if self.refused is None:
            self.refused = why

    def begin(self, command: cmd.Command, pending: dict[str, Any]) -> None:
        """Apply a probe or sweep command at this step boundary (see the module's docstring, 1)."""
        if self.refused:
            raise CommandError(self.refused)
        control, position, store = self.control, self.position, self.store
        active = control.excursion
        if active is not None:
            raise CommandError(f"excursion #{active.id} is running; cancel it first (python -m babysit cancel "
                               f"{active.id})")
        args = command.args
        fork_record = fork_state = None
        if command.kind == cmd.PROBE:
            values = probe_values(self.trainables.hparams(), type(self.trainables.optimizer).__name__, args)
            legs = [Leg(i, args["param"], v, args["steps"]) for i, v in enumerate(values)]
            if "checkpoint" in args:
                fork_record = store.checkpoint(args["checkpoint"], must_exist=True)
                assert fork_record is not None
                if fork_record["branch"] in store.excursion_branch_ids():
                    raise CommandError(f"checkpoint #{fork_record['id']} is a probe's end; roll back to it first "
                                       "(that continues the run from it), then probe from there")
                fork_state = read_verified(self.run_dir / fork_record["file"], fork_record["sha256"])
                self.trainables.check_fits(fork_state, fork_record["id"])
            spec = {"param": args["param"], "values": [leg.value for leg in legs], "steps": args["steps"],
                    "then": args["then"], "checkpoint": args.get("checkpoint")}
        else:
            lr = self.trainables.hparams()["lr"] or 0.0
            lr_min = args.get("lr_min", lr * cmd.SWEEP_DEFAULT_SPAN[0])
            lr_max = args.get("lr_max", lr * cmd.SWEEP_DEFAULT_SPAN[1])
            if not 0 < lr_min < lr_max:
                raise CommandError(f"sweep lr_min must be below lr_max, got lr_min {lr_min:g} and lr_max {lr_max:g}")
            legs = [Leg(0, "lr", lr_min, args["steps"])]
            spec = {"lr_min": lr_min, "lr_max": lr_max, "steps": args["steps"], "then": cmd.THEN_PAUSE}
        if fork_record is not None:  # retention keeps it while the return point is written, before the row pins it
            self.snapshots.pin(fork_record["id"], "a probe set is starting from it")
        try:
            job = self.snapshots.take(REASON_EXCURSION)
            self.snapshots.wait()
        finally:
            if fork_record is not None:
                self.snapshots.unpin(fork_record["id"])
        if job.error is not None or "id" not in job.meta:
            raise CommandError(f"the return point could not be checkpointed ({job.error}); nothing was changed")
        self.retire_probe_checkpoints()
        return_record = store.checkpoint(job.meta["id"])
        assert return_record is not None
        kind = EXCURSION_PROBE if command.kind == cmd.PROBE else EXCURSION_SWEEP
        with store.transaction():
            excursion_id = store.add_excursion(
                kind=kind, command=pending["id"], origin_branch=position.branch, origin_step=position.step,
                from_checkpoint=fork_record["id"] if fork_record else return_record["id"],
                return_checkpoint=return_record["id"], spec=spec)
            store.finish_command(pending["id"], cmd.APPLIED, branch=position.branch, step=position.step, result={
                "excursion": excursion_id, "checkpoint": return_record["id"]})
            what = cmd.describe(command.kind, args)
            store.add_event("excursion", f"excursion #{excursion_id} ({what}) starts; the run comes back to "
                            f"checkpoint #{return_record['id']} (step {position.step}) on branch {position.branch}",
                            branch=position.branch, step=position.step, epoch=position.epoch,
                            data={"excursion": excursion_id})
        excursion = Excursion(self, excursion_id, kind, spec, legs, fork_record or return_record, return_record)
        control.start_excursion(excursion)
        if fork_record is None:
            excursion.origin_evaluation = excursion.evaluate()
            excursion.start_leg(0)  # the state is the return point's: nothing to load
        else:
            excursion.pending = ("leg", 0, fork_state)
            control.cut_for_excursion()

    def retire_probe_checkpoints(self) -> None:
        """Bounded disk: earlier excursions' probe checkpoints go, except one a branch started from
        (a winner a person continued from)."""
        store = self.store
        probe_branches = store.excursion_branch_ids()
        if not probe_branches:
            return
        kept = {b["from_checkpoint"] for b in store.branches()}
        for record in store.checkpoints():
            if record["branch"] in probe_branches and record["id"] not in kept:
                unlink_in(self.run_dir, record["file"])
                store.mark_checkpoint_deleted(record["id"])


class Excursion:
    """The excursion in progress on one run (``RunControl.excursion``)."""

    def __init__(self, host: Excursions, excursion_id: int, kind: str, spec: dict[str, Any], legs: list[Leg],
                 fork_record: dict[str, Any], return_record: dict[str, Any]) -> None:
        self.host = host
        self.id = excursion_id
        self.kind = kind
        self.spec = spec
        self.legs = legs
        self.fork_record = fork_record
        self.return_record = return_record
        self.origin_branch = host.position.branch
        self.origin_step = host.position.step
        self.hparams_at_return = host.trainables.hparams()
        self.then = spec.get("then", cmd.THEN_PAUSE)
        self.origin_evaluation: dict[str, float] = {}
        self.leg: Leg | None = None  # the leg being trained
        # What the next cut leads to: ("leg", i, state or None) or ("return", state, message).
        self.pending: tuple[Any, ...] | None = None
        self.tap = LossTap(host.queue.items.append)
        host.queue.tap(self.tap)

    # -- where it is ------------------------------------------------------------------------
    def owns(self, branch: int) -> bool:
        return any(leg.branch == branch for leg in self.legs)

    def describe_leg(self) -> str:
        leg = self.leg
        if leg is None:
            return f"excursion #{self.id}"
        if self.kind == EXCURSION_SWEEP:
            return f"excursion #{self.id}, an lr sweep of {leg.steps} steps"
        return f"excursion #{self.id}, probe {leg.order + 1} of {len(self.legs)} ({leg.param} {leg.value:g})"

    def refuse(self, what: str) -> None:
        raise CommandError(f"{what} is refused while {self.describe_leg()} runs: it would change the probe, not the "
                           f"run; wait for it to end or cancel it (python -m babysit cancel {self.id})")

    # -- the legs ---------------------------------------------------------------------------
    def start_leg(self, order: int) -> None:
        host, leg = self.host, self.legs[order]
        store, position = host.store, host.position
        if leg.param == "lr":
            host.trainables.set_lr(leg.value)
        else:
            host.trainables.set_momentum(leg.value)
        with store.transaction():
            position.branch = store.new_branch(parent=self.fork_record["branch"],
                                               from_checkpoint=self.fork_record["id"], start_step=position.step,
                                               start_epoch=position.epoch, hparams=host.trainables.hparams())
            store.add_excursion_branch(excursion=self.id, branch=position.branch, ord=order, param=leg.param,
                                       value=leg.value, steps=leg.steps)
        leg.branch, leg.start_step = position.branch, position.step
        self.leg = leg
        self.tap.reset()
        host.guard.reset()
        host.hparams.record(force=True)
        host.control.say(f"{self.describe_leg()} on branch {position.branch}, from step {position.step}")

    def at_boundary(self) -> None:
        """Every step boundary while it runs (after the commands): the sweep's next lr; the end
        of a leg that has trained its steps or diverged."""
        leg, host = self.leg, self.host
        if leg is None:
            return
        done = host.position.step - leg.start_step
        if self.tap.diverged or done >= leg.steps:
            self.end_leg(done, "diverged" if self.tap.diverged else "")
            return
        if self.kind == EXCURSION_SWEEP:
            host.trainables.set_lr(sweep_lr(self.spec["lr_min"], self.spec["lr_max"], leg.steps, done))
            host.hparams.record(by=COMMAND)

    def end_leg(self, done: int, note: str = "", *, cancelled: bool = False) -> None:
        """Record the leg as it got (a probe that trained gets its end checkpoint and evaluation; a
        diverged or cancelled one neither) and, unless cancelled, cut toward what comes next."""
        host, leg = self.host, self.leg
        assert leg is not None
        self.leg = None
        # Every value the leg logged is stored before its end is: a reader that sees the probe (or
        # the sweep) ended reads all of its curve (`probes --wait` prints right then).
        host.flush_logged()
        leg.steps_done, leg.diverged, leg.loss_ewma, leg.note = done, self.tap.diverged, self.tap.smoothed, note
        if self.kind == EXCURSION_PROBE and not leg.diverged and not cancelled and done > 0:
            job = host.snapshots.take(REASON_PROBE)
            leg.evaluation = self.evaluate()
            host.snapshots.wait()
            leg.end_checkpoint = job.meta.get("id") if job.error is None else None
        result: dict[str, Any] = {"steps_done": done, "diverged": leg.diverged, "evaluation": leg.evaluation,
                                  "loss_ewma": leg.loss_ewma}
        if note:
            result["note"] = note
        host.store.finish_excursion_branch(leg.branch, end_checkpoint=leg.end_checkpoint, result=result)
        if cancelled:
            return
        if leg.order + 1 < len(self.legs):
            self.pending = ("leg", leg.order + 1, None)
        else:
            self.pending = ("return", EXCURSION_DONE, self.summary())
        host.control.cut_for_excursion()

    def evaluate(self) -> dict[str, float]:
        """``Run(evaluate=)``'s numbers now, leaving the RNGs and the model's train/eval modes as
        they were (nothing it does reaches a kept state)."""
        host = self.host
        if host.user_evaluate is None:
            return {}
        model = host.trainables.model
        rng, modes = rng_state(), [m.training for m in model.modules()]
        try:
            with torch.no_grad():
                raw = host.user_evaluate()
            return {str(k): to_float(v) for k, v in dict(raw).items() if isinstance(v, (int, float, torch.Tensor))
                    and not isinstance(v, bool)}
        except Exception as error:  # the user's evaluation failed: the excursion goes on without its numbers
            host.store.add_event("excursion", f"evaluate() failed during excursion #{self.id}: "
                                 f"{type(error).__name__}: {error}"[:500], branch=host.position.branch,
                                 step=host.position.step)
            return {}
        finally:
            set_rng_state(rng)
            for module, training in zip(model.modules(), modes):
                module.training = training

    # -- the cut, as the loop leaves the epoch -------------------------------------------------
    def transition(self) -> None:
        """Carry out what the cut was for: load the fork and start the next probe, or go back."""
        self.host.control.excursion_cut_done()
        pending, self.pending = self.pending, None
        assert pending is not None
        if pending[0] == "leg":
            order, state = pending[1], pending[2]
            self._load(self.fork_record, state)
            if order == 0:
                self.origin_evaluation = self.evaluate()
            self.start_leg(order)
        else:
            self.go_back(pending[1], pending[2])

    def epoch_end(self, last_epoch: bool) -> None:
        """The loop reached its epoch's end inside a probe: the epoch ends as usual (its logged
        values stay on the probe's branch) but no epoch checkpoint is written on a probe branch.
        If that was the run's last epoch (``last_epoch``), the leg ends here and the excursion goes on."""
        host = self.host
        position = host.position
        position.end_epoch(rng_state())
        host.store.add_epoch(position.branch, position.epoch, position.step)
        host.control.take_checkpoint_asked()
        if last_epoch and self.leg is not None:
            self.end_leg(position.step - self.leg.start_step, "the run's last epoch ended")
            self.transition()

    def cancel(self, state: str, why: str) -> None:
        """End it now (a cancel): the leg in progress is recorded as it got; the run goes back."""
        if self.leg is not None:
            self.end_leg(self.host.position.step - self.leg.start_step, why, cancelled=True)
        self.pending = ("return", state, f"{why}; {self.summary()}")
        self.host.control.cut_for_excursion()

    def go_back_for_stop(self) -> None:
        """A stop during the excursion: back to the return point first (the final checkpoint is
        the run's own state there, never a probe's)."""
        if self.leg is not None:
            self.end_leg(self.host.position.step - self.leg.start_step, "stopped", cancelled=True)
        self.go_back(EXCURSION_CANCELLED, f"stopped: {self.summary()}", then=None)

    def give_way_to_rollback(self, checkpoint_id: int) -> None:
        """A person's rollback during the excursion: it ends here; the rollback loads its checkpoint."""
        if self.leg is not None:
            self.end_leg(self.host.position.step - self.leg.start_step, f"a rollback to #{checkpoint_id}",
                         cancelled=True)
        self._end(EXCURSION_CANCELLED, f"cancelled by a rollback to checkpoint #{checkpoint_id}")

    def go_back(self, state: str, message: str, then: str | None = "spec") -> None:
        """Load the return point and carry on on the run's own branch, then pause or go on."""
        host = self.host
        control, position = host.control, host.position
        last_command = control.last_command
        self._load(self.return_record, None)
        control.saw_command(last_command)
        position.branch = self.origin_branch
        host.hparams.adopt()  # the return point's lr and momentum, already on B's curve: nothing to log
        self._end(state, message)
        then = self.then if then == "spec" else then
        if then == cmd.THEN_PAUSE:
            control.pause_after_excursion(f"paused at step {position.step} after {message}")
        elif then == cmd.THEN_CONTINUE:
            control.run_again(f"back at step {position.step} after {message}")
        host.store.write_status(**host.status_fields(), heartbeat=time.time())

    def _end(self, state: str, message: str) -> None:
        host = self.host
        host.queue.untap()
        host.control.end_excursion()
        result: dict[str, Any] = {"origin_evaluation": self.origin_evaluation}
        best = self.best()
        if best is not None:
            result["winner"] = best.branch
        with host.store.transaction():
            host.store.finish_excursion(self.id, state, message=message, result=result)
            host.store.add_event("excursion", f"excursion #{self.id} {state}: {message}", branch=self.origin_branch,
                                 step=self.origin_step, data={"excursion": self.id, "state": state})

    def _load(self, record: dict[str, Any], state: dict[str, Any] | None) -> None:
        host = self.host
        if state is None:
            state = read_verified(host.run_dir / record["file"], record["sha256"])
        host.loader.load_state(state, record)

    # -- what it found ----------------------------------------------------------------------
    def best(self) -> ProbeReading | None:
        if self.kind != EXCURSION_PROBE:
            return None
        return winner([ProbeReading(branch=leg.branch, order=leg.order, param=leg.param, value=leg.value,
                                    steps_planned=leg.steps, steps_done=leg.steps_done, start_step=leg.start_step,
                                    loss_ewma=leg.loss_ewma, diverged=leg.diverged, evaluation=leg.evaluation,
                                    end_checkpoint=leg.end_checkpoint)
                       for leg in self.legs if leg.branch is not None])

    def summary(self) -> str:
        if self.kind == EXCURSION_SWEEP:
            leg = self.legs[0]
            how = "diverged after" if leg.diverged else "ran"
            return f"the lr sweep {how} {leg.steps_done} of {leg.steps} steps (python -m babysit probes {self.id})"
        done = [leg for leg in self.legs if leg.branch is not None]
        best = self.best()
        text = f"{len(done)} of {len(self.legs)} probes of {self.spec['steps']} steps"
        if best is not None:
            text += (f"; best: {best.param} {best.value:g} on branch {best.branch}"
                     + (f" (checkpoint #{best.end_checkpoint})" if best.end_checkpoint else ""))
        return text
