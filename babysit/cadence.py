"""When a periodic checkpoint is due: every N steps and/or every M minutes.

By steps, at the multiples of N of the run's step count (steps 500, 1000, 1500... whatever
happened in between: after a resume at step 650 or a rollback to step 600, the next is at 800),
so a person can tell where the rollback points of a run are. By time, M minutes after the last
checkpoint the trainer wrote (of any kind) or after it started. Whichever comes first; each
periodic checkpoint is an exact resume point inside its epoch and a rollback target.

Pure: the trainer asks :meth:`Cadence.next_step` and :meth:`Cadence.next_time`; the page and
``status`` read what the trainer recorded (:meth:`Cadence.to_json`, with the next due step and
time) and say it with :func:`describe`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from .errors import SettingsError


@dataclass(frozen=True)
class Cadence:
    """``every_steps``: a whole number >= 1 or None; ``every_minutes``: a number > 0 or None."""

    every_steps: int | None = None
    every_minutes: float | None = None

    def __post_init__(self) -> None:
        steps = self.every_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise SettingsError(f"checkpoint_every_steps must be a whole number >= 1 or None, got {steps!r}")
        minutes = self.every_minutes
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                    or not math.isfinite(minutes) or minutes <= 0):
            raise SettingsError(f"checkpoint_every_minutes must be a number of minutes > 0 or None, got {minutes!r}")

    @property
    def active(self) -> bool:
        return self.every_steps is not None or self.every_minutes is not None

    def next_step(self, step: int) -> int | None:
        """The first step after ``step`` at which a periodic checkpoint is due by steps."""
        if self.every_steps is None:
            return None
        return (step // self.every_steps + 1) * self.every_steps

    def next_time(self, since: float) -> float | None:
        """When one is due by time, the last checkpoint (or the start) having been at ``since``."""
        return None if self.every_minutes is None else since + self.every_minutes * 60.0

    def to_json(self, *, next_step: int | None = None, next_wall: float | None = None) -> dict[str, Any]:
        """What the trainer records for the page and ``status``: the cadence and when the next is due."""
        return {"every_steps": self.every_steps, "every_minutes": self.every_minutes, "next_step": next_step,
                "next_wall": next_wall}


def describe(recorded: Any, *, now: float | None = None, upcoming: bool = True) -> str | None:
    """What `status` and the page say of a run's cadence (the trainer's record of it), or None when
    the run has none: "every 500 steps (next at step 1,000) or 30 min (next in 12 min)". Without
    ``upcoming`` (no trainer is running it) only the cadence: nothing is due on a run that is over."""
    if not isinstance(recorded, dict):
        return None
    try:
        cadence = Cadence(recorded.get("every_steps"), recorded.get("every_minutes"))
    except SettingsError:
        return None
    if not cadence.active:
        return None
    now = time.time() if now is None else now
    parts = []
    next_step = recorded.get("next_step")
    if cadence.every_steps is not None:
        text = f"every {cadence.every_steps:,} steps"
        if upcoming and isinstance(next_step, int) and not isinstance(next_step, bool):
            text += f" (next at step {next_step:,})"
        parts.append(text)
    next_wall = recorded.get("next_wall")
    if cadence.every_minutes is not None:
        text = f"every {_minutes(cadence.every_minutes)}"
        if (upcoming and isinstance(next_wall, (int, float)) and not isinstance(next_wall, bool)
                and math.isfinite(next_wall)):
            left = next_wall - now
            text += " (due now)" if left <= 0 else f" (next in {_minutes(left / 60.0)})"
        parts.append(text)
    return " or ".join(parts)


def _minutes(minutes: float) -> str:
    if minutes >= 120:
        return f"{minutes / 60:.1f} h".replace(".0 h", " h")
    if minutes >= 1:
        return f"{minutes:.0f} min"
    return f"{minutes * 60:.0f} s"
