"""Which logged values the divergence guard watches: one :class:`~babysit.guard.DivergenceGuard`
per watched name, each with averages of its own (a GAN's ``loss_D`` and ``loss_G`` live on
different scales), made when the name is first logged.

By default every per-step value whose name contains "loss" is watched (``loss``, ``train_loss``,
``loss_D``); ``GuardConfig(metrics=...)`` names them instead. A run that logs values of which none
is watched gets no guard at all: that is said once, so nobody believes a guard is on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from .guard import Divergence, DivergenceGuard, GuardConfig

# The steps of values logged without a watched one before babysit says the guard watches nothing
# (a loop may log its loss less often than its other values).
NOTHING_WATCHED_AFTER = 20


class WatchedGuards:
    """The guard of each watched metric; the writer thread feeds it, a rollback resets it."""

    def __init__(self, config: GuardConfig, make: Callable[[GuardConfig], DivergenceGuard] = DivergenceGuard) -> None:
        self.config = config
        self._make = make
        named = config.metrics if config.metrics is not None else (config.metric,) if config.metric else None
        self._named = frozenset(named) if named is not None else None
        self._watches: dict[str, bool] = {}
        self._guards: dict[str, DivergenceGuard] = {}
        self._scales: dict[str, float] = {}
        self._first_step: int | None = None
        self._told = False

    def describe(self) -> str:
        """What the guard watches, as a message says it."""
        if self._named is not None:
            return "the metrics " + ", ".join(repr(name) for name in sorted(self._named))
        return "every value logged per step whose name contains 'loss'"

    def watches(self, name: str) -> bool:
        known = self._watches.get(name)
        if known is None:
            known = self._watches[name] = name in self._named if self._named is not None else "loss" in name.lower()
        return known

    def feed_many(self, name: str, steps: Sequence[int], values: Sequence[float | None] | np.ndarray) -> Divergence | None:
        """Judge the values of the watched ``name``; the divergence found, naming the metric."""
        guard = self._guards.get(name)
        if guard is None:
            guard = self._guards[name] = self._make(self.config)
            if name in self._scales:
                guard.remember_scale(self._scales[name])
        found = guard.feed_many(steps, values)
        return None if found is None else dataclasses.replace(found, metric=name)

    def remember_scale(self, name: str, value: float) -> None:
        """The highest average ``name`` has had (the run's start, told on resume)."""
        self._scales[name] = max(value, self._scales.get(name, value))
        if name in self._guards:
            self._guards[name].remember_scale(value)

    def reset(self) -> None:
        for guard in self._guards.values():
            guard.reset()

    def nothing_watched(self, names: Sequence[str], steps: Sequence[int]) -> str | None:
        """Per-step values were logged under ``names`` at ``steps``: once, when for a while none of
        the run's values is watched, the warning to give (None otherwise)."""
        if self._told or not self.config.enabled or not steps:
            return None
        # babysit's own series (lr, momentum, lr/G: logged whenever a scheduler moves them, every
        # step with a per-step schedule) say nothing of what the loop logs between its losses.
        names = [name for name in names if not _hparam_series(name)]
        if not names:
            return None
        if any(self.watches(name) for name in names) or self._guards:
            self._told = True  # something is watched: nothing to say, ever
            return None
        if self._first_step is None:
            self._first_step = min(steps)
        if max(steps) - self._first_step < NOTHING_WATCHED_AFTER:
            return None
        self._told = True
        logged = ", ".join(repr(name) for name in sorted(set(names))[:6])
        return (f"the divergence guard watches nothing: it watches {self.describe()}, and this run logs "
                f"{logged}; log the loss under a name containing 'loss', or name what to watch with "
                "GuardConfig(metrics=[...])")


def _hparam_series(name: str) -> bool:
    """One of the lr and momentum series babysit logs itself (babysit.hparam_watch, optimizer_set.series_name)."""
    return name in ("lr", "momentum") or name.startswith(("lr/", "momentum/"))
