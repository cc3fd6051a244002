"""Replaying a panda journal on a run: its schedule's lr and momentum settings, applied at their
steps without a person (``babysit.Run(..., replay="journal.json")``, ``train --replay``).

The settings join the run's own replay queue (``run._replay``, the nudges a resume re-applies at
their steps) and are applied by :class:`~babysit.command_runner.CommandRunner` at the same place
of the epoch as when a person sent them; each is then written as an applied command of source
:data:`REPLAY_SOURCE`. A resumed replay (the same journal passed again) goes on after the
checkpoint it resumed from. A rollback during a replay ends it (a person took over).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .instruments.journal import AT_EPOCH_START, SETTABLE, read_journal

if TYPE_CHECKING:
    from .run import Run

REPLAY_SOURCE = "replay"


def load(replay: Any) -> dict[str, Any]:
    """The journal ``replay`` names (a path or a loaded dict), checked; SettingsError if unusable."""
    return read_journal(replay)


def settings(journal: dict[str, Any]) -> list[dict[str, Any]]:
    """The journal's schedule as entries of the run's replay queue (no command id yet)."""
    return [{"id": None, "kind": SETTABLE[entry["set"]], "args": {"value": float(entry["value"])},
             "step": entry["step"], "at": entry["at"], "source": REPLAY_SOURCE, "entry": index}
            for index, entry in enumerate(journal["schedule"])]


def begin(run: "Run", journal: dict[str, Any]) -> None:
    """After the run started or resumed: queue the settings still ahead of it, say so on the run."""
    queued = settings(journal)
    resumed = run.step > 0
    if resumed:  # what the resumed checkpoint holds is done; the journal, not its rows, says what follows
        queued = [e for e in queued if (e["step"], e["at"] == AT_EPOCH_START) > (run.step, False)]
    own = [c for c in run._replay if c.get("source") != REPLAY_SOURCE]
    run._replay = sorted(own + queued, key=lambda e: e["step"])  # stable: a step's settings keep their order
    origin = journal.get("run") or {}
    target = journal.get("to") or {}
    what = (f"the journal of {origin.get('run_dir', 'a run')!r} to checkpoint #{target.get('checkpoint', '?')}"
            f" (step {target.get('step', '?')})")
    done = len(journal["schedule"]) - len(queued)
    message = f"replaying {what}: {len(queued)} lr/momentum settings to apply at their steps"
    if done:
        message += f" ({done} already applied before step {run.step})"
    run.message = f"{run.message}; {message}" if run.message else message
    data = {"journal_of": origin.get("run_dir"), "to": target, "settings": len(journal["schedule"]),
            "queued": len(queued), "config": origin.get("config")}
    run.store.add_event("replay", message, branch=run.branch, step=run.step, epoch=run.epoch, data=data)
    run.store.set_meta("replay", data)
    if run.config and origin.get("config") and dict(origin["config"]) != run.config:
        differs = sorted(k for k in set(run.config) | set(origin["config"])
                         if run.config.get(k) != origin["config"].get(k) and k != "epochs")
        if differs:
            run.store.add_event("config", "this replay's config differs from the journal's in " + ", ".join(differs)
                                + "; the settings are applied at their steps, but the run will not be the same",
                                branch=run.branch, step=run.step, data={"journal": origin["config"],
                                                                         "here": run.config})

