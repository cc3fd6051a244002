"""Several optimizers, named (babysit.optimizer_set, babysit.trainables): what Run accepts as model
and optimizers, a nudge of one by name, its series and status, a replay and a rollback of each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import babysit
from babysit import commands as cmd
from babysit.checkpoint import KEY_MODEL, KEY_OTHER_OPTIMIZERS, read_verified
from babysit.errors import SettingsError
from babysit.instruments.journal import export_journal
from babysit.store import RunStore, optimizers_of
from babysit.guard import GuardConfig
from tests.conftest import cli_here
from tests.test_run import poison_weights


def gan_parts(seed: int = 0) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    net_d, net_g = nn.Linear(3, 1), nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    return ({"D": net_d, "G": net_g},
            {"D": torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999)),
             "G": torch.optim.SGD(net_g.parameters(), lr=1e-3, momentum=0.9)})


def train_gan(run_dir: Path, epochs: int, *, at_step: dict[int, Any] | None = None, **run_kwargs: Any
              ) -> tuple[babysit.Run, dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
    """A two-optimizer loop: ``at_step[n](run)`` runs once, after the first step n's update (to queue a
    command; a step trained again after a rollback does not run it again)."""
    nets, optimizers = gan_parts()
    with babysit.Run(run_dir, nets, optimizers=optimizers, **run_kwargs) as run:
        for _ in run.epochs(epochs):
            for _ in run.batches(range(4)):
                fake = nets["G"](torch.randn(8, 2))
                loss_d = nets["D"](fake.detach()).pow(2).mean()
                optimizers["D"].zero_grad()
                loss_d.backward()
                optimizers["D"].step()
                loss_g = (nets["D"](fake) - 1).pow(2).mean()
                optimizers["G"].zero_grad()
                loss_g.backward()
                optimizers["G"].step()
                run.log(loss_D=loss_d, loss_G=loss_g)
                if at_step and run.step in at_step:
                    at_step.pop(run.step)(run)
    return run, nets, optimizers


def queue(kind: str, args: dict[str, Any]) -> Any:
    return lambda run: run.store.enqueue_command(kind, args, source="test")


def test_a_nudge_names_its_optimizer_and_reaches_only_that_one(tmp_path: Path) -> None:
    run, _, optimizers = train_gan(tmp_path / "r", 1, at_step={
        1: queue(cmd.SET_LR, {"value": 5e-4, "optimizer": "G"}),
        2: queue(cmd.SET_MOMENTUM, {"value": 0.8}),  # no name: the first (D's beta1)
        3: queue(cmd.SET_LR, {"value": 1e-4, "optimizer": "X"})})
    assert optimizers["G"].param_groups[0]["lr"] == 5e-4 and optimizers["D"].param_groups[0]["lr"] == 2e-4
    assert optimizers["D"].param_groups[0]["betas"][0] == 0.8 and optimizers["G"].param_groups[0]["momentum"] == 0.9
    store = RunStore(tmp_path / "r")
    rows = store.commands()
    assert [(r["state"], (r["result"] or {}).get("optimizer")) for r in rows[:2]] == [("applied", "G"), ("applied", "D")]
    assert cmd.outcome(rows[0]).endswith("(after 0.0005, optimizer G)")
    assert rows[2]["state"] == "rejected" and rows[2]["reason"] == "unknown optimizer 'X'; this run has D, G"
    # The chart's series: the first's are lr and momentum, G's lr/G and momentum/G, from the first step on.
    series = {name for name, *_ in store.conn().execute("SELECT name FROM series")}
    assert {"lr", "momentum", "lr/G", "momentum/G", "loss_D", "loss_G"} <= series
    # The status names each, and the CLI says them.
    assert {name: v["lr"] for name, v in optimizers_of(store.status()).items()} == {"D": 2e-4, "G": 5e-4}
    said = cli_here("status", "--run-dir", str(tmp_path / "r")).stdout
    assert "optimizers   D: Adam, lr 0.0002, momentum 0.8 (the default of `set`)" in said
    assert "             G: SGD, lr 0.0005, momentum 0.9" in said
    assert json.loads(cli_here("status", "--json", "--run-dir", str(tmp_path / "r")).stdout)["optimizers"]["G"][
        "type"] == "SGD"


def test_the_cli_refuses_an_optimizer_the_run_has_not_naming_those_it_has(tmp_path: Path) -> None:
    train_gan(tmp_path / "gan", 1)
    refused = cli_here("set", "lr", "1e-4", "--optimizer", "Gen", "--run-dir", str(tmp_path / "gan"))
    assert refused.returncode == 2 and refused.stderr == (
        f"babysit: error: unknown optimizer 'Gen'; the run in {str(tmp_path / 'gan')!r} has D, G\n")
    model = nn.Linear(2, 1)
    with babysit.Run(tmp_path / "one", model, torch.optim.SGD(model.parameters(), lr=0.1)) as run:
        for _ in run.epochs(1):
            for _ in run.batches(range(2)):
                pass
    refused = cli_here("set", "lr", "1e-4", "--optimizer", "G", "--run-dir", str(tmp_path / "one"))
    assert "has one optimizer, unnamed (leave --optimizer out)" in refused.stderr
    assert RunStore(tmp_path / "gan").commands() == [] and RunStore(tmp_path / "one").commands() == []


def test_a_rollback_restores_both_nets_and_both_optimizers(tmp_path: Path) -> None:
    def remember(run: babysit.Run) -> None:
        run.checkpointer.wait()  # epoch 1's checkpoint, written in the background
        record = run.store.checkpoints()[0]
        remember.state = read_verified(run.run_dir / record["file"], record["sha256"])  # type: ignore[attr-defined]
        run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": record["id"]}, source="test")

    run, nets, optimizers = train_gan(tmp_path / "r", 2, at_step={
        5: queue(cmd.SET_LR, {"value": 5e-4, "optimizer": "G"}), 6: remember})
    saved = remember.state  # type: ignore[attr-defined]
    assert set(saved[KEY_OTHER_OPTIMIZERS]) == {"G"} and any(k.startswith("G.1.running_mean") for k in saved[KEY_MODEL])
    # The run went back to checkpoint #1 (epoch 1, step 4) and trained epoch 2 again on branch 2:
    # the same as never leaving it, both optimizers included (G's lr back at 1e-3).
    store = RunStore(tmp_path / "r")
    assert store.status()["branch"] == 2
    again, again_nets, again_optimizers = train_gan(tmp_path / "straight", 2)
    for name in ("D", "G"):
        for (key, a), b in zip(nets[name].state_dict().items(), again_nets[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)
        assert _equal(optimizers[name].state_dict(), again_optimizers[name].state_dict()), name
    assert optimizers["G"].param_groups[0]["lr"] == 1e-3


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_a_journal_replays_a_nudge_of_a_named_optimizer(tmp_path: Path) -> None:
    train_gan(tmp_path / "r", 1, at_step={2: queue(cmd.SET_LR, {"value": 5e-4, "optimizer": "G"})})
    journal = export_journal(RunStore(tmp_path / "r"))
    assert [(s["set"], s.get("optimizer"), s["step"]) for s in journal["schedule"]] == [("lr", "G", 2)]
    _, _, optimizers = train_gan(tmp_path / "replayed", 1, replay=journal)
    assert optimizers["G"].param_groups[0]["lr"] == 5e-4 and optimizers["D"].param_groups[0]["lr"] == 2e-4
    (row,) = RunStore(tmp_path / "replayed").commands()
    assert row["args"] == {"value": 5e-4, "optimizer": "G"} and row["state"] == "applied"


def test_a_restart_with_an_optimizer_less_refuses_the_checkpoint_naming_both_sides(tmp_path: Path) -> None:
    train_gan(tmp_path / "r", 1)
    nets, optimizers = gan_parts()
    with pytest.raises(Exception, match=r"it holds 2 optimizers \(the first, G\), this run has one optimizer\)"):
        babysit.Run(tmp_path / "r", nets, optimizers["D"])


@pytest.mark.parametrize("model, optimizer, optimizers, message", [
    ((nn.Linear(1, 1), nn.Linear(1, 1)), None, None,
     r"^model must be a torch.nn.Module or a dict of them \(such as \{'D': netD, 'G': netG\}\), got tuple$"),
    ({"D": nn.Linear(1, 1), "G": "netG"}, None, None, r"^model\['G'\] must be a torch.nn.Module, got str$"),
    ({"a.b": nn.Linear(1, 1)}, None, None, r"^model names must be 1 to 32 letters, digits, '_' or '-', got 'a.b'$"),
    (nn.Linear(1, 1), "list", None, r"^optimizer must be one torch optimizer, got a list; give several by name: "),
    (nn.Linear(1, 1), "one", "two", r"^give optimizer= \(one\) or optimizers= \(several, by name\), not both$"),
    (nn.Linear(1, 1), None, [1], r"^optimizers must be a dict of names to torch optimizers"),
    (nn.Linear(1, 1), None, "same", r"^optimizers\['G'\] is the same object as another one"),
])
def test_run_refuses_what_it_cannot_checkpoint_in_one_line_before_anything_is_created(
        tmp_path: Path, model: Any, optimizer: Any, optimizers: Any, message: str) -> None:
    sgd = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    optimizer = {"list": [sgd, sgd], "one": sgd, None: None}[optimizer]
    optimizers = {"two": {"D": sgd}, "same": {"D": sgd, "G": sgd}, None: None}.get(
        optimizers, optimizers) if not isinstance(optimizers, list) else optimizers
    if optimizer is None and optimizers is None:
        optimizer = sgd
    with pytest.raises(SettingsError, match=message):
        babysit.Run(tmp_path / "r", model, optimizer, optimizers=optimizers)
    assert not (tmp_path / "r").exists()


def test_the_chart_s_lr_panel_draws_each_optimizer_s_lr(tmp_path: Path) -> None:
    from babysit.ui.data import read_view
    from babysit.ui.figures import ChartOptions, build_figure

    train_gan(tmp_path / "r", 1, at_step={2: queue(cmd.SET_LR, {"value": 5e-4, "optimizer": "G"})})
    store = RunStore(tmp_path / "r")
    figure = build_figure(read_view(store, store.status()), ChartOptions())
    on_lr_axis = {trace["name"]: trace for trace in figure["data"] if trace.get("yaxis") == "y3" and trace.get("name")}
    assert {"lr", "lr/G"} <= set(on_lr_axis)
    assert on_lr_axis["lr/G"]["y"][0] == 1e-3 and on_lr_axis["lr/G"]["y"][-1] == 5e-4
    assert set(on_lr_axis["lr"]["y"]) == {2e-4}
    nudge = next(t for t in figure["data"] if "of optimizer G" in str(t.get("text") or t.get("hovertext") or ""))
    assert nudge


def test_a_rollback_keeping_the_current_hparams_keeps_every_optimizer_s(tmp_path: Path) -> None:
    def rollback_keeping(run: babysit.Run) -> None:
        run.checkpointer.wait()
        run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": run.store.checkpoints()[0]["id"],
                                                 "hparams": cmd.HPARAMS_CURRENT}, source="test")

    _, _, optimizers = train_gan(tmp_path / "r", 2, at_step={
        5: queue(cmd.SET_LR, {"value": 5e-4, "optimizer": "G"}), 6: rollback_keeping})
    assert RunStore(tmp_path / "r").status()["branch"] == 2
    assert optimizers["G"].param_groups[0]["lr"] == 5e-4 and optimizers["D"].param_groups[0]["lr"] == 2e-4
    # The acknowledgement names every optimizer's lr and momentum, not only the first's.
    rollback = [row for row in RunStore(tmp_path / "r").commands() if row["kind"] == cmd.ROLLBACK][0]
    assert "lr 0.0002, momentum 0.5, lr/G 0.0005, momentum/G 0.9" in cmd.outcome(rollback)


def test_the_branches_comparison_names_another_optimizer_s_change_by_its_series(tmp_path: Path) -> None:
    from babysit.instruments.compare import compare_branches, describe_change

    def rollback_keeping(run: babysit.Run) -> None:
        run.checkpointer.wait()
        run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": run.store.checkpoints()[0]["id"],
                                                 "hparams": cmd.HPARAMS_CURRENT}, source="test")

    train_gan(tmp_path / "r", 2, at_step={5: queue(cmd.SET_LR, {"value": 5e-4, "optimizer": "G"}),
                                          6: rollback_keeping})
    rows = {row.branch: row for row in compare_branches(RunStore(tmp_path / "r")).rows}
    assert rows[2].changed == {"lr/G": (1e-3, 5e-4)}
    assert "lr/G" in describe_change(rows[2].changed)


def test_another_optimizer_s_scheduler_is_checkpointed_and_its_lr_drawn_as_it_moves(tmp_path: Path) -> None:
    nets, optimizers = gan_parts()
    schedule = torch.optim.lr_scheduler.StepLR(optimizers["G"], step_size=1, gamma=0.5)
    with babysit.Run(tmp_path / "r", nets, optimizers=optimizers, scheduler={"G": schedule}) as run:
        for _ in run.epochs(1):
            for _ in run.batches(range(3)):
                optimizers["G"].step()
                schedule.step()
    store = RunStore(tmp_path / "r")
    (info,) = [i for i in store.series() if i.name == "lr/G"]
    assert list(store.chunk_points(info.id, None, None)[1]) == [1e-3, 5e-4, 2.5e-4, 1.25e-4]
    record = store.checkpoints()[-1]
    saved = read_verified(store.run_dir / record["file"], record["sha256"])
    assert saved["schedulers"]["G"]["last_epoch"] == 3 and saved["scheduler"] is None
    with pytest.raises(SettingsError, match=r"^scheduler names 'X' are not optimizers of this run; its optimizers: D, G$"):
        babysit.Run(tmp_path / "other", *gan_parts()[:1], optimizers=gan_parts()[1], scheduler={"X": schedule})


def test_the_guard_s_remedy_halves_the_first_s_lr_and_puts_the_others_back_at_the_checkpoint_s(
        tmp_path: Path) -> None:
    """`set lr 500 --optimizer G` blows a GAN up (here: its weights go NaN): the automatic remedy
    rolls back to the healthy checkpoint with half of D's lr there, and G back at its lr there,
    not at the 500 that blew it up; the event says both."""
    _, _, optimizers = train_gan(tmp_path / "r", 3, guard=GuardConfig(warmup_steps=0, auto_remedy_max=1), at_step={
        5: queue(cmd.SET_LR, {"value": 500.0, "optimizer": "G"}), 6: poison_weights,
        7: lambda run: run.writer.flush()})  # the guard reads step 7's NaN losses now
    store = RunStore(tmp_path / "r")
    assert store.status()["branch"] == 2
    assert optimizers["D"].param_groups[0]["lr"] == 1e-4 and optimizers["G"].param_groups[0]["lr"] == 1e-3
    divergence = next(e for e in store.events() if e["kind"] == "divergence")
    assert "lr 0.0001 (½ × 0.0002, its lr; the other optimizers' lr and momentum as at it)" in divergence["message"]


def test_a_journal_keeps_another_optimizer_s_lr_kept_by_a_rollback_with_the_current_hparams(tmp_path: Path) -> None:
    """G's lr nudged to 5e-4, then a rollback keeping the current hparams: the branch trains with G
    at 5e-4 from the checkpoint on. Its journal says so, and a run replaying it ends as this one."""
    def rollback_keeping(run: babysit.Run) -> None:
        run.checkpointer.wait()
        run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": run.store.checkpoints()[0]["id"],
                                                 "hparams": cmd.HPARAMS_CURRENT}, source="test")

    _, nets, optimizers = train_gan(tmp_path / "r", 2, at_step={
        5: queue(cmd.SET_LR, {"value": 5e-4, "optimizer": "G"}), 6: rollback_keeping})
    journal = export_journal(RunStore(tmp_path / "r"))
    assert [(s["set"], s.get("optimizer"), s["value"], s["step"]) for s in journal["schedule"]] == [
        ("lr", "G", 5e-4, 4)]
    _, replayed_nets, replayed = train_gan(tmp_path / "replayed", 2, replay=journal)
    assert replayed["G"].param_groups[0]["lr"] == optimizers["G"].param_groups[0]["lr"] == 5e-4
    for name in ("D", "G"):
        for a, b in zip(nets[name].state_dict().values(), replayed_nets[name].state_dict().values()):
            assert torch.equal(a, b), name
