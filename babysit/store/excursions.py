"""Excursions in the run database: probe sets and lr sweeps, each trained on branches of its own
from a fork checkpoint, then left for the run's own branch (see the excursions table in schema).

The trainer writes them; readers (the page, the CLI, babysit.instruments) read them. A run written
before excursions existed has no such tables until a trainer opens it: readers see none.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .rows import json_object
from .schema import EXCURSION_RUNNING, now

EXCURSION_COLUMNS = ("id, kind, command, created, state, origin_branch, origin_step, from_checkpoint,"
                     " return_checkpoint, spec, result, message, ended")
EXCURSION_BRANCH_COLUMNS = "branch, excursion, ord, param, value, steps, end_checkpoint, result"


def excursion_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": r[0], "kind": r[1], "command": r[2], "created": r[3], "state": r[4], "origin_branch": r[5],
            "origin_step": r[6], "from_checkpoint": r[7], "return_checkpoint": r[8], "spec": json_object(r[9]),
            "result": json_object(r[10]), "message": r[11], "ended": r[12]}


def excursion_branch_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"branch": r[0], "excursion": r[1], "ord": r[2], "param": r[3], "value": r[4], "steps": r[5],
            "end_checkpoint": r[6], "result": json_object(r[7])}


def _missing_table(error: sqlite3.OperationalError) -> bool:
    return "no such table" in str(error)


class ExcursionTable:
    """The excursions part of :class:`~babysit.store.RunStore`."""

    # -- the trainer's writes ----------------------------------------------------------------
    def add_excursion(
        self, *, kind: str, command: int | None, origin_branch: int, origin_step: int,
        from_checkpoint: int | None, return_checkpoint: int | None, spec: dict[str, Any],
    ) -> int:
        cur = self.conn().execute(  # type: ignore[attr-defined]
            "INSERT INTO excursions (kind, command, created, state, origin_branch, origin_step, from_checkpoint,"
            " return_checkpoint, spec) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, command, now(), EXCURSION_RUNNING, origin_branch, origin_step, from_checkpoint,
             return_checkpoint, json.dumps(spec)),
        )
        return int(cur.lastrowid)

    def add_excursion_branch(self, *, excursion: int, branch: int, ord: int, param: str, value: float,
                             steps: int) -> None:
        self.conn().execute(  # type: ignore[attr-defined]
            f"INSERT INTO excursion_branches ({EXCURSION_BRANCH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, '{{}}')",
            (branch, excursion, ord, param, float(value), steps),
        )

    def finish_excursion_branch(self, branch: int, *, end_checkpoint: int | None,
                                result: dict[str, Any] | None = None) -> None:
        self.conn().execute(  # type: ignore[attr-defined]
            "UPDATE excursion_branches SET end_checkpoint = ?, result = ? WHERE branch = ?",
            (end_checkpoint, json.dumps(result or {}), branch),
        )

    def finish_excursion(self, excursion: int, state: str, *, message: str = "",
                         result: dict[str, Any] | None = None) -> None:
        self.conn().execute(  # type: ignore[attr-defined]
            "UPDATE excursions SET state = ?, message = ?, result = ?, ended = ? WHERE id = ?",
            (state, message, json.dumps(result or {}), now(), excursion),
        )

    # -- reads -------------------------------------------------------------------------------
    def excursions(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` excursions, newest first, each with its ``branches`` (in order)."""
        try:
            rows = self.conn().execute(  # type: ignore[attr-defined]
                f"SELECT {EXCURSION_COLUMNS} FROM excursions ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            found = [excursion_row(r) for r in rows]
            for excursion in found:
                excursion["branches"] = self.excursion_branches(excursion["id"])
        except sqlite3.OperationalError as error:
            if _missing_table(error):
                return []
            raise
        return found

    def excursion(self, excursion_id: int) -> dict[str, Any] | None:
        try:
            row = self.conn().execute(  # type: ignore[attr-defined]
                f"SELECT {EXCURSION_COLUMNS} FROM excursions WHERE id = ?", (excursion_id,)).fetchone()
        except sqlite3.OperationalError as error:
            if _missing_table(error):
                return None
            raise
        if row is None:
            return None
        found = excursion_row(row)
        found["branches"] = self.excursion_branches(excursion_id)
        return found

    def excursion_branches(self, excursion_id: int) -> list[dict[str, Any]]:
        rows = self.conn().execute(  # type: ignore[attr-defined]
            f"SELECT {EXCURSION_BRANCH_COLUMNS} FROM excursion_branches WHERE excursion = ? ORDER BY ord",
            (excursion_id,)).fetchall()
        return [excursion_branch_row(r) for r in rows]

    def running_excursion(self) -> dict[str, Any] | None:
        """The excursion in progress, if any (at most one runs at a time)."""
        try:
            row = self.conn().execute(  # type: ignore[attr-defined]
                "SELECT id FROM excursions WHERE state = ? ORDER BY id DESC LIMIT 1", (EXCURSION_RUNNING,)).fetchone()
        except sqlite3.OperationalError as error:
            if _missing_table(error):
                return None
            raise
        return None if row is None else self.excursion(int(row[0]))

    def excursion_branch_ids(self) -> dict[int, int]:
        """Every excursion branch, mapped to its excursion: these are never the run's main line."""
        try:
            rows = self.conn().execute(  # type: ignore[attr-defined]
                "SELECT branch, excursion FROM excursion_branches").fetchall()
        except sqlite3.OperationalError as error:
            if _missing_table(error):
                return {}
            raise
        return {int(b): int(e) for b, e in rows}
