"""The page's instruments, below the cockpit: probe the lr, sweep it, compare branches.

Two expanders, so the curve and its controls keep the screen: "Probe lr · lr sweep" (its buttons
queue `probe`, `sweep` and `cancel` through the page's click protocol, babysit/ui/clicks.py; the
latest probe set's branches are drawn from their fork with a table and a winner to continue with;
the latest sweep is drawn against lr with a "use lr" button) and "Compare branches" (the table of
babysit.instruments.compare and the branches the person picks, aligned at their fork).

Kept quick: an expander's content is built only while it is open (``.open``), and probe or
sweep readings are read only when the run has an excursion (``store.excursions()``, one small
query).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st

from .. import commands as cmd
from ..instruments import compare as cmp
from ..instruments import probes as prb
from ..instruments import sweep as swp
from ..store import EXCURSION_PROBE, EXCURSION_RUNNING, EXCURSION_SWEEP, RunStore
from .clicks import command_button, send, short_number, toast_flash
from .instrument_figures import aligned_frame, build_aligned_figure, build_sweep_figure, sweep_frame
from .live_chart import forget_sent, live_chart
from .text import plain

EXCURSIONS_READ = 10       # the newest excursions the page looks at
COMPARE_DEFAULT_MAX = 6    # branches the comparison picks by itself
FROM_NOW = "now"


def instruments(store: RunStore, status: dict[str, Any]) -> None:
    """Both instruments' expanders (app.py calls this in a refreshed fragment)."""
    toast_flash()
    excursions = store.excursions(limit=EXCURSIONS_READ)
    running = next((e for e in excursions if e["state"] == EXCURSION_RUNNING), None)
    if running is not None and st.session_state.get("_excursion_opened") != running["id"]:
        # A probe set or sweep started (from here or the CLI): open its panel once; the person may
        # close it again. (A constant `expanded`: changing it would make a new expander.)
        st.session_state["_excursion_opened"] = running["id"]
        st.session_state["excursions_panel"] = True
    panel = st.expander("Probe lr · lr sweep", key="excursions_panel", on_change="rerun", icon=":material/science:")
    with panel:
        if panel.open:
            excursion_panel(store, status, excursions, running)
        else:
            forget_sent("probes")
            forget_sent("sweep")
    panel = st.expander("Compare branches", key="compare_panel", on_change="rerun", icon=":material/compare_arrows:")
    with panel:
        if panel.open:
            compare_panel(store)
        else:
            forget_sent("compare")


# -- probes and the sweep ---------------------------------------------------------------------------
def excursion_panel(store: RunStore, status: dict[str, Any], excursions: list[dict[str, Any]],
                    running: dict[str, Any] | None) -> None:
    if running is not None:
        done = sum(1 for b in running["branches"] if b["end_checkpoint"] is not None)
        what = (f"probe set #{running['id']}: probe {min(done + 1, len(running['branches']) or 1)} running"
                if running["kind"] == EXCURSION_PROBE else f"lr sweep #{running['id']} running")
        cols = st.columns([3, 1], vertical_alignment="center")
        cols[0].info(f"{what} (from step {running['origin_step']} of branch {running['origin_branch']}); the run "
                     "returns to that point when it ends.", icon=":material/science:")
        command_button(cols[1], "Cancel", "excursion_cancel", store, cmd.CANCEL, {"excursion": running["id"]},
                       icon=":material/cancel:", width="stretch")
    probe_controls(store, status)
    sweep_controls(store)
    latest_probe = next((e for e in excursions if e["kind"] == EXCURSION_PROBE), None)
    latest_sweep = next((e for e in excursions if e["kind"] == EXCURSION_SWEEP), None)
    if latest_probe is not None:
        probe_results(store, status, latest_probe)
    if latest_sweep is not None:
        sweep_results(store, latest_sweep)


def probe_controls(store: RunStore, status: dict[str, Any]) -> None:
    cols = st.columns([1.6, 1, 1.6, 1.2, 1], vertical_alignment="bottom")
    factors = cols[0].text_input("lr factors", value=", ".join(f"{f:g}" for f in cmd.PROBE_DEFAULT_FACTORS),
                                 key="probe_factors", help="Each probe trains with the current lr times a factor.")
    steps = cols[1].number_input("steps each", min_value=1, max_value=cmd.PROBE_MAX_STEPS,
                                 value=cmd.PROBE_DEFAULT_STEPS, step=10, key="probe_steps")
    checkpoints = store.checkpoints(limit=50)
    labels = {c["id"]: f"#{c['id']} · epoch {c['epoch']} · step {c['step']}" for c in reversed(checkpoints)}
    origin = cols[2].selectbox("from", [FROM_NOW, *labels], key="probe_from",
                               format_func=lambda v: "now" if v == FROM_NOW else labels.get(v, f"#{v}"))
    then = cols[3].radio("then", cmd.THEN_CHOICES, key="probe_then", horizontal=True)

    def args() -> dict[str, Any]:
        spec: dict[str, Any] = {"param": "lr", "factors": factors, "steps": int(steps), "then": then}
        if origin != FROM_NOW:
            spec["checkpoint"] = origin
        return spec

    command_button(cols[4], "Probe lr", "probe_lr", store, cmd.PROBE, args, icon=":material/call_split:",
                   type="primary", width="stretch",
                   help="Train each lr for its steps on a short-lived branch from the same point, then come back.")


def sweep_controls(store: RunStore) -> None:
    cols = st.columns([1, 1.3, 1.3, 2.6, 1], vertical_alignment="bottom")
    low, high = cmd.SWEEP_STEPS_RANGE
    steps = cols[0].number_input("sweep steps", min_value=low, max_value=high, value=cmd.SWEEP_DEFAULT_STEPS,
                                 step=50, key="sweep_steps")
    lr_min = cols[1].text_input("lr from", key="sweep_lr_min", placeholder="auto")
    lr_max = cols[2].text_input("lr to", key="sweep_lr_max", placeholder="auto")
    span = "×{:g} to ×{:g} of the current lr".format(*cmd.SWEEP_DEFAULT_SPAN)
    cols[3].caption(f"The lr rises exponentially over the steps (empty: {span}) on a throwaway branch; "
                    "the run comes back exactly where it was.")
    command_button(cols[4], "lr sweep", "lr_sweep", store, cmd.SWEEP,
                   lambda: {"steps": int(steps), "lr_min": lr_min.strip() or None, "lr_max": lr_max.strip() or None},
                   icon=":material/trending_up:", width="stretch")


def probe_table(readings: list[prb.ProbeReading], best: prb.ProbeReading | None) -> pd.DataFrame:
    """One row per probe: its value, how far it got, its loss EWMA, its evaluation, the winner."""
    rows = []
    for r in readings:
        row: dict[str, Any] = {"branch": r.branch, r.param: r.value, "steps": f"{r.steps_done} / {r.steps_planned}",
                               "loss (EWMA)": r.loss_ewma}
        row.update({k: v for k, v in r.evaluation.items()})
        row["diverged"] = "yes" if r.diverged else ""
        row["winner"] = "★" if best is not None and r.branch == best.branch else ""
        rows.append(row)
    return pd.DataFrame(rows)


def probe_results(store: RunStore, status: dict[str, Any], excursion: dict[str, Any]) -> None:
    readings = prb.read_probes(store, excursion["id"])
    if not readings:
        return
    best = prb.winner(readings) if excursion["state"] != EXCURSION_RUNNING else None
    st.markdown(f"**Probe set #{excursion['id']}** · {excursion['state']} · from step {excursion['origin_step']}"
                + (f" · {plain(excursion['message'])}" if excursion["message"] else ""))
    cols = st.columns([1.2, 1])
    with cols[0]:
        rows = cmp.compare_branches(store, [p.branch for p in readings]).rows
        span = max(p.steps_planned for p in readings)
        metric = prb.step_metric(store, readings[0].branch) or "loss"
        figure = build_aligned_figure(aligned_frame(store, rows, metric, span=span), metric=metric,
                                      highlight=best.branch if best else None, height=300)
        live_chart(figure, key="probes", height=300)
    with cols[1]:
        table = probe_table(readings, best)
        with st.container(key="probe_table"):
            st.dataframe(table, hide_index=True, width="stretch")
        if best is None:
            if excursion["state"] != EXCURSION_RUNNING:
                st.caption("No winner: every probe diverged or logged no loss.")
            return
        param = best.param
        kind = cmd.SET_LR if param == "lr" else cmd.SET_MOMENTUM
        st.caption(f"Winner: branch {best.branch}, {param} {short_number(best.value)}")
        paused = status.get("effective_state") == "paused"
        st.button(f"Continue with the winner's {param} ({short_number(best.value)})", key="probe_adopt_value",
                  on_click=_adopt_value, args=(store, kind, best.value), type="primary", width="stretch",
                  help="Sets it on the run's own branch" + (", then resumes the paused run." if paused else "."))
        if best.end_checkpoint is not None:
            command_button(st, f"Continue from the winner (checkpoint #{best.end_checkpoint})", "probe_adopt_branch",
                           store, cmd.ROLLBACK, {"checkpoint": best.end_checkpoint, "hparams": cmd.HPARAMS_CHECKPOINT},
                           width="stretch", help="Rolls back to the winner's end: the run goes on from its weights.")


def _adopt_value(store: RunStore, kind: str, value: float) -> None:
    """Set the winner's value and, when the run waits paused after its probes, resume it (paused
    as the run is at the click, not as the page last drew it)."""
    send(store, kind, {"value": value}, key="probe_adopt_value")
    if store.status().get("effective_state") == "paused":
        send(store, cmd.RESUME, None, key="probe_adopt_resume")


def sweep_results(store: RunStore, excursion: dict[str, Any]) -> None:
    reading = swp.read_sweep(store, excursion["id"])
    if reading is None or not len(reading.lrs):
        return
    st.markdown(f"**lr sweep #{excursion['id']}** · {excursion['state']} · from step {excursion['origin_step']}")
    cols = st.columns([1.6, 1], vertical_alignment="center")
    with cols[0]:
        live_chart(build_sweep_figure(sweep_frame(reading), reading), key="sweep", height=300)
    with cols[1]:
        facts = {"steepest descent": reading.steepest_lr, "lowest loss": reading.min_loss_lr,
                 "divergence": reading.divergence_lr, "suggested": reading.suggested_lr}
        st.markdown("  \n".join(f"{k}: lr **{short_number(v)}**" for k, v in facts.items() if v is not None)
                    or "The loss never fell: no lr to suggest.")
        lr = reading.suggested_lr
        if lr is not None and math.isfinite(lr):
            command_button(st, f"Use lr {lr:.3g}", "sweep_use_lr", store, cmd.SET_LR, {"value": float(f"{lr:.3g}")},
                           type="primary", width="stretch")


# -- comparing branches -------------------------------------------------------------------------
def default_branches(ids: list[int], kinds: dict[int, tuple[str, int | None]]) -> list[int]:
    """The newest few branches, sweeps left out (their lr is not one value)."""
    return [b for b in ids if kinds.get(b, (cmp.KIND_RUN,))[0] != cmp.KIND_SWEEP][-COMPARE_DEFAULT_MAX:]


def comparison_table(table: cmp.Comparison) -> pd.DataFrame:
    """The comparison as the page shows it."""
    n = table.at_steps
    loss_head = f"{table.loss_metric or 'loss'} @ +{n} steps" if n else "loss @ +N steps"
    rows = []
    for r in table.rows:
        rows.append({
            "branch": f"{r.branch}{' (trainer)' if r.current else ''}",
            "kind": r.kind + (f" #{r.excursion}" if r.excursion else ""),
            "parent": str(r.parent) if r.parent else "–", "from": f"#{r.from_checkpoint}" if r.from_checkpoint else "start",
            "fork": f"epoch {r.fork_epoch} · step {r.fork_step}",
            "changed": cmp.describe_change(r.changed) or "–",
            f"best {table.best_metric or ''}".strip(): r.best_value,
            "best epoch": r.best_epoch, loss_head: r.loss_at, "length": r.length,
        })
    frame = pd.DataFrame(rows)
    frame["best epoch"] = frame["best epoch"].astype("Int64")  # whole epochs, blank where none
    return frame


def compare_panel(store: RunStore) -> None:
    ids = [b["id"] for b in store.branches()]
    if not ids:
        st.caption("No branch yet.")
        return
    kinds = cmp.branch_kinds(store)
    if "compare_branches" in st.session_state:  # keep the choice to branches the run still has
        st.session_state["compare_branches"] = [b for b in st.session_state["compare_branches"] if b in ids]
    else:
        st.session_state["compare_branches"] = default_branches(ids, kinds)
    labels = {b: f"{b} · {kinds[b][0]} #{kinds[b][1]}" if b in kinds else f"{b} · run" for b in ids}
    chosen = st.multiselect("Branches", ids, key="compare_branches", format_func=lambda b: labels.get(b, str(b)))
    if not chosen:
        st.caption("Pick branches to compare.")
        forget_sent("compare")
        return
    table = cmp.compare_branches(store, chosen)
    with st.container(key="compare_table"):
        st.dataframe(comparison_table(table), hide_index=True, width="stretch")
    st.caption(plain(f"Losses are the EWMA (β {cmp.LOSS_BETA:g}) of the step metric the same number of steps after "
                     "each branch's fork, so they compare like with like (sweeps left out)"
                     + (f"; {cmp.describe_n(table)}." if table.at_steps else ".")))
    if table.loss_metric:
        figure = build_aligned_figure(aligned_frame(store, table.rows, table.loss_metric), metric=table.loss_metric)
        live_chart(figure, key="compare", height=360)
