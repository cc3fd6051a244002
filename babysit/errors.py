"""Every error babysit raises on purpose, in one tree: ``except babysit.BabysitError`` catches them
all, and each message names the bad value and what would be accepted.

    BabysitError
    ├── SettingsError (ValueError)       a bad setting: Run(...) arguments, GuardConfig, a job's config
    ├── CommandError (ValueError)        a command refused, when queued or when applied: an lr that
    │                                    is not a number > 0, an unknown checkpoint, "not paused"
    ├── StoreError (RuntimeError)        the run directory or its database is missing, foreign or damaged
    ├── CheckpointError (RuntimeError)   a checkpoint file is missing, damaged, tampered with, or
    │                                    does not fit the model
    ├── RunDirError (RuntimeError)       a path in the run directory babysit refuses (a link, a FIFO)
    │   └── RunLockedError               another trainer holds the run directory
    ├── RanksOutOfStep (RuntimeError)    under torch.distributed, the ranks are not at the same point
    │                                    of the loop (babysit.Run built on rank 0 only, say)
    └── CliError                         (the CLI's) a problem the user can fix, exit status 2

The standard bases (ValueError, RuntimeError) are kept so that code written against them before
this tree existed still catches what it caught.
"""

from __future__ import annotations


class BabysitError(Exception):
    """The base of every error babysit raises on purpose."""


class SettingsError(BabysitError, ValueError):
    """A setting that cannot be used; the message names it, its value and what is accepted."""


class CommandError(BabysitError, ValueError):
    """A command that cannot be queued or applied; the message names the bad value."""


class StoreError(BabysitError, RuntimeError):
    """The run directory or its database is missing, foreign or damaged; the message says which."""


class CheckpointError(BabysitError, RuntimeError):
    """A checkpoint file that is missing, damaged, tampered with or not a babysit checkpoint."""


class RunDirError(BabysitError, RuntimeError):
    """A path in a run directory that babysit refuses to use; the message names it and says why."""


class RunLockedError(RunDirError):
    """Another trainer owns this run directory."""


class RanksOutOfStep(BabysitError, RuntimeError):
    """Under torch.distributed, the ranks did not meet at the same point of the loop."""


class CliError(BabysitError):
    """A problem the user can fix; printed as ``babysit: error: ...`` with exit status 2."""
