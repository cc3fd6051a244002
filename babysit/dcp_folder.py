"""torch.distributed.checkpoint's file access, confined to one checkpoint folder.

DCP reads and writes through a ``FileSystem`` that opens paths as they come, follows links, reads
its index with ``pickle.load`` and its non-tensor values with ``torch.load(weights_only=False)``.
babysit gives it instead a :class:`Folder`: the checkpoint's folder opened once (``O_DIRECTORY |
O_NOFOLLOW``), every file named relative to it (never through a link, never outside it, created
new with ``O_EXCL``), each file hashed and checked against the manifest when opened, before
anything in it is decoded; the index is rebuilt with DCP's own metadata classes only
(:func:`load_metadata`), values with ``weights_only=True`` (:func:`weights_only_planner`).

DCP takes a second to import: nothing here imports it before it is used.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import io
import os
import pickle
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch

from .errors import CheckpointError, RunDirError
from .rundir import plain_name

DCP_METADATA = ".metadata"  # DCP's index of the shards, in the folder


# -- the folder, through its descriptor -------------------------------------------------------------
class Folder:
    """One checkpoint folder opened once (``O_DIRECTORY | O_NOFOLLOW``): every file in it is named
    relative to it, never through a link, never outside it. ``expected`` (reading): the manifest's
    files; a file is hashed and checked against it when opened, before anything decodes it."""

    def __init__(self, fd: int, path: Path, expected: dict[str, dict[str, Any]] | None) -> None:
        self.fd, self.path, self.expected = fd, path, expected
        self.written: set[str] = set()

    @classmethod
    @contextmanager
    def open(cls, path: Path, *, for_writing: bool = False,
             expected: dict[str, dict[str, Any]] | None = None) -> Iterator["Folder"]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            where = ("on this rank: the run directory must be on a filesystem every rank sees" if for_writing
                     else "")
            raise CheckpointError(f"checkpoint folder {str(path)!r} is missing {where}".rstrip()) from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CheckpointError(f"checkpoint folder {str(path)!r} was refused: it is a link or not a folder; "
                                      "babysit never follows links in a run directory") from None
            raise
        try:
            yield cls(fd, path, expected)
        finally:
            os.close(fd)

    def name_of(self, path: str | os.PathLike[str]) -> str:
        """The name of ``path`` in this folder; anything elsewhere is refused."""
        candidate = Path(path)
        if candidate.parent != self.path:
            raise CheckpointError(f"{str(candidate)!r} is not a file of checkpoint folder {str(self.path)!r}; "
                                  "it was not used")
        try:
            return plain_name(candidate.name)
        except RunDirError as error:
            raise CheckpointError(str(error)) from None

    def create(self, name: str) -> Any:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self.fd)
        self.written.add(name)
        return os.fdopen(fd, "wb")

    def open_read(self, name: str) -> Any:
        """``name`` opened for reading: a regular file in the folder, never through a link."""
        where = f"{str(self.path / name)!r}"
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {where} is missing; the checkpoint cannot be used") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise CheckpointError(f"checkpoint file {where} was refused: it is a link") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(f"checkpoint file {where} was refused: it is not a regular file")
        return os.fdopen(fd, "rb")

    def digest(self, name: str) -> dict[str, Any]:
        with self.open_read(name) as handle:
            return {"sha256": hashlib.file_digest(handle, "sha256").hexdigest(), "size": os.fstat(handle.fileno()).st_size}

    def read_checked(self, name: str) -> bytes:
        """The bytes of ``name``, once they match the manifest's hash."""
        entry = self._entry(name)
        with self.open_read(name) as handle:
            data = handle.read()
        self._check(name, entry, hashlib.sha256(data).hexdigest())
        return data

    def open_checked(self, name: str) -> Any:
        """``name`` opened for reading, after its whole content matched the manifest's hash."""
        entry = self._entry(name)
        handle = self.open_read(name)
        try:
            self._check(name, entry, hashlib.file_digest(handle, "sha256").hexdigest())
            handle.seek(0)
        except BaseException:
            handle.close()
            raise
        return handle

    def _entry(self, name: str) -> dict[str, Any]:
        if self.expected is None or name not in self.expected:
            raise CheckpointError(f"checkpoint file {str(self.path / name)!r} is not in the checkpoint's manifest; "
                                  "it was not read")
        return self.expected[name]

    def _check(self, name: str, entry: dict[str, Any], found: str) -> None:
        if found != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint file {str(self.path / name)!r} does not match the hash recorded when it was written "
                f"(recorded {entry['sha256'][:12]}…, found {found[:12]}…): it was truncated or altered; "
                "the checkpoint cannot be used")


def dcp_filesystem() -> type:
    """DCP's ``FileSystem``, confined to one :class:`Folder` (the class is built on first use)."""
    from torch.distributed.checkpoint.filesystem import FileSystemBase

    class FolderFiles(FileSystemBase):
        def __init__(self, folder: Folder) -> None:
            self.folder = folder

        @contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
            name = self.folder.name_of(path)
            with (self.folder.create(name) if "w" in mode else self.folder.open_checked(name)) as stream:
                yield stream

        def concat_path(self, path: str | os.PathLike[str], suffix: str) -> Path:
            return Path(path) / suffix

        def init_path(self, path: str | os.PathLike[str]) -> Path:
            return Path(path)

        def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
            old, new = self.folder.name_of(path), self.folder.name_of(new_path)
            os.rename(old, new, src_dir_fd=self.folder.fd, dst_dir_fd=self.folder.fd)
            self.folder.written.discard(old)
            self.folder.written.add(new)

        def mkdir(self, path: str | os.PathLike[str]) -> None:
            if Path(path) != self.folder.path:  # the folder itself is open already
                raise CheckpointError(f"DCP asked for a folder {str(path)!r} inside a checkpoint; refused")

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
            return True

        def exists(self, path: str | os.PathLike[str]) -> bool:
            try:
                os.stat(self.folder.name_of(path), dir_fd=self.folder.fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return True

        def rm_file(self, path: str | os.PathLike[str]) -> None:
            name = self.folder.name_of(path)
            os.unlink(name, dir_fd=self.folder.fd)
            self.folder.written.discard(name)

    return FolderFiles


def folder_writer(folder: Folder) -> Any:
    """DCP's writer, writing into ``folder`` only (files created new, fsynced)."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(folder.path, sync_files=True, overwrite=False)
    writer.fs = dcp_filesystem()(folder)
    return writer


def folder_reader(folder: Folder, metadata: Any = None) -> Any:
    """DCP's reader, reading ``folder``'s files only, each checked before it is decoded;
    ``metadata``: the index, if :func:`load_metadata` read it already."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    preloaded = metadata

    class FolderReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:  # DCP's fallback to a rank's own index: babysit never writes one
                raise CheckpointError("a sharded checkpoint has one index, .metadata")
            metadata = preloaded if preloaded is not None else load_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = FolderReader(folder.path)
    reader.fs = dcp_filesystem()(folder)
    return reader


def weights_only_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, but its non-tensor values (an optimizer's param_groups) are loaded with
        ``weights_only=True``: plain data only, as every babysit checkpoint."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"checkpoint value {read_item.dest_index.fqn!r} holds objects other than tensors and plain data, "
                    "which could run code; it was not loaded") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner()


# -- DCP's index, unpickled with nothing but its own classes ------------------------------------
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's ``.metadata``: its dataclasses and enums, torch sizes, dtypes and layouts,
    paths; anything else (a function that runs code) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES:
            import importlib

            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif module == "torch" and name == "Size":
            return torch.Size
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            from torch.serialization import _get_layout

            return _get_layout
        elif module == "pathlib" and name in ("PosixPath", "PurePosixPath", "Path"):
            return PurePosixPath
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's index")


def load_metadata(folder: Folder) -> Any:
    """The folder's DCP index, checked against the manifest, then unpickled with only DCP's own
    classes; every file it points to must be one the manifest vouches for."""
    where = str(folder.path / DCP_METADATA)
    data = folder.read_checked(DCP_METADATA)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"checkpoint file {where!r} was refused: it holds objects other than DCP's index "
                              f"({error}), which could run code; it was not loaded") from None
    except Exception as error:  # a damaged pickle fails in many ways
        raise CheckpointError(f"checkpoint file {where!r} was refused: it is damaged ({type(error).__name__})") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"checkpoint file {where!r} is not DCP's index of a checkpoint")
    for info in storage.values():
        if getattr(info, "relative_path", None) not in (folder.expected or {}):
            raise CheckpointError(f"checkpoint file {where!r} points to {getattr(info, 'relative_path', None)!r}, "
                                  "which the manifest does not vouch for; it was not loaded")
    return metadata
