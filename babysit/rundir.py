"""Paths inside a run directory: names confined to it, links never followed, the run's lock.

A run directory may come from anywhere (copied from a colleague, unpacked from an archive, written
to by something that is not babysit), so nothing found in it is trusted:

- a file name read from the database must be one plain name inside the directory (never
  ``/abs/path`` or ``../x``), or it is not used;
- every file babysit opens there is opened with ``O_NOFOLLOW`` and must be a regular file, so a
  symbolic link (or a FIFO, a device) planted under one of its names is refused, never written
  through;
- files babysit creates there are created with ``O_EXCL``.

Exceptions::

    RunDirError            a path in the run directory that babysit will not use (the message says why)
    └── RunLockedError     another trainer holds the run directory
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import IO, Any

from .errors import RunDirError, RunLockedError

LOCK_NAME = "run.lock"
# In the name of a file or folder being written or removed (``.<name>.tmp-<pid>``): a leftover is stale.
TEMP_MARK = ".tmp-"
_BASE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: opening a FIFO never blocks


def plain_name(name: Any) -> str:
    """``name`` if it is one plain file name (no directory part, not ``.`` or ``..``), else raise."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise RunDirError(f"{name!r} is not a plain file name inside the run directory; it is not used")
    return name


def is_plain_name(name: Any) -> bool:
    try:
        plain_name(name)
    except RunDirError:
        return False
    return True


def path_in(run_dir: Path | str, name: Any) -> Path:
    """The path of file ``name`` in ``run_dir``; ``name`` must be a plain file name."""
    return Path(run_dir) / plain_name(name)


def _refusal(path: Path, what: str) -> RunDirError:
    return RunDirError(
        f"{str(path)!r} is {what}; babysit opens only regular files in a run directory and never follows "
        "links there: remove it (babysit recreates its own files)"
    )


def open_fd(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses symbolic links and anything but a regular file (raises RunDirError)."""
    try:
        fd = os.open(path, flags | _BASE_FLAGS, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _refusal(path, "a symbolic link") from None
        if error.errno == errno.ENXIO:  # a FIFO with no reader, opened for writing
            raise _refusal(path, "not a regular file (a FIFO)") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise _refusal(path, "not a regular file" + (" (a directory)" if stat.S_ISDIR(kind) else ""))
    # Regular files ignore O_NONBLOCK, but clear it so the descriptor behaves as usual.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def open_file(path: Path, mode: str) -> IO[Any]:
    """Open a regular file in a run directory without following links. ``mode``: "rb", "r+b", "ab"
    (created if missing), "c+b" (read and write, created if missing, never truncated) or "xb"
    (created, must not exist)."""
    flags = {
        "rb": os.O_RDONLY, "r+b": os.O_RDWR, "ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        "c+b": os.O_RDWR | os.O_CREAT, "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    }[mode]
    return os.fdopen(open_fd(path, flags), {"c+b": "r+b", "xb": "wb"}.get(mode, mode))


def refuse_links(run_dir: Path, names: tuple[str, ...]) -> None:
    """Raise RunDirError if any of ``names`` in ``run_dir`` is a symbolic link or not a regular file
    (for files opened by a library that would follow links, such as SQLite)."""
    for name in names:
        path = Path(run_dir) / name
        try:
            kind = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(kind):
            raise _refusal(path, "a symbolic link")
        if not stat.S_ISREG(kind):
            raise _refusal(path, "not a regular file")


def unlink_in(run_dir: Path | str, name: Any) -> None:
    """Delete file ``name`` from ``run_dir`` (a link there is removed, its target never touched);
    a name that is not a plain file name raises RunDirError and nothing is deleted."""
    path_in(run_dir, name).unlink(missing_ok=True)


# -- a checkpoint's files, whatever its form (one file, or a sharded checkpoint's folder) ----------
def checkpoint_present(run_dir: Path | str, name: Any) -> bool:
    """True when checkpoint ``name`` is in ``run_dir`` as babysit writes it: a regular file, or a
    folder (never a link to either). Whether its contents are intact is for the verified load."""
    try:
        mode = os.lstat(path_in(run_dir, name)).st_mode
    except (FileNotFoundError, RunDirError):
        return False
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def remove_checkpoint_files(run_dir: Path | str, name: Any) -> None:
    """Delete checkpoint ``name`` from ``run_dir``, whatever its form: the file, or a sharded
    checkpoint's folder with everything in it. A link is removed, its target never touched; a name
    that is not a plain file name raises RunDirError and nothing is deleted.

    A folder is first renamed to a temporary name, at once: a crash half-way through leaves no
    half-deleted checkpoint under its listed name (what is left goes with the stale temporaries)."""
    path = path_in(run_dir, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        path.unlink(missing_ok=True)
        return
    doomed = path.with_name(f".{path.name}{TEMP_MARK}removed")
    remove_tree(doomed)  # a leftover of an earlier removal
    os.rename(path, doomed)
    remove_tree(doomed)


def remove_tree(path: Path) -> None:
    """Remove a folder and its contents without following any link in it (rmtree works through
    directory descriptors on Linux); a link or a file at ``path`` is unlinked."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def acquire_run_lock(run_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the run directory for the life of this process.

    The lock file is opened without following links (a ``run.lock`` planted as a link to another
    file would otherwise be truncated and overwritten with the owner's pid).
    """
    path = Path(run_dir) / LOCK_NAME
    handle = os.fdopen(open_fd(path, os.O_RDWR | os.O_CREAT), "r+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = handle.read(200).strip() or "unknown"
        handle.close()
        raise RunLockedError(
            f"run directory {str(run_dir)!r} is already used by another trainer ({owner}); "
            f"stop it first (`python -m babysit stop --run-dir {run_dir}`) or use another --run-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def usable_run_dir(run_dir: Path | str, *, must_exist: bool) -> str | None:
    """Why ``run_dir`` cannot be a run directory (a file is in the way, a name is too long, it is
    read-only), or None when it can. ``must_exist``: it must already be a directory."""
    if not str(run_dir).strip():  # Path("") is the current directory: a run directory is named, never implied
        return f"run directory {str(run_dir)!r} is empty: name one, such as 'checkpoints/my-run' (or '.' for this one)"
    path = Path(run_dir)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            return (f"run directory {str(run_dir)[:80]!r}… has a name part of {len(os.fsencode(part))} bytes; "
                    "file systems allow at most 255: use a shorter name")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if must_exist:
            return None  # the caller says "does not exist" with its own hint
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            return f"run directory {str(run_dir)!r} cannot be created: {str(parent)!r} is a file, not a directory"
        return None
    except NotADirectoryError:
        blocker = next(p for p in [path, *path.parents] if p.exists() and not p.is_dir())
        return f"run directory {str(run_dir)!r} cannot be used: {str(blocker)!r} is a file, not a directory"
    except OSError as error:
        return f"run directory {str(run_dir)!r} cannot be used: {error.strerror}"
    if not stat.S_ISDIR(mode):
        return (f"run directory {str(run_dir)!r} is a file, not a directory; pass the directory of a run "
                "(or a new directory's name)")
    return None


def read_only(run_dir: Path | str) -> bool:
    """True when ``run_dir`` cannot be written to (permissions or a read-only mount)."""
    try:
        probe = os.open(Path(run_dir), os.O_RDONLY)
    except OSError:
        return False
    try:
        if os.fstatvfs(probe).f_flag & os.ST_RDONLY:
            return True
    finally:
        os.close(probe)
    return not os.access(run_dir, os.W_OK)
