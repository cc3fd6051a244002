"""Built-in training jobs, written against babysit's public API.

``python -m babysit train --job NAME`` (and ``demo``) runs one of them. Each job module has a frozen
config dataclass (its fields are the ``train`` options it takes) and ``train(run_dir, config,
on_run=...)``. Modules are imported only when a job is run, so the rest of the CLI starts fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Job:
    name: str
    module: str
    config_class: str
    summary: str

    def load(self) -> tuple[type, Callable[..., Any]]:
        """The job's config class and its ``train`` function."""
        module = importlib.import_module(self.module)
        return getattr(module, self.config_class), module.train


JOBS = {
    "charlm": Job("charlm", "babysit.jobs.charlm", "CharLMConfig",
                  "a small character-level transformer on Python's own standard library sources"),
    "digits": Job("digits", "babysit.jobs.digits", "DigitsConfig",
                  "a small CNN on scikit-learn's bundled handwritten digits (fast; learns in 3 epochs)"),
}
DEFAULT_JOB = "charlm"
# Runs started before there was a choice of job hold no "job" in their config: they are digits runs.
JOB_OF_UNNAMED_RUNS = "digits"
