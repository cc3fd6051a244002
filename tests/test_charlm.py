"""The default demo job: a character model on the running Python's own standard library sources."""

from __future__ import annotations

import math
import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from babysit.jobs import charlm
from babysit.jobs.charlm import CharLMConfig, source_files
from babysit.store import RunStore
from tests.test_run import losses


def test_reads_the_stdlib_top_level_modules_in_name_order_every_tenth_held_out() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, val = source_files()
    every = sorted(stdlib.glob("*.py"), key=lambda p: p.name)
    assert (stdlib / "os.py") in every and len(every) > 100
    assert val == every[::10]
    assert train == [f for f in every if f not in val]
    assert all(f.parent == stdlib for f in train + val)  # top level only: no tests, no packages
    assert (train, val) == source_files()


def test_file_selection_and_split_depend_only_on_the_names(tmp_path: Path) -> None:
    for name in ("b.py", "a.py", "notes.txt", *(f"m{i:02d}.py" for i in range(20))):
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "inner.py").write_text("x = 1\n")
    train, val = source_files(tmp_path)
    names = ["a.py", "b.py", *(f"m{i:02d}.py" for i in range(20))]
    assert [f.name for f in val] == names[::10] == ["a.py", "m08.py", "m18.py"]
    assert [f.name for f in train] == [n for n in names if n not in ("a.py", "m08.py", "m18.py")]


def test_too_few_modules_is_refused_naming_the_directory(tmp_path: Path) -> None:
    (tmp_path / "only.py").write_text("pass\n")
    with pytest.raises(FileNotFoundError, match=rf"standard library's modules in {tmp_path}, found 1 \.py files"):
        source_files(tmp_path)


def test_encoding_keeps_tabs_newlines_and_printable_ascii_and_folds_the_rest() -> None:
    tokens = charlm.encode("\tdef f():\n    return 'é'\n".encode())
    assert charlm.VOCAB_SIZE == 98 and tokens.dtype == torch.int64
    assert charlm.decode(tokens) == "\tdef f():\n    return '??'\n"  # é is two bytes in UTF-8
    assert int(tokens.max()) == charlm.OTHER and int(tokens.min()) >= 0


def test_loading_the_text_uses_no_network_and_is_the_same_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the demo job tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    train, val = source_files()
    tokens = charlm.read_tokens(val)
    assert len(tokens) == sum(f.stat().st_size for f in val)
    assert torch.equal(tokens, charlm.read_tokens(val))
    inputs, targets = charlm.validation_batch(tokens, seq_len=16, windows=8)
    again = charlm.validation_batch(tokens, seq_len=16, windows=8)
    assert inputs.shape == targets.shape == (8, 16)
    assert torch.equal(inputs, again[0]) and torch.equal(inputs[:, 1:], targets[:, :-1])
    window = charlm.Windows(tokens, seq_len=16)
    x, y = window[5]
    assert torch.equal(x, tokens[5:21]) and torch.equal(y, tokens[6:22])


def test_bad_settings_are_refused_naming_the_value() -> None:
    with pytest.raises(Exception, match="seq_len must be a whole number >= 1, got 0"):
        CharLMConfig(seq_len=0)
    with pytest.raises(Exception, match=r"n_embd \(30\) must be a multiple of n_head \(4\)"):
        CharLMConfig(n_embd=30)
    with pytest.raises(Exception, match="optimizer must be one of sgd, adam, got 'lion'"):
        CharLMConfig(optimizer="lion")
    with pytest.raises(Exception, match=r"seed must be a whole number from -2\*\*63 to 2\*\*64 - 1 \(what "
                                        r"torch.manual_seed takes\), got 1000000000000000000000000000000$"):
        CharLMConfig(seed=10**30)
    with pytest.raises(Exception, match="epochs must be a whole number >= 1, got True"):
        CharLMConfig(epochs=True)


def test_a_short_real_run_learns_the_text(tmp_path: Path) -> None:
    """Three short epochs at the default settings, through the public API: the loss falls well
    below the uniform guess (ln 98 = 4.58 nats) and the validation loss falls every epoch."""
    config = CharLMConfig(epochs=3, steps_per_epoch=30)
    run = charlm.train(tmp_path / "run", config)
    assert run.status == "finished"
    store = RunStore(tmp_path / "run")
    steps, values = losses(store)
    assert len(steps) == 90 and np.isfinite(values).all()
    assert values[:5].mean() > 3.5 > 2.9 > values[-10:].mean(), (values[:5], values[-10:])
    val = [c["metrics"]["val_loss"] for c in store.checkpoints()]
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[-1] < math.log(charlm.VOCAB_SIZE) - 1.5, val
    assert store.get_meta("config")["job"] == "charlm"
