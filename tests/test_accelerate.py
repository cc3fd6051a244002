"""A loop prepared with ``accelerate`` (the style of the transformers examples), babysat by
``babysit.Run``: nudges go through accelerate's scheduler wrapper into the real schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from babysit import commands as cmd
from babysit.store import RunStore

STEPS_PER_EPOCH, EPOCHS, WARMUP = 16, 4, 8
TOTAL = STEPS_PER_EPOCH * EPOCHS


def accelerate_loop(run_dir: Path, *, accumulation: int = 1, on_step: Callable[[Any, int, float], None] | None = None,
                    **run_kwargs: Any) -> Any:
    """A transformers-examples style loop on CPU: Accelerator, AdamW, warmup + cosine schedule."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    import babysit

    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    x = torch.randn(STEPS_PER_EPOCH * 8 * accumulation, 6)
    y = x @ torch.randn(6, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP, TOTAL)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    with babysit.Run(run_dir, model, optimizer, scheduler, **run_kwargs) as run:
        for _epoch in run.epochs(EPOCHS):
            for xb, yb in run.batches(loader):
                with accelerator.accumulate(model):
                    loss = nn.functional.mse_loss(model(xb), yb)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                run.log(loss=loss)
                if on_step is not None:
                    on_step(run, run.step, optimizer.param_groups[0]["lr"])
    return run


def test_a_nudge_lasts_through_accelerates_scheduler_wrapper(tmp_path: Path) -> None:
    """set lr 0.02 at step 11 (a warmup + cosine schedule at factor λ(11)): every later step's lr is
    0.02 × λ(t) / λ(11), the schedule's shape from the nudged value, not the old lr back."""
    from transformers import get_cosine_schedule_with_warmup

    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), WARMUP, TOTAL)
    factor = [reference.get_last_lr()[0]]
    for _ in range(TOTAL):
        reference.optimizer.step()
        reference.step()
        factor.append(reference.get_last_lr()[0])

    seen: dict[int, float] = {}

    def on_step(run: Any, step: int, lr: float) -> None:
        if step == 11:
            run.store.enqueue_command(cmd.SET_LR, {"value": 0.02}, source="test")
        seen[step] = lr

    run = accelerate_loop(tmp_path / "run", on_step=on_step)
    assert seen[11] == pytest.approx(1e-2 * factor[11])
    # Applied at step 11's boundary; each later step's scheduler step keeps the nudge.
    applied = [c for c in RunStore(run.run_dir).commands() if c["kind"] == cmd.SET_LR]
    assert [(c["state"], c["step"]) for c in applied] == [(cmd.APPLIED, 11)]
    for step in range(12, TOTAL):
        assert seen[step] == pytest.approx(0.02 * factor[step] / factor[11], rel=1e-6), step
    events = RunStore(run.run_dir).events()
    assert not any(e["kind"] == "hparams" and "by the loop" in e["message"] for e in events)


def test_with_gradient_accumulation_a_stop_waits_for_the_optimizer_step_and_resumes_exactly(tmp_path: Path) -> None:
    """Two micro-batches per optimizer step: a stop asked at micro-batch 5 lands at 6, where the
    optimizer stepped (a checkpoint at 5 would drop the gradient summed so far); the resumed run
    ends with the very weights of a run never stopped."""
    reference = accelerate_loop(tmp_path / "reference", accumulation=2)

    def stop_at_5(run: Any, step: int, lr: float) -> None:
        if step == 5:
            run.request_stop("the test")

    stopped = accelerate_loop(tmp_path / "run", accumulation=2, on_step=stop_at_5)
    last = RunStore(tmp_path / "run").checkpoints()[-1]
    assert (last["step"], last["reason"]) == (6, "stop")
    resumed = accelerate_loop(tmp_path / "run", accumulation=2)
    assert resumed.step == reference.step == TOTAL * 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                  reference.model.state_dict().values()))
    assert stopped.status == "stopped"
