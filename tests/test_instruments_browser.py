"""The instruments' click paths in Chromium, against a real trainer subprocess: the probe set (open
"Probe lr", click it, see the command acknowledged, see the probes' table and their overlay from
the fork, and continue with the winner's lr: a set_lr command row, and a resume of the paused
run); the lr sweep (click it, see loss against a log lr, use the suggested lr); and "Compare
branches" (after a rollback: the table and the overlay aligned at the forks, and the same table,
sweep marked, from `python -m babysit branches`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from babysit import commands as cmd
from babysit.instruments.probes import read_probes, winner
from babysit.instruments.sweep import read_sweep
from babysit.store import EXCURSION_DONE, EXCURSION_SWEEP, RunStore
from tests.conftest import babysit_cli, chromium_page, dashboard_of, wait_for

FAST = ("--job", "digits", "--epoch-passes", "1", "--batch-size", "64")  # 23 steps per epoch
PROBE_STEPS = 12
SWEEP_STEPS = 40
PLOT = ".babysit-live-chart .js-plotly-plot"
WAIT_S = 90.0  # one acknowledgement or probe set, on two cores shared with Chromium and Streamlit


def open_and_click(page: Any, url: str, steps_key: str, steps: int, button_key: str) -> None:
    """Open the page and its "Probe lr · lr sweep" panel, type the steps, click the button."""
    page.goto(url)
    page.locator(PLOT).first.wait_for()
    page.locator(".st-key-excursions_panel summary").click()
    field = page.locator(f".st-key-{steps_key} input")
    field.fill(str(steps))
    field.press("Enter")
    page.wait_for_function("([key, v]) => document.querySelector(`.st-key-${key} input`).value === v",
                           arg=[steps_key, str(steps)])
    page.locator(f".st-key-{button_key} button").first.click()  # a button with help is drawn twice


def test_probe_lr_from_the_page_then_continue_with_the_winner(tmp_path: Path, trainers) -> None:
    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--epochs", "500", *FAST)
    trainer.wait_running(min_step=1)
    store = RunStore(run_dir)
    with dashboard_of(run_dir, tmp_path) as url:
        with chromium_page(1366, 900, timeout_s=WAIT_S) as (page, errors):
            open_and_click(page, url, "probe_steps", PROBE_STEPS, "probe_lr")
            # Acknowledged where every click's fate shows, then applied by the trainer.
            described = f"probe lr ×0.5, ×1, ×2 for {PROBE_STEPS} steps from now"
            page.locator('[data-testid="stAlert"]').filter(
                has_text=re.compile(rf"#\d+ {re.escape(described)}: (pending|applied)")).first.wait_for()
            excursion = wait_for(lambda: next((e for e in store.excursions() if e["state"] == EXCURSION_DONE), None),
                                 timeout=WAIT_S, what="the probe set to finish")
            # The results: a row per probe with the winner marked, and the three probes drawn from the fork.
            table = page.locator(".st-key-probe_table")
            table.wait_for()
            page.wait_for_function("""() => Array.from(document.querySelectorAll('.babysit-live-chart .js-plotly-plot'))
                .some((gd) => gd.data && gd.data.filter((t) => /probe #\\d+/.test(t.name) && !t.meta.raw).length === 3
                      && gd._fullLayout.xaxis.title.text === 'steps since the fork')""")
            adopt = page.locator(".st-key-probe_adopt_value button").first
            adopt.wait_for()
            best = winner(read_probes(store, excursion["id"]))
            assert best is not None and f"({best.value:.4g})" in adopt.inner_text()
            wait_for(lambda: store.status().get("state") == "paused", timeout=WAIT_S, what="the pause after the probes")
            adopt.click()
            rows = wait_for(lambda: [c for c in store.commands() if c["kind"] == cmd.SET_LR] or None,
                            timeout=WAIT_S, what="the set_lr command row")
            assert [(c["args"], c["source"]) for c in rows] == [({"value": best.value}, "dashboard")]
            resumed = wait_for(lambda: [c for c in store.commands() if c["kind"] == cmd.RESUME] or None,
                               timeout=WAIT_S, what="the resume command row")
            assert resumed[0]["id"] > rows[0]["id"]
            applied = wait_for(lambda: (row := store.command(rows[0]["id"]))["state"] == cmd.APPLIED and row,
                               timeout=WAIT_S, what="the winner's lr applied")
            # On the run's own branch, where the probes left it.
            assert applied["result"]["after"] == best.value and applied["branch"] == excursion["origin_branch"]
            assert errors == []


def test_an_lr_sweep_from_the_page_then_its_lr_then_compare_branches(tmp_path: Path, trainers) -> None:
    run_dir = tmp_path / "run"
    trainer = trainers(run_dir, "--epochs", "500", *FAST)
    trainer.wait_running(min_step=1)
    store = RunStore(run_dir)
    with dashboard_of(run_dir, tmp_path) as url:
        with chromium_page(1366, 900, timeout_s=WAIT_S) as (page, errors):
            open_and_click(page, url, "sweep_steps", SWEEP_STEPS, "lr_sweep")
            page.locator('[data-testid="stAlert"]').filter(
                has_text=re.compile(rf"#\d+ lr sweep over {SWEEP_STEPS} steps: (pending|applied)")).first.wait_for()
            sweep = wait_for(lambda: next((e for e in store.excursions() if e["kind"] == EXCURSION_SWEEP
                                           and e["state"] == EXCURSION_DONE), None),
                             timeout=WAIT_S, what="the sweep to finish")
            wait_for(lambda: store.status().get("state") == "paused", timeout=WAIT_S, what="the pause after the sweep")
            # Loss against lr, on a log axis, and the suggestion's button.
            page.wait_for_function("""() => Array.from(document.querySelectorAll('.babysit-live-chart .js-plotly-plot'))
                .some((gd) => gd._fullLayout && gd._fullLayout.xaxis.type === 'log'
                      && gd._fullLayout.xaxis.title.text === 'lr (log)')""")
            reading = read_sweep(store, sweep["id"])
            assert reading is not None and reading.suggested_lr is not None, reading
            chosen = float(f"{reading.suggested_lr:.3g}")
            # The panel reads the sweep as it goes: wait for its reading of the whole sweep.
            page.wait_for_function("""(label) => Array.from(document.querySelectorAll('.st-key-sweep_use_lr button'))
                .some((b) => b.innerText.includes(label))""", arg=f"Use lr {chosen:.3g}")
            page.locator(".st-key-sweep_use_lr button").first.click()
            row = wait_for(lambda: next((c for c in store.commands() if c["kind"] == cmd.SET_LR), None),
                           timeout=WAIT_S, what="the set_lr command row")
            assert (row["args"], row["source"]) == ({"value": chosen}, "dashboard")
            applied = wait_for(lambda: (found := store.command(row["id"]))["state"] == cmd.APPLIED and found,
                               timeout=WAIT_S, what="the suggested lr applied")
            assert applied["result"]["after"] == chosen and applied["branch"] == sweep["origin_branch"]
            # A rollback (from the CLI), then the comparison of the two lines, aligned at their forks.
            first = store.checkpoints()[0]
            babysit_cli("rollback", str(first["id"]), "--run-dir", str(run_dir), "--wait", check=True)
            rolled = store.status()["branch"]  # and running again: a rollback ends the pause
            wait_for(lambda: (store.status().get("step") or 0) >= first["step"] + 5, timeout=WAIT_S,
                     what="steps on the rollback's branch")
            page.locator(".st-key-compare_panel summary").click()
            table = page.locator(".st-key-compare_table")
            table.wait_for()
            page.wait_for_function("""(rolled) => Array.from(document.querySelectorAll('.babysit-live-chart .js-plotly-plot'))
                .some((gd) => gd._fullLayout && gd._fullLayout.xaxis.title.text === 'steps since the fork'
                      && gd.data.some((t) => /^branch 1\\b/.test(t.name))
                      && gd.data.some((t) => t.name.startsWith('branch ' + rolled + ' ')))""", arg=rolled)
            assert errors == []
    listed = babysit_cli("branches", "--run-dir", str(run_dir), check=True).stdout
    rows = [line.replace("*", " ").split() for line in listed.splitlines()[1:] if line[:1].isdigit()]  # * the trainer's
    kinds = {row[0]: row[1] for row in rows}
    sweep_branch = sweep["branches"][0]["branch"]
    assert kinds[str(sweep_branch)] == "sweep" and kinds["1"] == "run" and kinds[str(rolled)] == "run", listed
