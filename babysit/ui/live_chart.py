"""A Plotly chart that updates in place, so zoom, pan, log axes and hidden traces survive refreshes.

`st.plotly_chart` remounts the chart whenever the figure's data changes (Streamlit 1.67), so the
view resets at every auto-refresh, `uirevision` or not. This is a Streamlit v2 component
(`st.components.v2`) instead. Its JavaScript (live_chart/live_chart.js) runs in the app page, not
an iframe: Streamlit imports the module once and calls it again on each rerun whose data changed,
with the same parent element for as long as the element stays mounted (Streamlit keys it by
`key`, so it survives elements appearing above it). The module keeps one plot per parent element
and updates it with `Plotly.react` under a stable `layout.uirevision`, which keeps zoom, pan,
autoscale and legend visibility; edits that uirevision does not cover (the y axis type from the
mode bar's log button, anything an updatemenu sets) it records from `plotly_relayout` and applies
again to each new figure, unless the server has changed that attribute itself. It reports the
visible x range back (`setStateValue`), only when the user changed it and only when it differs
from what it last sent, so the report neither resets the view nor starts a rerun loop.

Getting plotly.js (the 4.8 MB plotly.min.js inside the plotly wheel) into the page, no CDN:
a v2 component's inline `js` travels inside the element's message on *every* rerun, so inlining
plotly.js sent 4.85 MB per rerun (measured in Chromium, websocket payload bytes). A second,
data-free "loader" component with plotly.js inline is deduplicated by Streamlit's ForwardMsg
cache after the first run (~33 KB/rerun, as without it), but that rests on hidden cache settings
and still pushes 4.8 MB through the websocket on every page load. A v2 `asset_dir` needs a
`[tool.streamlit.component]` manifest in pyproject.toml and an installed package. So the files
are served over HTTP by Streamlit's own component file server: `declare_component(path=...)`
(the public v1 API, never mounted) serves the plotly wheel's package_data folder and our
live_chart/ folder under ./component/<name>/. The browser fetches each once per page load
(plotly.min.js: 1.48 MB gzip-compressed), and a rerun carries only a 236-byte stub that imports
the real module by a content-versioned URL, plus the figure: ~1.3 KB per rerun in all for a
three-point figure (the stub, the data envelope and Streamlit's own messages), versus ~13 KB with
the 11.9 KB module inline. plotly.js then takes ~3 s to start in headless Chromium, once per page.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly
import plotly.io.json as plotly_json
import streamlit as st
from streamlit.components.v1 import declare_component

_ASSETS = Path(__file__).with_name("live_chart")
_JS_FILE = "live_chart.js"
# plotly.min.js ships inside the plotly wheel; serve that folder rather than a copy of 4.8 MB.
_PLOTLY_DIR = Path(plotly.__file__).parent / "package_data"
_PLOTLY_FILE = "plotly.min.js"
# declare_component serves each folder at ./component/<this module>.<name>/ (see _serve_assets).
_SERVED = {"assets": _ASSETS, "plotly_js": _PLOTLY_DIR}
# Versioned URLs, so a browser never mixes a cached old file with a new server.
_JS_URL = (
    f"./component/{__name__}.assets/{_JS_FILE}"
    f"?v={hashlib.sha256((_ASSETS / _JS_FILE).read_bytes()).hexdigest()[:12]}"
)
_PLOTLY_URL = f"./component/{__name__}.plotly_js/{_PLOTLY_FILE}?v={plotly.__version__}"

MIN_HEIGHT = 120

# All the component sends on each rerun, besides the figure: fetch the real module once (the
# browser keeps one instance per URL, and with it every chart's state) and hand over. The URL is
# made absolute here because this code runs from a blob: URL.
_STUB_JS = f"""
const url = new URL({json.dumps(_JS_URL)}, document.baseURI).href;
export default async function (component) {{
  const module = await import(url);
  return module.default(component);
}}
"""

_chart = st.components.v2.component(
    "babysit.live_chart",
    js=_STUB_JS,
    # Plotly puts its CSS (mode bar, hover labels) in the document head, which a shadow root would
    # not see.
    isolate_styles=False,
)


def _ignore() -> None:
    """Streamlit reports a state key only if it has a change callback; we have nothing to do."""


def _serve_assets() -> None:
    # A v1 component is, among other things, Streamlit's public way to serve a folder over HTTP;
    # we never mount one. Registering the same path again is a no-op, and it has to happen on
    # whichever runtime runs this script, so it is done on every call (microseconds).
    for name, folder in _SERVED.items():
        declare_component(name, path=str(folder))


def figure_json(figure: Mapping[str, Any] | Any) -> str:
    """The figure as JSON that the browser can parse: numpy arrays, pandas, dates, NaN and inf are
    converted by plotly's own encoder (NaN becomes null, which plotly draws as a gap)."""
    if hasattr(figure, "to_plotly_json"):
        figure = figure.to_plotly_json()
    if not isinstance(figure, Mapping):
        raise TypeError(f"figure must be a Plotly figure dict, got {type(figure).__name__}")
    unknown = set(figure) - {"data", "layout"}
    if unknown:
        raise ValueError(f"figure must have only data and layout, got {sorted(unknown)}")
    return plotly_json.to_json_plotly({"data": figure.get("data", []), "layout": figure.get("layout", {})})


def live_chart(figure: Mapping[str, Any], *, key: str, height: int = 640) -> dict | None:
    """Draw `figure` and update it in place on later reruns; return what the user looks at.

    `figure` is a Plotly figure dict (``go.Figure(...).to_plotly_json()``; a Figure works too).
    Returns None until the user first zooms, pans or autoscales; then ``{"x_range": [lo, hi]}``
    (data units, also on a log axis; date strings on a date axis), or ``{"x_range": None}`` after
    an autoscale or reset, so the caller can send a denser view of just that window (use
    `live_chart_view` to read it before building the figure). Subplots are expected to share one
    x axis. The chart takes the column's width and `height` pixels; its colours and font follow
    the Streamlit theme wherever the figure's layout does not set them. A new ``layout.uirevision``
    resets the user's view; the mode bar's log button toggles the top y axis (``yaxis``).
    ``st.session_state[key]`` belongs to the chart.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    if isinstance(height, bool) or not isinstance(height, int) or height < MIN_HEIGHT:
        raise ValueError(f"height must be an int >= {MIN_HEIGHT} pixels, got {height!r}")
    _serve_assets()
    result = _chart(
        key=key,
        data={"figure": figure_json(figure), "height": height, "key": key, "plotly_url": _PLOTLY_URL},
        height=height,
        on_view_change=_ignore,
    )
    # Streamlit lists every key that has a callback, as None until the browser first sets it.
    view = result.get("view")
    return dict(view) if view is not None else None


def live_chart_view(key: str) -> dict | None:
    """What ``live_chart(..., key=key)`` will return in this run, readable before the figure is built.

    Building the figure from this (rather than from the previous run's return value) sends the
    denser window in the very rerun that the zoom caused, which matters when nothing else reruns.
    """
    state = st.session_state.get(key)  # the component's own state, a dict, once it reported
    view = state.get("view") if isinstance(state, Mapping) else None
    return dict(view) if view is not None else None
