"""Whether a training script seeded torch before babysit saw it, and what to tell it if not.

babysit puts the random generators back as they were at a checkpoint, but what a script draws
before training starts (random data, a ``random_split``, the initial weights of a run resumed from
its start) comes from generators babysit never saw. Unseeded, torch picks its seed at random in
every process (a number of 64 bits), so a restarted process draws other data. A seed a person chose
(``torch.manual_seed``, Lightning's ``seed_everything``, transformers' ``set_seed``) is what
``torch.initial_seed()`` then returns; Lightning's also leaves ``PL_GLOBAL_SEED`` in the
environment. A person's seed of 2**32 or more is taken for torch's own: the warning is then one
too many, never one missing.
"""

from __future__ import annotations

import os

import torch

EXACTNESS = "exactness"  # the event kind


def seeded() -> bool:
    """True if this process's torch generator was seeded by the script (not torch's random pick)."""
    return "PL_GLOBAL_SEED" in os.environ or torch.initial_seed() < 2**32


def unseeded_warning(fix: str) -> str:
    return ("torch was not seeded before training began (torch.initial_seed() is the random seed torch picks in "
            "each process): what the script draws before training (random data, a random_split, the initial "
            "weights) differs in a restarted process, so a resumed run would train on other data; add "
            f"{fix} at the top of the script")
