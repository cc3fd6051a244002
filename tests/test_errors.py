"""The error tree: one base catches every error babysit raises on purpose, each leaf keeps the
standard base code written before the tree still catches, and each comes from where it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import babysit
from babysit.checkpoint import read_verified
from babysit.commands import validate_lr
from babysit.store import RunStore


def test_every_leaf_is_exported_under_one_base_and_keeps_its_standard_base() -> None:
    leaves = {babysit.SettingsError: ValueError, babysit.CommandError: ValueError, babysit.StoreError: RuntimeError,
              babysit.CheckpointError: RuntimeError, babysit.RunDirError: RuntimeError,
              babysit.RunLockedError: babysit.RunDirError}
    for leaf, standard in leaves.items():
        assert issubclass(leaf, babysit.BabysitError) and issubclass(leaf, standard), leaf


def test_each_kind_of_mistake_raises_its_own_leaf(tmp_path: Path) -> None:
    with pytest.raises(babysit.SettingsError, match=r"spike_factor must be .*, got 'x'$"):
        babysit.GuardConfig(spike_factor="x")
    with pytest.raises(babysit.SettingsError, match=r"keep_last must be a whole number >= 1 or None, got 0$"):
        babysit.Run(tmp_path / "a", torch.nn.Linear(1, 1), lr=0.1, keep_last=0)
    with pytest.raises(babysit.CommandError, match=r"lr must be .*, got -1"):
        validate_lr(-1)
    with pytest.raises(babysit.StoreError, match="does not exist"):
        RunStore(tmp_path / "nowhere")
    run = babysit.Run(tmp_path / "b", torch.nn.Linear(1, 1), lr=0.1)
    try:
        with pytest.raises(babysit.RunLockedError, match=r"already used by another trainer \(pid \d+"):
            babysit.Run(tmp_path / "b", torch.nn.Linear(1, 1), lr=0.1)
    finally:
        run.close()
    (tmp_path / "b" / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(babysit.CheckpointError):
        read_verified(tmp_path / "b" / "x.pt", "0" * 64)
