"""babysit: watch one long PyTorch training run in the browser, nudge it, roll it back.

The names below load on first use, so that the CLI and the dashboard, which never train, start
without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "Run", "GuardConfig", "Interrupt", "RetentionPolicy",
    "BabysitError", "SettingsError", "CommandError", "StoreError", "CheckpointError", "RunDirError", "RunLockedError",
    "RanksOutOfStep",
]
__version__ = "0.1.0"

_HOMES = {"Run": "run", "Interrupt": "run", "GuardConfig": "guard", "RetentionPolicy": "retention"}
_HOMES.update({name: "errors" for name in __all__ if name.endswith("Error") or name == "RanksOutOfStep"})  # the tree: babysit/errors.py


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'babysit' has no attribute {name!r}")
