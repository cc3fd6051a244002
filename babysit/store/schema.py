"""The run database's names and schema: file names, states, the tables, and where runs are."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

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

# An excursion's life (see the excursions table).
EXCURSION_PROBE = "probe"
EXCURSION_SWEEP = "sweep"
EXCURSION_RUNNING = "running"
EXCURSION_DONE = "done"
EXCURSION_CANCELLED = "cancelled"   # a person cancelled it, or a stop or rollback cut it short
EXCURSION_ABANDONED = "abandoned"   # the trainer died during it; the resume went back to the main line

PER_STEP = "step"
PER_EPOCH = "epoch"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS status (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL, pid INTEGER, host TEXT, heartbeat REAL, started REAL,
    epoch INTEGER, step INTEGER, step_in_epoch INTEGER, steps_per_epoch INTEGER,
    max_epochs INTEGER, branch INTEGER, lr REAL, momentum REAL, optimizer TEXT, message TEXT,
    items_per_step INTEGER, item_unit TEXT, optimizers TEXT
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
-- An excursion: a probe set or an lr sweep, trained on short-lived branches of its own from a
-- fork checkpoint, after which the run goes back to where it was (return_checkpoint) on its own
-- branch. Its branches are listed in excursion_branches and are never the main line.
CREATE TABLE IF NOT EXISTS excursions (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, command INTEGER, created REAL NOT NULL,
    state TEXT NOT NULL, origin_branch INTEGER NOT NULL, origin_step INTEGER NOT NULL,
    from_checkpoint INTEGER, return_checkpoint INTEGER, spec TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}', message TEXT NOT NULL DEFAULT '', ended REAL
);
CREATE TABLE IF NOT EXISTS excursion_branches (
    branch INTEGER PRIMARY KEY, excursion INTEGER NOT NULL, ord INTEGER NOT NULL, param TEXT NOT NULL,
    value REAL NOT NULL, steps INTEGER NOT NULL, end_checkpoint INTEGER, result TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS epochs (
    branch INTEGER NOT NULL, epoch INTEGER NOT NULL, end_step INTEGER NOT NULL, wall REAL NOT NULL,
    PRIMARY KEY (branch, epoch)
);
"""


# Status columns added after schema version 1 was first written; a trainer adds them to older runs.
STATUS_ADDED_COLUMNS = {"items_per_step": "INTEGER", "item_unit": "TEXT",
                        "optimizers": "TEXT"}  # several optimizers: {name: {type, lr, momentum}} as JSON


def add_missing_columns(connection: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
    for name, kind in columns.items():
        if name not in present:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def is_run_dir(path: Path | str) -> bool:
    return (Path(path) / DB_NAME).is_file()


# How far list_runs looks: a root that holds a whole file system (a home directory) must not hang the page.
RUNS_MAX_DEPTH = 6
RUNS_MAX_DIRS = 5000


def list_runs(root: Path | str) -> list[Path]:
    """Run directories under ``root`` at any depth up to :data:`RUNS_MAX_DEPTH` (or ``root`` itself),
    newest activity first. Hidden directories, links and a run's own subfolders are not entered, and
    the walk stops after :data:`RUNS_MAX_DIRS` directories."""
    root = Path(root)
    if not root.is_dir():
        return []
    found, seen, level = [], 0, [root]
    for _depth in range(RUNS_MAX_DEPTH + 1):
        deeper = []
        for folder in level:
            if is_run_dir(folder):
                found.append(folder)
                continue  # a run's checkpoint folders are no runs
            seen += 1
            if seen > RUNS_MAX_DIRS:
                break
            try:
                deeper += sorted(p for p in folder.iterdir()
                                 if not p.name.startswith(".") and not p.is_symlink() and p.is_dir())
            except OSError:  # unreadable: nothing to list there
                continue
        level = deeper
        if not level or seen > RUNS_MAX_DIRS:
            break
    return sorted(found, key=lambda p: (p / DB_NAME).stat().st_mtime, reverse=True)


def now() -> float:
    return time.time()
