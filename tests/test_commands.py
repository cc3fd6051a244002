"""Command validation: every kind, every bad value named in the message with what is accepted."""

from __future__ import annotations

import math

import pytest

from babysit import commands as cmd
from babysit.commands import Command, CommandError, validate

LR_ACCEPTED = r"a finite number > 0 \(for example 0\.01\)"
MOMENTUM_ACCEPTED = r"a finite number >= 0 and < 1 \(for example 0\.9\)"
CHECKPOINT_ACCEPTED = r"a checkpoint id, a whole number such as 3"


# -- the good cases --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [(0.05, 0.05), (1, 1.0), ("0.01", 0.01), (" 3e-4 ", 3e-4), (10, 10.0), ("1e-12", 1e-12)],
)
def test_set_lr_accepts_numbers_and_text(raw, expected):
    command = validate(cmd.SET_LR, {"value": raw})
    assert command == Command(cmd.SET_LR, {"value": expected})
    assert type(command.args["value"]) is float


@pytest.mark.parametrize(("raw", "expected"), [(0, 0.0), (0.9, 0.9), ("0.99", 0.99), (0.999999, 0.999999)])
def test_set_momentum_accepts_zero_up_to_below_one(raw, expected):
    command = validate(cmd.SET_MOMENTUM, {"value": raw})
    assert command == Command(cmd.SET_MOMENTUM, {"value": expected})
    assert type(command.args["value"]) is float


@pytest.mark.parametrize("kind", [cmd.PAUSE, cmd.RESUME, cmd.CHECKPOINT, cmd.STOP])
def test_argumentless_kinds_validate(kind):
    assert validate(kind) == Command(kind, {})
    assert validate(kind, {}) == Command(kind, {})
    # A key whose value is None is "not given" (the CLI passes unset options that way).
    assert validate(kind, {"value": None}) == Command(kind, {})


def test_rollback_defaults_to_checkpoint_hparams():
    assert validate(cmd.ROLLBACK, {"checkpoint": 3}) == Command(
        cmd.ROLLBACK, {"checkpoint": 3, "hparams": cmd.HPARAMS_CHECKPOINT}
    )


def test_rollback_normalises_text_id_and_optional_values():
    command = validate(
        cmd.ROLLBACK, {"checkpoint": " 12 ", "hparams": "current", "lr": "0.05", "momentum": 0.5}
    )
    assert command == Command(
        cmd.ROLLBACK, {"checkpoint": 12, "hparams": cmd.HPARAMS_CURRENT, "lr": 0.05, "momentum": 0.5}
    )


def test_rollback_ignores_lr_and_momentum_given_as_none():
    command = validate(cmd.ROLLBACK, {"checkpoint": "4", "lr": None, "momentum": None})
    assert command.args == {"checkpoint": 4, "hparams": "checkpoint"}


def test_validate_does_not_change_the_callers_dict():
    args = {"checkpoint": "5"}
    validate(cmd.ROLLBACK, args)
    assert args == {"checkpoint": "5"}


def test_command_is_immutable():
    command = validate(cmd.PAUSE)
    with pytest.raises(AttributeError):
        command.kind = cmd.STOP  # type: ignore[misc]


# -- lr --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (0, "0"),
        (-1.0, "-1.0"),
        (-0.0, "-0.0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        ("nan", "'nan'"),
        ("inf", "'inf'"),
        ("1e999", "'1e999'"),
        ("fast", "'fast'"),
        ("", "''"),
        ("   ", "'   '"),
        ("0_001", "'0_001'"),   # float() would read it as 1.0
        ("1_0", "'1_0'"),
        ("0x10", "'0x10'"),
        # As typed at a terminal (`python -m babysit set lr ...` passes the text as it is).
        ("0", "'0'"),
        ("-1", "'-1'"),
        ("-1e-3", "'-1e-3'"),
        ("-inf", "'-inf'"),
        ("1e400", "'1e400'"),
        ("0,01", "'0,01'"),
        (True, "True"),
        (False, "False"),
        (None, "None"),
        ([0.1], r"\[0\.1\]"),
    ],
)
def test_set_lr_refuses_bad_values_naming_them(raw, shown):
    with pytest.raises(CommandError, match=rf"^lr must be {LR_ACCEPTED}, got {shown}$"):
        validate(cmd.SET_LR, {"value": raw})


@pytest.mark.parametrize("raw, value", [(20, 20.0), ("20", 20.0), ("50", 50.0), (" 1e-9 ", 1e-9), ("1e3", 1000.0)])
def test_any_finite_positive_lr_is_accepted(raw, value):
    assert validate(cmd.SET_LR, {"value": raw}).args == {"value": value}


def test_an_lr_far_outside_the_usual_range_gets_a_warning_not_a_refusal():
    assert cmd.lr_warning(0.05) is None and cmd.lr_warning(50.0) is None and cmd.lr_warning(1e-7) is None
    assert cmd.lr_warning(1000.0) == "lr 1000 is far above the usual range (1e-07 to 100); applied as asked"
    assert cmd.lr_warning(1e-9) == "lr 1e-09 is far below the usual range (1e-07 to 100); applied as asked"


def test_set_lr_without_a_value_is_refused():
    with pytest.raises(CommandError, match=rf"^lr must be {LR_ACCEPTED}, got ''$"):
        validate(cmd.SET_LR, {})


def test_set_lr_refuses_an_integer_too_large_for_a_float():
    # A 400-digit integer (JSON can carry one into the queue) must be a CommandError like any
    # other absurd value, not an OverflowError escaping validation.
    with pytest.raises(CommandError, match=rf"^lr must be {LR_ACCEPTED}, got 1000000"):
        validate(cmd.SET_LR, {"value": 10**400})


@pytest.mark.parametrize("raw", ["x" * 500, "1" + "0" * 400])  # the second: 10**400 typed out
def test_long_bad_text_is_shortened_in_the_message(raw):
    with pytest.raises(CommandError) as info:
        validate(cmd.SET_LR, {"value": raw})
    message = str(info.value)
    assert message == f"lr must be a finite number > 0 (for example 0.01), got '{raw[:56]}..."
    assert len(message) < 150


# -- momentum --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (-0.1, "-0.1"),
        (1, "1"),
        (1.0, "1.0"),
        ("1", "'1'"),
        (1.5, "1.5"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ("heavy", "'heavy'"),
        ("", "''"),
        ("-0.1", "'-0.1'"),
        ("1.5", r"'1\.5'"),
        ("nan", "'nan'"),
        (True, "True"),
        (None, "None"),
    ],
)
def test_set_momentum_refuses_bad_values_naming_them(raw, shown):
    with pytest.raises(CommandError, match=rf"^momentum must be {MOMENTUM_ACCEPTED}, got {shown}$"):
        validate(cmd.SET_MOMENTUM, {"value": raw})


def test_set_momentum_refuses_an_integer_too_large_for_a_float():
    with pytest.raises(CommandError, match=rf"^momentum must be {MOMENTUM_ACCEPTED}, got 1000000"):
        validate(cmd.SET_MOMENTUM, {"value": 10**400})


# -- rollback --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("../x", r"'\.\./x'"),
        ("/etc/passwd", "'/etc/passwd'"),
        ("epoch-0001.pt", r"'epoch-0001\.pt'"),
        ("3/../../x", r"'3/\.\./\.\./x'"),
        ("0", "'0'"),
        ("000", "'000'"),
        ("-1", "'-1'"),
        ("1.5", r"'1\.5'"),
        ("", "''"),
        ("1" * 13, "'1111111111111'"),
        ("3; rm -rf /", "'3; rm -rf /'"),
        ("#3", "'#3'"),
        ("epoch-0001-step-00000023-b1.pt", r"'epoch-0001-step-00000023-b1\.pt'"),
        (0, "0"),
        (-1, "-1"),
        (1.5, r"1\.5"),
        (3.0, r"3\.0"),
        (True, "True"),
        (None, "None"),
    ],
)
def test_rollback_refuses_ids_that_are_not_whole_positive_numbers(raw, shown):
    with pytest.raises(CommandError, match=rf"^checkpoint must be {CHECKPOINT_ACCEPTED} .*, got {shown}$"):
        validate(cmd.ROLLBACK, {"checkpoint": raw})


def test_rollback_without_an_id_is_refused():
    with pytest.raises(CommandError, match=rf"^checkpoint must be {CHECKPOINT_ACCEPTED} .*, got ''$"):
        validate(cmd.ROLLBACK, {"hparams": "current"})


@pytest.mark.parametrize("hparams", ["mine", "", None, "Checkpoint", 1])
def test_rollback_refuses_an_unknown_hparams_choice(hparams):
    with pytest.raises(CommandError, match=rf"^hparams must be one of checkpoint, current, got {hparams!r}$"):
        validate(cmd.ROLLBACK, {"checkpoint": 2, "hparams": hparams})


def test_rollback_validates_its_optional_lr_and_momentum():
    with pytest.raises(CommandError, match=rf"^lr must be {LR_ACCEPTED}, got -0\.5$"):
        validate(cmd.ROLLBACK, {"checkpoint": 2, "lr": -0.5})
    with pytest.raises(CommandError, match=rf"^momentum must be {MOMENTUM_ACCEPTED}, got 1\.0$"):
        validate(cmd.ROLLBACK, {"checkpoint": 2, "momentum": 1.0})


def test_rollback_takes_a_data_skip_as_a_whole_number_of_batches():
    assert validate(cmd.ROLLBACK, {"checkpoint": 3, "skip_batches": "200"}).args == {
        "checkpoint": 3, "hparams": cmd.HPARAMS_CHECKPOINT, "skip_batches": 200}
    assert validate(cmd.ROLLBACK, {"checkpoint": 3, "skip_batches": 500.0}).args["skip_batches"] == 500
    assert "skip_batches" not in validate(cmd.ROLLBACK, {"checkpoint": 3, "skip_batches": None}).args


@pytest.mark.parametrize(("raw", "shown"), [(0, "0"), (-5, "-5"), ("2e2", "'2e2'"), (1.5, r"1\.5"), (True, "True"),
                                            ("", "''"), ("x", "'x'"), (10**9 + 1, "1000000001"), ([200], r"\[200\]")])
def test_rollback_refuses_a_skip_that_is_not_a_whole_number_of_batches(raw, shown):
    with pytest.raises(CommandError, match=rf"^skip_batches must be a whole number of batches from 1 to 1000000000, "
                                           rf"got {shown}$"):
        validate(cmd.ROLLBACK, {"checkpoint": 3, "skip_batches": raw})


# -- unknown kinds and stray arguments -------------------------------------------------------
@pytest.mark.parametrize(("kind", "shown"), [("jump", "'jump'"), ("", "''"), ("SET_LR", "'SET_LR'"), (None, "None"),
                                             (3, "3")])
def test_unknown_kind_is_refused_listing_the_accepted_ones(kind, shown):
    with pytest.raises(
        CommandError,
        match=rf"^unknown command {shown}; accepted: set_lr, set_momentum, pause, resume, checkpoint, stop, rollback, probe, sweep, cancel$",
    ):
        validate(kind, {})


@pytest.mark.parametrize("kind", [cmd.PAUSE, cmd.RESUME, cmd.CHECKPOINT, cmd.STOP])
def test_argumentless_kinds_refuse_arguments_naming_them(kind):
    with pytest.raises(CommandError, match=rf"^{kind} takes no arguments, got force, value$"):
        validate(kind, {"value": 1, "force": True})


def test_args_that_are_not_a_mapping_are_a_command_error():
    # The trainer validates rows from a queue "anyone can write"; args that decode to a list must
    # be refused as a CommandError naming them, not a bare ValueError from dict().
    with pytest.raises(CommandError, match=r"\['value'\]"):
        validate(cmd.SET_LR, ["value"])  # type: ignore[arg-type]


# -- parse_number on its own -----------------------------------------------------------------
def test_parse_number_returns_finite_floats_and_names_the_quantity():
    assert cmd.parse_number("  2.5\n", "x", "anything") == 2.5
    assert cmd.parse_number(7, "x", "anything") == 7.0
    with pytest.raises(CommandError, match=r"^spike must be big, got 'nope'$"):
        cmd.parse_number("nope", "spike", "big")
    with pytest.raises(CommandError, match=r"^spike must be big, got nan$"):
        cmd.parse_number(math.nan, "spike", "big")


# -- describe --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "args", "text"),
    [
        (cmd.SET_LR, {"value": "0.05"}, "set lr 0.05"),
        (cmd.SET_LR, {"value": 1e-5}, "set lr 1e-05"),
        (cmd.SET_MOMENTUM, {"value": 0.9}, "set momentum 0.9"),
        (cmd.SET_MOMENTUM, {"value": 0}, "set momentum 0"),
        (cmd.PAUSE, {}, "pause"),
        (cmd.RESUME, {}, "resume"),
        (cmd.CHECKPOINT, {}, "checkpoint"),
        (cmd.STOP, {}, "stop"),
        (cmd.ROLLBACK, {"checkpoint": "3"}, "rollback to #3 (checkpoint hparams)"),
        (cmd.ROLLBACK, {"checkpoint": 3, "hparams": "current"}, "rollback to #3 (current hparams)"),
        (cmd.ROLLBACK, {"checkpoint": 7, "hparams": "current", "lr": 0.025},
         "rollback to #7 (current hparams, lr 0.025)"),
        (cmd.ROLLBACK, {"checkpoint": 7, "lr": 0.5, "momentum": 0.95},
         "rollback to #7 (checkpoint hparams, lr 0.5, momentum 0.95)"),
        (cmd.ROLLBACK, {"checkpoint": 3, "skip_batches": 200}, "rollback to #3 (checkpoint hparams, skipping 200 batches)"),
    ],
)
def test_describe_validated_commands(kind, args, text):
    command = validate(kind, args)
    assert command.describe() == text
    assert cmd.describe(command.kind, command.args) == text


# -- probes, sweeps and their cancel ----------------------------------------------------------------
def test_probe_defaults_to_halving_and_doubling_the_lr_from_now_then_pausing():
    command = validate(cmd.PROBE, {})
    assert command.args == {"param": "lr", "factors": [0.5, 1.0, 2.0], "steps": 100, "then": "pause"}
    assert command.describe() == "probe lr ×0.5, ×1, ×2 for 100 steps from now"


def test_probe_reads_typed_values_steps_and_checkpoint():
    command = validate(cmd.PROBE, {"param": "momentum", "values": "0.8, 0.9 0.99", "steps": "50",
                                   "checkpoint": "3", "then": "continue"})
    assert command.args == {"param": "momentum", "values": [0.8, 0.9, 0.99], "steps": 50, "checkpoint": 3,
                            "then": "continue"}
    assert command.describe() == "probe momentum 0.8, 0.9, 0.99 for 50 steps from #3"


@pytest.mark.parametrize("args, message", [
    ({"factors": [0.5, 0]}, r"^probe factors must be finite numbers > 0 \(for example 0.5, 1, 2\), got \[0.5, 0\]$"),
    ({"factors": [1, 1]}, r"^probe factors must differ from each other, got \[1, 1\]$"),
    ({"factors": list(range(1, 10))}, r"^probe factors must be a list of 1 to 8 numbers"),
    ({"factors": "x"}, r"^probe factor must be a finite number > 0 \(for example 0.5\), got 'x'$"),
    ({"values": [0.1], "factors": [2]}, r"^probe takes factors \(of the value in use\) or values, not both$"),
    ({"param": "momentum", "values": [0.9, 1.0]}, r"^momentum must be a finite number >= 0 and < 1"),
    ({"values": [-0.1]}, r"^lr must be a finite number > 0"),
    ({"steps": 0}, r"^probe steps must be a whole number of steps from 1 to 100000, got 0$"),
    ({"steps": 2.5}, r"^probe steps must be a whole number of steps from 1 to 100000, got 2.5$"),
    ({"steps": True}, r"^probe steps must be a whole number of steps from 1 to 100000, got True$"),
    ({"param": "weight_decay"}, r"^probe param must be one of lr, momentum, got 'weight_decay'$"),
    ({"then": "later"}, r"^probe then must be one of pause, continue, got 'later'$"),
    ({"checkpoint": "../x.pt"}, r"^checkpoint must be a checkpoint id"),
    ({"lr": 0.1}, r"^probe takes only param, factors, values, steps, checkpoint, then; got lr$"),
])
def test_a_bad_probe_is_refused_naming_the_value(args, message):
    with pytest.raises(CommandError, match=message):
        validate(cmd.PROBE, args)


def test_sweep_defaults_and_bounds():
    assert validate(cmd.SWEEP, {}).args == {"steps": 200}
    assert validate(cmd.SWEEP, {"lr_min": "1e-5", "lr_max": 1, "steps": 300}).args == {
        "steps": 300, "lr_min": 1e-5, "lr_max": 1.0}
    with pytest.raises(CommandError, match=r"^sweep lr_min must be below lr_max, got lr_min 1 and lr_max 0.1$"):
        validate(cmd.SWEEP, {"lr_min": 1, "lr_max": 0.1})
    with pytest.raises(CommandError, match=r"^sweep steps must be a whole number of steps from 10 to 10000, got 5$"):
        validate(cmd.SWEEP, {"steps": 5})


def test_cancel_names_the_excursion():
    assert validate(cmd.CANCEL, {"excursion": "4"}).args == {"excursion": 4}
    assert validate(cmd.CANCEL, {"excursion": 4}).describe() == "cancel excursion #4"
    with pytest.raises(CommandError, match=r"^cancel excursion must be an excursion id, a whole number >= 1, got 0$"):
        validate(cmd.CANCEL, {"excursion": 0})


def test_an_outcome_says_a_scaled_lr_in_six_digits_not_in_full() -> None:
    row = {"state": cmd.APPLIED, "step": 12, "result": {"lr": 9.372421213165785e-05, "momentum": 0.9, "branch": 2}}
    assert cmd.outcome(row) == "applied at step 12 (lr 9.37242e-05, momentum 0.9, branch 2)"
