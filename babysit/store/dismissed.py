"""Hints a person dismissed, in the run database, so that a dismissal survives a reload, another
browser and the CLI (see babysit.instruments.hints).

The table is created by its first writer (the page's or the CLI's dismissal), not by the schema:
dismissing is the one write besides commands that a reader of the run makes, and a run that
never had a hint dismissed has no such table. Readers take its absence for "none dismissed".
"""

from __future__ import annotations

import sqlite3

from .schema import now

DISMISSED_HINTS_TABLE = "CREATE TABLE IF NOT EXISTS dismissed_hints (id TEXT PRIMARY KEY, at REAL NOT NULL)"
# A hint id names a rule and what it fired for ("plateau@branch1:epoch7"): short, printable.
HINT_ID_MAX_CHARS = 120


class DismissedHints:
    """The dismissed-hints part of :class:`~babysit.store.RunStore`."""

    def dismiss_hint(self, hint_id: str) -> None:
        """Record that ``hint_id`` was dismissed (again: the time is updated, nothing else)."""
        if not (isinstance(hint_id, str) and 0 < len(hint_id) <= HINT_ID_MAX_CHARS and hint_id.isprintable()):
            raise ValueError(f"a hint id must be printable text of 1 to {HINT_ID_MAX_CHARS} characters, got {hint_id!r}")
        connection = self.conn()  # type: ignore[attr-defined]
        connection.execute(DISMISSED_HINTS_TABLE)
        connection.execute("INSERT OR REPLACE INTO dismissed_hints (id, at) VALUES (?, ?)", (hint_id, now()))

    def dismissed_hints(self) -> set[str]:
        """The ids of every dismissed hint (none when nothing was ever dismissed)."""
        try:
            rows = self.conn().execute("SELECT id FROM dismissed_hints").fetchall()  # type: ignore[attr-defined]
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return set()
            raise
        return {str(r[0]) for r in rows}
