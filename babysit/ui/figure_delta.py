"""What a chart refresh sends: the whole figure once, then only what changed since.

A live learning curve changes at its end: new points are appended, the last downsampling bucket
moves (babysit/ui/data.py aligns its buckets so the earlier ones stay put). So each trace is sent
as "keep the first n points of x (and y, text) and append these", the layout only when it changed,
and a trace whose other attributes changed is sent whole. Pure functions on figure dicts; the
browser's side is `applyDelta` in live_chart/live_chart.js.
"""

from __future__ import annotations

from typing import Any

# The per-point arrays a trace may have; the rest of a trace is small and sent whole on a change.
POINT_KEYS = ("x", "y", "text")


def common_prefix(a: list[Any], b: list[Any]) -> int:
    """How many leading items ``a`` and ``b`` share (a binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def figure_delta(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The changes that turn figure ``old`` into ``new``, or None when sending ``new`` whole is
    the simpler message (another number of traces).

    The delta is ``{"traces": [...], "layout": layout or None}``; each trace entry has ``i``, its
    index, and either ``trace`` (the whole new trace) or, per changed point array,
    ``{key: {"keep": n, "add": [...]}}``.
    """
    old_traces, new_traces = old.get("data", []), new.get("data", [])
    if len(old_traces) != len(new_traces):
        return None
    changes: list[dict[str, Any]] = []
    for i, (before, after) in enumerate(zip(old_traces, new_traces)):
        if before == after:
            continue
        rest_before = {k: v for k, v in before.items() if k not in POINT_KEYS}
        rest_after = {k: v for k, v in after.items() if k not in POINT_KEYS}
        # Point arrays as lists can be cut and extended; plotly's typed arrays ({"bdata": ...}) not.
        lists = all(isinstance(t.get(k, []), list) for t in (before, after) for k in POINT_KEYS)
        if not lists or rest_before != rest_after or any((k in before) != (k in after) for k in POINT_KEYS):
            changes.append({"i": i, "trace": after})
            continue
        change: dict[str, Any] = {"i": i}
        for key in POINT_KEYS:
            if key in after and before[key] != after[key]:
                keep = common_prefix(before[key], after[key])
                change[key] = {"keep": keep, "add": after[key][keep:]}
        changes.append(change)
    layout = new.get("layout", {})
    return {"traces": changes, "layout": layout if layout != old.get("layout", {}) else None}


def apply_delta(old: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``delta`` applied (what the browser does; for tests and for checking)."""
    traces = [dict(t) for t in old.get("data", [])]
    for change in delta["traces"]:
        i = change["i"]
        if "trace" in change:
            traces[i] = change["trace"]
            continue
        for key in POINT_KEYS:
            if key in change:
                traces[i][key] = traces[i][key][:change[key]["keep"]] + change[key]["add"]
    layout = delta["layout"] if delta["layout"] is not None else old.get("layout", {})
    return {"data": traces, "layout": layout}
