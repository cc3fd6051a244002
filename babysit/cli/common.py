"""What every ``python -m babysit`` command shares: its defaults, exit codes, and opening a run's store."""

from __future__ import annotations

from ..errors import CliError
from ..store import RunStore, StoreError

DEFAULT_RUN_DIR = "checkpoints/demo"
DEFAULT_PORT = 8501
LOCALHOST = "127.0.0.1"
EXIT_USAGE = 2
EXIT_NOT_APPLIED = 1


def open_store(run_dir: str) -> RunStore:
    """The run's store, or a CliError that says why it cannot be opened."""
    try:
        return RunStore(run_dir)
    except StoreError as error:
        raise CliError(str(error)) from None
