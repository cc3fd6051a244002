"""The run store: one SQLite database (WAL) per run directory, shared by trainer and dashboard.

The trainer writes metrics, events, checkpoints, branches and its status; the dashboard and the
CLI read them and write only commands. Metrics are stored as chunks of up to ``CHUNK_POINTS``
points per series (steps, values and wall times as packed arrays, plus the chunk's min, max and
sum), so the trainer writes a few rows per flush instead of one per point, and a reader can draw a
million steps from a few thousand chunk summaries without touching the raw points.

Nothing read from the database is trusted: a checkpoint row whose file is not a plain name in the
run directory is left out, status fields of the wrong type read as None, and SQLite is never
pointed at a run.db that is a link. The trainer's store (``create=True``) keeps in memory the writes
a full disk refuses, for the metrics writer to store once there is room.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import commands as cmd
from . import rundir
from .errors import RunDirError, StoreError
from .rundir import LOCK_NAME

DB_NAME = "run.db"
NEW = "new"   # the state of a run directory no trainer has written a status to yet
DB_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal")
SIGNAL_NAME = "commands.signal"
LOG_NAME = "trainer.log"
SCHEMA_VERSION = 1
CHUNK_POINTS = 256
# A trainer writes its heartbeat several times a second; after this long without one it is
# shown as "not responding" and new commands are refused.
HEARTBEAT_STALE_S = 10.0

RUNNING = "running"
PAUSED = "paused"
FINISHED = "finished"
STOPPED = "stopped"
CRASHED = "crashed"
NOT_RESPONDING = "not responding"
LIVE_STATES = (RUNNING, PAUSED)

PER_STEP = "step"
PER_EPOCH = "epoch"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS status (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL, pid INTEGER, host TEXT, heartbeat REAL, started REAL,
    epoch INTEGER, step INTEGER, step_in_epoch INTEGER, steps_per_epoch INTEGER,
    max_epochs INTEGER, branch INTEGER, lr REAL, momentum REAL, optimizer TEXT, message TEXT,
    items_per_step INTEGER, item_unit TEXT
);
CREATE TABLE IF NOT EXISTS branches (
    id INTEGER PRIMARY KEY, parent INTEGER, from_checkpoint INTEGER,
    start_step INTEGER NOT NULL, start_epoch INTEGER NOT NULL, created REAL NOT NULL,
    hparams TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, branch INTEGER NOT NULL, per TEXT NOT NULL,
    segment INTEGER NOT NULL DEFAULT 0,
    UNIQUE (name, branch, per, segment)
);
CREATE TABLE IF NOT EXISTS chunks (
    series INTEGER NOT NULL, first_step INTEGER NOT NULL, last_step INTEGER NOT NULL,
    n INTEGER NOT NULL, vmin REAL, vmax REAL, vsum REAL, min_step INTEGER, max_step INTEGER,
    first_wall REAL NOT NULL, last_wall REAL NOT NULL,
    steps BLOB NOT NULL, vals BLOB NOT NULL, walls BLOB NOT NULL,
    PRIMARY KEY (series, first_step)
) WITHOUT ROWID;
-- The summaries alone, so that drawing a long run reads this index and none of the packed points.
CREATE INDEX IF NOT EXISTS chunk_summaries ON chunks (
    series, first_step, last_step, n, vmin, vmax, vsum, min_step, max_step, first_wall, last_wall
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, wall REAL NOT NULL, branch INTEGER, step INTEGER, epoch INTEGER,
    kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, source TEXT NOT NULL, kind TEXT NOT NULL,
    args TEXT NOT NULL, state TEXT NOT NULL, branch INTEGER, step INTEGER, done_at REAL,
    result TEXT, reason TEXT
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (state, id);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, branch INTEGER NOT NULL, epoch INTEGER NOT NULL,
    step INTEGER NOT NULL, step_in_epoch INTEGER NOT NULL, file TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, hparams TEXT NOT NULL, metrics TEXT NOT NULL, reason TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS epochs (
    branch INTEGER NOT NULL, epoch INTEGER NOT NULL, end_step INTEGER NOT NULL, wall REAL NOT NULL,
    PRIMARY KEY (branch, epoch)
);
"""


# Status columns added after schema version 1 was first written; a trainer adds them to older runs.
_STATUS_ADDED_COLUMNS = {"items_per_step": "INTEGER", "item_unit": "TEXT"}


def _add_missing_columns(connection: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
    for name, kind in columns.items():
        if name not in present:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


@dataclass(frozen=True)
class SeriesInfo:
    id: int
    name: str
    branch: int
    per: str
    segment: int  # 0: live; k > 0: the k-th piece superseded by a crash


def is_run_dir(path: Path | str) -> bool:
    return (Path(path) / DB_NAME).is_file()


def list_runs(root: Path | str) -> list[Path]:
    """Run directories directly under ``root`` (or ``root`` itself), newest activity first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [root] if is_run_dir(root) else []
    found += [p for p in root.iterdir() if p.is_dir() and is_run_dir(p)]
    return sorted(found, key=lambda p: (p / DB_NAME).stat().st_mtime, reverse=True)


def _now() -> float:
    return time.time()


def _pack(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def chunk_summary(steps: np.ndarray, vals: np.ndarray) -> tuple[float | None, float | None, float, int | None, int | None]:
    """min, max, sum (of the finite values) and the steps of the min and max."""
    finite = np.isfinite(vals)
    if not finite.any():
        return None, None, 0.0, None, None
    masked_low = np.where(finite, vals, np.inf)
    masked_high = np.where(finite, vals, -np.inf)
    i_min, i_max = int(masked_low.argmin()), int(masked_high.argmax())
    return float(vals[i_min]), float(vals[i_max]), float(vals[finite].sum()), int(steps[i_min]), int(steps[i_max])


def _chunk_row(series: int, steps: np.ndarray, vals: np.ndarray, walls: np.ndarray) -> tuple[Any, ...]:
    vmin, vmax, vsum, min_step, max_step = chunk_summary(steps, vals)
    return (
        series, int(steps[0]), int(steps[-1]), len(steps), vmin, vmax, vsum, min_step, max_step,
        float(walls[0]), float(walls[-1]), _pack(steps, "<i8"), _pack(vals, "<f8"), _pack(walls, "<f8"),
    )


class CommandSignal:
    """An 8-byte file that command writers overwrite after each commit.

    The trainer maps it and compares it with the last value it saw at every step boundary
    (~0.2 µs), so it notices a new command at the next step without querying SQLite per step.
    Writers store random bytes, so two writers racing still change it. Neither side follows a
    link planted under its name (see :mod:`babysit.rundir`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = rundir.open_file(path, "c+b")  # created if missing; a link is refused
        if os.fstat(self._file.fileno()).st_size != 8:
            os.ftruncate(self._file.fileno(), 0)
            os.pwrite(self._file.fileno(), b"\0" * 8, 0)
        self._map = mmap.mmap(self._file.fileno(), 8)
        self.seen = self._map[:8]

    def changed(self) -> bool:
        return self._map[:8] != self.seen

    def mark_seen(self) -> None:
        self.seen = self._map[:8]

    def close(self) -> None:
        self._map.close()
        self._file.close()

    @staticmethod
    def ring(path: Path) -> None:
        """Tell the trainer a command is queued. Best effort: without a usable signal file (none
        yet, or something that is not babysit's own 8-byte file) the trainer still finds the
        command by polling the database within a fraction of a second."""
        try:
            fd = rundir.open_fd(path, os.O_WRONLY)
        except (OSError, RunDirError):
            return
        try:
            if os.fstat(fd).st_size == 8:
                os.pwrite(fd, os.urandom(8), 0)
        except OSError:
            pass  # a full disk cannot stop a command that is already committed
        finally:
            os.close(fd)


class RunStore:
    """One run directory's database. Each thread gets its own SQLite connection."""

    def __init__(self, run_dir: Path | str, *, create: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.db_path = self.run_dir / DB_NAME
        self.signal_path = self.run_dir / SIGNAL_NAME
        unusable = rundir.usable_run_dir(self.run_dir, must_exist=not create)
        if unusable:
            raise StoreError(unusable)
        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        elif not self.run_dir.is_dir():
            raise StoreError(f"run directory {str(self.run_dir)!r} does not exist; {self._runs_hint()}")
        elif not self.db_path.is_file():
            raise StoreError(
                f"{str(self.run_dir)!r} is not a babysit run (it has no {DB_NAME}); {self._runs_hint()}"
            )
        try:  # SQLite follows links: a run.db planted as one would be read and written elsewhere
            rundir.refuse_links(self.run_dir, DB_FILES)
        except RunDirError as error:
            raise StoreError(str(error)) from None
        self._local = threading.local()
        self._series_ids: dict[tuple[str, int, str, int], int] = {}
        # The trainer's store (the one that creates the run) keeps what a full disk refused.
        self.keeps_refused_writes = create
        self._held = _HeldWrites()
        self._check_or_create_schema(create)

    def _runs_hint(self) -> str:
        runs = list_runs(self.run_dir.parent) if self.run_dir.parent.is_dir() else []
        if runs:
            return "runs found: " + ", ".join(str(p) for p in runs[:8])
        return "start one with `python -m babysit train --run-dir DIR` or pass the directory of an existing run"

    # -- connections -------------------------------------------------------------------------
    def conn(self) -> sqlite3.Connection:
        connection = getattr(self._local, "conn", None)
        if connection is None:
            connection = sqlite3.connect(self.db_path, timeout=10.0, isolation_level=None)
            connection.execute("PRAGMA busy_timeout = 10000")
            connection.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = connection
        return connection

    def close(self) -> None:
        connection = getattr(self._local, "conn", None)
        if connection is not None:
            connection.close()
            self._local.conn = None

    def _create_database(self) -> None:
        """Build the schema in a side file and rename it into place, so that a reader never opens
        a run.db without its tables."""
        temp = self.db_path.with_name(f".{DB_NAME}.new-{os.getpid()}")
        temp.unlink(missing_ok=True)
        connection = sqlite3.connect(temp, isolation_level=None)
        try:
            connection.executescript(_SCHEMA)
            connection.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            connection.execute("INSERT INTO meta VALUES ('created', ?)", (repr(_now()),))
            connection.execute("PRAGMA journal_mode = WAL")
        finally:
            connection.close()
        os.replace(temp, self.db_path)

    def _check_or_create_schema(self, create: bool) -> None:
        try:
            if create and not self.db_path.exists():
                self._create_database()
            connection = self.conn()
            if create:
                connection.executescript(_SCHEMA)  # no-op unless an older run lacks a table
                _add_missing_columns(connection, "status", _STATUS_ADDED_COLUMNS)
            row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as error:
            self.close()
            if rundir.read_only(self.run_dir):
                raise StoreError(
                    f"run directory {str(self.run_dir)!r} is read-only: babysit needs to write there (its "
                    f"database keeps a write-ahead log next to {DB_NAME}, and commands are rows in it); "
                    "make it writable, or copy the run somewhere writable to look at it"
                ) from None
            if disk_full(error):
                raise StoreError(f"{str(self.db_path)!r} cannot be opened: {disk_full_message(self.run_dir)}") from None
            raise StoreError(
                f"{str(self.db_path)!r} is not a readable babysit run database ({error}); "
                "restore it from a backup or start a new run in another directory"
            ) from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            self.close()
            raise StoreError(
                f"{str(self.db_path)!r} has schema version {row[0] if row else 'none'}; "
                f"this babysit reads version {SCHEMA_VERSION}"
            )

    def transaction(self) -> "_Transaction":
        """Group writes into one commit (``with store.transaction(): ...``); nests."""
        return _Transaction(self.conn())

    _tx = transaction

    # -- meta --------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        self.conn().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # -- status ------------------------------------------------------------------------------
    def write_status(self, **fields: Any) -> None:
        """Insert or update the single status row with the given fields."""
        if not fields:
            return
        connection = self.conn()
        sets = ", ".join(f"{key} = ?" for key in fields)
        cursor = self._execute_or_hold(f"UPDATE status SET {sets} WHERE id = 1", tuple(fields.values()))
        if cursor is not None and not cursor.rowcount:  # the first write of a new run
            fields.setdefault("state", RUNNING)
            columns = ", ".join(["id", *fields])
            marks = ", ".join("?" * (len(fields) + 1))
            connection.execute(f"INSERT INTO status ({columns}) VALUES ({marks})", (1, *fields.values()))

    def status(self) -> dict[str, Any]:
        """The status row with ``effective_state``: the state, or "not responding" when stale."""
        connection = self.conn()
        connection.row_factory = sqlite3.Row
        try:
            row = connection.execute("SELECT * FROM status WHERE id = 1").fetchone()
        finally:
            connection.row_factory = None
        if row is None:
            return {"state": NEW, "effective_state": NEW, "alive": False}
        status = _typed_status(dict(row))
        status["alive"] = trainer_alive(status)
        live = status["state"] in LIVE_STATES
        if status["alive"] or not live:
            status["effective_state"] = status["state"]
        elif process_gone(status):
            # Its process no longer exists on this host: known at once, not after the heartbeat goes stale.
            status["effective_state"] = CRASHED
            status["message"] = (f"the trainer (pid {status['pid']}) is gone without a clean stop; "
                                 "start it again to resume from the latest checkpoint")
        else:
            status["effective_state"] = NOT_RESPONDING
        return status

    # -- branches ----------------------------------------------------------------------------
    def new_branch(
        self, *, parent: int | None, from_checkpoint: int | None, start_step: int, start_epoch: int,
        hparams: dict[str, Any] | None = None,
    ) -> int:
        cur = self.conn().execute(
            "INSERT INTO branches (parent, from_checkpoint, start_step, start_epoch, created, hparams)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (parent, from_checkpoint, start_step, start_epoch, _now(), json.dumps(hparams or {})),
        )
        return int(cur.lastrowid)

    def branches(self) -> list[dict[str, Any]]:
        rows = self.conn().execute(
            "SELECT id, parent, from_checkpoint, start_step, start_epoch, created, hparams FROM branches ORDER BY id"
        ).fetchall()
        keys = ("id", "parent", "from_checkpoint", "start_step", "start_epoch", "created", "hparams")
        return [dict(zip(keys, row[:-1]), hparams=json.loads(row[-1])) for row in rows]

    def branch(self, branch_id: int) -> dict[str, Any] | None:
        return next((b for b in self.branches() if b["id"] == branch_id), None)

    # -- metrics -----------------------------------------------------------------------------
    def series_id(self, name: str, branch: int, per: str, segment: int = 0) -> int:
        key = (name, branch, per, segment)
        found = self._series_ids.get(key)
        if found is not None:
            return found
        connection = self.conn()
        connection.execute(
            "INSERT OR IGNORE INTO series (name, branch, per, segment) VALUES (?, ?, ?, ?)", key
        )
        found = int(connection.execute(
            "SELECT id FROM series WHERE name = ? AND branch = ? AND per = ? AND segment = ?", key
        ).fetchone()[0])
        self._series_ids[key] = found
        return found

    def series(self) -> list[SeriesInfo]:
        rows = self.conn().execute("SELECT id, name, branch, per, segment FROM series ORDER BY id").fetchall()
        return [SeriesInfo(*row) for row in rows]

    def write_chunks(self, chunks: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Write (series, steps, values, walls) chunks in one transaction; a chunk with the same
        first step replaces the earlier, shorter write of itself."""
        rows = [_chunk_row(*chunk) for chunk in chunks]
        if not rows:
            return
        with self._tx() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )

    def chunk_summaries(self, series: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
        """Rows (first_step, last_step, n, vmin, vmax, vsum, min_step, max_step, first_wall,
        last_wall) of the chunks that overlap [lo, hi], as a float array."""
        start = self._first_chunk_start(series, lo)
        hi_step = int(hi) if hi is not None else 2**62
        rows = self.conn().execute(
            "SELECT first_step, last_step, n, vmin, vmax, vsum, min_step, max_step, first_wall, last_wall"
            " FROM chunks WHERE series = ? AND first_step >= ? AND first_step <= ? ORDER BY first_step",
            (series, start, hi_step),
        ).fetchall()
        return np.array(rows, dtype=float).reshape(-1, 10) if rows else np.empty((0, 10))

    def chunk_points(
        self, series: int, lo: float | None = None, hi: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The raw (steps, values, walls) of the chunks that overlap [lo, hi] (not cut to it)."""
        start = self._first_chunk_start(series, lo)
        hi_step = int(hi) if hi is not None else 2**62
        rows = self.conn().execute(
            "SELECT steps, vals, walls FROM chunks WHERE series = ? AND first_step >= ? AND first_step <= ?"
            " ORDER BY first_step",
            (series, start, hi_step),
        ).fetchall()
        if not rows:
            empty = np.empty(0)
            return empty.astype(np.int64), empty, empty
        return (
            np.frombuffer(b"".join(r[0] for r in rows), dtype="<i8"),
            np.frombuffer(b"".join(r[1] for r in rows), dtype="<f8"),
            np.frombuffer(b"".join(r[2] for r in rows), dtype="<f8"),
        )

    def _first_chunk_start(self, series: int, lo: float | None) -> int:
        if lo is None:
            return -(2**62)
        row = self.conn().execute(
            "SELECT max(first_step) FROM chunks WHERE series = ? AND first_step <= ?", (series, int(lo))
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else -(2**62)

    def series_extent(self, series: int) -> tuple[int, int, int] | None:
        """(first step, last step, number of points) of a series, or None when it is empty."""
        row = self.conn().execute(
            "SELECT min(first_step), max(last_step), sum(n) FROM chunks WHERE series = ?", (series,)
        ).fetchone()
        return None if row[0] is None else (int(row[0]), int(row[1]), int(row[2]))

    def starting_mean(self, name: str) -> float | None:
        """The mean of the first stored chunk of ``name`` (per step) on the run's first branch:
        how high the metric was when the run started (the loss before any learning)."""
        row = self.conn().execute(
            "SELECT c.vsum / c.n FROM chunks c JOIN series s ON s.id = c.series"
            " WHERE s.name = ? AND s.per = ? AND s.segment = 0 AND c.n > 0"
            " AND s.branch = (SELECT min(id) FROM branches) ORDER BY c.first_step LIMIT 1",
            (name, PER_STEP),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def supersede_after(self, branch: int, step: int) -> int:
        """Move the points of ``branch`` logged after ``step`` into new superseded series.

        Called when a trainer resumes from a checkpoint at ``step`` after a crash: what the dead
        process logged after its last checkpoint stays in the store, drawn faded, never as live.
        Returns the number of points moved.
        """
        moved = 0
        connection = self.conn()
        live = connection.execute(
            "SELECT id, name, per FROM series WHERE branch = ? AND segment = 0", (branch,)
        ).fetchall()
        segment_row = connection.execute(
            "SELECT coalesce(max(segment), 0) FROM series WHERE branch = ?", (branch,)
        ).fetchone()
        segment = int(segment_row[0]) + 1
        to_write: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        with self._tx():
            for series, name, per in live:
                rows = connection.execute(
                    "SELECT first_step, steps, vals, walls FROM chunks WHERE series = ? AND last_step > ?",
                    (series, step),
                ).fetchall()
                if not rows:
                    continue
                target = None
                for first_step, steps_b, vals_b, walls_b in rows:
                    steps = np.frombuffer(steps_b, dtype="<i8")
                    vals = np.frombuffer(vals_b, dtype="<f8")
                    walls = np.frombuffer(walls_b, dtype="<f8")
                    keep = steps <= step
                    connection.execute("DELETE FROM chunks WHERE series = ? AND first_step = ?", (series, first_step))
                    if keep.any():
                        to_write.append((series, steps[keep], vals[keep], walls[keep]))
                    if target is None:
                        connection.execute(
                            "INSERT OR IGNORE INTO series (name, branch, per, segment) VALUES (?, ?, ?, ?)",
                            (name, branch, per, segment),
                        )
                        target = int(connection.execute(
                            "SELECT id FROM series WHERE name = ? AND branch = ? AND per = ? AND segment = ?",
                            (name, branch, per, segment),
                        ).fetchone()[0])
                    gone = ~keep
                    moved += int(gone.sum())
                    to_write.append((target, steps[gone], vals[gone], walls[gone]))
            self.write_chunks(to_write)  # nested: joins this transaction
            connection.execute("DELETE FROM epochs WHERE branch = ? AND end_step > ?", (branch, step))
        return moved

    def add_epoch(self, branch: int, epoch: int, end_step: int) -> None:
        self.conn().execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?)", (branch, epoch, end_step, _now()))

    def epochs(self) -> list[tuple[int, int, int]]:
        """(branch, epoch, end_step) of every finished epoch."""
        return [tuple(r) for r in self.conn().execute(
            "SELECT branch, epoch, end_step FROM epochs ORDER BY branch, epoch"
        ).fetchall()]

    # -- events ------------------------------------------------------------------------------
    def add_event(
        self, kind: str, message: str, *, branch: int | None = None, step: int | None = None,
        epoch: int | None = None, data: dict[str, Any] | None = None,
    ) -> int:
        """Record an event; returns its id (0 when a full disk made the trainer's store hold it)."""
        cur = self._execute_or_hold(
            "INSERT INTO events (wall, branch, step, epoch, kind, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (_now(), branch, step, epoch, kind, message, json.dumps(data or {})),
        )
        return int(cur.lastrowid) if cur is not None else 0

    def events(self, since_id: int = 0, limit: int = 10_000, *, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` events with an id above ``since_id`` (of the given ``kinds``), oldest first."""
        where, params = _newest_filter(since_id, kinds)
        rows = self.conn().execute(
            "SELECT * FROM (SELECT id, wall, branch, step, epoch, kind, message, data FROM events"
            f" WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (*params, limit),
        ).fetchall()
        keys = ("id", "wall", "branch", "step", "epoch", "kind", "message")
        return [dict(zip(keys, row[:-1]), data=_json_object(row[-1])) for row in rows]

    # -- commands ----------------------------------------------------------------------------
    def enqueue_command(
        self, kind: str, args: dict[str, Any] | None = None, *, source: str, require_live: bool = True
    ) -> int:
        """Validate and queue a command; raise :class:`~babysit.commands.CommandError` and queue
        nothing when the command or the run's state does not allow it."""
        command = cmd.validate(kind, args)
        status = self.status()
        if require_live and not status["alive"]:
            raise cmd.CommandError(self._not_running_message(status))
        if command.kind == cmd.ROLLBACK:
            self.checkpoint(command.args["checkpoint"], must_exist=True)
        try:
            cur = self.conn().execute(
                "INSERT INTO commands (created, source, kind, args, state) VALUES (?, ?, ?, ?, ?)",
                (_now(), source, command.kind, json.dumps(command.args), cmd.PENDING),
            )
        except sqlite3.OperationalError as error:
            if not (self.keeps_refused_writes and disk_full(error)):
                raise
            return self.hold_command(command.kind, command.args, source=source)
        CommandSignal.ring(self.signal_path)
        return int(cur.lastrowid)

    def hold_command(self, kind: str, args: dict[str, Any] | None = None, *, source: str) -> int:
        """Queue a command of the trainer's own (a pause) in memory only, under a negative id: for
        when the database cannot take it (a full disk, run.db gone). The trainer applies it like
        any other; it is written to the database, with its fate, once there is room."""
        command = cmd.validate(kind, args)
        with self._held.lock:
            command_id = self._held.next_id
            self._held.next_id -= 1
            self._held.commands.append({"id": command_id, "created": _now(), "source": source, "kind": command.kind,
                                        "args": command.args, "state": cmd.PENDING, "branch": None, "step": None,
                                        "done_at": None, "result": None, "reason": None})
        CommandSignal.ring(self.signal_path)
        return command_id

    def _execute_or_hold(self, sql: str, params: tuple[Any, ...], *, finishes: int | None = None) -> sqlite3.Cursor | None:
        """Execute one write; in the trainer's store, a write a full disk refuses (outside a
        transaction) is kept and written later by :meth:`take_held`'s caller, and None returned."""
        connection = self.conn()
        try:
            return connection.execute(sql, params)
        except sqlite3.OperationalError as error:
            if not (self.keeps_refused_writes and disk_full(error) and not connection.in_transaction):
                raise
        with self._held.lock:
            self._held.writes.append((sql, params))
            if finishes is not None:
                self._held.finished.add(finishes)
        return None

    def held_count(self) -> int:
        """How many writes (and commands of its own) the trainer's store holds for lack of space."""
        with self._held.lock:
            return len(self._held.writes) + len(self._held.commands)

    def take_held(self) -> tuple[list[Any], set[int], list[dict[str, Any]]]:
        """Take what a full disk refused earlier, to write with :meth:`write_held` (and give back
        with :meth:`restore_held` if the disk refuses again)."""
        with self._held.lock:
            taken = (self._held.writes, self._held.finished, self._held.commands)
            self._held.writes, self._held.finished, self._held.commands = [], set(), []
        return taken

    def write_held(self, taken: tuple[list[Any], set[int], list[dict[str, Any]]]) -> None:
        """Write what :meth:`take_held` took, in order (inside the caller's transaction)."""
        writes, _, held = taken
        connection = self.conn()
        for sql, params in writes:
            connection.execute(sql, params)
        for c in held:
            connection.execute(
                "INSERT INTO commands (created, source, kind, args, state, branch, step, done_at, result, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (c["created"], c["source"], c["kind"], json.dumps(c["args"]), c["state"], c["branch"], c["step"],
                 c["done_at"], json.dumps(c["result"]) if c["result"] is not None else None, c["reason"]),
            )

    def restore_held(self, taken: tuple[list[Any], set[int], list[dict[str, Any]]]) -> None:
        """Keep what :meth:`take_held` took for the next try (its transaction failed)."""
        writes, finished, held = taken
        with self._held.lock:
            self._held.writes[:0] = writes
            self._held.finished |= finished
            self._held.commands[:0] = held

    def _not_running_message(self, status: dict[str, Any]) -> str:
        state = status.get("effective_state", NEW)
        if state == NEW:
            detail = "no trainer has started in it yet"
        elif status.get("state") in LIVE_STATES and process_gone(status):
            detail = f"its trainer (pid {status.get('pid')}) is no longer running"
        elif state == NOT_RESPONDING:
            age = _now() - (status.get("heartbeat") or 0)
            detail = f"its trainer (pid {status.get('pid')}) has not answered for {age:.0f} s"
        else:
            detail = f"its trainer is {state}"
        more = " --epochs N (more than it has done)" if state == FINISHED else ""
        return (
            f"run {str(self.run_dir)!r} is not running ({detail}); commands are accepted only while a trainer "
            f"runs: resume it by running your training script again, or for the demo "
            f"`python -m babysit train --run-dir {self.run_dir}{more}`"
        )

    def pending_commands(self) -> list[dict[str, Any]]:
        rows = self.conn().execute(
            "SELECT id, created, source, kind, args FROM commands WHERE state = ? ORDER BY id", (cmd.PENDING,)
        ).fetchall()
        with self._held.lock:
            finished = set(self._held.finished)
            held = [{k: c[k] for k in ("id", "created", "source", "kind", "args")}
                    for c in self._held.commands if c["state"] == cmd.PENDING]
        return [
            {"id": r[0], "created": r[1], "source": r[2], "kind": r[3], "args": _json_or_text(r[4])}
            for r in rows if r[0] not in finished
        ] + held

    def has_pending_commands(self) -> bool:
        return self.conn().execute("SELECT 1 FROM commands WHERE state = ? LIMIT 1", (cmd.PENDING,)).fetchone() is not None

    def last_handled_command_id(self) -> int:
        """The highest id of a command that is no longer pending (0 if none)."""
        row = self.conn().execute("SELECT MAX(id) FROM commands WHERE state != ?", (cmd.PENDING,)).fetchone()
        return row[0] or 0

    def finish_command(
        self, command_id: int, state: str, *, branch: int | None = None, step: int | None = None,
        result: dict[str, Any] | None = None, reason: str | None = None,
    ) -> None:
        if command_id < 0:  # one held in memory (see hold_command)
            with self._held.lock:
                for held in self._held.commands:
                    if held["id"] == command_id and held["state"] == cmd.PENDING:
                        held.update(state=state, branch=branch, step=step, done_at=_now(), result=result, reason=reason)
            return
        self._execute_or_hold(
            "UPDATE commands SET state = ?, branch = ?, step = ?, done_at = ?, result = ?, reason = ?"
            " WHERE id = ? AND state = ?",
            (state, branch, step, _now(), json.dumps(result) if result is not None else None, reason,
             command_id, cmd.PENDING),
            finishes=command_id,
        )

    def commands(self, since_id: int = 0, limit: int = 10_000, *, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` commands with an id above ``since_id`` (of the given ``kinds``), oldest first."""
        where, params = _newest_filter(since_id, kinds)
        rows = self.conn().execute(
            f"SELECT * FROM (SELECT {_COMMAND_COLUMNS} FROM commands WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (*params, limit),
        ).fetchall()
        return [_command_row(r) for r in rows]

    def command(self, command_id: int) -> dict[str, Any] | None:
        row = self.conn().execute(f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
        return None if row is None else _command_row(row)

    def applied_commands_after(self, branch: int, step: int, command_id: int | None) -> list[dict[str, Any]]:
        """Commands applied on ``branch`` after a checkpoint at ``step`` that had handled commands
        up to ``command_id`` (None: not recorded), by step (replayed after a crash).

        Either test alone misses some: a nudge applied just after the checkpoint has its step; a
        nudge still waiting to be replayed when the checkpoint was taken has a lower id.
        """
        rows = self.conn().execute(
            "SELECT id FROM commands WHERE state = ? AND branch = ? AND (step > ? OR id > ?) ORDER BY step, id",
            (cmd.APPLIED, branch, step, command_id if command_id is not None else 2**62),
        ).fetchall()
        return [c for c in (self.command(r[0]) for r in rows) if c is not None]

    # -- checkpoints -------------------------------------------------------------------------
    def add_checkpoint(
        self, *, branch: int, epoch: int, step: int, step_in_epoch: int, file: str, sha256: str,
        size: int, hparams: dict[str, Any], metrics: dict[str, Any], reason: str,
    ) -> int:
        cur = self.conn().execute(
            "INSERT INTO checkpoints (created, branch, epoch, step, step_in_epoch, file, sha256, size,"
            " hparams, metrics, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_now(), branch, epoch, step, step_in_epoch, file, sha256, size, json.dumps(hparams),
             json.dumps(metrics), reason),
        )
        return int(cur.lastrowid)

    def checkpoints(self, include_deleted: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        """The run's checkpoints, oldest first (with ``limit``: only the newest ``limit``).

        A row whose file is not a plain name inside the run directory (``/abs/path``, ``../x``: a
        forged or foreign row) is left out: nothing reads, lists or deletes a file through it.
        """
        where = "" if include_deleted else " WHERE deleted = 0"
        rows = self.conn().execute(
            f"SELECT * FROM (SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints{where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (-1 if limit is None else limit,),
        ).fetchall()
        return [c for c in map(_checkpoint_row, rows) if rundir.is_plain_name(c["file"])]

    def checkpoint_count(self) -> int:
        """How many checkpoints are listed (not deleted)."""
        return int(self.conn().execute("SELECT count(*) FROM checkpoints WHERE deleted = 0").fetchone()[0])

    def checkpoint(self, checkpoint_id: int, *, must_exist: bool = False) -> dict[str, Any] | None:
        row = self.conn().execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = ?", (checkpoint_id,)
        ).fetchone()
        found = None if row is None else _checkpoint_row(row)
        if found is not None and not rundir.is_plain_name(found["file"]):
            if must_exist:
                raise cmd.CommandError(
                    f"checkpoint #{checkpoint_id} names a file outside the run directory ({found['file']!r}); "
                    "it is never used: pick another checkpoint"
                )
            return None
        if not must_exist:
            return found
        if found is None or found["deleted"]:
            known = [c["id"] for c in self.checkpoints(limit=12)]
            listing = ", ".join(f"#{i}" for i in known) if known else "none yet"
            what = "was deleted" if found else "does not exist"
            raise cmd.CommandError(
                f"checkpoint #{checkpoint_id} {what} in run {str(self.run_dir)!r}; available: {listing}"
            )
        if not (self.run_dir / found["file"]).is_file():
            raise cmd.CommandError(
                f"checkpoint #{checkpoint_id}: its file {found['file']!r} is missing from {str(self.run_dir)!r}; "
                "pick another checkpoint"
            )
        return found

    def mark_checkpoint_deleted(self, checkpoint_id: int) -> None:
        self.conn().execute("UPDATE checkpoints SET deleted = 1 WHERE id = ?", (checkpoint_id,))

    def data_version(self) -> int:
        """Changes whenever another connection commits (a cheap "anything new?" for readers)."""
        return int(self.conn().execute("PRAGMA data_version").fetchone()[0])


@dataclass
class _HeldWrites:
    """What the trainer's store could not write for lack of space, in order, until there is room."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)   # commands whose held write finishes them
    commands: list[dict[str, Any]] = field(default_factory=list)  # its own, under negative ids
    next_id: int = -1


class _Transaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.outer = connection.in_transaction

    def __enter__(self) -> sqlite3.Connection:
        if not self.outer:
            self.connection.execute("BEGIN IMMEDIATE")
        return self.connection

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.outer:
            return
        self.connection.execute("ROLLBACK" if exc_type else "COMMIT")


_CHECKPOINT_COLUMNS = ("id, created, branch, epoch, step, step_in_epoch, file, sha256, size, hparams, metrics, reason,"
                       " deleted")


def _checkpoint_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": r[0], "created": r[1], "branch": r[2], "epoch": r[3], "step": r[4], "step_in_epoch": r[5],
        "file": r[6], "sha256": r[7], "size": r[8], "hparams": _json_object(r[9]), "metrics": _json_object(r[10]),
        "reason": r[11], "deleted": bool(r[12]),
    }


_COMMAND_COLUMNS = "id, created, source, kind, args, state, branch, step, done_at, result, reason"


def _command_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": r[0], "created": r[1], "source": r[2], "kind": r[3], "args": _json_or_text(r[4]),
        "state": r[5], "branch": r[6], "step": r[7], "done_at": r[8],
        "result": _json_or_text(r[9]) if r[9] else None, "reason": r[10],
    }


def _newest_filter(since_id: int, kinds: Iterable[str] | None) -> tuple[str, tuple[Any, ...]]:
    if kinds is None:
        return "id > ?", (since_id,)
    kinds = tuple(kinds)
    return f"id > ? AND kind IN ({', '.join('?' * len(kinds))})", (since_id, *kinds)


def _json_object(text: Any) -> dict[str, Any]:
    """A JSON object column as a dict; anything else (damaged or forged) as an empty one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _json_or_text(text: str) -> Any:
    """Command rows can be written by anyone: text that is not JSON is passed on as it is, and the
    trainer rejects it with a message instead of choking on it."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


_STATUS_TYPES = {
    "state": str, "pid": int, "host": str, "heartbeat": float, "started": float, "epoch": int, "step": int,
    "step_in_epoch": int, "steps_per_epoch": int, "max_epochs": int, "branch": int, "lr": float,
    "momentum": float, "optimizer": str, "message": str,
}


def _typed(value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or None when it is not one (SQLite stores whatever a writer gives it)."""
    if value is None or isinstance(value, bool):
        return None
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) else None
    return float(value) if isinstance(value, (int, float)) else None


def _typed_status(row: dict[str, Any]) -> dict[str, Any]:
    """The status row with each field of its declared type, or None: a forged or damaged value
    (text where a number belongs) shows as unknown instead of breaking every reader."""
    return {key: _typed(value, _STATUS_TYPES[key]) if key in _STATUS_TYPES else value for key, value in row.items()}


def process_gone(status: dict[str, Any]) -> bool:
    """True when the status names a process on this host that no longer exists."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def trainer_alive(status: dict[str, Any]) -> bool:
    """True when the status row says running/paused and its heartbeat is fresh (and, on this
    host, the process still exists)."""
    if status.get("state") not in LIVE_STATES or status.get("heartbeat") is None:
        return False
    # A heartbeat from the future is not one either (a forged row, or a clock far off).
    if abs(_now() - float(status["heartbeat"])) > HEARTBEAT_STALE_S:
        return False
    return not process_gone(status)


def disk_full(error: BaseException | None) -> bool:
    """True when ``error`` (or what caused it) says the disk is full: SQLite's SQLITE_FULL or an
    OSError with ENOSPC / EDQUOT."""
    while error is not None:
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(run_dir: Path) -> str:
    return f"the disk holding {str(run_dir)!r} is full; free some space and try again"
