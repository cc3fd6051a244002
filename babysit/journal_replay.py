"""The nudges a run replays at their steps: after a resume, the lr and momentum settings applied
after the checkpoint it resumed from; with a panda journal (``babysit.Run(..., replay=
"journal.json")``, ``train --replay``), the journal's schedule, applied without a person.

Both wait in one :class:`ReplayQueue`, applied by :class:`~babysit.command_runner.CommandRunner`
at the same place of the epoch as when a person sent them; a journal's settings are then written as
applied commands of source :data:`REPLAY_SOURCE`. A resumed replay (the same journal passed again)
goes on after the checkpoint it resumed from. A rollback ends the replay (a person took over).
"""

from __future__ import annotations

from typing import Any

from .instruments import journal as journals
from .instruments.journal import AT_EPOCH_START, SETTABLE, read_journal

REPLAY_SOURCE = "replay"
# A journal's data skip (a rollback's --skip-batches), as it waits in the queue and is recorded.
DATA_SKIP_KIND = "skip_batches"


class ReplayQueue:
    """Nudges waiting to be re-applied, in step order (a step's settings keep their order)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def replace(self, entries: list[dict[str, Any]]) -> None:
        self.entries = list(entries)

    def clear(self) -> None:
        """A rollback: nudges of the branch it left stay there."""
        self.entries = []

    @property
    def next_step(self) -> int | None:
        return self.entries[0]["step"] if self.entries else None

    def due(self, step: int, step_in_epoch: int, *, under_ranks: bool) -> bool:
        """Whether the first nudge is due at this boundary: past its step, or at it in the same
        place of the epoch (see :func:`babysit.instruments.journal.at_of`)."""
        if not self.entries:
            return False
        head = self.entries[0]
        if step != head["step"] or under_ranks:
            # Under torch.distributed the ranks meet at sync steps only, and an epoch's first
            # boundary is none: a nudge recorded there is replayed at the step's first meeting.
            return step >= head["step"]
        return replay_at(head) != AT_EPOCH_START or step_in_epoch == 0

    def pop(self) -> dict[str, Any]:
        return self.entries.pop(0)

    def add_journal(self, queued: list[dict[str, Any]]) -> None:
        """A journal's settings join the nudges already waiting (a journal's earlier ones are replaced)."""
        own = [c for c in self.entries if c.get("source") != REPLAY_SOURCE]
        self.entries = sorted(own + queued, key=lambda e: e["step"])  # stable: a step's settings keep their order


def replay_at(entry: dict[str, Any]) -> str:
    """Where a nudge waiting to be replayed lands: a journal's setting says it; an applied command
    row recorded its ``step_in_epoch`` (rows from before that: the boundary after its step)."""
    if "at" in entry:
        return entry["at"]
    result = entry.get("result")
    return journals.at_of(result.get("step_in_epoch") if isinstance(result, dict) else None)


def load(replay: Any) -> dict[str, Any]:
    """The journal ``replay`` names (a path or a loaded dict), checked; SettingsError if unusable."""
    return read_journal(replay)


def settings(journal: dict[str, Any]) -> list[dict[str, Any]]:
    """The journal's schedule as entries of the run's replay queue (no command id yet)."""
    return [{"id": None, "step": entry["step"], "at": entry["at"], "source": REPLAY_SOURCE, "entry": index,
             **({"kind": DATA_SKIP_KIND, "args": {"batches": int(entry["skip_batches"])}} if journals.is_skip(entry)
                else {"kind": SETTABLE[entry["set"]], "args": {"value": float(entry["value"]), **(
                    {"optimizer": entry["optimizer"]} if entry.get("optimizer") is not None else {})}})}
            for index, entry in enumerate(journal["schedule"])]


def queue_journal(queue: ReplayQueue, journal: dict[str, Any], step: int) -> tuple[int, int]:
    """Queue the journal's settings still ahead of ``step`` (what a resumed checkpoint holds is
    done: the journal, not its rows, says what follows); returns (queued, already applied)."""
    queued = settings(journal)
    if step > 0:
        queued = [e for e in queued if (e["step"], e["at"] == AT_EPOCH_START) > (step, False)]
    queue.add_journal(queued)
    return len(queued), len(journal["schedule"]) - len(queued)


def describe(journal: dict[str, Any], queued: int, done: int, step: int) -> str:
    """What the run says as it starts replaying ``journal``."""
    origin = journal.get("run") or {}
    target = journal.get("to") or {}
    what = (f"the journal of {origin.get('run_dir', 'a run')!r} to checkpoint #{target.get('checkpoint', '?')}"
            f" (step {target.get('step', '?')})")
    message = f"replaying {what}: {queued} lr/momentum settings to apply at their steps"
    if done:
        message += f" ({done} already applied before step {step})"
    return message


def event_data(journal: dict[str, Any], queued: int) -> dict[str, Any]:
    origin = journal.get("run") or {}
    return {"journal_of": origin.get("run_dir"), "to": journal.get("to") or {}, "settings": len(journal["schedule"]),
            "queued": queued, "config": origin.get("config")}


def config_differences(journal: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The config keys (but epochs) where this run differs from the journal's run."""
    origin = (journal.get("run") or {}).get("config")
    if not config or not origin or dict(origin) == config:
        return []
    return sorted(k for k in set(config) | set(origin) if config.get(k) != origin.get(k) and k != "epochs")
