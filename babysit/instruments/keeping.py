"""What a run keeps on disk and when its next periodic checkpoint is due: one reading, which
`status` prints and the page shows, so that the two always say the same."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .. import cadence, retention


@dataclass(frozen=True)
class Keeping:
    """``cadence``: the trainer's checkpoint cadence with when the next is due ("every 500 steps
    (next at step 1,000) or every 30 min (next in 12 min)"), None when it has none; ``retention``:
    the policy in words; ``kept``: why each of the run's own checkpoints is kept (id → why)."""

    cadence: str | None
    retention: str
    kept: dict[int, str]


def read_keeping(store: Any, *, now: float | None = None) -> Keeping:
    now = time.time() if now is None else now
    policy, kept = retention.explain(store, now=now)
    live = bool(store.status().get("alive"))  # a run that is over has nothing due
    return Keeping(cadence.describe(store.get_meta("cadence", None), now=now, upcoming=live), policy.describe(), kept)
