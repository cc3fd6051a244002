"""babysit under torch.distributed (torchrun, DDP): rank 0 leads, the other ranks follow.

Every rank builds the same ``babysit.Run`` and runs the same loop. Rank 0, the leader, owns the run
directory, the store and the checkpoint files, and decides; the followers never open the store.
Both meet only at agreed points, on a gloo group of babysit's own (CPU tensors whatever backend
the training uses, so a meeting never synchronises a GPU):

* a **sync step**: every ``interval`` steps, one ``all_reduce`` of three numbers — "the leader has
  commands to apply", "a follower was asked to stop (a signal)", and the interval to the next sync
  step, chosen by the leader so that meetings are about ``SYNC_EVERY_S`` apart and never more than
  ``MAX_INTERVAL`` steps (the bound on how late a nudge lands; every rank applies it at the same
  step);
* the **start**, each **epoch's end**, a **stop**, the **finish** and ``run.checkpoint_now()``:
  points every rank reaches anyway.

At a meeting with work to do, the leader runs babysit's usual code and tells the followers each
effect as it happens (``tell``): an lr or momentum to set (through :mod:`babysit.optim`, as on the
leader), a checkpoint to load (each follower reads the verified file itself: the run directory must
be on a filesystem every rank sees), a snapshot for which each follower hands in what differs per
rank (its RNG states, its loader generators, its ``run.state``). The meeting ends with ``done``,
which carries the leader's branch, status, message and interruption (a stop, a rollback). A paused
leader keeps the followers waiting in the meeting, with a ``ping`` now and then so no collective
times out.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import optim, user_state
from .checkpoint import (
    KEY_EPOCH_START_RNG, KEY_LOADER_RNG, KEY_RNG, KEY_USER_STATE, read_verified, rng_state,
)

if TYPE_CHECKING:
    from .run import Run

KEY_RANKS = "ranks"        # in a checkpoint: per rank, what differs between ranks (None for the leader)
RANK_KEYS = (KEY_RNG, KEY_EPOCH_START_RNG, KEY_LOADER_RNG, KEY_USER_STATE)
SYNC_EVERY_S = 0.02        # how far apart sync steps are, in time, when steps are fast
MAX_INTERVAL = 64          # ... and in steps: a nudge reaches every rank within this many steps
PING_S = 1.0               # while paused, how often the leader tells the followers it is there


def join() -> "Ranks | None":
    """The ranks of this job, or None for a single process (no process group, or a group of one).

    Collective: under torch.distributed every rank must build its ``Run`` at the same point."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Ranks(dist.new_group(backend="gloo"), dist.get_rank(), dist.get_world_size())


class Ranks:
    """This process's share of the meetings: leader (rank 0) or follower."""

    def __init__(self, group: Any, rank: int, world_size: int) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.leads = rank == 0
        self.next_sync = 0                       # the step at or after which the next sync step falls
        self._last_sync = (0, time.perf_counter())
        self._header = torch.zeros(3, dtype=torch.int64)
        self._in_meeting = False
        self._handed_in: dict[str, Any] | None = None  # a follower's share of the last snapshot

    # -- the primitives ------------------------------------------------------------------------
    def _broadcast(self, value: Any = None) -> Any:
        box = [value]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def tell(self, *op: Any) -> None:
        """Leader, in a meeting: have every follower do ``op`` (see :meth:`follow`)."""
        if self._in_meeting:
            self._broadcast(op)

    def sync_step(self, step: int, *, work: bool, stop_asked: bool) -> tuple[bool, bool]:
        """At a sync step: (the leader has work, some rank was asked to stop). Sets the next one."""
        header = self._header
        header[0] = int(work) if self.leads else 0
        header[1] = int(stop_asked)
        header[2] = self._choose_interval(step) if self.leads else 0
        self._dist.all_reduce(header, group=self.group)
        self.next_sync = step + int(header[2])
        return bool(header[0]), bool(header[1])

    def _choose_interval(self, step: int) -> int:
        last_step, last_time = self._last_sync
        now = time.perf_counter()
        self._last_sync = (step, now)
        if step <= last_step:
            return 1
        per_step = (now - last_time) / (step - last_step)
        return max(1, min(MAX_INTERVAL, math.ceil(SYNC_EVERY_S / max(per_step, 1e-9))))

    # -- meetings ----------------------------------------------------------------------------
    def meet(self, run: "Run", body: Callable[[], Any]) -> Any:
        """Every rank at the same point: the leader runs ``body`` telling its effects, the
        followers carry them out; every rank returns the body's (picklable) result."""
        if not self.leads:
            return self.follow(run)
        if self._in_meeting:  # a meeting inside a meeting (a stop inside the epoch's end): one meeting
            return body()
        result = None
        self._in_meeting = True
        try:
            result = body()
        finally:
            self._in_meeting = False
            # Sent on errors too, or the followers would wait for it until their collectives time out.
            self._broadcast(("done", _picklable(result), run.branch, run.status, run.message, run._interrupt,
                             run._ended))
        return result

    def follow(self, run: "Run") -> Any:
        """Follower: carry out what the leader tells until it says ``done``."""
        while True:
            op = self._broadcast()
            kind = op[0]
            if kind == "done":
                _, result, run.branch, run.status, run.message, run._interrupt, run._ended = op
                return result
            if kind == "set_lr":
                optim.set_lr(run.optimizer, op[1], run.scheduler)
            elif kind == "set_momentum":
                optim.set_momentum(run.optimizer, op[1])
            elif kind == "restore_hparams":
                optim.restore_hparams(run.optimizer, op[1], run.scheduler)
            elif kind == "hand_in":
                self.hand_in(run)
            elif kind == "epoch_end":
                assert self._handed_in is not None
                run.position.end_epoch(self._handed_in[KEY_RNG])
            elif kind == "load":
                self.load(run, op[1])
            elif kind != "ping":
                raise RuntimeError(f"babysit: rank {self.rank} was told {kind!r}, which it does not know")

    def leave(self) -> None:
        """The run is closed: release babysit's group now, in order, rather than at interpreter
        exit (where gloo's threads may be torn down after what they use, and abort the process)."""
        if self.group is not None:
            group, self.group = self.group, None
            self._dist.destroy_process_group(group)

    # -- snapshots: what differs between ranks -------------------------------------------------
    def gather_for_snapshot(self, run: "Run") -> list[dict[str, Any] | None]:
        """Leader, taking a snapshot: every follower's share (RNGs, loader generators, run.state)."""
        self.tell("hand_in")
        shares: list[Any] = [None] * self.world_size
        self._dist.gather_object(None, shares, dst=0, group=self.group)
        return shares

    def hand_in(self, run: "Run") -> None:
        position = run.position
        now = rng_state()
        share = {
            KEY_RNG: now,
            KEY_EPOCH_START_RNG: position.epoch_start_rng if position.epoch_start_rng is not None else now,
            KEY_LOADER_RNG: position.to_checkpoint(now)[KEY_LOADER_RNG],
            KEY_USER_STATE: user_state.capture(run.state, on_refused=lambda _key, _message: None),
        }
        self._handed_in = share
        self._dist.gather_object(share, None, dst=0, group=self.group)

    def load(self, run: "Run", record: dict[str, Any]) -> None:
        """Follower: load the checkpoint the leader loaded, with this rank's own share."""
        state = read_verified(run.run_dir / record["file"], record["sha256"])
        run._resume.load_training_state(for_rank(state, self.rank), record)


def for_rank(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """The checkpoint as rank ``rank`` restores it: the leader's, with this rank's share if it has
    one (a checkpoint of a job with fewer ranks, or of a single process, gives every rank the
    leader's RNGs and run.state)."""
    shares = state.get(KEY_RANKS) or []
    share = shares[rank] if rank < len(shares) else None
    return {**state, **share} if share else state


def _picklable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else None
