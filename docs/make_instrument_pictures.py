"""The pictures of the panda's instruments in docs/instruments.md, made from real runs: regenerate
them with

    python docs/make_instrument_pictures.py          # a few minutes: two digits runs

It starts real trainers (`python -m babysit train --job digits`) and a real dashboard, opens the
page in Chromium, and uses each instrument the way docs/instruments.md describes, through the CLI
(the same commands the page's buttons queue):

1. an lr sweep after the first epoch, then the panel with loss against lr    -> instruments-sweep.png
2. a probe set of lr ×½ ×1 ×2 from now, then the panel with its overlay and table -> instruments-probes.png
3. a rollback with a new lr, then "Compare branches" on the three lines      -> instruments-compare.png
4. the run paused, "Journal to #N" under the checkpoints, built and offered -> instruments-journal.png
5. a second run at a far too small lr: its "no progress" hint by the controls -> instruments-hints.png

Each picture is the part of the page that shows the instrument (the whole screen for the hints,
which sit in the cockpit), stored as a small palette PNG. A JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docs"))

from make_pictures import VIEWPORT, background, dashboard_url, shrink  # noqa: E402

from babysit.store import RunStore  # noqa: E402
from bench.browser_render import free_port  # noqa: E402
from bench.demo_curve import babysit  # noqa: E402
from bench.demo_curve import wait_until as until  # noqa: E402
from tests.conftest import chromium_page  # noqa: E402

WAIT_S = 600.0
EPOCH_PASSES = "2"  # digits epochs of ~90 steps: a few seconds each, so the pictures come quickly


def trainer(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "babysit", "train", "--job", "digits", "--run-dir", str(run_dir),
            "--epochs", "1000", "--epoch-passes", EPOCH_PASSES, *extra]


def epochs_done(store: RunStore, branch: int | None = None) -> int:
    return max((c["epoch"] for c in store.checkpoints() if c["reason"] == "epoch"
                and (branch is None or c["branch"] == branch)), default=0)


def expander(page: Any, label: str) -> Any:
    """The expander with ``label``, opened (a click on its summary when it is closed)."""
    box = page.locator('[data-testid="stExpander"]').filter(has_text=label).first
    box.wait_for()
    if box.locator("details[open]").count() == 0 and box.get_attribute("open") is None:
        box.locator("summary").first.click()
    return box


def snap(locator: Any, path: Path, summary: dict[str, Any]) -> None:
    locator.page.wait_for_timeout(2500)  # the fragments refresh every second or two: let them settle
    locator.screenshot(path=str(path))
    shrink(path)
    summary["pictures"].append(path.name)


def instruments(out: Path, scratch: Path) -> dict[str, Any]:
    run_dir, plateau_dir = scratch / "digits", scratch / "plateau"
    dashboard = [sys.executable, "-m", "babysit", "dashboard", "--root", str(scratch), "--port", str(free_port())]
    summary: dict[str, Any] = {"viewport": VIEWPORT, "pictures": []}

    def cli(*args: str, where: Path = run_dir) -> str:
        return babysit(*args, "--run-dir", str(where), "--wait", "--timeout", str(WAIT_S)).strip()

    with background(trainer(run_dir), scratch / "trainer.log") as job, \
            background(dashboard, scratch / "dashboard.log") as server, \
            chromium_page(*VIEWPORT, timeout_s=120) as (page, errors):
        store = until("the run store", lambda: (run_dir / "run.db").exists() and RunStore(run_dir))
        url = until("the dashboard's URL", lambda: dashboard_url(server))
        until("the first epoch", lambda: epochs_done(store) >= 1, timeout=WAIT_S)
        page.goto(url)

        # 1. The lr sweep early on, while the loss still falls (it pauses the run when it is done).
        summary["sweep"] = cli("sweep", "--steps", "150")
        panel = expander(page, "Probe lr · lr sweep")
        panel.get_by_text("lr sweep #").first.wait_for()
        snap(panel, out / "instruments-sweep.png", summary)
        babysit("resume", "--run-dir", str(run_dir), "--wait")

        # 2. Two epochs later, probe lr ×½ ×1 ×2 for 60 steps each from now; the run carries on.
        until("three epochs", lambda: epochs_done(store) >= 3, timeout=WAIT_S)
        summary["probe"] = cli("probe", "--steps", "60", "--then", "continue")
        panel = expander(page, "Probe lr · lr sweep")
        panel.get_by_text("Probe set #").first.wait_for()
        snap(panel, out / "instruments-probes.png", summary)

        # 3. Roll back two epochs with a doubled lr, train two epochs there, and compare.
        origin = next(c for c in reversed(store.checkpoints()) if c["reason"] == "epoch"
                      and c["epoch"] == epochs_done(store) - 2)
        summary["rollback"] = cli("rollback", str(origin["id"]), "--lr", "0.1")
        branch = store.status()["branch"]
        until("two epochs on the new branch", lambda: epochs_done(store, branch) >= origin["epoch"] + 2,
              timeout=WAIT_S)
        snap(expander(page, "Compare branches"), out / "instruments-compare.png", summary)

        # 4. The journal of the newest checkpoint, from the page.
        babysit("pause", "--run-dir", str(run_dir), "--wait")  # the newest checkpoint stays the newest
        journal = page.get_by_role("button", name="Journal to #").first
        journal.scroll_into_view_if_needed()
        journal.click()
        page.get_by_role("button", name="Download").first.wait_for()
        page.mouse.move(5, 5)  # no tooltip over the table
        page.wait_for_timeout(2500)
        box = journal.bounding_box()  # the checkpoint table above the buttons, and the buttons
        page.screenshot(path=str(out / "instruments-journal.png"), clip={
            "x": max(0, box["x"] - 16), "y": max(0, box["y"] - 330), "width": 620, "height": 400})
        shrink(out / "instruments-journal.png")
        summary["pictures"].append("instruments-journal.png")
        babysit("stop", "--run-dir", str(run_dir), "--wait")
        job.wait(timeout=WAIT_S)

        # 5. A run at lr 1e-7 stays flat from its first steps: the hint that its lr is too low.
        with background(trainer(plateau_dir, "--lr", "1e-7"), scratch / "plateau.log") as flat:
            plateau = until("the plateau run's store", lambda: (plateau_dir / "run.db").exists()
                            and RunStore(plateau_dir))
            until("four epochs", lambda: epochs_done(plateau) >= 4, timeout=WAIT_S)
            page.goto(url)  # a new session opens on the run being trained
            page.get_by_text("No progress: lr likely too low").first.wait_for(timeout=WAIT_S * 1000)
            page.wait_for_timeout(2500)
            page.screenshot(path=str(out / "instruments-hints.png"))
            shrink(out / "instruments-hints.png")
            summary["pictures"].append("instruments-hints.png")
            babysit("stop", "--run-dir", str(plateau_dir), "--wait")
            flat.wait(timeout=WAIT_S)
        summary["page_errors"] = errors
    summary["sizes"] = {name: (out / name).stat().st_size for name in summary["pictures"]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go (default docs/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="babysit-instrument-pictures-") as scratch:
        summary = instruments(args.out, Path(scratch))
    print(json.dumps(summary, indent=2))
    return 1 if summary["page_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
