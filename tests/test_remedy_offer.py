"""The divergence remedy's lr (babysit/instruments/remedy_offer.py): half of the last healthy
checkpoint's lr, or of a lower lr set since; the same rule for the trainer's automatic remedy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from babysit import commands as cmd
from babysit.guard import GuardConfig
from babysit.instruments.remedy_offer import read_offer, remedy_offer
from babysit.store import RunStore
from tests.conftest import tiny_job
from tests.test_run import poison_weights

CHECKPOINT = {"id": 62, "created": 1000.0, "branch": 1, "step": 620, "hparams": {"lr": 0.3, "momentum": 0.9}}


def applied(kind: str, lr: float, done_at: float, *, branch: int = 1, step: int = 700, id: int = 1,
            state: str = cmd.APPLIED) -> dict[str, Any]:
    result = {"before": 0.3, "after": lr} if kind == cmd.SET_LR else {"lr": lr, "checkpoint": 62}
    args = {"value": lr} if kind == cmd.SET_LR else {"checkpoint": 62}
    return {"id": id, "kind": kind, "args": args, "state": state, "branch": branch, "step": step,
            "done_at": done_at, "result": result}


@pytest.mark.parametrize("settings,halved,lr,set_since", [
    # Nothing set since the checkpoint: half of its own lr.
    ([], 0.3, 0.15, False),
    # The nudge that blew it up (500) is higher: still half of the checkpoint's, never 250.
    ([applied(cmd.SET_LR, 500.0, 1100.0)], 0.3, 0.15, False),
    # A lower lr set since (while paused after the blow-up): half of that.
    ([applied(cmd.SET_LR, 500.0, 1100.0, id=1), applied(cmd.SET_LR, 0.1, 1200.0, id=2)], 0.1, 0.05, True),
    # Only the newest setting counts: 0.1 then 500 is 500's run.
    ([applied(cmd.SET_LR, 0.1, 1100.0, id=1), applied(cmd.SET_LR, 500.0, 1200.0, id=2)], 0.3, 0.15, False),
    # The remedy rolled back at 0.05 and diverged again: it halves again, from 0.05.
    ([applied(cmd.SET_LR, 500.0, 1100.0, id=1), applied(cmd.ROLLBACK, 0.05, 1300.0, id=2)], 0.05, 0.025, True),
    # Settings before the checkpoint, refused or still pending count for nothing.
    ([applied(cmd.SET_LR, 0.01, 900.0, step=600), applied(cmd.SET_LR, 0.02, 1100.0, state=cmd.REJECTED),
      applied(cmd.SET_LR, 0.03, 1100.0, state=cmd.PENDING)], 0.3, 0.15, False),
    # Applied at a later step on the checkpoint's branch while its file was still being written.
    ([applied(cmd.SET_LR, 0.1, 999.0, step=621)], 0.1, 0.05, True),
    # A forged row (no time, a text lr) is skipped, not a crash.
    ([applied(cmd.SET_LR, 0.1, "soon"), {**applied(cmd.SET_LR, 0.1, 1100.0), "result": {"after": "x"},  # type: ignore[arg-type]
                                         "args": {}}], 0.3, 0.15, False),
])
def test_the_remedy_halves_the_checkpoints_lr_or_a_lower_one_set_since(settings, halved, lr, set_since) -> None:
    offer = remedy_offer(CHECKPOINT, settings)
    assert (offer.checkpoint, offer.checkpoint_lr, offer.halved, offer.lr, offer.set_since) == (
        62, 0.3, halved, lr, set_since)
    assert offer.command_args() == {"checkpoint": 62, "hparams": cmd.HPARAMS_CURRENT, "lr": lr}


def test_the_offer_states_both_numbers() -> None:
    assert remedy_offer(CHECKPOINT, []).describe() == "lr 0.15 (½ × 0.3, its lr)"
    lower = remedy_offer(CHECKPOINT, [applied(cmd.SET_LR, 0.1, 1100.0)])
    assert lower.describe() == "lr 0.05 (½ × 0.1 set since; its lr 0.3)"


def test_a_checkpoint_without_an_lr_is_offered_with_its_own_hyperparameters() -> None:
    offer = remedy_offer({**CHECKPOINT, "hparams": {}}, [])
    assert offer.lr is None and offer.describe() == "its own hyperparameters"
    assert offer.command_args() == {"checkpoint": 62, "hparams": cmd.HPARAMS_CHECKPOINT}


def test_the_automatic_remedy_halves_the_checkpoints_lr_and_again_after_a_second_divergence(tmp_path: Path) -> None:
    """lr 0.1 at checkpoint #1 (step 8); `set lr 5` and the weights go NaN: the remedy rolls back
    at 0.05 (not 2.5). Its branch blows up too before the next checkpoint: 0.025 (not 0.05 again)."""
    def on_step(run, step):
        if run.branch == 1 and step == 10:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.SET_LR, {"value": 5.0}, source="test")
        if (run.branch, step) in ((1, 12), (2, 10)):
            poison_weights(run)
        if (run.branch, step) in ((1, 13), (2, 11)):
            run.writer.flush()  # the guard reads the NaN loss now

    run, _ = tiny_job(tmp_path / "r", epochs=3, guard=GuardConfig(warmup_steps=0, auto_remedy_max=2), on_step=on_step)
    store = RunStore(tmp_path / "r")
    rollbacks = [c for c in store.commands() if c["kind"] == cmd.ROLLBACK]
    assert [(c["source"], c["state"], c["args"]["checkpoint"], c["result"]["lr"]) for c in rollbacks] == [
        ("guard", cmd.APPLIED, 1, 0.05), ("guard", cmd.APPLIED, 1, 0.025)]
    divergences = [e for e in store.events() if e["kind"] == "divergence"]
    assert "with lr 0.05 (½ × 0.1, its lr)" in divergences[0]["message"]
    assert "with lr 0.025 (½ × 0.05 set since; its lr 0.1)" in divergences[1]["message"]
    assert [e["data"]["suggested_lr"] for e in divergences] == [0.05, 0.025]
    assert run.status == "finished" and run.branch == 3
    # The page reads the same offer from the run store.
    assert read_offer(store, 1).lr == 0.0125


GAN_CHECKPOINT = {**CHECKPOINT, "hparams": {"lr": 0.3, "momentum": 0.9, "others": {"G": {"lr": 0.01, "momentum": 0.5}}}}


def test_with_several_optimizers_another_one_s_nudge_is_not_the_first_s_lr_and_the_others_go_back_to_the_checkpoint() -> None:
    """A GAN's `set lr 1e-5 --optimizer G` is G's lr, not D's: D's remedy is still half of D's own.
    And G, whose nudge to 500 may be what blew the run up, goes back to its lr at the healthy
    checkpoint rather than keeping 500 (a rollback keeping the current hparams would keep it)."""
    g_nudges = [{**applied(cmd.SET_LR, 500.0, 1100.0, id=1), "args": {"value": 500.0, "optimizer": "G"}},
                {**applied(cmd.SET_LR, 1e-5, 1200.0, id=2), "args": {"value": 1e-5, "optimizer": "G"}}]
    offer = remedy_offer(GAN_CHECKPOINT, g_nudges)
    assert (offer.halved, offer.lr, offer.set_since) == (0.3, 0.15, False)
    assert offer.command_args() == {"checkpoint": 62, "hparams": cmd.HPARAMS_CHECKPOINT, "lr": 0.15}
    assert offer.describe() == "lr 0.15 (½ × 0.3, its lr; the other optimizers' lr and momentum as at it)"
    # A nudge of the first by its name still counts as the first's.
    d_nudge = {**applied(cmd.SET_LR, 0.1, 1300.0, id=3), "args": {"value": 0.1, "optimizer": "D"}}
    assert remedy_offer(GAN_CHECKPOINT, [*g_nudges, d_nudge]).lr == 0.05
