"""Sharded checkpoints (babysit/sharded.py): a folder of DCP shards, listed by one hash that vouches
for every file; refused whole when any file is missing, altered, a link, or holds more than plain
data. One process writes one shard here (DCP without torch.distributed); two real FSDP2 ranks
under torchrun write and reload theirs, and one plain process loads what they wrote."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from babysit.checkpoint import FORMAT, KEY_FORMAT, PendingCheckpoint, write_atomic
from babysit.errors import CheckpointError
from babysit.sharded import (
    DCP_METADATA, KEY_SHARDED, MANIFEST, REST, load_shards, read_checkpoint, read_sharded, stage,
)
from babysit.sharded_writer import ShardedCheckpointer
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SHARD = "__0_0.distcp"


def _model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1 * (seed + 1), momentum=0.9 - 0.1 * seed)


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    model, optimizer = _model(0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _write(run_dir: Path, model: nn.Module, optimizer: Any, name: str = "c.dcp") -> PendingCheckpoint:
    run_dir.mkdir(parents=True, exist_ok=True)
    failed: list[PendingCheckpoint] = []
    writer = ShardedCheckpointer(lambda job: None, failed.append)
    job = writer.submit(PendingCheckpoint(path=run_dir / name, state={
        "shards": stage(model, optimizer), "rest": {KEY_FORMAT: FORMAT, "position": 7}}, meta={}))
    writer.close()
    assert job.error is None and not failed, job.error
    return job


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_sharded_checkpoint_lists_a_hash_per_file_and_loads_back_exactly(tmp_path: Path):
    model, optimizer = _trained()
    job = _write(tmp_path, model, optimizer)
    folder = tmp_path / "c.dcp"
    assert job.path == folder and sorted(os.listdir(folder)) == sorted([DCP_METADATA, SHARD, REST, MANIFEST])
    manifest = json.loads((folder / MANIFEST).read_bytes())
    assert job.result == {"sha256": _sha(folder / MANIFEST),
                          "size": sum(p.stat().st_size for p in folder.iterdir())}
    assert manifest["world_size"] == 1 and manifest["files"] == {
        name: {"sha256": _sha(folder / name), "size": (folder / name).stat().st_size, "rank": 0}
        for name in (DCP_METADATA, SHARD, REST)}

    state = read_checkpoint(tmp_path, "c.dcp", job.result["sha256"])
    assert state["position"] == 7 and state[KEY_SHARDED]["world_size"] == 1
    assert state[KEY_SHARDED]["model_shapes"] == {"0.weight": (8, 4), "0.bias": (8,), "2.weight": (2, 8), "2.bias": (2,)}
    fresh, fresh_optimizer = _model(1)
    load_shards(state[KEY_SHARDED], fresh, fresh_optimizer)
    assert _same(fresh, model)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1 and fresh_optimizer.param_groups[0]["momentum"] == 0.9
    assert all(torch.equal(fresh_optimizer.state[p]["momentum_buffer"], optimizer.state[q]["momentum_buffer"])
               for p, q in zip(fresh.parameters(), model.parameters()))


def test_the_optimizer_state_comes_back_as_saved_whatever_the_fresh_optimizer_holds(tmp_path: Path):
    """As optimizer.load_state_dict: SGD built without momentum and nudged to 0.9 saved momentum
    buffers, which the resumed one (built without momentum again) must get, and then step alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    x = torch.randn(5, 4)

    def step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()

    step(model, optimizer)
    optimizer.param_groups[0]["momentum"] = 0.9  # a nudge
    step(model, optimizer)
    job = _write(tmp_path, model, optimizer)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.0)
    load_shards(read_sharded(tmp_path, "c.dcp", job.result["sha256"])[KEY_SHARDED], fresh, fresh_optimizer)
    assert fresh_optimizer.param_groups[0]["momentum"] == 0.9 and len(fresh_optimizer.state) == 4
    step(model, optimizer)
    step(fresh, fresh_optimizer)
    assert _same(fresh, model)


def test_a_checkpoint_before_the_first_step_changes_nothing_and_resumes_alike(tmp_path: Path):
    """DCP's get_state_dict makes an empty optimizer's state with a step of lr 0 (Adam's count
    becomes 1): a checkpoint taken before the first step must leave the optimizer as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    job = _write(tmp_path, model, optimizer)
    assert not optimizer.state
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    load_shards(read_sharded(tmp_path, "c.dcp", job.result["sha256"])[KEY_SHARDED], fresh, fresh_optimizer)
    assert not fresh_optimizer.state and fresh_optimizer.param_groups[0]["lr"] == 0.01
    x = torch.randn(5, 4)
    for m, o in ((model, optimizer), (fresh, fresh_optimizer)):
        for _ in range(2):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert _same(fresh, model) and optimizer.state_dict()["state"][0]["step"] == 2


def test_a_file_checkpoint_still_reads_as_before(tmp_path: Path):
    sha, _ = write_atomic(tmp_path / "e.pt", {KEY_FORMAT: FORMAT, "model": {"w": torch.ones(2)}})
    assert torch.equal(read_checkpoint(tmp_path, "e.pt", sha)["model"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="'../e.pt' is not a plain file name"):
        read_checkpoint(tmp_path / "sub", "../e.pt", sha)


@pytest.mark.parametrize("damaged", [SHARD, DCP_METADATA, REST, MANIFEST])
def test_one_altered_file_makes_the_whole_checkpoint_unusable_naming_it(tmp_path: Path, damaged: str):
    model, optimizer = _trained()
    job = _write(tmp_path, model, optimizer)
    path = tmp_path / "c.dcp" / damaged
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint file '{path}' does not match the hash recorded"):
        read_sharded(tmp_path, "c.dcp", job.result["sha256"])


def test_a_shard_altered_after_the_check_is_refused_before_it_is_decoded(tmp_path: Path):
    model, optimizer = _trained()
    job = _write(tmp_path, model, optimizer)
    state = read_sharded(tmp_path, "c.dcp", job.result["sha256"], verify_shards=False)  # a follower's read
    path = tmp_path / "c.dcp" / SHARD
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    fresh, fresh_optimizer = _model(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' does not match the hash recorded"):
        load_shards(state[KEY_SHARDED], fresh, fresh_optimizer)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_missing_shard_or_folder_is_named(tmp_path: Path):
    model, optimizer = _trained()
    job = _write(tmp_path, model, optimizer)
    (tmp_path / "c.dcp" / SHARD).unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint file '{tmp_path / 'c.dcp' / SHARD}' is missing"):
        read_sharded(tmp_path, "c.dcp", job.result["sha256"])
    shutil.rmtree(tmp_path / "c.dcp")
    with pytest.raises(CheckpointError, match=rf"checkpoint folder '{tmp_path / 'c.dcp'}' is missing"):
        read_sharded(tmp_path, "c.dcp", job.result["sha256"])


def test_links_are_never_followed_even_to_intact_copies(tmp_path: Path):
    model, optimizer = _trained()
    job = _write(tmp_path / "run", model, optimizer)
    folder = tmp_path / "run" / "c.dcp"
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    (folder / SHARD).unlink()
    (folder / SHARD).symlink_to(copy / SHARD)  # the same bytes, the same hash, but through a link
    with pytest.raises(CheckpointError, match=rf"checkpoint file '{folder / SHARD}' was refused: it is a link"):
        read_sharded(tmp_path / "run", "c.dcp", job.result["sha256"])
    shutil.rmtree(folder)
    folder.symlink_to(copy)
    with pytest.raises(CheckpointError, match=rf"checkpoint folder '{folder}' was refused: it is a link"):
        read_sharded(tmp_path / "run", "c.dcp", job.result["sha256"])


class _Marker:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _vouch(folder: Path, name: str) -> str:
    """Rewrite the manifest so that it vouches for ``name`` as it is now (as someone who can write
    the run directory could); the manifest's new hash."""
    manifest = json.loads((folder / MANIFEST).read_bytes())
    manifest["files"][name]["sha256"] = _sha(folder / name)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return _sha(folder / MANIFEST)


def test_an_index_that_would_run_code_is_refused_unrun_even_with_matching_hashes(tmp_path: Path):
    model, optimizer = _trained()
    _write(tmp_path, model, optimizer)
    folder, marker = tmp_path / "c.dcp", tmp_path / "pwned"
    (folder / DCP_METADATA).write_bytes(pickle.dumps(_Marker(marker)))
    sha = _vouch(folder, DCP_METADATA)
    with pytest.raises(CheckpointError, match=rf"checkpoint file '{folder / DCP_METADATA}' was refused: it holds "
                                              r"objects other than DCP's index \(posix.system"):
        read_sharded(tmp_path, "c.dcp", sha)
    assert not marker.exists()


def test_a_value_that_would_run_code_is_refused_unrun(tmp_path: Path):
    model, optimizer = _trained()
    marker = tmp_path / "pwned"
    optimizer.param_groups[0]["note"] = _Marker(marker)  # saved as DCP saves any value: pickled
    job = _write(tmp_path, model, optimizer)
    fresh, fresh_optimizer = _model(1)
    fresh_optimizer.param_groups[0]["note"] = "plain"  # so that the load asks for it
    state = read_sharded(tmp_path, "c.dcp", job.result["sha256"])
    with pytest.raises(CheckpointError, match=r"checkpoint value '.*note' holds objects other than tensors and plain "
                                              "data, which could run code; it was not loaded"):
        load_shards(state[KEY_SHARDED], fresh, fresh_optimizer)
    assert not marker.exists()


def test_an_index_pointing_outside_the_manifest_is_refused(tmp_path: Path):
    model, optimizer = _trained()
    _write(tmp_path, model, optimizer)
    folder = tmp_path / "c.dcp"
    manifest = json.loads((folder / MANIFEST).read_bytes())
    del manifest["files"][SHARD]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"'{folder / DCP_METADATA}' points to '{SHARD}', which the manifest "
                                              "does not vouch for"):
        read_sharded(tmp_path, "c.dcp", _sha(folder / MANIFEST))


def test_a_checkpoint_of_another_model_does_not_fit(tmp_path: Path):
    model, optimizer = _trained()
    job = _write(tmp_path, model, optimizer)
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    state = read_sharded(tmp_path, "c.dcp", job.result["sha256"])
    with pytest.raises(CheckpointError, match=rf"sharded checkpoint '{tmp_path / 'c.dcp'}' does not fit the model"):
        load_shards(state[KEY_SHARDED], other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9))


def test_a_non_finite_shard_is_never_written(tmp_path: Path):
    model, optimizer = _trained()
    failed: list[PendingCheckpoint] = []
    writer = ShardedCheckpointer(lambda job: None, failed.append)
    shards = stage(model, optimizer)
    shards["model"]["2.bias"][0] = float("inf")
    writer.submit(PendingCheckpoint(path=tmp_path / "c.dcp", state={"shards": shards, "rest": {KEY_FORMAT: FORMAT}},
                                    meta={}))
    writer.close()
    assert [str(job.error) for job in failed] == [
        "not written: parameter '2.bias' holds NaN or infinity (rank 0's shard)"]
    assert os.listdir(tmp_path) == []


def test_two_fsdp2_ranks_write_while_training_reload_refuse_together_and_name_a_missing_rank(tmp_path: Path):
    """One torchrun job (tests/sharded_script.py), then the checkpoint of two ranks loaded into a
    plain model on one process (DCP reshards)."""
    run_dir, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "sharded_script.py"), str(run_dir), str(record)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["a"]["error"] for r in ranks] == [None, None]
    assert [r["a"]["loaded_equal"] for r in ranks] == [True, True]  # every parameter and momentum buffer
    assert [r["a"]["note"] for r in ranks] == ["rank 0's part"] * 2  # rank 0's babysit.pt, read on both
    folder = run_dir / "a.dcp"
    manifest = json.loads((folder / MANIFEST).read_bytes())
    assert manifest["world_size"] == 2 and {name: entry["rank"] for name, entry in manifest["files"].items()} == {
        "__0_0.distcp": 0, "__1_0.distcp": 1, DCP_METADATA: 0, REST: 0}
    assert ranks[0]["a"]["result"]["sha256"] == _sha(folder / MANIFEST)

    refused = "not written: parameter '2.weight' holds NaN or infinity (rank 1's shard)"
    assert [r["b"]["error"] for r in ranks] == [refused, refused]
    assert ranks[0]["c"]["type"] == "RanksOutOfStep" and ranks[0]["c"]["error"] == (
        "rank 1 did not arrive at the start of checkpoint c.dcp's write within 3 s (stopped, killed, or stuck in a "
        "collective of its own); the checkpoint is not listed")
    assert 3 <= ranks[0]["c"]["seconds"] < 30
    assert [r["written"] for r in ranks] == [["a.dcp"], []]
    assert [r["failed"] for r in ranks] == [["b.dcp", "c.dcp"], ["b.dcp"]]
    assert sorted(os.listdir(run_dir)) == ["a.dcp"]  # nothing of b or c left behind

    # Resharded: two ranks' shards into one plain model and optimizer.
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    state = read_sharded(run_dir, "a.dcp", _sha(folder / MANIFEST))
    load_shards(state[KEY_SHARDED], model, optimizer)
    expected = torch.load(record / "a-full.pt")
    assert all(torch.equal(p, expected[name]) for name, p in model.named_parameters())
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], expected[f"momentum:{name}"])
               for name, p in model.named_parameters())
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["momentum"]) == (0.05, 0.9)
