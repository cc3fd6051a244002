"""Reading and writing lr and momentum on real torch optimizers and schedulers."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from babysit import optim
from babysit.commands import CommandError


def _params(n: int = 1) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]


def _groups(*lrs: float) -> list[dict[str, Any]]:
    return [{"params": [p], "lr": lr} for p, lr in zip(_params(len(lrs)), lrs)]


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


# -- read ------------------------------------------------------------------------------------
def test_read_sgd_with_momentum():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    assert optim.momentum_key(opt) == "momentum"
    assert optim.read_hparams(opt) == {"lr": 0.1, "momentum": 0.9}


def test_read_plain_sgd_reports_momentum_zero():
    opt = torch.optim.SGD(_params(), lr=0.1)
    assert optim.read_hparams(opt) == {"lr": 0.1, "momentum": 0.0}


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam])
def test_read_adam_family_uses_beta1(cls):
    opt = cls(_params(), lr=1e-3, betas=(0.85, 0.98))
    assert optim.momentum_key(opt) == "betas"
    assert optim.read_hparams(opt) == {"lr": 1e-3, "momentum": 0.85}


def test_read_rmsprop_uses_momentum():
    opt = torch.optim.RMSprop(_params(), lr=0.01, momentum=0.5)
    assert optim.momentum_key(opt) == "momentum"
    assert optim.read_hparams(opt) == {"lr": 0.01, "momentum": 0.5}


def test_read_optimizer_without_momentum():
    opt = torch.optim.Adagrad(_params(), lr=0.01)
    assert optim.momentum_key(opt) is None
    assert optim.read_hparams(opt) == {"lr": 0.01, "momentum": None}


def test_read_tensor_lr_as_float():
    opt = torch.optim.Adam(_params(), lr=torch.tensor(0.02))
    hparams = optim.read_hparams(opt)
    assert type(hparams["lr"]) is float
    assert hparams["lr"] == pytest.approx(0.02, rel=1e-7)


# -- set lr ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: torch.optim.RMSprop(p, lr=0.01),
        lambda p: torch.optim.Adagrad(p, lr=0.01),
    ],
)
def test_set_lr_writes_exactly_and_returns_the_read_back(make: Callable[[Any], torch.optim.Optimizer]):
    opt = make(_params())
    before_momentum = optim.read_hparams(opt)["momentum"]
    assert optim.set_lr(opt, 0.0375) == 0.0375
    assert opt.param_groups[0]["lr"] == 0.0375
    assert optim.read_hparams(opt) == {"lr": 0.0375, "momentum": before_momentum}


def test_set_lr_keeps_the_ratios_between_groups():
    opt = torch.optim.SGD(_groups(0.1, 0.01, 0.3), lr=0.1, momentum=0.9)
    assert 0.1 * (0.013 / 0.1) != 0.013  # so the next line tells "exactly" from "scaled"
    assert optim.set_lr(opt, 0.013) == 0.013
    lrs = _lrs(opt)
    assert lrs[0] == 0.013  # exactly what was asked, not 0.1 * (0.013 / 0.1)
    assert lrs[1] == pytest.approx(0.0013, rel=1e-12)
    assert lrs[2] == pytest.approx(0.039, rel=1e-12)
    assert lrs[1] / lrs[0] == pytest.approx(0.1, rel=1e-12)
    assert lrs[2] / lrs[0] == pytest.approx(3.0, rel=1e-12)


def test_set_lr_from_zero_sets_every_group():
    opt = torch.optim.SGD(_groups(0.0, 0.5), lr=0.0)
    assert optim.set_lr(opt, 0.2) == 0.2
    assert _lrs(opt) == [0.2, 0.2]


def test_set_lr_updates_a_tensor_lr_in_place():
    opt = torch.optim.Adam(_params(), lr=torch.tensor(0.01))
    lr_tensor = opt.param_groups[0]["lr"]
    assert optim.set_lr(opt, 0.005) == pytest.approx(0.005, rel=1e-7)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.005, rel=1e-7)


def test_set_lr_does_not_touch_momentum():
    opt = torch.optim.Adam(_params(), lr=1e-3, betas=(0.8, 0.95))
    optim.set_lr(opt, 1e-4)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)


# -- set momentum ----------------------------------------------------------------------------
def test_set_momentum_sgd_every_group():
    opt = torch.optim.SGD(_groups(0.1, 0.01), lr=0.1, momentum=0.9)
    assert optim.set_momentum(opt, 0.5) == 0.5
    assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.5]
    assert optim.read_hparams(opt) == {"lr": 0.1, "momentum": 0.5}


def test_set_momentum_sgd_to_zero_is_allowed_without_nesterov():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    assert optim.set_momentum(opt, 0.0) == 0.0
    assert opt.param_groups[0]["momentum"] == 0.0


def test_set_momentum_sgd_nesterov():
    opt = torch.optim.SGD(_groups(0.1, 0.01), lr=0.1, momentum=0.9, nesterov=True)
    assert optim.set_momentum(opt, 0.95) == 0.95
    assert [g["momentum"] for g in opt.param_groups] == [0.95, 0.95]


def test_set_momentum_zero_refused_for_nesterov_and_nothing_changes():
    opt = torch.optim.SGD(_groups(0.1, 0.01), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(CommandError, match=r"^momentum must be > 0 for SGD with nesterov=True, got 0\.0$"):
        optim.set_momentum(opt, 0.0)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]


def test_set_momentum_zero_refused_when_only_a_later_group_is_nesterov():
    params = _params(2)
    opt = torch.optim.SGD(
        [{"params": [params[0]]}, {"params": [params[1]], "nesterov": True}], lr=0.1, momentum=0.9
    )
    with pytest.raises(CommandError, match="nesterov=True"):
        optim.set_momentum(opt, 0.0)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_set_momentum_adam_writes_beta1_and_keeps_beta2(cls):
    params = _params(2)
    opt = cls([{"params": [params[0]], "betas": (0.9, 0.999)}, {"params": [params[1]], "betas": (0.9, 0.98)}],
              lr=1e-3)
    assert optim.set_momentum(opt, 0.8) == 0.8
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.999), (0.8, 0.98)]
    assert optim.read_hparams(opt) == {"lr": 1e-3, "momentum": 0.8}


def test_set_momentum_adam_then_step_uses_the_new_beta1():
    # After the write a real step runs with the new beta1: exp_avg = (1 - beta1) * grad.
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([param], lr=1e-3)
    optim.set_momentum(opt, 0.5)
    param.grad = torch.tensor([1.0, 2.0, 4.0])
    opt.step()
    assert torch.equal(opt.state[param]["exp_avg"], torch.tensor([0.5, 1.0, 2.0]))


def test_set_momentum_rmsprop():
    opt = torch.optim.RMSprop(_params(), lr=0.01, momentum=0.0)
    assert optim.set_momentum(opt, 0.9) == 0.9
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["alpha"] == 0.99  # RMSprop's own smoothing is not momentum


def test_rmsprop_nudged_from_no_momentum_steps_on_as_if_it_had_started_with_a_zero_buffer():
    params = _params()
    opt = torch.optim.RMSprop(params, lr=0.01)  # momentum 0: no buffer after its first step
    params[0].grad = torch.tensor([1.0, -2.0])
    opt.step()
    assert optim.set_momentum(opt, 0.5) == 0.5
    before = params[0].detach().clone()
    grad = params[0].grad = torch.tensor([0.5, 0.25])
    opt.step()  # raised KeyError: 'momentum_buffer' before
    state = opt.state[params[0]]
    # From a zero buffer: buf = 0.5 * 0 + grad / (sqrt(square_avg) + eps), then param -= lr * buf.
    expected = grad / (state["square_avg"].sqrt() + opt.param_groups[0]["eps"])
    assert torch.allclose(state["momentum_buffer"], expected)
    assert torch.allclose(params[0].detach(), before - 0.01 * expected)


def test_set_momentum_without_momentum_is_refused_and_nothing_changes():
    opt = torch.optim.Adagrad(_params(), lr=0.01)
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
    with pytest.raises(
        CommandError,
        match=r"^Adagrad has no momentum to set; accepted for optimizers with 'momentum' \(SGD, RMSprop\) "
              r"or 'betas' \(Adam, AdamW\)$",
    ):
        optim.set_momentum(opt, 0.9)
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups] == before
    assert "momentum" not in opt.param_groups[0]


# -- restore ---------------------------------------------------------------------------------
def test_restore_hparams_sets_lr_and_momentum():
    opt = torch.optim.SGD(_groups(0.1, 0.05), lr=0.1, momentum=0.9)
    optim.restore_hparams(opt, {"lr": 0.02, "momentum": 0.8})
    assert optim.read_hparams(opt) == {"lr": 0.02, "momentum": 0.8}
    assert _lrs(opt)[1] == pytest.approx(0.01, rel=1e-12)


def test_restore_hparams_skips_missing_values():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    optim.restore_hparams(opt, {"lr": None, "momentum": None})
    assert optim.read_hparams(opt) == {"lr": 0.1, "momentum": 0.9}
    optim.restore_hparams(opt, {"momentum": 0.7})
    assert optim.read_hparams(opt) == {"lr": 0.1, "momentum": 0.7}


def test_restore_hparams_ignores_momentum_for_an_optimizer_without_it():
    opt = torch.optim.Adagrad(_params(), lr=0.01)
    optim.restore_hparams(opt, {"lr": 0.03, "momentum": 0.9})
    assert optim.read_hparams(opt) == {"lr": 0.03, "momentum": None}


# -- schedulers ------------------------------------------------------------------------------
# The promise (set_lr's docstring): the scheduler's own lr sources are scaled with the nudge, so its
# next step does not silently undo it. Concretely: after set_lr(new), every later lr of every group
# is new / old times the lr the same schedule gives a twin that was not nudged.
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.4, 0.04], total_steps=30),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=[0.01, 0.001], max_lr=[0.1, 0.01], step_size_up=4),
    # The usual warm-up then cosine: the wrapper's children keep base_lrs of their own.
    "SequentialLR(LinearLR, CosineAnnealingLR)": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3),
              torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)], milestones=[6]),
}


def _step(opt: torch.optim.Optimizer, scheduler: Any) -> None:
    opt.step()  # no gradients: changes nothing, but keeps the scheduler's call-order check quiet
    scheduler.step()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_step_after_set_lr_keeps_the_nudge(name: str):
    nudged = torch.optim.SGD(_groups(0.1, 0.01), lr=0.1, momentum=0.9)
    twin = torch.optim.SGD(_groups(0.1, 0.01), lr=0.1, momentum=0.9)
    nudged_sched, twin_sched = SCHEDULERS[name](nudged), SCHEDULERS[name](twin)
    for _ in range(4):
        _step(nudged, nudged_sched)
        _step(twin, twin_sched)
    assert _lrs(nudged) == _lrs(twin)

    old = _lrs(nudged)[0]
    new = old / 4
    assert optim.set_lr(nudged, new, nudged_sched) == new
    assert _lrs(nudged)[0] == new
    assert nudged_sched.get_last_lr() == _lrs(nudged)

    for _ in range(12):  # crosses StepLR's decays, the cosine's turn, CyclicLR's peak, SequentialLR's switch
        _step(nudged, nudged_sched)
        _step(twin, twin_sched)
        assert _lrs(nudged) == pytest.approx([lr / 4 for lr in _lrs(twin)], rel=1e-9)
        assert optim.read_hparams(nudged)["lr"] == _lrs(nudged)[0]
        assert nudged_sched.get_last_lr() == pytest.approx(_lrs(nudged), rel=1e-12)


def test_set_lr_without_the_scheduler_is_undone_by_lambda_lr():
    # The reason the scheduler must be passed: LambdaLR recomputes the lr from base_lrs.
    opt = torch.optim.SGD(_params(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    optim.set_lr(opt, 0.01)
    _step(opt, scheduler)
    assert _lrs(opt) == [0.1]


def test_set_lr_scales_lambda_lr_base_lrs_and_initial_lr():
    opt = torch.optim.SGD(_groups(0.2, 0.02), lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    optim.set_lr(opt, 0.1, scheduler)
    assert scheduler.base_lrs == pytest.approx([0.1, 0.01], rel=1e-12)
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01], rel=1e-12)


def test_set_lr_scales_one_cycle_group_keys():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=20)
    group = opt.param_groups[0]
    before = {k: group[k] for k in ("initial_lr", "max_lr", "min_lr")}
    factor = 0.5
    optim.set_lr(opt, group["lr"] * factor, scheduler)
    assert {k: group[k] for k in before} == pytest.approx({k: v * factor for k, v in before.items()}, rel=1e-12)
