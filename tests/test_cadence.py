"""The checkpoint cadence (babysit.cadence): when a periodic checkpoint is due, and how it is said."""

from __future__ import annotations

from typing import Any

import pytest

from babysit.cadence import Cadence, describe
from babysit.errors import SettingsError


def test_by_steps_it_is_due_at_the_multiples_whatever_the_step_it_resumed_at() -> None:
    cadence = Cadence(every_steps=200)
    assert [cadence.next_step(step) for step in (0, 1, 199, 200, 650, 1999)] == [200, 200, 200, 400, 800, 2000]
    assert cadence.next_time(1000.0) is None and cadence.active


def test_by_time_it_is_due_minutes_after_the_last_checkpoint() -> None:
    cadence = Cadence(every_minutes=30)
    assert cadence.next_time(1000.0) == 2800.0 and cadence.next_step(5) is None
    assert not Cadence().active


@pytest.mark.parametrize("settings, message", [
    ({"every_steps": 0}, "checkpoint_every_steps must be a whole number >= 1 or None, got 0"),
    ({"every_steps": 2.0}, "checkpoint_every_steps must be a whole number >= 1 or None, got 2.0"),
    ({"every_steps": True}, "checkpoint_every_steps must be a whole number >= 1 or None, got True"),
    ({"every_minutes": 0}, "checkpoint_every_minutes must be a number of minutes > 0 or None, got 0"),
    ({"every_minutes": float("inf")}, "checkpoint_every_minutes must be a number of minutes > 0 or None, got inf"),
    ({"every_minutes": "30"}, "checkpoint_every_minutes must be a number of minutes > 0 or None, got '30'"),
])
def test_a_bad_cadence_is_refused_naming_the_value(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=f"^{message}$"):
        Cadence(**settings)


def test_status_says_the_cadence_and_when_the_next_is_due() -> None:
    recorded = Cadence(every_steps=500, every_minutes=30).to_json(next_step=1000, next_wall=10_000.0)
    assert describe(recorded, now=10_000.0 - 12 * 60) == "every 500 steps (next at step 1,000) or every 30 min (next in 12 min)"
    assert describe(recorded, now=10_001.0) == "every 500 steps (next at step 1,000) or every 30 min (due now)"
    assert describe(Cadence(every_minutes=180).to_json(), now=0) == "every 3 h"
    assert describe(Cadence().to_json()) is None
    # A run no trainer is running has nothing due: only the cadence is said.
    assert describe(recorded, now=10_000.0 - 12 * 60, upcoming=False) == "every 500 steps or every 30 min"
    assert describe({"every_steps": -3}) is None and describe("x") is None and describe(None) is None
