"""Turn a results dict into the targets table and the Markdown report (bench/RESULTS.md).

The report is regenerated on every run, except for the hand-written analysis at its end (between
the ANALYSIS markers), which is carried over from the previous file so that findings written for
one run stay next to its numbers until someone rewrites them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import REPO, fmt, fmt_range

ANALYSIS_START = "<!-- ANALYSIS START: hand-written, kept when the file is regenerated -->"
ANALYSIS_END = "<!-- ANALYSIS END -->"

STEP_TARGET_PCT = 2.0        # of a fast step, whole loop
TB_RATIO_TARGET = 0.10
STALL_TARGET = 1.25
ROLLBACK_TARGET = 1.0
REFRESH_TARGET_MS = 100.0
POINTS_TARGET = 5_000
RSS_FLAT_MB = 10.0


def _get(d: Any, *keys: Any, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _target(tid: str, target: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"id": tid, "target": target, "measured": measured, "met": met}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results.get("sections", {})
    out: list[dict[str, Any]] = []
    loop = _get(s, "step", "whole_loop")
    for threads, by in (loop or {}).get("by_threads", {}).items():
        v = by["variants"]
        bs, bare = v["babysit"]["mean"], v["bare"]["mean"]["us_per_step"]["median"]
        pct, us = bs["overhead_pct"]["median"], bs["overhead_us"]["median"]
        # The median's standard error (from the quartiles, as for a normal spread) must be within
        # half the target, or the rounds cannot tell it met or missed: more rounds narrow it.
        spread = bs["overhead_pct"]["p75"] - bs["overhead_pct"]["p25"]
        error = 1.253 * spread / 1.349 / math.sqrt(max(bs["overhead_pct"]["n"], 1))
        resolved = error <= STEP_TARGET_PCT / 2
        note = "" if resolved else (f"; not resolved: the median's standard error is ±{fmt(error, 1)} % (paired "
                                    f"quartiles {fmt(bs['overhead_pct']['p25'], 1)} to {fmt(bs['overhead_pct']['p75'], 1)} %)")
        least = v.get("least_logger", {}).get("mean", {}).get("overhead_us")
        floor = "" if least is None else (f"; the least logger (one call, `.item()`, a list append) {fmt(least['median'], 1)} µs, "
                                          f"babysit beyond it {fmt(us - least['median'], 1)} µs (difference of the medians)")
        out.append(_target(f"step_overhead_{threads}t", f"babysit per-step overhead ≤ {STEP_TARGET_PCT:g} % of a fast "
                           f"step (whole loop, mean; {threads} torch thread{'s' if threads != '1' else ''})",
                           f"{fmt(pct, 2)} % ({fmt(us, 1)} µs of a {fmt(bare, 0)} µs step); median of "
                           f"{bs['overhead_pct']['n']} paired rounds{floor}{note}", pct <= STEP_TARGET_PCT if resolved else None))
        if "tensorboard" in v:
            tb = v["tensorboard"]["mean"]["overhead_us"]["median"]
            ratio = v["babysit"]["over_tensorboard"]["mean"]["of_medians"]
            out.append(_target(f"vs_tensorboard_{threads}t", f"babysit overhead ≤ 1/10 of TensorBoard's, loss logged every "
                               f"step ({threads} torch thread{'s' if threads != '1' else ''})",
                               f"{fmt(ratio, 3)} ({fmt(us, 1)} µs vs {fmt(tb, 1)} µs); per-round ratios "
                               f"{fmt_range(v['babysit']['over_tensorboard']['mean']['per_round'], 3)}{note}",
                               None if math.isnan(ratio) or not resolved else ratio <= TB_RATIO_TARGET))
        else:
            out.append(_target(f"vs_tensorboard_{threads}t", "babysit overhead ≤ 1/10 of TensorBoard's",
                               "tensorboard not installed (pip install -r bench/requirements.txt)", None))
    nudge = s.get("nudge")
    if nudge:
        n, ok, strict = nudge["commands"], nudge["on_next_boundary_after_return"], nudge["on_next_boundary"]
        out.append(_target("nudge", "a nudge is applied at the next step boundary after it is committed",
                           f"{ok}/{n} at the next boundary after enqueue_command returned; {strict}/{n} counted from "
                           f"the SQLite commit itself (before the trainer is signalled); latency "
                           f"{fmt(nudge['ms_commit_to_step_start']['median'], 2)} ms median",
                           nudge["applied"] == n and ok == n))
    for size in ("small", "large"):
        ck = _get(s, "checkpoint", size)
        if ck:
            r = ck["stall_over_state_copy"]["median"]
            out.append(_target(f"stall_{size}", f"checkpoint stall ≤ 1.25× the in-memory copy ({size} model, "
                               f"{fmt(ck['state_mb'], 1)} MB of state)",
                               f"{fmt(r, 2)}× ({fmt(ck['ms']['stall']['median'], 2)} ms vs "
                               f"{fmt(ck['ms']['state_copy']['median'], 2)} ms)", r <= STALL_TARGET))
    for size in ("small", "large"):
        rb = _get(s, "rollback", size)
        if rb:
            r = rb["ratio_rollback_over_plain"]["median"]
            out.append(_target(f"rollback_{size}", f"rollback ≤ torch.load + one step ({size} model, "
                               f"{fmt(rb['checkpoint_file_mb'], 1)} MB file)",
                               f"{fmt(r, 2)}× ({fmt(rb['ms_rollback']['median'], 1)} ms vs "
                               f"{fmt(rb['ms_plain_load_plus_step']['median'], 1)} ms)", r <= ROLLBACK_TARGET))
    dash = s.get("dashboard")
    if dash and dash.get("sizes"):
        sizes = sorted(dash["sizes"], key=int)
        top = dash["sizes"][sizes[-1]]
        label = f"{int(sizes[-1]):,} steps"
        read = top["views"]["full"]["read_ms"]["median"]
        total = top["views"]["full"]["total_ms"]["median"]
        out.append(_target("refresh_read", f"dashboard refresh (read + downsample, 3 series, whole run) ≤ 100 ms at {label}",
                           f"{fmt(read, 1)} ms", read <= REFRESH_TARGET_MS))
        out.append(_target("refresh_total", f"… and with the Plotly figure built and serialised ≤ 100 ms at {label}",
                           f"{fmt(total, 1)} ms", total <= REFRESH_TARGET_MS))
        most = max(p for e in dash["sizes"].values() for v in e["points"].values() for p in v.values())
        most = max([most] + [p for e in dash["sizes"].values() for p in e.get("max_trace_points", {}).values()])
        out.append(_target("points", "≤ 5 000 points per trace sent",
                           f"at most {most:,} in any trace of any view at any size", most <= POINTS_TARGET))
        kept = all(v["spikes_kept"] == v["spikes"] and v["dips_kept"] == v["dips"] and v["max_matches_raw"]
                   and v["min_matches_raw"] for e in dash["sizes"].values() for v in e["spikes"].values())
        n_sp = sum(v["spikes"] + v["dips"] for e in dash["sizes"].values() for v in e["spikes"].values())
        out.append(_target("spikes", "spikes of the raw curve kept (min/max-preserving downsampling)",
                           f"{'all' if kept else 'NOT all'} of {n_sp} injected spikes/dips kept across views and sizes; "
                           "min and max of every view equal the raw ones" if kept else "some lost", kept))
        low = dash["sizes"][sizes[0]]["rss_after_mb"]["median"]
        high = top["rss_after_mb"]["median"]
        out.append(_target("memory", f"dashboard memory does not grow with run length (RSS after refreshes, "
                           f"{int(sizes[0]):,} → {int(sizes[-1]):,} steps, within {RSS_FLAT_MB:g} MB)",
                           f"{fmt(low, 1)} MB → {fmt(high, 1)} MB (database {fmt(dash['sizes'][sizes[0]]['db_mb'], 1)} "
                           f"→ {fmt(top['db_mb'], 1)} MB)", high - low <= RSS_FLAT_MB))
    return out


def targets_text(targets: list[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
        lines.append(f"  [{mark}] {t['target']}: {t['measured']}")
    return "\n".join(lines)


# -- Markdown ----------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _previous_analysis(previous: Path | None) -> str:
    if previous is None or not previous.exists():
        return ""
    text = previous.read_text()
    if ANALYSIS_START in text and ANALYSIS_END in text:
        return text[text.index(ANALYSIS_START) + len(ANALYSIS_START):text.index(ANALYSIS_END)].strip("\n")
    return ""


def _step_table(section: dict[str, Any], percent: bool = True) -> str:
    rows = []
    names = {"bare": "bare step", "babysit": "babysit", "tensorboard": "TensorBoard SummaryWriter",
             "babysit_batches_only": "babysit, run.batches only (no log)"}
    for name, v in section["variants"].items():
        over = v.get("overhead_us_paired")
        rows.append([
            names.get(name, name),
            fmt_range(v["typical_us_per_step"], 1),
            f"**{fmt_range(v['overhead_us_paired_typical'], 1)}**" if over else "–",
            fmt(v.get("overhead_pct_typical"), 2) + " %" if over and percent else "–",
            fmt_range(v["us_per_step"], 1),
            fmt_range(over, 1) if over else "–",
            fmt_range(v["overhead_us_paired_loop_only"], 1) if over else "–",
            fmt_range(v["cpu_us_per_step"], 1),
            fmt_range(v["overhead_us_paired_cpu"], 1) if over else "–",
        ])
    return _table(["variant", "typical µs/step (block's median step + drain)", "overhead µs, typical (paired)",
                   "% of bare", "µs/step, block wall time incl. drain", "overhead µs, wall (paired)",
                   "overhead µs, loop only (paired)", "CPU µs/step, all threads", "overhead µs, CPU (paired)"], rows)


def whole_loop_text(loop: dict[str, Any]) -> str:
    """The whole-loop tables, one per torch thread count (what the step targets use)."""
    names = {"bare": "bare loop", "least_logger": "least logger (`log(loss=loss)`: `.item()`, kept in a list)",
             "babysit": "babysit (default guard)", "babysit_guard_off": "babysit, guard off",
             "babysit_at_rev": f"babysit at `{loop.get('compare_rev')}` (the whole package; default guard)",
             "tensorboard": "TensorBoard SummaryWriter"}
    parts = [f"**Whole loops** (what the user pays; the targets): {loop['workload']}; {loop['rounds']} paired rounds "
             f"of one {loop['steps_per_block']:,}-step loop per variant, the order shuffled every round. babysit: "
             "`run.batches` + `run.log(loss=loss)` with its writer thread running at its default pace (0.25 s); "
             "TensorBoard: `add_scalar(\"loss\", loss, step)`. Each loop is timed from its first batch until the "
             "tool has stored its values (babysit's last `writer.flush()`, TensorBoard's `flush()`), divided by the "
             "steps: a mean, so the writer's bursts count. Overheads are medians over rounds of the difference to the "
             "bare loop of the same round; \"loop only\" stops the clock at the last step, \"median step\" is the "
             "in-loop median (secondary: it cannot see the bursts).\n"]
    for threads, by in loop["by_threads"].items():
        rows = []
        for name, v in by["variants"].items():
            m = v["mean"]
            tb = v.get("over_tensorboard")
            rows.append([
                names.get(name, name), fmt_range(m["us_per_step"], 1),
                f"**{fmt_range(m['overhead_us'], 1)}**" if "overhead_us" in m else "–",
                f"**{fmt(m['overhead_pct']['median'], 2)} %** ({fmt(m['overhead_pct']['p25'], 2)} – "
                f"{fmt(m['overhead_pct']['p75'], 2)})" if "overhead_pct" in m else "–",
                fmt(v["loop"]["overhead_us"]["median"], 1) if "overhead_us" in v["loop"] else "–",
                fmt(v["median_step"]["overhead_us"]["median"], 1) if "overhead_us" in v["median_step"] else "–",
                f"**{fmt(tb['mean']['of_medians'], 3)}** (per round {fmt_range(tb['mean']['per_round'], 2)})" if tb else "–",
            ])
        parts.append(f"{threads} torch thread{'s' if threads != '1' else ''}:\n")
        parts.append(_table(["variant", "µs/step, whole loop (mean)", "overhead µs (paired)",
                             "overhead % of bare (median; quartiles)", "overhead µs, loop only",
                             "overhead µs, in-loop median step", "babysit / TensorBoard overhead"], rows))
        parts.append("")
    return "\n".join(parts) + "\n"


def render(results: dict[str, Any], *, raw_path: Path | None = None, previous: Path | None = None) -> str:
    m = results["machine"]
    s = results.get("sections", {})
    out: list[str] = []
    add = out.append
    title = "babysit benchmark results" + (" (QUICK mode: tiny sizes, not for quoting)" if results["mode"] == "quick" else "")
    add(f"# {title}\n")
    add("Generated by `python -m bench` (see [bench/README.md](README.md)); the hand-written analysis at the end is "
        "kept across runs. Every comparison below was made inside one process with the variants' repetitions "
        "interleaved; numbers are medians with (min–max) over repetitions; ratios are what to quote, absolute times "
        "move with the machine's load.\n")
    add("## Machine and command\n")
    raw_rel = str(raw_path.relative_to(REPO)) if raw_path and raw_path.is_relative_to(REPO) else str(raw_path)
    add(_table(["", ""], [
        ["command", f"`{m['command']}`"],
        ["git commit", f"`{m['git_commit']}`" + (" (+ uncommitted changes)" if m.get("git_dirty") else "")],
        ["date (UTC)", m["started_utc"]],
        ["duration", f"{results.get('duration_s')} s"],
        ["CPU", f"{m['cpu_model']}, {m['cpu_count']} logical CPUs ({m['cpus_usable']} usable), {m['memory_gib']} GiB"],
        ["load average (1/5/15 min) at start / end", f"{m['load_average_start']} / {m.get('load_average_end')}"],
        ["software", f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} thread(s) for the training "
                     f"steps), numpy {m['numpy']}, SQLite {m['sqlite']}, tensorboard {m['tensorboard'] or 'not installed'}, "
                     f"plotly {m['plotly']}, {m['os']}"],
        ["raw numbers", f"`{raw_rel}`"],
    ]))
    add("")
    if results.get("errors"):
        add("**Sections that failed:** " + ", ".join(results["errors"]) + " (tracebacks in the raw JSON)\n")

    add("## Targets\n")
    mark = {True: "met", False: "**missed**", None: "n/a"}
    add(_table(["target", "measured", ""], [[t["target"], t["measured"], mark[t["met"]]] for t in results["targets"]]))
    add("")

    step = s.get("step")
    if step:
        ref = step["reference"]
        add("## 1. Per-step overhead\n")
        loop = step.get("whole_loop")
        if loop:
            add(whole_loop_text(loop))
        add(f"**Blocks with a sleeping writer** (the earlier method; its *typical step* is an in-loop median, blind "
            f"to the writer's bursts, which land on a few steps): {ref['workload']}; {ref['rounds']} interleaved rounds of one {ref['steps_per_block']}-step "
            "block per variant. babysit: `run.batches` (the per-step command poll) + `run.log(loss=loss, lr=…, momentum=…)`; "
            "TensorBoard: three `SummaryWriter.add_scalar` calls with the same objects. One warmed-up `Run` and one "
            "`SummaryWriter` serve all blocks; babysit's writer thread is kept asleep and each babysit block ends with the "
            "one flush its writer thread would do every 0.25 s, timed on the training thread (an upper bound: in a real "
            "run it overlaps the steps); \"loop only\" leaves it out (a lower bound). The *typical step* is each block's "
            "median step time plus its drain per step, which a burst of load from other processes does not move; "
            "\"paired\" overheads subtract the bare block of the same round.\n")
        add(_step_table(ref))
        add("")
        ratio = ref.get("babysit_over_tensorboard")
        if ratio is not None:
            add(f"babysit's overhead / TensorBoard's: **{fmt(ref.get('babysit_over_tensorboard_typical'), 3)}** "
                f"(typical step), {fmt(ratio, 3)} (block wall time incl. drain), "
                f"{fmt(ref.get('babysit_over_tensorboard_loop_only'), 3)} (loop only), "
                f"{fmt(ref.get('babysit_over_tensorboard_cpu'), 3)} (CPU time of all threads).\n")
        parts = []
        for name in ("babysit", "tensorboard"):
            v = ref["variants"].get(name)
            if v and "drain_us_per_step" in v:
                parts.append(f"{name}: drain {fmt_range(v['drain_us_per_step'], 1)} µs/step, median step grew by "
                             f"{fmt_range(v['median_step_growth_us_paired'], 1)} µs (paired)")
        if parts:
            add("The typical-step overhead in its two parts — " + "; ".join(parts) + ".\n")
        dg = step["digits"]
        add(f"**Demo job step**: {dg['workload']}; babysit logs the loss only, as the demo does; {dg['rounds']} rounds × "
            f"{dg['steps_per_block']} steps.\n")
        add(_step_table(dg))
        add("")
        iso = step["isolated"]
        add(f"**The tools alone** (no training: the loop body only logs a fixed 0-d tensor and two floats; "
            f"{iso['rounds']} rounds × {iso['steps_per_block']:,} iterations). \"loop only\" is what the training "
            "thread pays directly; \"incl. drain\" adds the background writer's work for the same values, run "
            "synchronously.\n")
        add(_step_table(iso, percent=False))
        add("")

    nudge = s.get("nudge")
    if nudge:
        add("## 2. Nudge latency\n")
        add(f"A second process queued {nudge['commands']} `set_lr` commands with `RunStore.enqueue_command` at random "
            f"moments while the reference step ran under `run.batches` (step {fmt_range(nudge['step_ms'], 3)} ms). "
            "A command committed while step k runs is on time when babysit applies it at the boundary after step k, "
            "so that step k+1 uses it (\"steps late\" 0; −1 when the commit landed between a step's end and its "
            "boundary check).\n")
        add(_table(["", "value"], [
            ["applied (store says `applied`)", f"{nudge['applied']}/{nudge['commands']} ({nudge['store_applied']} in the store)"],
            ["used at the next step boundary after `enqueue_command` returned", f"{nudge['on_next_boundary_after_return']}/{nudge['commands']}"],
            ["used at the next step boundary after the SQLite commit itself", f"{nudge['on_next_boundary']}/{nudge['commands']}"],
            ["steps late (from the commit)", f"{fmt_range(nudge['steps_late'], 0)}"],
            ["ms from commit to the start of the step that uses it", fmt_range(nudge["ms_commit_to_step_start"], 3)],
            ["ms from commit to `enqueue_command` returning (signal rung)", fmt_range(nudge["ms_commit_to_return"], 3)],
            ["ms for the whole `enqueue_command` call", fmt_range(nudge["ms_enqueue_call"], 3)],
            ["the step babysit recorded used the new lr (trainer's own record)", f"{nudge['store_step_matches']}/{nudge['applied']}"],
        ]))
        add("")

    ck = s.get("checkpoint")
    if ck:
        add("## 3. Checkpoint stall\n")
        add("Epochs of one step under `run.epochs`; the stall is the gap between the end of an epoch's last step and "
            "the start of the next epoch's body (record the epoch, snapshot with `clone_tree`, RNG states, hand to "
            "the writer thread). In the same epochs, rotated: a plain synchronous `torch.save({model, optimizer, rng})` "
            "(no fsync), the in-memory copy (`clone_tree` of both state dicts + `rng_state()`), and `clone()` of the "
            "tensors alone. The last rows are the cost the background write puts on the steps taken while it runs.\n")
        rows = []
        labels = [("stall", "babysit stall (training thread blocked)"), ("state_copy", "in-memory copy of the state"),
                  ("tensor_clone", "clone() of the tensors only"), ("torch_save", "plain torch.save (sync)"),
                  ("write_ms", "background write, until done"), ("steps_during_write", "steps trained during the write"),
                  ("extra_ms_during_write", "extra time of those steps (vs quiet steps)"),
                  ("step_ms_quiet", "one step, nothing in the background")]
        for key, label in labels:
            rows.append([label] + [fmt_range(ck[size]["ms"][key], 3 if size == "small" else 1) for size in ("small", "large")])
        rows.append(["**stall / in-memory copy**"] + [f"**{fmt_range(ck[z]['stall_over_state_copy'], 2)}**" for z in ("small", "large")])
        rows.append(["stall / clone() only"] + [fmt_range(ck[z]["stall_over_tensor_clone"], 2) for z in ("small", "large")])
        rows.append(["stall / plain torch.save"] + [fmt_range(ck[z]["stall_over_torch_save"], 2) for z in ("small", "large")])
        add(_table(["ms", f"small: {ck['small']['workload']} ({fmt(ck['small']['state_mb'], 3)} MB state, "
                          f"{ck['small']['reps']} reps)",
                    f"large: {ck['large']['workload']} ({fmt(ck['large']['state_mb'], 1)} MB state, "
                    f"{fmt(ck['large']['checkpoint_file_mb'], 1)} MB file, {ck['large']['reps']} reps)"], rows))
        add("")

    rb = s.get("rollback")
    if rb:
        add("## 4. Rollback latency\n")
        add("From the commit of a `rollback` command (queued by a second process at a random point in a step) to the "
            "end of the first step on the restored weights, against a plain `torch.load(weights_only=True)` of the "
            "same file + `load_state_dict` (model, optimizer) + one step, timed on the training thread just before.\n")
        rows = []
        for key, label in (("ms_rollback", "babysit: commit → end of first restored step"),
                           ("ms_commit_to_first_step_start", "babysit: commit → start of first restored step"),
                           ("ms_plain_load_plus_step", "plain: torch.load + load_state_dict + one step")):
            rows.append([label] + [fmt_range(rb[z][key], 1) for z in ("small", "large")])
        for key, label in (("load_ms", "… of which torch.load"), ("load_state_dict_ms", "… of which load_state_dict"),
                           ("step_ms", "… of which the step")):
            rows.append([label] + [fmt_range(rb[z]["ms_plain_parts"][key], 1) for z in ("small", "large")])
        rows.append(["**babysit / plain**"] + [f"**{fmt_range(rb[z]['ratio_rollback_over_plain'], 2)}**" for z in ("small", "large")])
        rows.append(["rollbacks applied, restored to the checkpoint's step"] +
                    [f"{rb[z]['applied']}/{rb[z]['reps']}, {rb[z]['restored_to_checkpoint_step']}/{rb[z]['reps']}" for z in ("small", "large")])
        add(_table(["ms", f"small ({fmt(rb['small']['checkpoint_file_mb'], 3)} MB file)",
                    f"large ({fmt(rb['large']['checkpoint_file_mb'], 1)} MB file)"], rows))
        add("")

    dash = s.get("dashboard")
    if dash:
        add("## 5. Dashboard refresh\n")
        add(f"Run databases built with `RunStore.write_chunks` (chunks of 256 points; loss with 20 spikes and 10 dips, "
            f"lr, momentum). Each size is read by fresh processes ({dash['rounds']} rounds, interleaved, "
            f"{dash['reps']} warm refreshes each after one cold one), running the dashboard's own code as "
            "`babysit/ui/page.py` does (`ui.data.read_view` → `ui.figures.build_figure` → `ui.live_chart.figure_json`). "
            f"Views: **full** = the whole run; **tail** = the last {dash['tail_steps']:,} steps; **new rows** = the "
            f"last {dash['new_rows_steps']} steps (an incremental refresh).\n")
        rows = []
        for n, e in sorted(dash["sizes"].items(), key=lambda kv: int(kv[0])):
            for view, t in e["views"].items():
                rows.append([f"{int(n):,}" if view == "full" else "", view,
                             fmt_range(t["read_ms"], 1), fmt_range(t["figure_ms"], 1), fmt_range(t["json_ms"], 1),
                             f"**{fmt_range(t['total_ms'], 1)}**", fmt(e["cold_total_ms"][view]["median"], 1),
                             " / ".join(str(p) for p in e["points"][view].values()), fmt(e["json_kb"][view], 0)])
        add(_table(["steps", "view", "read + downsample ms", "figure ms", "JSON ms", "total ms",
                    "cold total ms", "points loss / lr / momentum", "JSON kB"], rows))
        add("")
        rows = []
        for n, e in sorted(dash["sizes"].items(), key=lambda kv: int(kv[0])):
            sp = e["spikes"]["full"]
            rows.append([f"{int(n):,}", fmt(e["db_mb"], 1), fmt(e["rss_base_mb"]["median"], 1),
                         fmt(e["rss_after_mb"]["median"], 1), fmt(e["rss_growth_mb"]["median"], 1),
                         fmt(e["rss_peak_mb"]["median"], 1),
                         f"{sp['spikes_kept']}/{sp['spikes']} spikes, {sp['dips_kept']}/{sp['dips']} dips"])
        add(_table(["steps", "database MB", "RSS before reading MB", "RSS after refreshes MB", "growth MB",
                    "peak RSS MB", "kept in the full view"], rows))
        add("")

    add("## Analysis\n")
    add(ANALYSIS_START)
    analysis = _previous_analysis(previous)
    add(analysis if analysis else "_(no analysis written yet for these numbers)_")
    add(ANALYSIS_END)
    add("")
    return "\n".join(out)
