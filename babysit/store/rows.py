"""Rows as readers get them, decoded in one place: JSON columns parsed (a damaged or forged one
reads as empty, or as the text it is), status fields typed or None, newest-first filters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np


@dataclass(frozen=True)
class SeriesInfo:
    id: int
    name: str
    branch: int
    per: str
    segment: int  # 0: live; k > 0: the k-th piece superseded by a crash


BRANCH_COLUMNS = "id, parent, from_checkpoint, start_step, start_epoch, created, hparams"


def branch_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": r[0], "parent": r[1], "from_checkpoint": r[2], "start_step": r[3], "start_epoch": r[4],
            "created": r[5], "hparams": json_object(r[6])}


EVENT_COLUMNS = "id, wall, branch, step, epoch, kind, message, data"


def event_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": r[0], "wall": r[1], "branch": r[2], "step": r[3], "epoch": r[4], "kind": r[5], "message": r[6],
            "data": json_object(r[7])}


CHECKPOINT_COLUMNS = ("id, created, branch, epoch, step, step_in_epoch, file, sha256, size, hparams, metrics, reason,"
                       " deleted")


def checkpoint_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": r[0], "created": r[1], "branch": r[2], "epoch": r[3], "step": r[4], "step_in_epoch": r[5],
        "file": r[6], "sha256": r[7], "size": r[8], "hparams": json_object(r[9]), "metrics": json_object(r[10]),
        "reason": r[11], "deleted": bool(r[12]),
    }


COMMAND_COLUMNS = "id, created, source, kind, args, state, branch, step, done_at, result, reason"


def command_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": r[0], "created": r[1], "source": r[2], "kind": r[3], "args": json_or_text(r[4]),
        "state": r[5], "branch": r[6], "step": r[7], "done_at": r[8],
        "result": json_or_text(r[9]) if r[9] else None, "reason": r[10],
    }


def newest_filter(since_id: int, kinds: Iterable[str] | None) -> tuple[str, tuple[Any, ...]]:
    if kinds is None:
        return "id > ?", (since_id,)
    kinds = tuple(kinds)
    return f"id > ? AND kind IN ({', '.join('?' * len(kinds))})", (since_id, *kinds)


def json_object(text: Any) -> dict[str, Any]:
    """A JSON object column as a dict; anything else (damaged or forged) as an empty one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def json_or_text(text: str) -> Any:
    """Command rows can be written by anyone: text that is not JSON is passed on as it is, and the
    trainer rejects it with a message instead of choking on it."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


STATUS_TYPES = {
    "state": str, "pid": int, "host": str, "heartbeat": float, "started": float, "epoch": int, "step": int,
    "step_in_epoch": int, "steps_per_epoch": int, "max_epochs": int, "branch": int, "lr": float,
    "momentum": float, "optimizer": str, "message": str, "optimizers": str,
}


def typed(value: Any, kind: type) -> Any:
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


def typed_status(row: dict[str, Any]) -> dict[str, Any]:
    """The status row with each field of its declared type, or None: a forged or damaged value
    (text where a number belongs) shows as unknown instead of breaking every reader."""
    return {key: typed(value, STATUS_TYPES[key]) if key in STATUS_TYPES else value for key, value in row.items()}


def optimizers_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run's optimizers by name, each ``{"type", "lr", "momentum"}``, from its status row; empty
    for a run with one optimizer (or a damaged column: read as one)."""
    try:
        found = json.loads(status.get("optimizers") or "{}")
    except ValueError:
        return {}
    if not isinstance(found, dict) or len(found) < 2:
        return {}
    return {str(name): (values if isinstance(values, dict) else {}) for name, values in found.items()}
