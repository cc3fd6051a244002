"""The README's pictures, made from a real first session with the demo: regenerate them all with

    python docs/make_pictures.py            # about as long as 45 demo epochs
    python docs/make_pictures.py --fast     # a smoke run with 20-step epochs

It starts a real trainer (`python -m babysit train`, the default job at its default settings) and
a real dashboard (`python -m babysit dashboard`), opens the page in Chromium at a laptop's
1366×768, and goes through the README's walk-through with the page's own controls, clicked as a
person clicks them (nothing is sent from a terminal):

1. watch the curve until it flattens (epoch ``PLATEAU_EPOCH``)          -> walkthrough-1-plateau.png
2. lr × ½, and two epochs later the drop (zoomed on the last epochs)      -> walkthrough-2-halved.png
3. × 2 clicked twice (lr × 4): the loss climbs back                       -> walkthrough-3-bad-x4.png
4. pause, pick the checkpoint before it, roll back with its lr            -> dashboard.png
5. lr 500 typed in: the loss blows up, the guard pauses, the remedy offers
   half the healthy checkpoint's lr                                       -> walkthrough-5-blow-up.png
6. the remedy clicked: the curve after a blow-up, readable                -> walkthrough-6-remedy.png

Each picture is the page, taken once the chart has drawn the latest step, and stored as a small
palette PNG. A JSON summary of what happened (each command's fate) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from babysit.jobs.charlm import CharLMConfig  # noqa: E402
from babysit.store import RunStore  # noqa: E402
from babysit import commands as cmd  # noqa: E402
from bench.browser_render import free_port  # noqa: E402
from bench.demo_curve import AFTER, PLATEAU_EPOCH, babysit  # noqa: E402
from bench.demo_curve import wait_until as until  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402
from tests.conftest import chromium_page  # noqa: E402

VIEWPORT = (1366, 768)  # a laptop screen: the cockpit fits the curve and the controls in it
URL_LINE = re.compile(r"babysit: dashboard at (http://127\.0\.0\.1:\d+)")
WAIT_S = 600.0
CLICK_GAP_MS = 500  # between two clicks of a hand on the same button
BLOW_UP_LR = 500  # an lr no model survives: the loss is NaN within a few steps
FAST_STEPS = 20  # steps per epoch in --fast
# The largest step drawn on any chart of the page (whatever the layout and the trace names).
DRAWN_UP_TO = """() => Math.max(-1, ...Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(
    (gd) => (gd.data || []).flatMap((t) => Array.from(t.x || []).filter((v) => typeof v === 'number'))))"""


@contextmanager
def background(command: list[str], log: Path) -> Iterator[subprocess.Popen[str]]:
    """A babysit process for the length of the block; its output is kept in ``log``."""
    lines: list[str] = []
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def keep() -> None:
        with open(log, "w") as out:
            for line in process.stdout:  # type: ignore[union-attr]
                lines.append(line)
                out.write(line)
                out.flush()

    threading.Thread(target=keep, daemon=True).start()
    process.lines = lines  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def dashboard_url(server: subprocess.Popen[str]) -> str | None:
    found = next((m.group(1) for line in server.lines if (m := URL_LINE.search(line))), None)  # type: ignore[attr-defined]
    if not found and server.poll() is not None:
        raise RuntimeError(f"the dashboard ended:\n{''.join(server.lines)}")  # type: ignore[attr-defined]
    return found


def epoch_checkpoint(store: RunStore, epoch: int, branch: int) -> dict[str, Any] | None:
    return next((c for c in store.checkpoints() if c["reason"] == "epoch" and c["epoch"] == epoch
                 and c["branch"] == branch), None)


def completed_epochs(store: RunStore, branch: int) -> int:
    return max((c["epoch"] for c in store.checkpoints() if c["reason"] == "epoch" and c["branch"] == branch), default=0)


def shoot(page: Any, store: RunStore, path: Path) -> None:
    """Wait until the chart has drawn the trainer's current step, let the page settle, take the picture."""
    step = store.status()["step"] or 0
    until(f"the chart to draw step {step}", lambda: page.evaluate(DRAWN_UP_TO) >= step - 2, timeout=120)
    page.wait_for_timeout(2500)  # the status box and controls refresh every second or two
    page.screenshot(path=str(path))
    shrink(path)


def zoom(page: Any, store: RunStore, from_epoch: int) -> None:
    """Zoom the chart as a person would (a drag box) onto the steps since ``from_epoch`` ended, with
    the loss axis fitted to them: a drop of a few hundredths of a nat is lost on an axis that
    starts at the first step's 4.6. The chart keeps the zoom while new points arrive."""
    import numpy as np

    start = max((end for branch, epoch, end in store.epochs() if branch == 1 and epoch == from_epoch), default=0)
    step = store.status()["step"] or 0
    values = [store.chunk_points(s.id)[:2] for s in store.series() if s.name in ("loss", "val_loss")]
    recent = np.concatenate([v[s >= start] for s, v in values] or [np.empty(0)])
    recent = recent[np.isfinite(recent)]
    low, high = np.percentile(recent, [0.5, 99.5]) if len(recent) else (0.0, 5.0)
    page.evaluate("""(r) => window.Plotly.relayout(document.querySelector('.js-plotly-plot'),
                     {'xaxis.range': r.x, 'yaxis.range': r.y})""",
                  {"x": [start, step + 60], "y": [float(low) - 0.05, min(float(high), 5.0) + 0.05]})


def shrink(path: Path) -> None:
    """A palette PNG: a screenshot of a chart has few colours, so this keeps it sharp and small."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def fates(store: RunStore, seen: int, count: int) -> list[str]:
    """The fates of the ``count`` commands the page sent after the first ``seen``, once none is
    pending: "#12 set lr 0.15: applied at step 4012 ...", as `--wait` prints them."""
    def done() -> list[dict[str, Any]] | None:
        rows = [c for c in store.commands() if c["source"] == "dashboard"][seen:]
        return rows if len(rows) >= count and all(r["state"] != cmd.PENDING for r in rows) else None
    rows = until(f"{count} command(s) from the page answered", done)
    return [f"#{r['id']} {cmd.describe(r['kind'], r['args'])}: {cmd.outcome(r)}" for r in rows]


def sent(store: RunStore) -> int:
    return sum(1 for c in store.commands() if c["source"] == "dashboard")


def click(page: Any, selector: str) -> None:
    """A person's click: the pointer goes to the button, presses, and moves away (a tooltip left
    over a button would cover the next one)."""
    page.locator(selector).first.click()
    page.mouse.move(VIEWPORT[0] // 3, 5)


def choose_checkpoint(page: Any, checkpoint: dict[str, Any]) -> None:
    """Pick a checkpoint in "Roll back to" as a person does: open the list, type its number, pick it."""
    label = f"#{checkpoint['id']} · epoch {checkpoint['epoch']} · step {checkpoint['step']} ·"
    box = page.locator(".st-key-rollback_target input")
    option = page.locator('[role="option"]').filter(has_text=label).first
    # The controls refresh every few seconds: one that lands while the list is open closes it and
    # drops what was typed. A person opens it again and retypes; so does this.
    for _ in range(20):
        box.click()
        page.keyboard.press("ControlOrMeta+a")
        page.keyboard.type(f"#{checkpoint['id']} · epoch {checkpoint['epoch']}", delay=60)
        try:
            option.click(timeout=10_000)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    until(f"{label} chosen", lambda: box.input_value().startswith(label), timeout=120)


def walk_through(out: Path, scratch: Path, fast: bool) -> dict[str, Any]:
    defaults = CharLMConfig()
    plateau = 3 if fast else PLATEAU_EPOCH
    run_dir = scratch / "demo"
    train = [sys.executable, "-m", "babysit", "train", "--run-dir", str(run_dir)]
    # Fast epochs end while the pictures are taken: give them room to run on.
    train += ["--steps-per-epoch", str(FAST_STEPS), "--epochs", "1000"] if fast else ["--epochs", "100"]
    dashboard = [sys.executable, "-m", "babysit", "dashboard", "--root", str(scratch), "--port", str(free_port())]
    summary: dict[str, Any] = {"fast": fast, "plateau_epoch": plateau, "viewport": VIEWPORT, "pictures": []}
    with background(train, scratch / "trainer.log") as trainer, \
            background(dashboard, scratch / "dashboard.log") as server, \
            chromium_page(*VIEWPORT, timeout_s=120) as (page, errors):
        store = until("the run store", lambda: (run_dir / "run.db").exists() and RunStore(run_dir))
        url = until("the dashboard's URL", lambda: dashboard_url(server))
        page.goto(url)
        page.locator(".st-key-lr_half button").wait_for(timeout=WAIT_S * 1000)

        def picture(name: str, zoom_from: int | None = None) -> None:
            if trainer.poll() is not None:
                raise RuntimeError(f"the trainer ended early:\n{''.join(trainer.lines)}")
            if zoom_from is not None:
                zoom(page, store, zoom_from)
            shoot(page, store, out / name)
            summary["pictures"].append(name)

        # 1. Watch until the curve flattens (the picture is taken during the epoch before the
        # plateau's checkpoint, so that the nudge can follow that checkpoint on a busy machine).
        until(f"epoch {plateau - 1}", lambda: epoch_checkpoint(store, plateau - 1, 1))
        picture("walkthrough-1-plateau.png")
        # 2. lr × ½, then the drop: two whole epochs at the new lr (a nudge lands inside an epoch).
        until(f"epoch {plateau}", lambda: epoch_checkpoint(store, plateau, 1))
        before = sent(store)
        click(page, ".st-key-lr_half button")
        (summary["halve"],) = fates(store, before, 1)
        halved_in = completed_epochs(store, 1) + 1
        before_bad = until("two epochs at the halved lr", lambda: epoch_checkpoint(store, halved_in + AFTER, 1))
        picture("walkthrough-2-halved.png", zoom_from=max(1, plateau - 10))
        # 3. × 2 twice, at a hand's speed: lr × 4. The guard pauses the run, or (if it does not
        # trip) an epoch of worse loss.
        before = sent(store)
        click(page, ".st-key-lr_double button")
        page.wait_for_timeout(CLICK_GAP_MS)
        click(page, ".st-key-lr_double button")
        summary["bad"] = "\n".join(fates(store, before, 2))
        # The status row follows the applied commands within a moment: × 4 of the halved lr.
        summary["lr_after_bad"] = until("the trainer's lr × 4", lambda: store.status().get("lr") == 2 * defaults.lr
                                        and store.status().get("lr"), timeout=120)
        bad_in = completed_epochs(store, 1) + 1
        until("the guard to pause the run, or the epoch to end", lambda: store.status().get("state") == "paused"
              or epoch_checkpoint(store, bad_in, 1))
        summary["guard_paused"] = store.status().get("state") == "paused"
        picture("walkthrough-3-bad-x4.png", zoom_from=max(1, plateau - 10))
        # 4. Pause (unless the guard did), pick the checkpoint before the bad nudge, roll back with
        # that checkpoint's lr (the default); watch the new branch.
        before = sent(store)
        if not summary["guard_paused"]:
            click(page, ".st-key-pause button")
            fates(store, before, 1)
            before += 1
        choose_checkpoint(page, before_bad)
        click(page, ".st-key-rollback button")
        (summary["rollback"],) = fates(store, before, 1)
        until("two epochs on the new branch", lambda: epoch_checkpoint(store, before_bad["epoch"] + AFTER, 2))
        picture("dashboard.png", zoom_from=max(1, plateau - 10))
        # 5. A blow-up: lr 500 typed in. The guard pauses the run; the remedy offers half of the
        # healthy checkpoint's lr, never half of the lr that blew up.
        before = sent(store)
        page.locator(".st-key-lr_exact input").fill(str(BLOW_UP_LR))
        click(page, ".st-key-lr_set button")
        (summary["blow_up"],) = fates(store, before, 1)
        page.locator(".st-key-lr_exact input").fill("")  # sent: the box is emptied, as a hand would
        until("the guard's pause", lambda: store.status().get("state") == "paused")
        remedy = page.locator(".st-key-remedy button")
        remedy.wait_for(timeout=WAIT_S * 1000)
        summary["remedy_offer"] = remedy.inner_text().strip().splitlines()[-1]  # its text, not its icon's name
        picture("walkthrough-5-blow-up.png")
        # 6. The remedy clicked: the run goes on from the healthy checkpoint at the lr it offered,
        # and the curve stays readable beside the blow-up it left behind.
        before = sent(store)
        click(page, ".st-key-remedy button")
        (summary["remedy"],) = fates(store, before, 1)
        branch = store.status()["branch"]
        until("an epoch after the remedy", lambda: any(c["branch"] == branch and c["reason"] == "epoch"
                                                       for c in store.checkpoints()))
        picture("walkthrough-6-remedy.png")
        summary["page_errors"] = errors
        babysit("stop", "--run-dir", str(run_dir), "--wait")
        trainer.wait(timeout=WAIT_S)
    summary["sizes"] = {name: (out / name).stat().st_size for name in summary["pictures"]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="20-step epochs, the plateau at epoch 3 (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go (default docs/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="babysit-pictures-") as scratch:
        summary = walk_through(args.out, Path(scratch), args.fast)
    print(json.dumps(summary, indent=2))
    return 1 if summary["page_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
