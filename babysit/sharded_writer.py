"""Writing sharded checkpoints: every rank's writer thread, together (see :mod:`babysit.sharded`
for the folder's layout).

On the training thread each rank only copies its shard; while the ranks still meet (between
:meth:`~babysit.checkpoint.AsyncCheckpointer.hold` and ``release``), the copy is made on a thread
of its own, beside the meeting's collectives, and ``release`` waits for it: the training thread
never goes on to change the weights before they are copied. Its writer thread
(:class:`ShardedCheckpointer`) does the rest with every other rank's, in the order the
checkpoints were taken. Rank 0 makes the folder under a temporary name and writes
``babysit.pt``; the writers meet (each says whether its shard can be written: a NaN in it, say);
``dcp.save`` writes every rank's shard and rank 0 the index; each rank hashes the files it wrote
and reports them to rank 0, which writes the manifest, renames the folder to its name and only
then lists it. A checkpoint some rank could not write is never listed: the message names the rank
and why.

The writers meet through the job's key-value store (:mod:`babysit.arrivals`), never through a
collective of the training's own group (a collective started by a background thread on the group
FSDP uses is how a checkpoint hangs a job), and with a deadline: a rank that does not arrive is
named. ``dcp.save`` runs its collectives on a gloo group of the writers' own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from .checkpoint import (
    SHARDED_SUFFIX, AsyncCheckpointer, PendingCheckpoint, clone_tree, disk_full_error, first_non_finite, remove_unlisted,
    to_cpu_tree, write_atomic,
)
from .dcp_folder import DCP_METADATA, Folder, folder_writer
from .arrivals import Arrivals
from .errors import CheckpointError, RanksOutOfStep
from .rundir import TEMP_MARK, remove_tree
from .sharded import DCP_MODEL, MANIFEST, REST, SHARDED_FORMAT, describe, failures, local_shards
from .store.liveness import disk_full

log = logging.getLogger(__name__)

# How long a writer waits for the others at a meeting before naming the ranks that did not come.
ARRIVAL_TIMEOUT_S = 300.0


class ShardedCheckpointer(AsyncCheckpointer):
    """Writes sharded checkpoints on a thread of its own, on every rank, one at a time, in the
    order submitted, which must be the same on every rank.

    Build it on every rank at the same point of the program (under torch.distributed it creates
    a gloo group for the writers, a collective). Submit, on every rank, a
    :class:`~babysit.checkpoint.PendingCheckpoint` whose ``path`` is the checkpoint's folder (the
    same on every rank) and whose ``state`` is ``{"shards": stage(...), "rest": ...}``: ``rest``,
    on rank 0 only, is ``babysit.pt``'s content. On rank 0, ``on_written`` gets the job with
    ``path`` the folder as listed and ``result`` the manifest's ``sha256`` and the folder's ``size``;
    ``on_failed`` gets it with ``error`` saying which rank could not write and why. On the other
    ranks both are told of their own part only.
    """

    def __init__(self, on_written: Callable[[PendingCheckpoint], None],
                 on_failed: Callable[[PendingCheckpoint], None], *, timeout_s: float = ARRIVAL_TIMEOUT_S) -> None:
        import torch.distributed as dist

        joined = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if joined else 0
        self.world_size = dist.get_world_size() if joined else 1
        self.timeout_s = timeout_s
        self._group: Any = None
        self._meeting: Arrivals | None = None
        self._serial = 0
        self._copying: list[threading.Thread] = []
        if self.world_size > 1:
            # The writers' own group: DCP's collectives run on the writer threads, never on a group
            # the training thread uses at the same time.
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            token = [f"{os.getpid()}-{time.time_ns()}"]
            dist.broadcast_object_list(token, src=0, group=self._group)
            self._meeting = Arrivals(dist.distributed_c10d._get_default_store(), f"babysit/sharded/{token[0]}",
                                     self.rank, self.world_size, timeout_s)
        super().__init__(on_written, on_failed)

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def submit(self, job: PendingCheckpoint) -> PendingCheckpoint:
        """Write ``job``; its ``shards`` may be live state dicts (:func:`babysit.sharded.state_dicts`):
        they are copied now, or, while held, on a thread of its own that :meth:`release` waits for."""
        live = job.state["shards"]
        if self._released.is_set():
            job.state["shards"] = clone_tree(live)
        else:
            copying = threading.Thread(target=lambda: job.state.__setitem__("shards", clone_tree(live)),
                                       name="babysit-shard-copy", daemon=True)
            copying.start()
            self._copying.append(copying)
            job.state["copying"] = copying
        return super().submit(job)

    def release(self) -> None:
        """Wait for the copies of the shards submitted while held (the training thread may change
        the weights from now on), then let the writes start."""
        for copying in self._copying:
            copying.join()
        self._copying.clear()
        super().release()

    def close(self) -> None:
        """Wait for the writes, stop the thread, release the writers' group (now, in order, rather
        than at interpreter exit)."""
        super().close()
        if self._group is not None:
            import torch.distributed as dist

            group, self._group = self._group, None
            if dist.is_initialized():
                dist.destroy_process_group(group)

    def _write(self, job: PendingCheckpoint) -> None:
        self._serial += 1
        key = f"{self._serial}"
        name = job.path.name
        temp = job.path.with_name(f".{name}{TEMP_MARK}shards")
        try:
            self._write_job(job, key, temp)
            if self.leads:
                try:
                    self._on_written(job)
                except BaseException:  # listed or gone: never a complete folder nobody lists
                    if not job.listed:
                        remove_unlisted(job.path)
                    raise
        except BaseException as error:  # reported, never allowed to kill the writer thread
            job.error = error if isinstance(error, Exception) else CheckpointError(describe(error))
            log.warning("babysit: rank %d: sharded checkpoint %s: %s", self.rank, name, job.error)
            if self.leads:
                _remove_quietly(temp)
            self._report_failure(job)
        finally:
            job.state = {}  # free the snapshot
            job.done.set()

    def _report_failure(self, job: PendingCheckpoint) -> None:
        try:
            self._on_failed(job)
        except Exception as unrecorded:  # a full disk refuses the event too: the log is all there is
            why = "the disk is full" if disk_full(unrecorded) else f"{type(unrecorded).__name__}: {unrecorded}"
            log.error("babysit: checkpoint %s failed and the failure could not be recorded (%s)", job.path.name, why)

    def _write_job(self, job: PendingCheckpoint, key: str, temp: Path) -> None:
        name = job.path.name
        copying = job.state.get("copying")
        if copying is not None:  # (released after the copy, but a hold ends by itself after a while)
            copying.join()
        shards, rest = job.state["shards"], job.state.get("rest")
        rest_file: dict[str, Any] | None = None
        own_error: BaseException | None = None
        # 1. What this rank can say before anything is written: its shard is finite; on rank 0,
        # the folder and babysit.pt are in place.
        verdict = None
        try:
            bad = first_non_finite(local_shards(shards[DCP_MODEL]))
            if bad is not None:
                verdict = f"not written: parameter {bad!r} holds NaN or infinity (rank {self.rank}'s shard)"
            elif self.leads:
                _fresh_folder(temp)
                sha256, size = write_atomic(temp / REST, to_cpu_tree(rest))
                rest_file = {"sha256": sha256, "size": size, "rank": 0}
        except Exception as error:
            own_error, verdict = error, f"rank {self.rank} could not start it: {describe(error)}"
        verdicts = self._meet_all(key + "/ready", verdict, f"the start of checkpoint {name}'s write")
        if own_error is not None:
            raise own_error
        refused = [v for v in verdicts if v]
        if refused:
            raise CheckpointError("; ".join(refused))
        # 2. Every rank writes its shard (rank 0 the index too), hashes what it wrote, reports.
        report: dict[str, Any]
        try:
            report = {"files": self._save_shards(temp, shards)}
        except BaseException as error:
            report = {"error": f"rank {self.rank} could not write its shard: {describe(error)}",
                      "errno": _errno_of(error)}
        reports = self._gather_at_leader(key + "/done", report, f"the end of checkpoint {name}'s write")
        if not self.leads:
            if "error" in report:
                raise CheckpointError(report["error"])
            return
        # 3. Rank 0: every rank's files are complete; the manifest vouches for them, then the name.
        broken = [r for r in reports if "error" in r]
        if broken:
            error = CheckpointError("not written: " + "; ".join(r["error"] for r in broken))
            full = next((r["errno"] for r in broken if r.get("errno") in _DISK_FULL), None)
            if full is not None:  # seen as a full disk, as a single-file checkpoint's would be
                raise error from OSError(full, os.strerror(full))
            raise error
        files = {REST: rest_file}
        for report in reports:
            files.update(report["files"])
        if DCP_METADATA not in files:
            raise CheckpointError(f"not written: DCP wrote no {DCP_METADATA} index")
        sha256, size = _write_manifest(temp, {"format": SHARDED_FORMAT, "world_size": self.world_size, "files": files})
        job.path = _publish(temp, job.path)
        job.result = {"sha256": sha256, "size": size + sum(f["size"] for f in files.values())}

    def _save_shards(self, temp: Path, shards: dict[str, Any]) -> dict[str, dict[str, Any]]:
        import torch.distributed.checkpoint as dcp

        with Folder.open(temp, for_writing=True) as folder:
            dcp.save(shards, storage_writer=folder_writer(folder), process_group=self._group,
                     no_dist=self._group is None)
            return {name: {**folder.digest(name), "rank": self.rank} for name in sorted(folder.written)}

    def _meet_all(self, key: str, value: Any, what: str) -> list[Any]:
        if self._meeting is None:
            return [value]
        try:
            return self._meeting.all_arrive(key, value, what)
        except RanksOutOfStep as error:
            raise RanksOutOfStep(f"{error}; the checkpoint is not listed") from None

    def _gather_at_leader(self, key: str, value: Any, what: str) -> list[Any]:
        if self._meeting is None:
            return [value]
        try:
            values = self._meeting.report_to_leader(key, value, what)
        except RanksOutOfStep as error:
            raise RanksOutOfStep(f"{error}; the checkpoint is not listed") from None
        if self.leads:  # every rank is past this checkpoint's meetings
            serial = key.split("/", 1)[0]
            self._meeting.forget(f"{serial}/ready", key)
        return values


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _errno_of(error: BaseException) -> int | None:
    for candidate in failures(error):
        full = disk_full_error(candidate)
        if full is not None:
            return full.errno
    return None


def _fresh_folder(temp: Path) -> None:
    remove_tree(temp)  # a leftover of a write that died; never followed if it is a link
    os.mkdir(temp, 0o755)


def _remove_quietly(temp: Path) -> None:
    try:
        remove_tree(temp)
    except OSError as error:
        log.warning("babysit: could not remove %s: %s", temp, error)


def _write_manifest(temp: Path, manifest: dict[str, Any]) -> tuple[str, int]:
    data = json.dumps(manifest, sort_keys=True, indent=1).encode()
    with Folder.open(temp, for_writing=True) as folder:
        with folder.create(MANIFEST) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.fsync(folder.fd)  # every rank's files and the manifest are named on disk before the folder is
    return hashlib.sha256(data).hexdigest(), len(data)


def _publish(temp: Path, path: Path) -> Path:
    """Give the complete folder its name (or the first free ``-N`` variant: never over anything)."""
    stem = path.name[: -len(SHARDED_SUFFIX)] if path.name.endswith(SHARDED_SUFFIX) else path.name
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{stem}-{n}{SHARDED_SUFFIX}")
        # The run directory's lock keeps other trainers out: nothing else creates names here meanwhile.
        if os.path.lexists(candidate):
            continue
        os.rename(temp, candidate)
        fd = os.open(candidate.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free checkpoint folder name", str(path))
