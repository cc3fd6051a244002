"""Checkpoints: atomic writes, verified loads, RNG round trips, hostile files, the background writer."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from babysit import checkpoint as ck
from babysit.checkpoint import AsyncCheckpointer, CheckpointError, PendingCheckpoint


def _trained(opt_cls: type, **opt_kwargs: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = opt_cls(model.parameters(), **opt_kwargs)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, **extra: Any) -> dict[str, Any]:
    return {
        ck.KEY_FORMAT: ck.FORMAT, ck.KEY_MODEL: model.state_dict(), ck.KEY_OPTIMIZER: opt.state_dict(),
        ck.KEY_RNG: ck.rng_state(), ck.KEY_EPOCH: 2, ck.KEY_STEP: 40, ck.KEY_STEP_IN_EPOCH: 0, ck.KEY_BRANCH: 1,
        ck.KEY_HPARAMS: {"lr": 0.1, "momentum": 0.9}, ck.KEY_CONFIG: {"seed": 0, "optimizer": "sgd"},
        ck.KEY_METRICS: {"val_loss": 0.5}, **extra,
    }


def _small(tmp_path: Path) -> tuple[Path, str, bytes]:
    path = tmp_path / "small.pt"
    sha, _ = ck.write_atomic(path, {ck.KEY_FORMAT: ck.FORMAT, ck.KEY_MODEL: {"w": torch.ones(2)}, ck.KEY_EPOCH: 1})
    return path, sha, path.read_bytes()


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- names and trees -------------------------------------------------------------------------
def test_checkpoint_file_names_sort_in_training_order_and_name_their_branch():
    # `ls` of a run directory lists its checkpoints in the order they were trained (zero-padded
    # epoch and step), and two branches that reach the same step never share a file.
    trained = [(1, 1, 9), (1, 2, 18), (1, 10, 90), (2, 10, 90), (1, 999, 8_991), (1, 1000, 12_345_678)]
    names = [ck.checkpoint_filename(branch=b, epoch=e, step=s) for b, e, s in trained]
    assert sorted(names) == names and len(set(names)) == len(names)
    assert names[3] == "epoch-0010-step-00000090-b2.pt"
    assert all("/" not in name and name.endswith(".pt") and ck.TEMP_MARK not in name for name in names)


def test_clone_tree_copies_tensors_and_keeps_the_rest():
    tensor = torch.ones(2)
    tree = {"a": tensor, "b": [tensor, 3, ("x", tensor)], "c": None}
    copied = ck.clone_tree(tree)
    tensor.add_(1)
    assert torch.equal(copied["a"], torch.ones(2))
    assert torch.equal(copied["b"][0], torch.ones(2))
    assert copied["b"][1] == 3
    assert isinstance(copied["b"][2], tuple) and copied["b"][2][0] == "x"
    assert torch.equal(copied["b"][2][1], torch.ones(2))
    assert copied["c"] is None


def test_first_non_finite():
    assert ck.first_non_finite({"a": torch.ones(2), "steps": torch.tensor([1, 2])}) is None
    assert ck.first_non_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]),
                                "c": torch.tensor([float("inf")])}) == "b"
    assert ck.first_non_finite({"a": torch.tensor([float("-inf")], dtype=torch.bfloat16)}) == "a"
    assert ck.first_non_finite({"not a tensor": float("nan")}) is None
    assert ck.first_non_finite({}) is None


# -- round trips -----------------------------------------------------------------------------
def test_round_trip_model_and_sgd_momentum_buffers(tmp_path: Path):
    model, opt = _trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    path = tmp_path / "a.pt"
    sha, size = ck.write_atomic(path, _state(model, opt))
    state = ck.read_verified(path, sha)

    fresh_model, fresh_opt = _trained(torch.optim.SGD, lr=0.5, momentum=0.1)
    fresh_model.apply(lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, torch.nn.Linear) else None)
    fresh_model.load_state_dict(state[ck.KEY_MODEL])
    fresh_opt.load_state_dict(state[ck.KEY_OPTIMIZER])
    for name, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], value), name
    for original, restored in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(fresh_opt.state[restored]["momentum_buffer"], opt.state[original]["momentum_buffer"])
    assert fresh_opt.param_groups[0]["lr"] == 0.1 and fresh_opt.param_groups[0]["momentum"] == 0.9
    assert state[ck.KEY_EPOCH] == 2 and state[ck.KEY_STEP] == 40 and state[ck.KEY_BRANCH] == 1
    assert state[ck.KEY_CONFIG] == {"seed": 0, "optimizer": "sgd"}
    assert state[ck.KEY_HPARAMS] == {"lr": 0.1, "momentum": 0.9}
    assert state[ck.KEY_METRICS] == {"val_loss": 0.5}
    assert size == path.stat().st_size


def test_round_trip_adam_state(tmp_path: Path):
    model, opt = _trained(torch.optim.Adam, lr=1e-2, betas=(0.8, 0.99))
    path = tmp_path / "adam.pt"
    sha, _ = ck.write_atomic(path, _state(model, opt))
    state = ck.read_verified(path, sha)
    fresh_model, fresh_opt = _trained(torch.optim.Adam, lr=1.0)
    fresh_model.load_state_dict(state[ck.KEY_MODEL])
    fresh_opt.load_state_dict(state[ck.KEY_OPTIMIZER])
    for original, restored in zip(model.parameters(), fresh_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_opt.state[restored][key], opt.state[original][key]), key
    assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert fresh_opt.param_groups[0]["lr"] == 1e-2


def test_restored_training_continues_identically(tmp_path: Path):
    model, opt = _trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    path = tmp_path / "a.pt"
    sha, _ = ck.write_atomic(path, _state(model, opt))
    twin_model, twin_opt = _trained(torch.optim.SGD, lr=0.3, momentum=0.2)
    state = ck.read_verified(path, sha)
    twin_model.load_state_dict(state[ck.KEY_MODEL])
    twin_opt.load_state_dict(state[ck.KEY_OPTIMIZER])
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    for m, o in ((model, opt), (twin_model, twin_opt)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_rng_states_round_trip_through_a_file(tmp_path: Path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)            # leaves python's cached second gaussian set
    np.random.standard_normal()   # leaves numpy's cached gaussian set
    path = tmp_path / "rng.pt"
    sha, _ = ck.write_atomic(path, {ck.KEY_FORMAT: ck.FORMAT, ck.KEY_RNG: ck.rng_state()})

    def draw() -> tuple[Any, ...]:
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())

    expected = draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw() != expected
    ck.set_rng_state(ck.read_verified(path, sha)[ck.KEY_RNG])
    assert draw() == expected


def test_rng_state_holds_only_plain_data():
    state = ck.rng_state()
    assert set(state) >= {"python", "numpy", "torch"}
    assert isinstance(state["numpy"]["keys"], torch.Tensor) and state["numpy"]["keys"].dtype == torch.int64
    assert state["numpy"]["name"] == "MT19937"


# -- hashes ----------------------------------------------------------------------------------
def test_write_atomic_returns_the_sha256_and_size_of_the_file(tmp_path: Path):
    path, sha, data = _small(tmp_path)
    assert sha == hashlib.sha256(data).hexdigest()
    assert len(data) > 0
    assert ck.write_atomic(tmp_path / "again.pt", {"x": torch.arange(5)}) == (
        hashlib.sha256((tmp_path / "again.pt").read_bytes()).hexdigest(), (tmp_path / "again.pt").stat().st_size
    )


def test_write_atomic_replaces_an_existing_file_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "a.pt"
    path.write_bytes(b"old")
    sha, _ = ck.write_atomic(path, {ck.KEY_FORMAT: ck.FORMAT, "v": 2})
    assert ck.read_verified(path, sha)["v"] == 2
    assert _entries(tmp_path) == ["a.pt"]


def test_read_verified_without_a_recorded_hash_still_loads(tmp_path: Path):
    path, _, _ = _small(tmp_path)
    state = ck.read_verified(path, None)
    assert torch.equal(state[ck.KEY_MODEL]["w"], torch.ones(2))


# -- refused files ---------------------------------------------------------------------------
def test_missing_file_is_refused(tmp_path: Path):
    path = tmp_path / "gone.pt"
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' is missing$"):
        ck.read_verified(path, "0" * 64)


@pytest.mark.parametrize("keep", [0, 1, 100, -1], ids=["empty", "one-byte", "100-bytes", "last-byte-gone"])
def test_truncated_file_is_refused_naming_it(tmp_path: Path, keep: int):
    path, sha, data = _small(tmp_path)
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' does not match the hash recorded .*"
                                              r"it was truncated or altered; it was not loaded$"):
        ck.read_verified(path, sha)


def test_truncated_file_without_hash_is_refused_as_damaged(tmp_path: Path):
    path, _, data = _small(tmp_path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' was refused: it is damaged \(\w+\); it was not loaded$"):
        ck.read_verified(path, None)


def test_one_flipped_byte_in_tensor_data_is_refused(tmp_path: Path):
    path, sha, data = _small(tmp_path)
    where = data.find(torch.ones(2).numpy().tobytes())
    assert where > 0 and data.count(torch.ones(2).numpy().tobytes()) == 1
    flipped = bytearray(data)
    flipped[where + 2] ^= 0x01  # 1.0 becomes another finite float: the load alone would not notice
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' does not match the hash recorded "
                                              rf"when it was written \(recorded {sha[:12]}…, found [0-9a-f]{{12}}…\)"):
        ck.read_verified(path, sha)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_flipped_byte_of_the_pickle_is_refused_as_a_checkpoint_error(tmp_path: Path):
    # Whatever torch's unpickler trips over (IndexError, AssertionError, struct.error, ...), a damaged
    # file must come back as CheckpointError naming the file, never as a stray exception.
    path, sha, data = _small(tmp_path)
    entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    pickle_end = sorted(e.header_offset for e in entries)[1]  # data.pkl is the first entry
    escaped: dict[int, str] = {}
    for position in range(pickle_end):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            ck.read_verified(path, sha)
        except CheckpointError as error:
            assert str(path) in str(error)
        except BaseException as error:  # noqa: BLE001 - collected and reported below
            escaped[position] = repr(error)
        else:
            escaped[position] = "loaded without complaint"
    assert escaped == {}


class _Marker:
    """Creates a file when unpickled (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("recorded", ["original", "of_the_malicious_file", None])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path: Path, how: str, recorded: str | None):
    path, original_sha, _ = _small(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({ck.KEY_FORMAT: ck.FORMAT, ck.KEY_MODEL: {"w": torch.ones(2)}, "x": _Marker(marker, how)}, path)
    sha = {"original": original_sha, "of_the_malicious_file": hashlib.sha256(path.read_bytes()).hexdigest(),
           None: None}[recorded]
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' "):
        ck.read_verified(path, sha)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_raw_pickle_is_refused_and_does_not_run(tmp_path: Path):
    path = tmp_path / "raw.pt"
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps(_Marker(marker, "system")))
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' was refused: it is not in the zip format "
                                              r"torch.save writes \(a bare pickle is never loaded\); it was not loaded$"):
        ck.read_verified(path, hashlib.sha256(path.read_bytes()).hexdigest())
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 200, random.Random(0).randbytes(500), b"PK\x03\x04" + b"x" * 300,
     b"this is not a checkpoint at all\n" * 10],
    ids=["empty", "zeros", "random", "zip-header", "text"],
)
def test_garbage_file_is_refused(tmp_path: Path, content: bytes):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' was refused: (it is damaged|it holds objects|it is not in the zip format)"):
        ck.read_verified(path, hashlib.sha256(content).hexdigest())


def test_refusal_of_a_malicious_pickle_does_not_advise_turning_the_protection_off(tmp_path: Path):
    # torch's first line says "Re-running `torch.load` with `weights_only` set to `False`"; quoted
    # as the reason for refusing a tampered file, it reads as advice to load it unsafely.
    path = tmp_path / "evil.pt"
    torch.save({ck.KEY_FORMAT: ck.FORMAT, "x": _Marker(tmp_path / "pwned", "system")}, path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' was refused") as info:
        ck.read_verified(path, hashlib.sha256(path.read_bytes()).hexdigest())
    assert "set to `False`" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("payload", [{"model": {}}, {ck.KEY_FORMAT: "other-format-1"}, [1, 2, 3], torch.ones(2)])
def test_plain_data_that_is_not_a_babysit_checkpoint_is_refused(tmp_path: Path, payload: Any):
    path = tmp_path / "other.pt"
    sha, _ = ck.write_atomic(path, payload)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file '{path}' is not a babysit checkpoint "
                                              r"\(format babysit-checkpoint-1 expected\)$"):
        ck.read_verified(path, sha)


# -- failed writes ---------------------------------------------------------------------------
def test_failed_write_leaves_no_file_and_no_temp(tmp_path: Path):
    (tmp_path / "keep.pt").write_bytes(b"earlier checkpoint")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ck.write_atomic(tmp_path / "new.pt", {"unpicklable": lambda: None, "w": torch.ones(1000)})
    assert _entries(tmp_path) == ["keep.pt"]
    assert (tmp_path / "keep.pt").read_bytes() == b"earlier checkpoint"


def test_failed_write_does_not_touch_an_existing_file_at_the_target(tmp_path: Path):
    target = tmp_path / "a.pt"
    sha, _ = ck.write_atomic(target, {ck.KEY_FORMAT: ck.FORMAT, "v": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ck.write_atomic(target, {ck.KEY_FORMAT: ck.FORMAT, "v": threading.Lock()})
    assert ck.read_verified(target, sha)["v"] == 1
    assert _entries(tmp_path) == ["a.pt"]


def test_disk_full_during_write_removes_the_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OSError) as info:
        ck.write_atomic(tmp_path / "a.pt", {"w": torch.ones(3)})
    assert ck.disk_full_error(info.value) is info.value
    assert _entries(tmp_path) == []


def test_disk_full_error_finds_the_oserror_behind_torchs_own():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert ck.disk_full_error(full) is full
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert ck.disk_full_error(quota) is quota
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 622016 vs 621904")
    except RuntimeError as outer:  # torch.save reports a failed write like this, the OSError as context
        assert ck.disk_full_error(outer) is full
    assert ck.disk_full_error(OSError(errno.EACCES, "Permission denied")) is None
    assert ck.disk_full_error(ValueError("bad")) is None
    assert ck.disk_full_error(None) is None


def test_remove_stale_temps(tmp_path: Path):
    stale = [tmp_path / ".epoch-0001-step-00000010-b1.pt.tmp-123", tmp_path / ".x.pt.tmp-99999"]
    for path in stale:
        path.write_bytes(b"half")
    keep = [tmp_path / "epoch-0001-step-00000010-b1.pt", tmp_path / "run.db", tmp_path / ".hidden", tmp_path / "x.tmp-1"]
    for path in keep:
        path.write_bytes(b"keep")
    assert sorted(ck.remove_stale_temps(tmp_path)) == sorted(stale)
    assert _entries(tmp_path) == sorted(p.name for p in keep)
    assert ck.remove_stale_temps(tmp_path) == []


def test_remove_stale_temps_removes_a_half_written_checkpoint_folder_without_following_links(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    run_dir = tmp_path / "run"
    stale = run_dir / f".epoch-0001-step-00000020-b1.dcp{ck.TEMP_MARK}shards"
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"half")
    (stale / "escape").symlink_to(outside)
    assert ck.remove_stale_temps(run_dir) == [stale]
    assert _entries(run_dir) == [] and _entries(outside) == ["precious"]


def test_temp_name_is_found_by_remove_stale_temps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A process killed mid-write leaves its temp file: make one exactly as write_atomic names it.
    seen: list[str] = []
    real_replace = os.replace

    def crash(src: Any, dst: Any) -> None:
        seen.append(Path(src).name)
        raise KeyboardInterrupt  # anything, even a BaseException, still cleans up

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.write_atomic(tmp_path / "a.pt", {"w": torch.ones(1)})
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert seen == [f".a.pt{ck.TEMP_MARK}{os.getpid()}"]
    assert _entries(tmp_path) == []
    (tmp_path / seen[0]).write_bytes(b"half")
    assert ck.remove_stale_temps(tmp_path) == [tmp_path / seen[0]]


# -- the background writer -------------------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.written: list[PendingCheckpoint] = []
        self.failed: list[PendingCheckpoint] = []

    def on_written(self, job: PendingCheckpoint) -> None:
        self.written.append(job)

    def on_failed(self, job: PendingCheckpoint) -> None:
        self.failed.append(job)


def test_async_checkpointer_writes_in_order_and_reports(tmp_path: Path):
    model, opt = _trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    recorder = _Recorder()
    writer = AsyncCheckpointer(recorder.on_written, recorder.on_failed)
    jobs = [writer.submit(PendingCheckpoint(path=tmp_path / f"{i}.pt", state=ck.clone_tree(_state(model, opt)),
                                            meta={"n": i})) for i in range(3)]
    writer.close()
    assert [job.meta["n"] for job in recorder.written] == [0, 1, 2]
    assert recorder.failed == []
    for job in jobs:
        assert job.done.is_set() and job.error is None and job.state == {}
        assert job.result == {"sha256": hashlib.sha256(job.path.read_bytes()).hexdigest(),
                              "size": job.path.stat().st_size}
        restored = ck.read_verified(job.path, job.result["sha256"])
        assert torch.equal(restored[ck.KEY_MODEL]["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_async_checkpointer_never_writes_non_finite_weights(tmp_path: Path, bad: float):
    model, opt = _trained(torch.optim.SGD, lr=0.1)
    with torch.no_grad():
        model[2].bias[1] = bad
    recorder = _Recorder()
    writer = AsyncCheckpointer(recorder.on_written, recorder.on_failed)
    job = writer.submit(PendingCheckpoint(path=tmp_path / "bad.pt", state=_state(model, opt), meta={}))
    writer.close()
    assert recorder.written == [] and recorder.failed == [job]
    assert isinstance(job.error, CheckpointError)
    assert str(job.error) == "not written: parameter '2.bias' holds NaN or infinity"
    assert job.result is None and job.done.is_set()
    assert _entries(tmp_path) == []


def test_async_checkpointer_survives_a_failed_write_and_a_raising_callback(tmp_path: Path):
    recorder = _Recorder()

    def on_failed(job: PendingCheckpoint) -> None:
        recorder.on_failed(job)
        raise RuntimeError("the store is busy")

    writer = AsyncCheckpointer(recorder.on_written, on_failed)
    bad = writer.submit(PendingCheckpoint(path=tmp_path / "bad.pt",
                                          state={ck.KEY_MODEL: {}, "f": lambda: None}, meta={"n": 1}))
    good = writer.submit(PendingCheckpoint(path=tmp_path / "good.pt",
                                           state={ck.KEY_FORMAT: ck.FORMAT, ck.KEY_MODEL: {"w": torch.ones(1)}},
                                           meta={"n": 2}))
    writer.wait()
    assert recorder.failed == [bad] and recorder.written == [good]
    assert bad.error is not None and good.error is None
    assert _entries(tmp_path) == ["good.pt"]
    writer.close()


def test_a_written_checkpoint_the_store_cannot_list_is_removed_never_left_unlisted(tmp_path: Path):
    failed: list[PendingCheckpoint] = []

    def on_written(job: PendingCheckpoint) -> None:
        if job.meta["listed"]:  # listed, then what follows (retention) fails: the file is the store's
            job.listed = True
            raise PermissionError("retention could not remove an older file")
        raise OverflowError("int too large to convert to float")  # the flush before listing, say

    writer = AsyncCheckpointer(on_written, failed.append)
    state = {ck.KEY_FORMAT: ck.FORMAT, ck.KEY_MODEL: {"w": torch.ones(1)}}
    unlisted = writer.submit(PendingCheckpoint(path=tmp_path / "a.pt", meta={"listed": False}, state=dict(state)))
    listed = writer.submit(PendingCheckpoint(path=tmp_path / "b.pt", meta={"listed": True}, state=dict(state)))
    writer.close()
    assert failed == [unlisted, listed] and isinstance(unlisted.error, OverflowError)
    assert unlisted.result is not None and not unlisted.listed
    assert _entries(tmp_path) == ["b.pt"]


def test_async_checkpointer_state_without_a_model_is_a_failure(tmp_path: Path):
    recorder = _Recorder()
    writer = AsyncCheckpointer(recorder.on_written, recorder.on_failed)
    job = writer.submit(PendingCheckpoint(path=tmp_path / "x.pt", state={"no": "model"}, meta={}))
    writer.close()
    assert recorder.failed == [job] and isinstance(job.error, KeyError)
    assert _entries(tmp_path) == []
