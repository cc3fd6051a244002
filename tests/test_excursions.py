"""Probe sets and lr sweeps on the trainer side (babysit.excursion_runner): in-process runs of the
tiny job for the rules, a real trainer subprocess for kill -9 and for the CLI end to end."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from babysit import commands as cmd
from babysit.instruments.probes import read_probes, winner
from babysit.instruments.sweep import read_sweep
from babysit.store import RunStore
from tests.conftest import babysit_cli, cli_here, tiny_job, wait_for


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


def loss_steps(store: RunStore, branch: int) -> list[int]:
    info = next(s for s in store.series() if s.name == "loss" and s.branch == branch and s.segment == 0)
    return store.chunk_points(info.id)[0].tolist()


def send_at(step: int, kind: str, args: dict[str, Any] | None = None) -> Any:
    """An on_step hook that queues one command after ``step`` (applied at that step's boundary)."""
    def on_step(run: Any, now: int) -> None:
        if now == step and run.branch == 1:
            run.store.enqueue_command(kind, args or {}, source="test")
    return on_step


def resume_when_paused(run_dir: Path) -> threading.Thread:
    """A person who resumes the run once it pauses (after an excursion that ends in a pause)."""
    def watch() -> None:
        store = wait_for(lambda: (run_dir / "run.db").exists() and RunStore(run_dir), what="the run store")
        wait_for(lambda: store.status().get("state") == "paused", timeout=120, what="the pause")
        store.enqueue_command(cmd.RESUME, {}, source="test")
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_probe_set_from_now_tries_each_value_and_leaves_the_run_exactly_as_it_was(tmp_path: Path) -> None:
    _, straight = tiny_job(tmp_path / "straight", epochs=3)
    probe = {"factors": "0.5, 1, 2", "steps": 4, "then": "continue"}
    run, probed = tiny_job(tmp_path / "probed", epochs=3, on_step=send_at(10, cmd.PROBE, probe))
    assert same_weights(straight, probed)  # the main line is bit-identical to a run without probes
    store = RunStore(tmp_path / "probed")
    (excursion,) = store.excursions()
    assert (excursion["state"], excursion["origin_branch"], excursion["origin_step"]) == ("done", 1, 10)
    assert excursion["from_checkpoint"] == excursion["return_checkpoint"]
    readings = read_probes(store, excursion["id"])
    assert [(r.value, r.steps_done, r.start_step, r.diverged) for r in readings] == [
        (0.05, 4, 10, False), (0.1, 4, 10, False), (0.2, 4, 10, False)]
    for reading in readings:
        assert loss_steps(store, reading.branch) == [11, 12, 13, 14]
        end = store.checkpoint(reading.end_checkpoint)
        assert (end["branch"], end["step"], end["reason"], end["hparams"]["lr"]) == (reading.branch, 14, "probe",
                                                                                    reading.value)
        branch = store.branch(reading.branch)
        assert (branch["parent"], branch["from_checkpoint"], branch["start_step"]) == (1, excursion["from_checkpoint"],
                                                                                       10)
    # The lr ×1 probe trained what the main line trained next: the same losses, step for step.
    main_info = next(s for s in store.series() if s.name == "loss" and s.branch == 1)
    steps, values, _ = store.chunk_points(main_info.id)
    probe_info = next(s for s in store.series() if s.name == "loss" and s.branch == readings[1].branch)
    assert store.chunk_points(probe_info.id)[1].tolist() == values[10:14].tolist()
    assert steps.tolist() == list(range(1, 25))  # nothing of the probes on the main line
    assert [c["branch"] for c in store.checkpoints() if c["reason"] == "epoch"] == [1, 1, 1]
    assert winner(readings) is not None
    assert run.branch == 1
