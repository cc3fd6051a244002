"""The run's control state alone (babysit.control): every transition from every state it may start
from, as a table; no torch, no store, no run."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from babysit.control import Interrupt, PendingRollback, RunControl, TransitionError
from babysit.errors import CommandError

ROLLBACK = PendingRollback(command={"id": 7}, checkpoint={"id": 3}, state={}, hparams_at_cut={"lr": 0.1},
                           branch_at_cut=1, step_at_cut=40)
EXCURSION = object()


def running() -> RunControl:
    return RunControl()


def paused() -> RunControl:
    control = RunControl()
    control.pause("paused at step 5: by test")
    return control


def stopping() -> RunControl:
    control = RunControl()
    control.begin_stop({"id": 9}, "job")
    return control


def rolling_back() -> RunControl:
    control = RunControl()
    control.begin_rollback(ROLLBACK)
    return control


def on_excursion() -> RunControl:
    control = RunControl()
    control.start_excursion(EXCURSION)
    return control


def excursion_cut() -> RunControl:
    control = on_excursion()
    control.cut_for_excursion()
    return control


def finished() -> RunControl:
    control = RunControl()
    control.finish("finished", "finished 3 epochs")
    return control


STATES: dict[str, Callable[[], RunControl]] = {
    "running": running, "paused": paused, "stopping": stopping, "rolling back": rolling_back,
    "on excursion": on_excursion, "excursion cut": excursion_cut, "finished": finished,
}

EVENTS: dict[str, Callable[[RunControl], Any]] = {
    "pause": lambda c: c.pause("paused"),
    "resume": lambda c: c.resume("resumed"),
    "begin_stop": lambda c: c.begin_stop(None, "job"),
    "begin_rollback": lambda c: c.begin_rollback(ROLLBACK),
    "take_rollback": lambda c: c.take_rollback(),
    "take_stop": lambda c: c.take_stop(),
    "start_excursion": lambda c: c.start_excursion(object()),
    "cut_for_excursion": lambda c: c.cut_for_excursion(),
    "excursion_cut_done": lambda c: c.excursion_cut_done(),
    "end_excursion": lambda c: c.end_excursion(),
    "finish stopped": lambda c: c.finish("stopped", "stopped at step 9"),
}

# (state, event) -> (status, interrupt) after it, CommandError (a person's command refused, said on
# its row), or TransitionError (babysit asked for a move the state does not allow: a bug).
S, R, E = Interrupt.STOP, Interrupt.ROLLBACK, Interrupt.EXCURSION
TABLE: dict[tuple[str, str], Any] = {
    ("running", "pause"): ("paused", None),
    ("running", "resume"): CommandError,
    ("running", "begin_stop"): ("running", S),
    ("running", "begin_rollback"): ("running", R),
    ("running", "take_rollback"): TransitionError,
    ("running", "take_stop"): TransitionError,
    ("running", "start_excursion"): ("running", None),
    ("running", "cut_for_excursion"): TransitionError,     # no excursion to cut for
    ("running", "excursion_cut_done"): TransitionError,
    ("running", "end_excursion"): TransitionError,
    ("running", "finish stopped"): ("stopped", None),
    ("paused", "pause"): CommandError,
    ("paused", "resume"): ("running", None),
    ("paused", "begin_stop"): ("paused", S),
    ("paused", "begin_rollback"): ("paused", R),
    ("paused", "start_excursion"): ("running", None),      # a probe asked of a paused run runs now
    ("paused", "take_rollback"): TransitionError,
    ("paused", "take_stop"): TransitionError,
    ("paused", "cut_for_excursion"): TransitionError,
    ("paused", "excursion_cut_done"): TransitionError,
    ("paused", "end_excursion"): TransitionError,
    ("paused", "finish stopped"): ("stopped", None),
    ("stopping", "begin_stop"): TransitionError,           # one cut at a time
    ("stopping", "begin_rollback"): TransitionError,
    ("stopping", "take_stop"): ("running", S),             # the run then ends with finish
    ("stopping", "take_rollback"): TransitionError,
    ("stopping", "finish stopped"): ("stopped", S),
    ("rolling back", "begin_stop"): TransitionError,
    ("rolling back", "begin_rollback"): TransitionError,
    ("rolling back", "take_rollback"): ("running", None),
    ("rolling back", "take_stop"): TransitionError,
    ("rolling back", "start_excursion"): TransitionError,
    ("on excursion", "start_excursion"): TransitionError,  # one excursion at a time
    ("on excursion", "cut_for_excursion"): ("running", E),
    ("on excursion", "end_excursion"): ("running", None),
    ("on excursion", "begin_rollback"): ("running", R),
    ("excursion cut", "excursion_cut_done"): ("running", None),
    ("excursion cut", "cut_for_excursion"): TransitionError,
    ("excursion cut", "begin_stop"): TransitionError,
    ("finished", "finish stopped"): TransitionError,       # a run ends once
    ("finished", "pause"): TransitionError,
}


@pytest.mark.parametrize("state, event", sorted(TABLE))
def test_each_transition_moves_the_state_as_the_table_says(state: str, event: str) -> None:
    control = STATES[state]()
    expected = TABLE[(state, event)]
    before = (control.status, control.interrupt, control.ended)
    if isinstance(expected, type):
        with pytest.raises(expected):
            EVENTS[event](control)
        assert (control.status, control.interrupt, control.ended) == before, "a refused move changes nothing"
        return
    EVENTS[event](control)
    assert (control.status, control.interrupt) == expected


def test_the_table_covers_every_event_from_running_and_paused() -> None:
    missing = [(state, event) for state in ("running", "paused") for event in EVENTS if (state, event) not in TABLE]
    assert missing == []


def test_a_rollback_is_handed_over_once_with_what_was_applied() -> None:
    control = rolling_back()
    assert control.interrupted
    assert control.take_rollback() is ROLLBACK
    assert control.interrupt is None and not control.interrupted
    with pytest.raises(TransitionError):
        control.take_rollback()


def test_a_stop_command_at_an_epochs_last_boundary_waits_for_the_epoch_then_is_answered() -> None:
    control = RunControl()
    command = {"id": 12, "kind": "stop"}
    control.stop_at_epoch_end(command)
    assert control.stop_asked and control.interrupt is None, "not a cut: the epoch ends as usual first"
    assert control.stop_between_epochs() is True and control.interrupt is Interrupt.STOP
    stop = control.take_stop()
    assert stop.command is command and stop.job is None, "its checkpoint is taken as the stop is carried out"


def test_a_signal_keeps_a_deferred_stop_commands_answer() -> None:
    """A stop command deferred to the epoch's end, then a signal's stop at a later boundary: the
    command is still answered by the stop that ends the run (never left pending)."""
    control = RunControl()
    command = {"id": 4, "kind": "stop"}
    control.stop_at_epoch_end(command)
    control.ask_stop("SIGTERM")
    control.begin_stop(None, "job")
    assert control.take_stop().command is command


def test_nothing_asked_means_no_stop_between_epochs() -> None:
    control = RunControl()
    assert control.stop_between_epochs() is False and control.interrupt is None


def test_an_epoch_that_reached_its_end_inside_an_excursion_is_interrupted() -> None:
    control = on_excursion()
    assert not control.interrupted
    control.epoch_batches_done()
    assert control.interrupted, "its evaluation and anneal belong to a probe's branch"
    control.epoch_begins()
    assert not control.interrupted


@pytest.mark.parametrize("paused_meanwhile", [False, True])
def test_back_from_an_excursion_the_run_pauses_whether_or_not_a_person_paused_it_meanwhile(
        paused_meanwhile: bool) -> None:
    control = on_excursion()
    if paused_meanwhile:
        control.pause("paused at step 45: by dashboard")
    control.end_excursion()
    control.pause_after_excursion("paused at step 50 after 3 probes")
    assert (control.status, control.message) == ("paused", "paused at step 50 after 3 probes")


def test_closing_stops_a_live_run_once_and_keeps_a_reason_already_given() -> None:
    control = RunControl()
    assert control.close("the training script ended at step 7") is True
    assert (control.status, control.message) == ("stopped", "the training script ended at step 7")
    assert control.close("again") is False and control.message == "the training script ended at step 7"
    crashed = RunControl()
    crashed.crashed("RuntimeError: boom")
    crashed.close("the training script ended")
    assert (crashed.status, crashed.message) == ("crashed", "RuntimeError: boom")


def test_command_bookkeeping_never_goes_back() -> None:
    control = RunControl()
    control.saw_command(5)
    control.saw_command(3)
    assert control.last_command == 5
    control.resumed_at(2, handled_so_far=0)
    assert (control.resumed_last_command, control.last_command) == (2, 2)
    control.resumed_at(None, handled_so_far=9)  # a checkpoint from before checkpoints recorded it
    assert (control.resumed_last_command, control.last_command) == (None, 9)


def test_a_follower_adopts_the_leaders_state() -> None:
    control = RunControl()
    control.adopt("paused", "paused at step 3: by cli", Interrupt.ROLLBACK, False)
    assert (control.status, control.message, control.interrupt, control.ended) == (
        "paused", "paused at step 3: by cli", Interrupt.ROLLBACK, False)


def test_the_control_state_is_plain_python() -> None:
    import subprocess
    import sys

    code = "import sys, babysit.control; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
