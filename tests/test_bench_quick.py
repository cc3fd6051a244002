"""The benchmark suite's quick mode runs end to end and writes well-formed results.

No assertion here is about how fast anything is: timings on a shared CI machine are noise. This
test only guards the suite itself (it must keep working as babysit changes under it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("step", "nudge", "checkpoint", "rollback", "dashboard")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench-out")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--results", str(out / "RESULTS.md")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    return proc, out


def _numbers(obj: object) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def test_quick_mode_completes_without_section_errors(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _out = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in SECTIONS:
        assert f"[bench] {name} done" in proc.stdout


def test_quick_mode_writes_raw_json_with_every_section(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _proc, out = quick_run
    raw_files = sorted(out.glob("results-quick-*.json"))
    assert len(raw_files) == 1
    results = json.loads(raw_files[0].read_text())
    assert results == json.loads((out / "latest-quick.json").read_text())
    assert results["mode"] == "quick"
    assert results["errors"] == {}
    assert sorted(results["sections"]) == sorted(SECTIONS)
    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "python", "torch", "git_commit", "command", "torch_threads"):
        assert machine[key] not in (None, ""), key
    assert machine["command"].startswith("python -m bench --quick")
    # Every section measured something, and no number is NaN or infinite where one was computed.
    step = results["sections"]["step"]
    for part in ("reference", "digits", "isolated"):
        assert step[part]["variants"]["bare"]["us_per_step"]["n"] >= 1
        assert step[part]["variants"]["babysit"]["overhead_us_paired"]["n"] >= 1
    assert results["sections"]["nudge"]["commands"] >= 1
    assert results["sections"]["nudge"]["applied"] == results["sections"]["nudge"]["commands"]
    for size in ("small", "large"):
        assert results["sections"]["checkpoint"][size]["ms"]["stall"]["n"] >= 1
        assert results["sections"]["rollback"][size]["reps"] >= 1
        assert results["sections"]["rollback"][size]["applied"] == results["sections"]["rollback"][size]["reps"]
    for entry in results["sections"]["dashboard"]["sizes"].values():
        assert all(n <= 5_000 for view in entry["points"].values() for n in view.values())
    finite = [x for name in SECTIONS for x in _numbers(results["sections"][name]) if not math.isnan(x)]
    assert finite and all(math.isfinite(x) for x in finite)


def test_quick_mode_writes_a_markdown_report_with_targets(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _proc, out = quick_run
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# babysit benchmark results (QUICK mode")
    for heading in ("## Machine and command", "## Targets", "## 1. Per-step overhead", "## 2. Nudge latency",
                    "## 3. Checkpoint stall", "## 4. Rollback latency", "## 5. Dashboard refresh", "## Analysis"):
        assert heading in text, heading
    results = json.loads((out / "latest-quick.json").read_text())
    assert len(results["targets"]) >= 10
    for target in results["targets"]:
        assert target["met"] in (True, False, None)
        assert target["target"] in text
    assert "`python -m bench --quick" in text
