"""Commands in the run database: queued by the CLI and the page, applied or refused by the
trainer; and what a full disk refuses, held in memory until there is room."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import commands as cmd
from .liveness import disk_full, process_gone, process_stopped, stopped_message
from .rows import COMMAND_COLUMNS, command_row, json_or_text, newest_filter
from .schema import FINISHED, LIVE_STATES, NEW, NOT_RESPONDING, now
from .signal import CommandSignal


@dataclass
class _HeldWrites:
    """What the trainer's store could not write for lack of space, in order, until there is room."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)   # commands whose held write finishes them
    commands: list[dict[str, Any]] = field(default_factory=list)  # its own, under negative ids
    next_id: int = -1


class CommandTable:
    """The commands part of :class:`~babysit.store.RunStore`."""

    def enqueue_command(
        self, kind: str, args: dict[str, Any] | None = None, *, source: str, require_live: bool = True
    ) -> int:
        """Validate and queue a command; raise :class:`~babysit.commands.CommandError` and queue
        nothing when the command or the run's state does not allow it."""
        command = cmd.validate(kind, args)
        # The run's state is read and the command written in one transaction: a trainer that stops
        # expires what is pending and says "stopped" in one commit of its own, so a command is
        # either expired by that stop or refused because of it, never left for the next start.
        try:
            with self.transaction():
                status = self.status()
                if require_live and not status["alive"]:
                    raise cmd.CommandError(self._not_running_message(status))
                if command.kind == cmd.ROLLBACK:
                    self.checkpoint(command.args["checkpoint"], must_exist=True)
                cur = self.conn().execute(
                    "INSERT INTO commands (created, source, kind, args, state) VALUES (?, ?, ?, ?, ?)",
                    (now(), source, command.kind, json.dumps(command.args), cmd.PENDING),
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
            self._held.commands.append({"id": command_id, "created": now(), "source": source, "kind": command.kind,
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
        if status.get("state") in LIVE_STATES and process_stopped(status):
            return f"run {str(self.run_dir)!r} is not running: {stopped_message(status)}"
        if state == NEW:
            detail = "no trainer has started in it yet"
        elif status.get("state") in LIVE_STATES and process_gone(status):
            detail = f"its trainer (pid {status.get('pid')}) is no longer running"
        elif state == NOT_RESPONDING:
            age = now() - (status.get("heartbeat") or 0)
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
            {"id": r[0], "created": r[1], "source": r[2], "kind": r[3], "args": json_or_text(r[4])}
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
                        held.update(state=state, branch=branch, step=step, done_at=now(), result=result, reason=reason)
            return
        self._execute_or_hold(
            "UPDATE commands SET state = ?, branch = ?, step = ?, done_at = ?, result = ?, reason = ?"
            " WHERE id = ? AND state = ?",
            (state, branch, step, now(), json.dumps(result) if result is not None else None, reason,
             command_id, cmd.PENDING),
            finishes=command_id,
        )

    def expire_pending(self, reason: str, *, branch: int | None, step: int | None) -> list[int]:
        """Mark every command still pending expired, with ``reason``: the run ended before it
        applied them, and a later start must not carry them out unasked. Returns their ids."""
        expired = [c["id"] for c in self.pending_commands()]
        for command_id in expired:
            self.finish_command(command_id, cmd.EXPIRED, branch=branch, step=step, reason=reason)
        return expired

    def record_trainer_command(self, kind: str, args: dict[str, Any], state: str, *, source: str, branch: int,
                               step: int, result: dict[str, Any] | None = None, reason: str | None = None) -> int:
        """A command the trainer carried out (or refused) of its own accord, a journal's setting in a
        replay: written already finished, so the run's history, and its own journal, show it like
        any other. Returns its id (0 when a full disk made the trainer's store hold the write)."""
        at = now()
        cur = self._execute_or_hold(
            "INSERT INTO commands (created, source, kind, args, state, branch, step, done_at, result, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (at, source, kind, json.dumps(args), state, branch, step, at,
             json.dumps(result) if result is not None else None, reason),
        )
        return int(cur.lastrowid) if cur is not None else 0

    def commands(self, since_id: int = 0, limit: int = 10_000, *, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` commands with an id above ``since_id`` (of the given ``kinds``), oldest first."""
        where, params = newest_filter(since_id, kinds)
        rows = self.conn().execute(
            f"SELECT * FROM (SELECT {COMMAND_COLUMNS} FROM commands WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (*params, limit),
        ).fetchall()
        return [command_row(r) for r in rows]

    def command(self, command_id: int) -> dict[str, Any] | None:
        row = self.conn().execute(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
        return None if row is None else command_row(row)

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
