"""The page's instruments with Streamlit's AppTest: the probe and sweep buttons queue the right
commands, the winner's buttons continue the run, the comparison shows, and nothing is read while
the panels are closed."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from babysit import commands as cmd
from babysit.store import EXCURSION_PROBE, RunStore
from tests.conftest import REPO
from tests.test_instruments_compare import build


def live(store: RunStore, state: str = "paused") -> RunStore:
    """Say a trainer (this test process) is alive on branch 1, as after a probe set with then=pause."""
    store.write_status(state=state, pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                       heartbeat=time.time(), epoch=5, max_epochs=10, step=500, step_in_epoch=100, steps_per_epoch=100,
                       branch=1, lr=0.1, momentum=0.9, optimizer="SGD", message="")
    return store


@pytest.fixture
def page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["app.py", "--root", str(tmp_path), "--run", str(tmp_path / "run")])
    monkeypatch.delenv("BABYSIT_TOKEN", raising=False)

    def start(*, open_panels: bool = True) -> AppTest:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
        at.run()  # a session's first run draws the curve alone
        if open_panels:
            at.session_state["excursions_panel"] = True
            at.session_state["compare_panel"] = True
        at.run()
        assert not at.exception, at.exception
        return at

    return start


def frame(at: AppTest, column: str):
    """The table on the page that has ``column`` (AppTest does not carry a dataframe's key)."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def queued(store: RunStore) -> list[tuple[str, dict]]:
    return [(c["kind"], c["args"]) for c in store.commands()]


def test_nothing_is_read_or_drawn_while_the_panels_are_closed(page, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from babysit.ui import instruments_panel

    live(build(tmp_path / "run"))
    calls: list[str] = []
    for name in ("read_probes", "read_sweep"):
        original = getattr(instruments_panel.prb if name == "read_probes" else instruments_panel.swp, name)
        monkeypatch.setattr(instruments_panel.prb if name == "read_probes" else instruments_panel.swp, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    original_compare = instruments_panel.cmp.compare_branches
    monkeypatch.setattr(instruments_panel.cmp, "compare_branches",
                        lambda *a, **k: calls.append("compare") or original_compare(*a, **k))
    at = page(open_panels=False)
    assert [e.label for e in at.expander] == ["Probe lr · lr sweep", "Compare branches"]
    assert calls == []
    at.session_state["excursions_panel"] = True
    at.run()
    assert "read_probes" in calls and "read_sweep" in calls and "compare" in calls  # the probe overlay's rows
    calls.clear()
    at.session_state["excursions_panel"] = False
    at.session_state["compare_panel"] = True
    at.run()
    assert calls == ["compare"]  # the chosen branches


def test_probe_lr_queues_the_probe_the_controls_say(page, tmp_path: Path) -> None:
    store = live(build(tmp_path / "run"), state="running")
    at = page()
    at.text_input(key="probe_factors").input("0.25, 1, 4").run()
    at.number_input(key="probe_steps").set_value(40).run()
    at.selectbox(key="probe_from").set_value(3).run()
    at.radio(key="probe_then").set_value(cmd.THEN_CONTINUE).run()
    at.button(key="probe_lr").click().run()
    assert not at.exception, at.exception
    assert queued(store) == [(cmd.PROBE, {"param": "lr", "factors": [0.25, 1.0, 4.0], "steps": 40, "checkpoint": 3,
                                          "then": cmd.THEN_CONTINUE})]
    assert at.toast[-1].value.startswith("Sent #1: probe lr ×0.25, ×1, ×4 for 40 steps from #3")
    at.text_input(key="probe_factors").input("0.5, -2").run()
    at.button(key="probe_lr").click().run()
    assert len(queued(store)) == 1  # refused, nothing queued, and it says why
    assert any("probe factors must be finite numbers > 0" in e.value for e in at.error)


def test_the_probe_results_name_the_winner_and_continue_with_it(page, tmp_path: Path) -> None:
    store = live(build(tmp_path / "run"))
    at = page()
    table = frame(at, "winner")
    assert table["branch"].tolist() == [3, 4] and table["winner"].tolist() == ["", "★"]
    assert table["steps"].tolist() == ["60 / 60", "60 / 60"]
    at.button(key="probe_adopt_value").click().run()
    # The run waits paused after its probes: the winner's lr, then resume.
    assert queued(store) == [(cmd.SET_LR, {"value": 0.2}), (cmd.RESUME, {})]
    at.button(key="probe_adopt_branch").click().run()
    assert queued(store)[-1] == (cmd.ROLLBACK, {"checkpoint": 7, "hparams": cmd.HPARAMS_CHECKPOINT})


def test_the_sweep_suggests_an_lr_to_use(page, tmp_path: Path) -> None:
    store = live(build(tmp_path / "run"), state="running")
    at = page()
    text = " ".join(m.value for m in at.markdown)
    assert "steepest descent: lr **0.0621**" in text and "divergence: lr **3.857**" in text
    at.button(key="sweep_use_lr").click().run()
    assert queued(store) == [(cmd.SET_LR, {"value": 0.0621})]
    at.text_input(key="sweep_lr_min").input("1e-4").run()
    at.text_input(key="sweep_lr_max").input("1").run()
    at.button(key="lr_sweep").click().run()
    assert queued(store)[-1] == (cmd.SWEEP, {"steps": cmd.SWEEP_DEFAULT_STEPS, "lr_min": 1e-4, "lr_max": 1.0})


def test_a_running_excursion_can_be_cancelled(page, tmp_path: Path) -> None:
    store = live(build(tmp_path / "run"), state="running")
    running = store.add_excursion(kind=EXCURSION_PROBE, command=None, origin_branch=1, origin_step=500,
                                  from_checkpoint=5, return_checkpoint=5, spec={"param": "lr", "steps": 50})
    at = page(open_panels=False)
    assert at.session_state["excursions_panel"] is True  # opens by itself while one runs
    assert any(f"probe set #{running}: probe 1 running" in i.value for i in at.info)
    at.button(key="excursion_cancel").click().run()
    assert queued(store) == [(cmd.CANCEL, {"excursion": running})]


def test_the_comparison_shows_the_chosen_branches_aligned(page, tmp_path: Path) -> None:
    live(build(tmp_path / "run"))
    at = page()
    assert at.multiselect(key="compare_branches").value == [1, 2, 3, 4]  # the sweep is left out by default
    table = frame(at, "changed")
    assert table["kind"].tolist() == ["run", "run", "probe #1", "probe #1"]
    assert table["changed"].tolist() == ["–", "lr 0.1 → 0.05", "lr 0.1 → 0.05", "lr 0.1 → 0.2"]
    assert "loss @ +60 steps" in table.columns and table["best epoch"].tolist()[:2] == [4, 4]
    at.multiselect(key="compare_branches").set_value([1, 2]).run()
    table = frame(at, "changed")
    assert table["branch"].tolist() == ["1 (trainer)", "2"] and "loss @ +300 steps" in table.columns
