"""Ranks meeting through the job's key-value store, with a deadline that names who did not come.

A collective that a rank never joins waits for it, silently, until the process group's timeout
(thirty minutes by default), and then says only that it timed out. Before babysit's meetings the
ranks first say they have arrived, in the key-value store torchrun starts for the job (thread-safe,
and no collective): each rank posts under ``<prefix>/<key>/<rank>`` and waits until every rank has.
A wait that runs long is reported (``on_late``: a log line, an event on the page) naming the ranks
that have not arrived, and at the deadline every rank raises
:class:`~babysit.errors.RanksOutOfStep` naming them, the same way on every rank, late ones
included: the first rank to decide (all came, or some are late) sets the outcome with
compare-and-set, and every other rank reads it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from .errors import RanksOutOfStep

log = logging.getLogger(__name__)

LATE_AFTER_S = 60.0  # a wait this long (or half the deadline, if shorter) is reported, naming who is missing
# The store is asked again after a pause that grows from 0.2 ms to 20 ms: ranks a moment apart meet
# without a long sleep, a long wait costs a few store round trips a second.
_FIRST_POLL_S = 0.0002
_LONGEST_POLL_S = 0.02


class Arrivals:
    """One rank's side of the meetings under ``prefix`` in ``store`` (a ``torch.distributed.Store``)."""

    def __init__(self, store: Any, prefix: str, rank: int, world_size: int, timeout_s: float) -> None:
        self.store, self.prefix, self.rank, self.world_size, self.timeout_s = store, prefix, rank, world_size, timeout_s

    def _keys(self, key: str) -> list[str]:
        return [f"{self.prefix}/{key}/{rank}" for rank in range(self.world_size)]

    def _missing(self, keys: list[str]) -> list[int]:
        return [rank for rank, name in enumerate(keys) if not self.store.check([name])]

    def _wait(self, key: str, what: str, on_late: Callable[[list[int], float], None] | None) -> list[int]:
        """Wait until every rank posted under ``key``, or the deadline; the ranks missing then."""
        keys = self._keys(key)
        started = time.monotonic()
        late_at, deadline = started + min(LATE_AFTER_S, self.timeout_s / 2), started + self.timeout_s
        pause = _FIRST_POLL_S
        while not self.store.check(keys):  # one round trip, however many ranks
            now = time.monotonic()
            if now > deadline:
                return self._missing(keys)
            if now > late_at:
                late_at = float("inf")  # once
                missing = self._missing(keys)
                log.warning("babysit: rank %d has waited %.0f s for %s at %s", self.rank, now - started,
                            _ranks(missing), what)
                if on_late is not None and missing:
                    on_late(missing, now - started)
            time.sleep(pause)
            pause = min(pause * 1.5, _LONGEST_POLL_S)
        return []

    def post(self, key: str, value: Any = None) -> None:
        """Say this rank has come to ``key`` (without waiting for the others)."""
        self.store.set(self._keys(key)[self.rank], json.dumps(value))

    def missing(self, key: str) -> list[int]:
        """The ranks that have not said they came to ``key``."""
        return self._missing(self._keys(key))

    def late(self, missing: list[int], what: str) -> RanksOutOfStep:
        return RanksOutOfStep(f"{_ranks(missing)} did not arrive at {what} within {self.timeout_s:.0f} s (stopped, "
                              "killed, or stuck in a collective of its own)")

    def all_arrive(self, key: str, value: Any, what: str,
                   on_late: Callable[[list[int], float], None] | None = None) -> list[Any]:
        """Post ``value`` (JSON); every rank's value, once all posted. Raises RanksOutOfStep on every
        rank alike when some did not come by the deadline."""
        self.all_here(key, what, on_late, value)
        return [json.loads(self.store.get(name)) for name in self._keys(key)]

    def all_here(self, key: str, what: str, on_late: Callable[[list[int], float], None] | None = None,
                 value: Any = None) -> None:
        """:meth:`all_arrive` without reading the values back (a few store round trips in all)."""
        self.store.set(self._keys(key)[self.rank], json.dumps(value))
        missing = self._wait(key, what, on_late)
        outcome = "all" if not missing else "late:" + ",".join(map(str, missing))
        decided = self.store.compare_set(f"{self.prefix}/{key}/outcome", "", outcome).decode()
        if decided != "all":
            raise self.late([int(rank) for rank in decided.split(":", 1)[1].split(",")], what)

    def report_to_leader(self, key: str, value: Any, what: str) -> list[Any]:
        """Post ``value``; on rank 0, every rank's value once all posted (the others return at once)."""
        self.store.set(self._keys(key)[self.rank], json.dumps(value))
        if self.rank != 0:
            return []
        missing = self._wait(key, what, None)
        if missing:
            raise self.late(missing, what)
        return [json.loads(self.store.get(name)) for name in self._keys(key)]

    def forget(self, *keys: str) -> None:
        """Rank 0, once every rank is past them: remove the keys of these meetings from the store."""
        for key in keys:
            for name in [*self._keys(key), f"{self.prefix}/{key}/outcome"]:
                try:
                    self.store.delete_key(name)
                except Exception:  # a store without delete: the keys are small
                    return


def _ranks(missing: list[int]) -> str:
    return ("rank " if len(missing) == 1 else "ranks ") + ", ".join(str(rank) for rank in missing)
