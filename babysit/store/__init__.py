"""The run store: one SQLite database (WAL) per run directory, shared by trainer and dashboard.

The trainer writes metrics, events, checkpoints, branches and its status; the dashboard and the
CLI read them and write only commands (and which hints a person dismissed). Metrics are stored as
chunks of up to ``CHUNK_POINTS`` points per series (steps, values and wall times as packed arrays,
plus the chunk's min, max and sum), so the trainer writes a few rows per flush instead of one per
point, and a reader can draw a million steps from a few thousand chunk summaries without touching the raw points.

Nothing read from the database is trusted: a checkpoint row whose file is not a plain name in the
run directory is left out, status fields of the wrong type read as None, and SQLite is never
pointed at a run.db that is a link. The trainer's store (``create=True``) keeps in memory the writes
a full disk refuses, for the metrics writer to store once there is room.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

from .. import commands as cmd
from .. import rundir
from ..errors import RunDirError, StoreError
from .command_table import CommandTable, _HeldWrites
from .dismissed import DismissedHints
from .excursions import ExcursionTable
from .liveness import disk_full, disk_full_message, process_gone, process_stopped, stopped_message, trainer_alive
from .rows import (  # noqa: F401 (SeriesInfo: part of the store's names)
    BRANCH_COLUMNS, CHECKPOINT_COLUMNS, EVENT_COLUMNS, SeriesInfo, branch_row, checkpoint_row, event_row, newest_filter,
    optimizers_of, typed_status,
)
from .schema import *  # noqa: F401,F403 (the store's names, as before the split)
from .schema import (
    DB_FILES, DB_NAME, LIVE_STATES, NEW, NOT_RESPONDING, CRASHED, RUNNING, SCHEMA, SCHEMA_VERSION, SIGNAL_NAME,
    STATUS_ADDED_COLUMNS, add_missing_columns, list_runs, now,
)
from .series import SeriesTables, chunk_summary  # noqa: F401 (chunk_summary: part of the store's names)
from .signal import CommandSignal  # noqa: F401 (as before the split)


class RunStore(SeriesTables, CommandTable, ExcursionTable, DismissedHints):
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
            connection.executescript(SCHEMA)
            connection.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            connection.execute("INSERT INTO meta VALUES ('created', ?)", (repr(now()),))
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
                connection.executescript(SCHEMA)  # no-op unless an older run lacks a table
                add_missing_columns(connection, "status", STATUS_ADDED_COLUMNS)
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
        status = typed_status(dict(row))
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
            if process_stopped(status):  # frozen, not dead: what to do, for the CLI as for the page
                status["message"] = stopped_message(status)
        return status

    # -- branches ----------------------------------------------------------------------------
    def new_branch(
        self, *, parent: int | None, from_checkpoint: int | None, start_step: int, start_epoch: int,
        hparams: dict[str, Any] | None = None,
    ) -> int:
        cur = self.conn().execute(
            "INSERT INTO branches (parent, from_checkpoint, start_step, start_epoch, created, hparams)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (parent, from_checkpoint, start_step, start_epoch, now(), json.dumps(hparams or {})),
        )
        return int(cur.lastrowid)

    def branches(self) -> list[dict[str, Any]]:
        rows = self.conn().execute(f"SELECT {BRANCH_COLUMNS} FROM branches ORDER BY id").fetchall()
        return [branch_row(row) for row in rows]

    def branch(self, branch_id: int) -> dict[str, Any] | None:
        row = self.conn().execute(f"SELECT {BRANCH_COLUMNS} FROM branches WHERE id = ?", (branch_id,)).fetchone()
        return None if row is None else branch_row(row)

    # -- events ------------------------------------------------------------------------------
    def add_event(
        self, kind: str, message: str, *, branch: int | None = None, step: int | None = None,
        epoch: int | None = None, data: dict[str, Any] | None = None,
    ) -> int:
        """Record an event; returns its id (0 when a full disk made the trainer's store hold it)."""
        cur = self._execute_or_hold(
            "INSERT INTO events (wall, branch, step, epoch, kind, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now(), branch, step, epoch, kind, message, json.dumps(data or {})),
        )
        return int(cur.lastrowid) if cur is not None else 0

    def events(self, since_id: int = 0, limit: int = 10_000, *, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` events with an id above ``since_id`` (of the given ``kinds``), oldest first."""
        where, params = newest_filter(since_id, kinds)
        rows = self.conn().execute(
            f"SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (*params, limit),
        ).fetchall()
        return [event_row(row) for row in rows]

    # -- checkpoints -------------------------------------------------------------------------
    def add_checkpoint(
        self, *, branch: int, epoch: int, step: int, step_in_epoch: int, file: str, sha256: str,
        size: int, hparams: dict[str, Any], metrics: dict[str, Any], reason: str,
    ) -> int:
        cur = self.conn().execute(
            "INSERT INTO checkpoints (created, branch, epoch, step, step_in_epoch, file, sha256, size,"
            " hparams, metrics, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now(), branch, epoch, step, step_in_epoch, file, sha256, size, json.dumps(hparams),
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
            f"SELECT * FROM (SELECT {CHECKPOINT_COLUMNS} FROM checkpoints{where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (-1 if limit is None else limit,),
        ).fetchall()
        return [c for c in map(checkpoint_row, rows) if rundir.is_plain_name(c["file"])]

    def checkpoint_count(self) -> int:
        """How many checkpoints are listed (not deleted)."""
        return int(self.conn().execute("SELECT count(*) FROM checkpoints WHERE deleted = 0").fetchone()[0])

    def checkpoint(self, checkpoint_id: int, *, must_exist: bool = False) -> dict[str, Any] | None:
        row = self.conn().execute(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = ?", (checkpoint_id,)
        ).fetchone()
        found = None if row is None else checkpoint_row(row)
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
        if not rundir.checkpoint_present(self.run_dir, found["file"]):  # a file, or a sharded checkpoint's folder
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
