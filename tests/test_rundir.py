"""Paths in a run directory (babysit/rundir.py): a checkpoint's files, whatever their form, found and
removed without following a link or leaving the directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from babysit import rundir
from babysit.checkpoint import checkpoint_filename, sharded_checkpoint_name
from babysit.errors import RunDirError


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_remove_checkpoint_files_removes_a_file_or_a_whole_folder_whatever_its_form(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    run_dir = tmp_path / "run"
    folder = run_dir / sharded_checkpoint_name(1, 2, 40)
    folder.mkdir(parents=True)
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "babysit.pt", "manifest.json"):
        (folder / name).write_bytes(b"x")
    (folder / "planted").symlink_to(outside)
    single = run_dir / checkpoint_filename(1, 1, 20)
    single.write_bytes(b"x")
    link = run_dir / "epoch-0003-step-00000060-b1.pt"
    link.symlink_to(outside / "precious")
    assert rundir.checkpoint_present(run_dir, folder.name) and rundir.checkpoint_present(run_dir, single.name)
    assert not rundir.checkpoint_present(run_dir, link.name) and not rundir.checkpoint_present(run_dir, "../outside")

    for name in (folder.name, single.name, link.name, "never-there.dcp"):
        rundir.remove_checkpoint_files(run_dir, name)
    assert _entries(run_dir) == [] and _entries(outside) == ["precious"]
    with pytest.raises(RunDirError, match="'../outside' is not a plain file name"):
        rundir.remove_checkpoint_files(run_dir, "../outside")
    assert _entries(outside) == ["precious"]
