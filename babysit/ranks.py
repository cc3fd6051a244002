"""babysit under torch.distributed (torchrun, DDP): rank 0 leads, the other ranks follow.

Every rank builds the same ``babysit.Run`` and runs the same loop. Rank 0, the leader, owns the run
directory, the store and the checkpoint files, and decides; the followers never open the store.
Both meet only at agreed points, on a gloo group of babysit's own (CPU tensors whatever backend
the training uses, so a meeting never synchronises a GPU):

* a **sync step**: every ``interval`` steps, one ``all_reduce`` of three numbers — "the leader has
  commands to apply", "a follower was asked to stop (a signal)", and the interval to the next sync
  step, chosen by the leader so that meetings are about ``SYNC_EVERY_S`` apart and never more than
  ``MAX_INTERVAL`` steps (the bound on how late a nudge lands; every rank applies it at the same
  step). The all_reduce is posted without waiting and its answer read at the next step's boundary,
  where every rank acts on it (so the exchange overlaps a step of training instead of stalling it);
  only a replayed nudge due at the very step of a sync (the first after a resume) waits for it;
* the **start**, each **epoch's end**, a **stop**, the **finish** and ``run.checkpoint_now()``:
  points every rank reaches anyway.

At a meeting with work to do, the leader runs babysit's usual code and tells the followers each
effect as it happens (``tell``): an lr or momentum to set (through :mod:`babysit.optim`, as on the
leader), a checkpoint to load (each follower reads the verified file itself: the run directory must
be on a filesystem every rank sees), a snapshot for which each follower hands in what differs per
rank (its RNG states, its loader generators, its ``run.state``) and, for a sharded model, gives its
own shard to its writer thread. The meeting ends with ``done``,
which carries the leader's branch, status, message and interruption (a stop, a rollback). A paused
leader keeps the followers waiting in the meeting, with a ``ping`` now and then so no collective
times out.

A rank that does not come to a meeting (stuck in a deadlock of its own, stopped) is named instead
of leaving the others waiting without a word: a rank whose meeting's collective has not completed
after a while (a minute, or half the wait if shorter) says so in the job's key-value store
(:mod:`babysit.arrivals`) and looks there for the ranks that have not; the leader puts them on the
page, and every rank waiting names them in the RanksOutOfStep it raises at the wait's end (and at
``babysit.Run()``, every rank says it has come before any collective). Nothing of this costs a
meeting that completes in time. The wait is the training's own collectives' timeout
(``init_process_group(timeout=...)``), so a long evaluation on rank 0 is fine.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from . import user_state
from . import arrivals as arrivals_module
from .arrivals import Arrivals
from .checkpoint import KEY_EPOCH_START_RNG, KEY_LOADER_RNG, KEY_RNG, KEY_USER_STATE, PendingCheckpoint, rng_state
from .control import RunControl
from .errors import RanksOutOfStep
from .position import ResumePosition
from .trainables import Trainables

log = logging.getLogger(__name__)

KEY_RANKS = "ranks"        # in a checkpoint: per rank, what differs between ranks (None for the leader)
RANK_KEYS = (KEY_RNG, KEY_EPOCH_START_RNG, KEY_LOADER_RNG, KEY_USER_STATE)
SYNC_EVERY_S = 0.02        # how far apart sync steps are, in time, when steps are fast
MAX_INTERVAL = 64          # ... and in steps: a nudge reaches every rank within this many steps


# The points where the ranks meet, checked to be the same on every rank (see Ranks.meet).
START, SYNC, EPOCH_END, BETWEEN_EPOCHS, FINISH = 1, 2, 3, 4, 5
_POINTS = {START: "babysit.Run()", SYNC: "a step boundary", EPOCH_END: "an epoch's end",
           BETWEEN_EPOCHS: "the start of an epoch", FINISH: "the end of run.epochs"}
ARRIVAL_TIMEOUT_S = 300.0  # how long a rank waits for the others to build their Run
_TELL_BYTES = 4096         # what the leader tells at a meeting fits in one broadcast of this size

_joined = 0  # Runs built in this process: the n-th Run of every rank meets the n-th of the others


def join() -> "Ranks | None":
    """The ranks of this job, or None for a single process (no process group, or a group of one).

    Collective: under torch.distributed every rank must build its ``Run`` at the same point; a
    rank whose peers do not is told so (rather than waiting without a word)."""
    import torch.distributed as dist

    global _joined
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    _joined += 1
    rank, world = dist.get_rank(), dist.get_world_size()
    timeout = _training_timeout(dist)
    store = dist.distributed_c10d._get_default_store()
    try:
        Arrivals(store, f"babysit/run-{_joined}", rank, world, ARRIVAL_TIMEOUT_S).all_here("start", "babysit.Run()")
    except RanksOutOfStep as error:
        raise RanksOutOfStep(f"{error}: under torch.distributed every rank builds the same babysit.Run (rank 0 leads, "
                             "the others follow its commands; do not build it on rank 0 only)") from None
    # Babysit's collectives wait as long as the training's own do (a long evaluation on rank 0).
    group = dist.new_group(backend="gloo", timeout=timeout)
    waits = Arrivals(store, f"babysit/run-{_joined}/waits", rank, world, timeout.total_seconds())
    return Ranks(group, rank, world, waits)


def _training_timeout(dist: Any) -> Any:
    try:
        return dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # a backend without CPU options (NCCL only): its own default
        return dist.distributed_c10d._get_default_timeout(dist.get_backend())


class Ranks:
    """This process's share of the meetings: leader (rank 0) or follower."""

    def __init__(self, group: Any, rank: int, world_size: int, arrivals: Arrivals | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.leads = rank == 0
        self.next_sync = 0                       # the step at or after which the next sync step falls
        self._last_sync = (0, time.perf_counter())
        self._posted: tuple[Any, torch.Tensor, int] | None = None  # a sync in flight: (work, header, its step)
        self._in_meeting = False
        self._handed_in: dict[str, Any] | None = None  # a follower's share of the last snapshot
        self._run: _Bound | None = None
        self._arrivals = arrivals  # where a rank that waits long says so, and finds who has not come
        self._waits = 0              # the meetings' collectives waited for, counted alike on every rank
        self.shard_writer: Any = None  # a follower's writer of its shards (a sharded model; the leader's: Snapshots')
        self.report_wait: Callable[[str, list[int]], None] | None = None  # the leader's: a long wait, on the page

    def bind(self, control: RunControl, position: ResumePosition, trainables: Trainables, run_dir: Path,
             load_training_state: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
        """What a meeting reads and a follower changes: this rank's run (see :meth:`follow`)."""
        self._run = _Bound(control, position, trainables, run_dir, load_training_state)

    @property
    def _bound(self) -> "_Bound":
        assert self._run is not None, "Ranks.bind() first"
        return self._run

    # -- the primitives ------------------------------------------------------------------------
    def _broadcast(self, value: Any = None) -> Any:
        """The leader's ``value`` on every rank: one broadcast of a small buffer (what a meeting tells
        is a few hundred bytes), two for anything larger (``broadcast_object_list``'s size, then data)."""
        buffer = torch.zeros(_TELL_BYTES, dtype=torch.uint8)
        if self.leads:
            data = pickle.dumps(value)
            if len(data) <= _TELL_BYTES - 4:
                buffer[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
                buffer[4:4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._dist.broadcast(buffer, src=0, group=self.group)
        size = int.from_bytes(bytes(buffer[:4].tolist()), "little")
        if size:  # (0: too large for the buffer, it follows)
            return value if self.leads else pickle.loads(buffer[4:4 + size].numpy().tobytes())
        box = [value]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def tell(self, *op: Any) -> None:
        """Leader, in a meeting: have every follower do ``op`` (see :meth:`follow`)."""
        if self._in_meeting:
            self._broadcast(op)

    def _new_header(self, point: int, step: int, *, work: bool, stop_asked: bool, interval: int) -> torch.Tensor:
        """What a meeting reduces with MAX: the leader's work flag and interval (the followers send
        0), any rank's stop request, and (as x and -x) the point and the step, to check every rank
        is at the same one. Built from one list: one call into torch, not seven element writes."""
        return torch.tensor([int(work) if self.leads else 0, int(stop_asked), interval if self.leads else 0,
                             point, -point, step, -step], dtype=torch.int64)

    def _exchange(self, point: int, step: int, *, work: bool, stop_asked: bool,
                  interval: int = 0) -> tuple[bool, bool, int]:
        """A blocking meeting's header: (the leader has work, some rank was asked to stop, interval)."""
        self._settle_posted()
        header = self._new_header(point, step, work=work, stop_asked=stop_asked, interval=interval)
        work_ = self._dist.all_reduce(header, op=self._dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._await(work_, f"{_POINTS[point]} after step {step}")
        return self._read(header, point, step)

    def _await(self, work: Any, where: str) -> None:
        """Wait for a meeting's collective; past a while, say so and name who has not come (see
        the module's docstring), and at the group's timeout raise RanksOutOfStep naming them."""
        self._waits += 1
        if self._arrivals is None:
            work.wait()
            return
        patience = min(arrivals_module.LATE_AFTER_S, self._arrivals.timeout_s / 2)
        try:
            work.wait(timeout=timedelta(seconds=patience))
            return
        except RuntimeError:  # not yet: gloo's wait timed out, the collective itself goes on
            pass
        key = f"{self._waits}"
        self._arrivals.post(key, where)
        missing = self._arrivals.missing(key)
        log.warning("babysit: rank %d has waited %.0f s at %s for rank(s) %s", self.rank, patience, where, missing)
        if missing and self.report_wait is not None:
            self.report_wait(f"waited {patience:.0f} s at {where} for rank(s) {', '.join(map(str, missing))}, which "
                             "did not arrive (still busy, stopped, or stuck)", missing)
        try:
            work.wait()  # until the group's own timeout
        except RuntimeError as error:
            missing = self._arrivals.missing(key) or missing
            if not missing:
                raise
            raise self._arrivals.late(missing, where) from error

    def _read(self, header: torch.Tensor, point: int, step: int) -> tuple[bool, bool, int]:
        work, stop_asked, interval, high_point, low_point, high_step, low_step = header.tolist()  # one read
        if high_point != -low_point or high_step != -low_step:
            raise RanksOutOfStep(
                f"the ranks of this job are not at the same point of the loop: rank {self.rank} is at "
                f"{_POINTS[point]} after step {step}, and the ranks are between {_POINTS.get(-low_point, '?')} "
                f"and {_POINTS.get(high_point, '?')}, after steps {-low_step} to {high_step}; every rank "
                "must build babysit.Run and run the same loop (run.epochs, run.batches, run.end_epoch, "
                "run.checkpoint_now) in the same order")
        return bool(work), bool(stop_asked), interval

    def sync_step(self, step: int, *, work: bool, stop_asked: bool, due_at: int | None = None) -> tuple[bool, bool]:
        """At a sync step's boundary: (the leader has work, some rank was asked to stop) — what
        the sync posted one step ago answered, acted on here by every rank. ``work`` is the
        leader's for the next step; ``due_at``, a replayed nudge's step, is met exactly: the sync
        before it is posted at ``due_at - 1``, or, when it is due now, this one waits."""
        found = self._take_posted(step) if self._posted is not None else (False, False)
        if step < self.next_sync:
            return found
        interval = self._choose_interval(step, due_at) if self.leads else 0
        if due_at is not None and due_at <= step:  # due at this very step: decided now, not one step late
            now_work, now_stop, agreed = self._exchange(SYNC, step, work=work, stop_asked=stop_asked, interval=interval)
            self.next_sync = step + agreed
            return found[0] or now_work, found[1] or now_stop
        header = self._new_header(SYNC, step, work=work, stop_asked=stop_asked, interval=interval)
        handle = self._dist.all_reduce(header, op=self._dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._posted = (handle, header, step)
        self.next_sync = step + 1  # its answer is read at the next boundary
        return found

    def restart_syncs(self) -> None:
        """The step went back (a checkpoint was loaded): meet at the next boundary, then as usual."""
        self._settle_posted()
        self.next_sync = 0

    def _take_posted(self, step: int) -> tuple[bool, bool]:
        handle, header, posted_at = self._posted  # type: ignore[misc]
        self._posted = None
        self._await(handle, f"a step boundary after step {posted_at}")
        work, stop_asked, interval = self._read(header, SYNC, posted_at)
        self.next_sync = posted_at + interval
        return work, stop_asked

    def _settle_posted(self) -> None:
        """Before any other collective: finish the sync in flight. Its answer is not acted on
        here, on any rank alike; the leader's commands and a follower's stop are still there to
        be flagged at the next sync step."""
        if self._posted is not None:
            self._take_posted(self._posted[2])

    def _choose_interval(self, step: int, due_at: int | None) -> int:
        last_step, last_time = self._last_sync
        now = time.perf_counter()
        self._last_sync = (step, now)
        if step <= last_step:
            return 1
        per_step = (now - last_time) / (step - last_step)
        # A sync is acted on one step after it is posted: MAX_INTERVAL - 1 apart keeps the bound.
        interval = max(1, min(MAX_INTERVAL - 1, math.ceil(SYNC_EVERY_S / max(per_step, 1e-9))))
        # A nudge replayed at due_at: the sync acted on there is posted one step before it.
        return min(interval, due_at - 1 - step) if due_at is not None and due_at - 1 > step else interval

    def ping(self) -> bool:
        """While the leader is paused in a meeting: keep the collectives alive, and learn whether
        a follower was asked to stop (a signal to that rank)."""
        if self.leads:
            self.tell("ping")
        self._settle_posted()
        flag = torch.tensor([int(self._bound.control.stop_asked)], dtype=torch.int64)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX, group=self.group)
        return bool(flag[0])

    # -- meetings ----------------------------------------------------------------------------
    def meet(self, body: Callable[[], Any], point: int | None = None, *, only_for_a_stop: bool = False) -> Any:
        """Every rank at the same point: the leader runs ``body`` telling its effects, the
        followers carry them out; every rank returns the body's (picklable) result. ``point``:
        which meeting, checked to be the same on every rank first, where the leader also learns
        of a stop asked on another rank (None: a sync step's, already checked).
        ``only_for_a_stop``: ``body`` does nothing unless a stop was asked; when no rank asked for
        one (every rank learns it from the check), the meeting ends there, on every rank alike."""
        if self.leads and self._in_meeting:  # a meeting inside a meeting: one meeting
            return body()
        bound = self._bound
        control = bound.control
        if point is not None:
            _, stop_asked, _ = self._exchange(point, bound.position.step, work=False, stop_asked=control.stop_asked)
            if stop_asked and self.leads and not control.stop_asked:
                control.ask_stop("a stop asked on another rank")
            if only_for_a_stop and not stop_asked:
                return None
        if not self.leads:
            return self.follow()
        result = None
        self._in_meeting = True
        try:
            result = body()
        finally:
            self._in_meeting = False
            # Sent on errors too, or the followers would wait for it until their collectives time out.
            self._broadcast(("done", _picklable(result), bound.position.branch, control.status, control.message,
                             control.interrupt, control.ended))
        return result

    def follow(self) -> Any:
        """Follower: carry out what the leader tells until it says ``done``."""
        bound = self._bound
        trainables = bound.trainables
        while True:
            op = self._broadcast()
            kind = op[0]
            if kind == "done":
                _, result, bound.position.branch, status, message, interrupt, ended = op
                bound.control.adopt(status, message, interrupt, ended)
                return result
            if kind == "set_lr":
                trainables.set_lr(op[1], op[2])
            elif kind == "set_momentum":
                trainables.set_momentum(op[1], op[2])
            elif kind == "restore_hparams":
                trainables.restore_hparams(op[1])
            elif kind == "hand_in":
                self.hand_in(*op[1:])
            elif kind == "epoch_end":
                assert self._handed_in is not None
                bound.position.end_epoch(self._handed_in[KEY_RNG])
            elif kind == "load":
                self.load(op[1])
            elif kind == "ping":
                self.ping()
            else:
                raise RuntimeError(f"babysit: rank {self.rank} was told {kind!r}, which it does not know")

    def leave(self) -> None:
        """The run is closed: release babysit's group now, in order, rather than at interpreter
        exit (where gloo's threads may be torn down after what they use, and abort the process)."""
        if self.group is not None:
            if self._posted is not None:  # the last sync's answer, which nobody needs now
                try:
                    self._posted[0].wait()
                except Exception:  # a peer that is already gone: the group goes anyway
                    pass
                self._posted = None
            group, self.group = self.group, None
            self._dist.destroy_process_group(group)

    # -- snapshots: what differs between ranks -------------------------------------------------
    def ask_for_shares(self, folder: str | None = None) -> None:
        """Leader, taking a snapshot: have every follower hand in its share (RNGs, loader generators,
        run.state; see :meth:`gather_shares`); ``folder``: a sharded checkpoint's, into which every
        follower writes its shard too (each copies its shard meanwhile, as the leader does its own)."""
        self.tell("hand_in", folder)

    def gather_shares(self) -> list[dict[str, Any] | None]:
        """Leader: the shares the followers were asked for, by rank (None for the leader)."""
        shares: list[Any] = [None] * self.world_size
        self._dist.gather_object(None, shares, dst=0, group=self.group)
        return shares

    def hand_in(self, folder: str | None = None) -> None:
        bound = self._bound
        if folder is not None:  # this rank's shard, written by its writer thread with the others'
            self.shard_writer.submit(PendingCheckpoint(path=bound.run_dir / folder, meta={}, state={
                "shards": bound.trainables.shards(), "rest": None}))
        position = bound.position
        now = rng_state()
        share = {
            KEY_RNG: now,
            KEY_EPOCH_START_RNG: position.epoch_start_rng if position.epoch_start_rng is not None else now,
            KEY_LOADER_RNG: position.to_checkpoint(now)[KEY_LOADER_RNG],
            KEY_USER_STATE: user_state.capture(self._bound.trainables.state, on_refused=lambda _key, _message: None),
        }
        self._handed_in = share
        self._dist.gather_object(share, None, dst=0, group=self.group)

    def load(self, record: dict[str, Any]) -> None:
        """Follower: load the checkpoint the leader loaded, with this rank's own share."""
        bound = self._bound
        # The leader checked every file; a shard is checked again by each rank that opens it.
        state = bound.trainables.read(bound.run_dir, record, verify_shards=False)
        bound.load_training_state(for_rank(state, self.rank), record)


def for_rank(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """The checkpoint as rank ``rank`` restores it: the leader's, with this rank's share if it has
    one (a checkpoint of a job with fewer ranks, or of a single process, gives every rank the
    leader's RNGs and run.state)."""
    shares = state.get(KEY_RANKS) or []
    share = shares[rank] if rank < len(shares) else None
    return {**state, **share} if share else state


class _Bound:
    """This rank's run, as a meeting reads it and a follower changes it."""

    def __init__(self, control: RunControl, position: ResumePosition, trainables: Trainables, run_dir: Path,
                 load_training_state: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
        self.control = control
        self.position = position
        self.trainables = trainables
        self.run_dir = run_dir
        self.load_training_state = load_training_state


def _picklable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else None
