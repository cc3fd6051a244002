"""From a click in the page to the optimizer using the value, on the real demo; and how long the
demo's epochs take.

    python -m bench.click_latency [--clicks 12] [--epochs 3] [--out bench/CLICK.md]

Starts `python -m babysit demo` on a fresh run directory, opens its page in Chromium (the tests'
settings) and, once the curve is drawn, clicks the lr buttons one click at a time, "× ½" and
"× 2" in turn (the lr stays between the demo's default and half of it). For each click:
- in the page, from the click to the toast "Sent #N" (the dashboard has queued the command) and
  to the status box saying "applied at step S" (the page has read the trainer's answer back);
- in the run store, from the command's row being written to the trainer marking it applied.
It then waits for the demo's first epochs to end and reports their length from the run store.
Everything shares the machine's cores: the trainer, Streamlit and Chromium with software rendering.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from babysit import commands as cmd
from babysit.store import RunStore
from bench.browser_render import free_port
from tests.conftest import CHROMIUM, chromium_page

REPO = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"babysit: dashboard at (http://127\.0\.0\.1:\d+)")
PLOT = ".babysit-live-chart .js-plotly-plot"
WAIT_S = 120.0


@contextmanager
def demo(run_dir: Path) -> Iterator[str]:
    """`python -m babysit demo` on ``run_dir``; yields its URL; stops dashboard and trainer after."""
    output: list[str] = []
    process = subprocess.Popen(
        # The digits job: CLICK.md's figures were measured on it (270 steps an epoch).
        [sys.executable, "-m", "babysit", "demo", "--job", "digits", "--run-dir", str(run_dir), "--port", str(free_port())],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + WAIT_S
        while not (found := [m.group(1) for line in list(output) if (m := URL_LINE.search(line))]):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the demo did not print its URL:\n{''.join(output)}")
            time.sleep(0.1)
        yield found[0]
    finally:
        process.terminate()  # the dashboard; the trainer outlives it by design, so stop it too
        process.wait(timeout=30)
        subprocess.run([sys.executable, "-m", "babysit", "stop", "--run-dir", str(run_dir), "--wait"],
                       cwd=REPO, capture_output=True, timeout=120)


def shown_lr(page, lr: float) -> float:
    """Wait until the lr controls say "now <lr>"; return it."""
    from playwright.sync_api import expect

    label = page.locator('[data-testid="stMarkdown"]').filter(has_text=re.compile(r"Learning rate — now"))
    expect(label.first).to_contain_text(f"now {lr:.4g}", timeout=WAIT_S * 1000)
    return lr


# The moment the click reaches the page, on the same wall clock as time.time().
CLICK_CLOCK = """() => {
    window.__babysitClickAt = null;
    document.addEventListener('click', () => { window.__babysitClickAt = performance.timeOrigin + performance.now(); },
                              {capture: true, once: true});
}"""


def click_once(page, store: RunStore, key: str, expected_lr: float) -> dict[str, float]:
    """Click one lr button; the times of what follows, from the click event in the page, in ms."""
    from playwright.sync_api import expect

    toasts = page.locator('[data-testid="stToast"]')
    newest = store.commands()[-1]["id"] if store.commands() else 0  # an older toast may say the same
    page.evaluate(CLICK_CLOCK)
    asked = time.time()
    page.locator(f".st-key-{key} button").click()
    clicked = page.evaluate("() => window.__babysitClickAt") / 1000
    sent = re.compile(rf"Sent #(\d+): set lr {re.escape(f'{expected_lr:g}')}")
    command_id = None
    while command_id is None:
        command_id = next((int(m.group(1)) for t in toasts.all_inner_texts()
                           if (m := sent.search(t)) and int(m.group(1)) > newest), None)
        if time.time() - clicked > WAIT_S:
            raise RuntimeError(f"no toast for set lr {expected_lr:g} after command #{newest}")
        if command_id is None:
            time.sleep(0.01)
    toast_at = time.time()
    applied = page.locator('[data-testid="stAlert"]').filter(
        has_text=re.compile(rf"#{command_id} set lr .*: applied at step \d+"))
    expect(applied.first).to_be_visible(timeout=WAIT_S * 1000)
    shown_at = time.time()
    row = store.command(command_id)
    if row["state"] != cmd.APPLIED or row["result"]["after"] != expected_lr:
        raise RuntimeError(f"command #{command_id} was not applied as sent: {row}")
    return {"playwright_wait_ms": (clicked - asked) * 1000, "queued_ms": (row["created"] - clicked) * 1000,
            "toast_ms": (toast_at - clicked) * 1000, "page_applied_ms": (shown_at - clicked) * 1000,
            "store_queued_to_applied_ms": (row["done_at"] - row["created"]) * 1000}


def measure(clicks: int, epochs: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="babysit-click-") as scratch:
        run_dir = Path(scratch) / "demo"
        with demo(run_dir) as url, chromium_page(timeout_s=WAIT_S) as (page, errors):
            page.goto(url)
            page.locator(PLOT).first.wait_for(timeout=WAIT_S * 1000)
            store = RunStore(run_dir)
            rows = []
            for i in range(clicks):
                # As a person would: click once the controls show the lr the trainer uses now (the
                # buttons halve or double the lr shown next to them).
                lr = shown_lr(page, store.status()["lr"])
                key, target = ("lr_half", lr / 2) if i % 2 == 0 else ("lr_double", lr * 2)
                rows.append(click_once(page, store, key, target))
            deadline = time.monotonic() + 20 * 60
            while len(epoch_checkpoints(store)) < epochs and time.monotonic() < deadline:
                time.sleep(1.0)
            listed = epoch_checkpoints(store)[:epochs]
            if errors:
                raise RuntimeError(f"errors in the page: {errors}")
    return {"clicks": rows, "epoch_ends": [c["created"] for c in listed],
            "steps_per_epoch": listed[0]["step"] if listed else None}


def epoch_checkpoints(store: RunStore) -> list[dict[str, object]]:
    """Branch 1's end-of-epoch checkpoints: each is listed when its epoch has ended."""
    return [c for c in store.checkpoints() if c["reason"] == "epoch" and c["branch"] == 1]


def _stat(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def report(result: dict[str, object], args: argparse.Namespace) -> str:
    clicks: list[dict[str, float]] = result["clicks"]  # type: ignore[assignment]
    ends: list[float] = result["epoch_ends"]  # type: ignore[assignment]
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    epoch_lengths = [b - a for a, b in zip(ends, ends[1:])]
    lines = [
        "# The demo in the browser: click to applied, and epoch length",
        "",
        f"`python -m bench.click_latency --clicks {args.clicks} --epochs {args.epochs}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {chromium}, headless with --disable-gpu, "
        f"{os.cpu_count()} CPU cores shared by the trainer, the dashboard and Chromium; Python {platform.python_version()}.",
        "",
        "Each click is one lr button (`× ½` and `× 2` in turn) on the page of `python -m babysit demo`, "
        "the next one once the controls show the lr the previous one set. Times start at the click event in "
        "the page (a capturing listener; page and script share the wall clock). Medians (min–max) in ms.",
        "",
        "| from the click event in the page to | ms |",
        "|---|---|",
        f"| the command's row written (the dashboard ran the click) | {_stat([c['queued_ms'] for c in clicks])} |",
        f"| the toast \"Sent #N\" shown | {_stat([c['toast_ms'] for c in clicks])} |",
        f"| the page showing \"applied at step S\" | {_stat([c['page_applied_ms'] for c in clicks])} |",
        "",
        f"Before each click event, Playwright waited {_stat([c['playwright_wait_ms'] for c in clicks])} ms for the "
        "button to be visible and still (the page above it grows and shrinks as status boxes come and go).",
        "",
        "| in the run store | ms |",
        "|---|---|",
        f"| command queued → applied by the trainer | {_stat([c['store_queued_to_applied_ms'] for c in clicks])} |",
        "",
        f"Clicks: {len(clicks)}, all applied with the value the page sent. The trainer's share is the store's "
        "figure. Before the row is written, the click travels from Chromium to the server, which reruns the "
        "controls once the part of the page it is refreshing at that moment is done; the toast comes back "
        "with that rerun; \"applied at step S\" waits for the status "
        "box's next refresh (every second by default). Chromium renders in software here, on the cores the "
        "trainer and the server use.",
        "",
        "| demo epochs | seconds |",
        "|---|---|",
        f"| length of epochs 2…{len(ends)} of {result['steps_per_epoch']} steps (between their checkpoints) | "
        + (", ".join(f"{x:.1f}" for x in epoch_lengths) or "–") + " |",
        "",
        "The first epoch also pays the trainer's start-up (imports, data) and Chromium's first drawing.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3, help="wait for this many epochs to end")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "CLICK.md")
    args = parser.parse_args(argv)
    result = measure(args.clicks, args.epochs)
    text = report(result, args)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
