"""Checkpoints: snapshot on the training thread, write atomically off it, load only when verified.

A checkpoint file is written to a temporary name, hashed while it is written, fsynced and renamed
into place (never over an existing checkpoint); only then is it listed in the run store, with its
SHA-256. Loading checks the hash before ``torch.load(weights_only=True)`` decodes anything, and
refuses the file if either fails. The training thread only pays for an in-memory copy of the state.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import mmap
import os
import pickle
import queue
import random
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import CheckpointError, RunDirError
from .rundir import TEMP_MARK, open_file, remove_tree
from .store.liveness import disk_full

log = logging.getLogger(__name__)

FORMAT = "babysit-checkpoint-1"

# Keys of a checkpoint file. The run config travels in every checkpoint.
KEY_FORMAT = "format"
KEY_MODEL = "model"
KEY_OPTIMIZER = "optimizer"
KEY_SCHEDULER = "scheduler"
# A run with several optimizers: the first under KEY_OPTIMIZER / KEY_SCHEDULER, the others by name here.
KEY_OTHER_OPTIMIZERS = "optimizers"
KEY_OTHER_SCHEDULERS = "schedulers"
KEY_RNG = "rng"
KEY_EPOCH_START_RNG = "epoch_start_rng"
KEY_EPOCH = "epoch"
KEY_STEP = "step"
KEY_STEP_IN_EPOCH = "step_in_epoch"
KEY_BRANCH = "branch"
KEY_HPARAMS = "hparams"
KEY_CONFIG = "config"
KEY_METRICS = "metrics"
# The id of the last command the trainer had handled when the snapshot was taken. A resumed
# trainer replays the nudges applied at a later step or with a later id: the step alone cannot tell
# a nudge applied just before an epoch's checkpoint from one applied just after it, at the same step.
KEY_LAST_COMMAND = "last_command"
# The loop's own state (run.state): plain values and the state of its Stateful objects.
KEY_USER_STATE = "user_state"
# The states of the loader's own torch.Generator(s), at the epoch's start and at the cut.
KEY_LOADER_RNG = "loader_rng"
# The loader's own state_dict(), for a loader that has one (torchdata's StatefulDataLoader); None otherwise.
KEY_LOADER_STATE = "loader_state"

# Why a checkpoint was taken (its ``reason`` in the store): an epoch's own checkpoint resumes at the
# next epoch; the others ("checkpoint now", a stop) resume inside their epoch.
REASON_EPOCH = "epoch"
REASON_COMMAND = "command"
REASON_STOP = "stop"

# Below this size a checkpoint is read and hashed in one go; above, it is memory-mapped and hashed
# by a second thread while torch decodes it (a thread and a mapping cost more than they save on
# small files).
MAP_ABOVE_BYTES = 8 * 2**20


def checkpoint_filename(branch: int, epoch: int, step: int) -> str:
    return f"epoch-{epoch:04d}-step-{step:08d}-b{branch}.pt"


# A sharded checkpoint is a folder (see babysit/sharded.py), named like a file with this suffix.
SHARDED_SUFFIX = ".dcp"


def sharded_checkpoint_name(branch: int, epoch: int, step: int) -> str:
    return f"epoch-{epoch:04d}-step-{step:08d}-b{branch}{SHARDED_SUFFIX}"


def clone_tree(obj: Any) -> Any:
    """Copy every tensor in a nest of dicts, lists and tuples; keep the rest as it is.

    Tensors stay on their device: a GPU tensor is copied on the GPU (fast) and moved to the host
    by the writer thread, so the training thread never waits for a device-to-host transfer.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {key: clone_tree(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [clone_tree(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tree(value) for value in obj)
    return obj


def to_cpu_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: to_cpu_tree(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [to_cpu_tree(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu_tree(value) for value in obj)
    return obj


def first_non_finite(state_dict: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, if any.

    A NaN or an infinity anywhere makes the tensor's float64 sum non-finite: one pass and no
    boolean copy of the weights; only a sum that is not finite is checked element by element (a
    float64 sum of huge finite float64 values can overflow).
    """
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            if not bool(torch.isfinite(tensor.sum(dtype=torch.float64))) and not bool(torch.isfinite(tensor).all()):
                return name
    return None


# -- random number generators ----------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states, in types ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((
        np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
        np_state["has_gauss"], np_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing -----------------------------------------------------------------------------------
class _HashingWriter(io.RawIOBase):
    """A file wrapper that hashes what torch.save writes through it (no second read)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.handle.write(view)

    def flush(self) -> None:
        if not self.handle.closed:
            self.handle.flush()


def write_atomic(path: Path, state: dict[str, Any]) -> tuple[str, int]:
    """Write ``state`` to ``path`` atomically, replacing what is there; return (sha256 hex, size).

    On any failure (a full disk included) the temporary file is removed and the error re-raised;
    a file at ``path`` only ever appears complete and flushed to disk.
    """
    _, sha256, size = _write(path, state, replace=True)
    return sha256, size


def write_new(path: Path, state: dict[str, Any]) -> tuple[Path, str, int]:
    """Like :func:`write_atomic`, but never replaces an existing file: when ``path`` is taken (a run
    whose run.db was lost and restarted from scratch reaches the same epoch and step), the file is
    written as ``<name>-2.pt``, ``-3``, … Returns (the path written, sha256 hex, size)."""
    return _write(path, state, replace=False)


def _write(path: Path, state: dict[str, Any], *, replace: bool) -> tuple[Path, str, int]:
    temp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with _create_temp(temp) as handle:
            writer = _HashingWriter(handle)
            torch.save(state, writer)
            writer.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temp, path)
        else:
            path = _link_unused_name(temp, path)
            temp.unlink()
        _fsync_dir(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path, writer.digest.hexdigest(), writer.size


def _create_temp(temp: Path) -> Any:
    """Create the temporary file with O_EXCL and O_NOFOLLOW: whatever sits at the predictable name
    (a leftover, or a link planted to receive the checkpoint's bytes) is removed, never written through."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o644)
    except FileExistsError:
        temp.unlink()  # removes the entry itself; a link's target is left alone
        fd = os.open(temp, flags, 0o644)
    return os.fdopen(fd, "wb")


def _link_unused_name(temp: Path, path: Path) -> Path:
    """Give ``temp`` the name ``path`` (or the first free ``-N`` variant) without ever replacing a
    file: a hard link fails when the name exists, atomically."""
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.link(temp, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # A file system without hard links: check, then rename (the lock keeps other
            # trainers out, so nothing else creates checkpoint names here meanwhile).
            if os.path.lexists(candidate):
                continue
            os.rename(temp, candidate)
            temp.touch()  # the caller unlinks the temporary name
            return candidate
    raise FileExistsError(errno.EEXIST, "no free checkpoint file name", str(path))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete half-written checkpoint files (and sharded checkpoints' folders) left by a process
    that died mid-write or mid-removal."""
    removed = []
    for candidate in directory.glob(f".*{TEMP_MARK}*"):
        remove_tree(candidate)
        removed.append(candidate)
    return removed


def disk_full_error(error: BaseException | None) -> OSError | None:
    """The "no space left" OSError behind ``error`` (torch wraps it in its own RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return error
        error = error.__cause__ or error.__context__
    return None


# -- reading -----------------------------------------------------------------------------------
def read_verified(path: Path, sha256: str | None) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` after checking its SHA-256.

    Nothing is decoded before the hash matches (and a record torch.save would not have written,
    a compressed one, is refused from the zip directory alone). A large file is memory-mapped:
    hashing it brings its pages into the cache and torch maps its records lazily, so nothing is
    copied before ``load_state_dict`` copies the weights into the model. Raises
    :class:`CheckpointError` naming the file when it is missing, a link or not a regular file,
    altered, truncated or holds anything but plain data.
    """
    try:
        handle = open_file(path, "rb")  # never through a link, never a FIFO or a device
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except RunDirError as error:
        raise CheckpointError(f"checkpoint file refused: {error}") from None
    with handle:
        identity = os.fstat(handle.fileno())
        if identity.st_size == 0:  # nothing to map
            digest = {"hex": hashlib.sha256(b"").hexdigest()}
            _check_hash(path, digest["hex"], sha256)
            state, load_error = None, EOFError("empty file")
        elif identity.st_size < MAP_ABOVE_BYTES:
            state, load_error, digest = _load_read(path, handle, sha256)
        else:
            state, load_error, digest = _load_mapped(path, handle, sha256)
    try:
        replaced = os.stat(path).st_ino != identity.st_ino
    except FileNotFoundError:
        replaced = True
    if replaced:  # what torch read is not what was hashed
        raise CheckpointError(f"checkpoint file {str(path)!r} was replaced while it was being read; try again")
    if load_error is not None:
        if identity.st_size and not _starts_like_zip(path):
            reason = "it is not in the zip format torch.save writes (a bare pickle is never loaded)"
        elif isinstance(load_error, pickle.UnpicklingError):
            # torch's own message goes on to suggest weights_only=False: exactly what must not be done.
            reason = "it holds objects other than tensors and plain data, which could run code"
        else:
            reason = f"it is damaged ({type(load_error).__name__})"
        raise CheckpointError(f"checkpoint file {str(path)!r} was refused: {reason}; it was not loaded")
    if not isinstance(state, dict) or state.get(KEY_FORMAT) != FORMAT:
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a babysit checkpoint (format {FORMAT} expected)")
    return state


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _check_hash(path: Path, found: str, sha256: str | None) -> None:
    """Refuse a file whose bytes are not the ones recorded, before anything decodes them (a small
    file can hold a compressed record that inflates to gigabytes)."""
    if sha256 is not None and found != sha256:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not match the hash recorded when it was written "
            f"(recorded {sha256[:12]}…, found {found[:12]}…): it was truncated or altered; "
            "it was not loaded"
        )


def _only_stored_records(data: Any) -> str | None:
    """Why ``data`` is not a zip that torch.save could have written, judged from its directory
    alone: torch.save stores every record uncompressed, so a compressed one is refused unread."""
    try:
        with zipfile.ZipFile(data if isinstance(data, mmap.mmap) else io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    return f"its record {info.filename!r} is compressed, which torch.save never does"
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None  # not a zip at all: torch.load refuses it with its own reason
    return None


def _verify_before_decoding(path: Path, data: Any, sha256: str | None) -> dict[str, str]:
    """Hash the bytes and refuse compressed records, before torch decodes anything."""
    digest = {"hex": hashlib.sha256(data).hexdigest()}
    _check_hash(path, digest["hex"], sha256)
    compressed = _only_stored_records(data)
    if compressed:
        raise CheckpointError(f"checkpoint file {str(path)!r} was refused: {compressed}; it was not loaded")
    return digest


def _load_read(path: Path, handle: Any, sha256: str | None) -> tuple[Any, BaseException | None, dict[str, str]]:
    data = handle.read()
    digest = _verify_before_decoding(path, data, sha256)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), None, digest
    except Exception as error:  # a damaged file fails in many ways (IndexError, struct.error, ...)
        return None, error, digest


def _load_mapped(path: Path, handle: Any, sha256: str | None) -> tuple[Any, BaseException | None, dict[str, str]]:
    # Hashed before torch reads it; torch then maps the records lazily, so the load itself reads
    # little more than the pickle, and the pages the hash read are in the page cache.
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        digest = _verify_before_decoding(path, mapped, sha256)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), None, digest
    except Exception as error:  # a damaged file fails in many ways (IndexError, struct.error, ...)
        return None, error, digest


# -- the background writer ---------------------------------------------------------------------
@dataclass
class PendingCheckpoint:
    path: Path
    state: dict[str, Any]
    meta: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    # Set by ``on_written`` once the store lists the file; until then the file is the writer's, and
    # removed if listing it fails (a file nothing lists is never resumed from, only takes room).
    listed: bool = False


def _lower_thread_priority() -> None:
    """Let training steps win the CPU from the checkpoint writer (Linux schedules threads one by
    one, so this thread alone is niced); elsewhere, nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


# How long a write waits for the training thread to leave the meeting it was taken in (see hold()).
HOLD_AT_MOST_S = 1.0


class AsyncCheckpointer:
    """Writes snapshots on a thread of its own, one at a time, in the order submitted.

    ``on_written(job)`` lists a written file (and sets ``job.listed``); if it raises before the file
    is listed, the file is removed and ``on_failed(job)`` reports it: a checkpoint file is either
    listed or gone, never left on the disk unlisted.

    Between :meth:`hold` and :meth:`release` (babysit holds it while the ranks meet), a write waits
    to start, for at most ``HOLD_AT_MOST_S``: a writer thread running Python (pickling, DCP's
    planning) takes the GIL from the training thread at every collective it waits on, which
    would lengthen the meeting the training thread is still in; once it has left, the write goes
    on beside training."""

    def __init__(self, on_written: Callable[[PendingCheckpoint], None],
                 on_failed: Callable[[PendingCheckpoint], None]) -> None:
        self._queue: queue.Queue[PendingCheckpoint | None] = queue.Queue()
        self._on_written = on_written
        self._on_failed = on_failed
        self._released = threading.Event()
        self._released.set()
        self._thread = threading.Thread(target=self._loop, name="babysit-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, job: PendingCheckpoint) -> PendingCheckpoint:
        self._queue.put(job)
        return job

    def hold(self) -> None:
        """Writes wait to start until :meth:`release` (or ``HOLD_AT_MOST_S``)."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def wait(self) -> None:
        """Block until every submitted checkpoint is written (or has failed)."""
        self.release()
        self._queue.join()

    def close(self) -> None:
        self.wait()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        _lower_thread_priority()
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._released.wait(HOLD_AT_MOST_S)
                self._write(job)
            finally:
                self._queue.task_done()

    def _write(self, job: PendingCheckpoint) -> None:
        try:
            state = to_cpu_tree(job.state)
            bad = first_non_finite(state[KEY_MODEL])
            if bad is not None:
                raise CheckpointError(f"not written: parameter {bad!r} holds NaN or infinity")
            job.path, sha256, size = write_new(job.path, state)
            job.result = {"sha256": sha256, "size": size}
            try:
                self._on_written(job)
            except BaseException:
                if not job.listed:
                    remove_unlisted(job.path)
                raise
        except BaseException as error:  # reported, never allowed to kill the writer thread
            job.error = error
            if job.listed:
                done = "listed, but what follows its listing failed"
            else:
                done = "not written" if job.result is None else "written but not listed, so removed"
            log.warning("babysit: checkpoint %s %s: %s: %s", job.path.name, done, type(error).__name__, error)
            try:
                self._on_failed(job)  # an event the page shows, a pause or a remedy
            except Exception as unrecorded:  # a full disk refuses the event too: the log is all there is
                why = ("the disk is full" if disk_full(unrecorded)
                       else f"{type(unrecorded).__name__}: {unrecorded}")
                log.error("babysit: checkpoint %s failed and the failure could not be recorded in the store (%s)",
                          job.path.name, why)
        finally:
            job.state = {}  # free the snapshot
            job.done.set()


def remove_unlisted(path: Path) -> None:
    """Remove a checkpoint file (or a sharded checkpoint's folder) the store could not list (the
    failure itself is reported by the caller)."""
    try:
        remove_tree(path)
        _fsync_dir(path.parent)
    except OSError as error:
        log.error("babysit: checkpoint %s could not be listed, nor removed (%s); nothing refers to it", path.name,
                  error)
