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
again to each new figure, unless the server has changed that attribute itself. The axis ranges
are the module's own: a person's zoom on an axis holds until they autoscale it, a y axis nobody
zoomed takes the range the figure's ``layout.meta.fit`` gives (or everything, after a click on
the note the figure names ``babysit-clip-…``), and an x zoom whose right edge was at
``layout.meta.newest`` moves on with new points. It reports what the user looks at back
(`setStateValue`: the x range, whether it follows, the branches clicked to be drawn in full),
only when the user changed it and only when it differs from what it last sent, so the report
neither resets the view nor starts a rerun loop.

Getting plotly.js into the page, no CDN: a v2 component's inline `js` travels inside the element's
message on *every* rerun, so the files are served over HTTP by Streamlit's own component file
server instead: `declare_component(path=...)` (the public v1 API, never mounted) serves our
live_chart/ folder under ./component/<name>/, and a rerun carries only a ~1 KB stub that starts
loading plotly.js and imports the real module by a content-versioned URL, plus the figure. The plotly.js served is the
official "basic" partial bundle committed in live_chart/ (see live_chart/PLOTLY.md): the chart
uses SVG scatter traces only, and the basic bundle is a quarter of the full plotly.min.js to
download and to evaluate, which is most of the time to the first chart.

Refreshes send what changed, not the whole figure: see babysit/ui/figure_delta.py. The browser
module keeps the figure it drew and applies each delta in order; a delta that does not follow the
figure it holds (a lost message) makes it ask for the whole figure again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.io.json as plotly_json
import streamlit as st
from streamlit.components.v1 import declare_component

from .figure_delta import figure_delta

_ASSETS = Path(__file__).with_name("live_chart")
_JS_FILE = "live_chart.js"
_PLOTLY_FILE = "plotly-basic.min.js"  # plotly.js's basic bundle, committed (live_chart/PLOTLY.md)
# declare_component serves each folder at ./component/<this module>.<name>/ (see _serve_assets).
_SERVED = {"assets": _ASSETS}
# Versioned URLs, so a browser never mixes a cached old file with a new server.
_JS_URL = (
    f"./component/{__name__}.assets/{_JS_FILE}"
    f"?v={hashlib.sha256((_ASSETS / _JS_FILE).read_bytes()).hexdigest()[:12]}"
)
_PLOTLY_URL = (
    f"./component/{__name__}.assets/{_PLOTLY_FILE}"
    f"?v={hashlib.sha256((_ASSETS / _PLOTLY_FILE).read_bytes()).hexdigest()[:12]}"
)

MIN_HEIGHT = 120

# Loading plotly.js: one <script> per page, its promise on window. Both stubs below start it as
# soon as they run, so plotly.js downloads and evaluates while the rest of the page (and the
# chart's own module) is still on its way; after a failure the next update tries again.
_ENSURE_PLOTLY_JS = f"""
function ensurePlotly(source) {{
  if (window.__babysitPlotly) return;
  const url = new URL({json.dumps(_PLOTLY_URL)}, document.baseURI).href;
  window.__babysitPlotly = (async () => {{
    const src = source ? await source(url) : url; // the preload's may come from Cache Storage
    return new Promise((resolve, reject) => {{
      const script = document.createElement("script");
      script.src = src;
      script.async = true;
      const done = () => src !== url && URL.revokeObjectURL(src);
      script.onload = () => {{
        done();
        performance.mark("babysit:plotly-loaded"); // for bench/first_chart.py's timeline
        window.Plotly ? resolve(window.Plotly) : reject(new Error(`${{url}} did not define Plotly`));
      }};
      script.onerror = () => {{
        done();
        window.__babysitPlotly = null;
        script.remove();
        reject(new Error(`could not load plotly.js from ${{url}}`));
      }};
      document.head.appendChild(script);
    }});
  }})();
  window.__babysitPlotly.catch(() => {{}}); // reported by the chart that awaits it
}}
"""

# plotly.js through a copy in the browser's Cache Storage, for both stubs below (Streamlit's
# component file server sends no max-age and no validators, so the browser would fetch the 1.2 MB
# again on every visit); the URL carries the file's hash, so a new file is a new entry and the old
# ones are dropped. Where there is no Cache Storage (plain http to another host) it loads as usual.
# Whichever stub runs first on a page starts the one load; the other awaits it.
_CACHED_PLOTLY_JS = """
async function cachedPlotly(src) {
  try {
    const cache = await caches.open("babysit-plotly");
    let response = await cache.match(src);
    if (!response) {
      response = await fetch(src);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      await cache.put(src, response.clone());
      for (const old of await cache.keys()) if (old.url !== src) cache.delete(old);
    }
    return URL.createObjectURL(await response.blob());
  } catch (err) {
    return src;
  }
}
"""

# All the chart sends on each rerun, besides the figure: start plotly.js, fetch the real module
# once (the browser keeps one instance per URL, and with it every chart's state) and hand over.
# The URLs are made absolute here because this code runs from a blob: URL.
_STUB_JS = _ENSURE_PLOTLY_JS + _CACHED_PLOTLY_JS + f"""
const url = new URL({json.dumps(_JS_URL)}, document.baseURI).href;
export default async function (component) {{
  ensurePlotly(cachedPlotly); // the chart may mount before the preload: either way from the cache
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

# A data-free component placed first on the page: it starts loading plotly.js while the server
# still builds the page and the figure.
_preloader = st.components.v2.component("babysit.plotly_preload", js=_ENSURE_PLOTLY_JS + _CACHED_PLOTLY_JS + """
export default function () {
  ensurePlotly(cachedPlotly);
}
""", isolate_styles=False)
PRELOAD_KEY = "babysit_plotly_preload"


def preload_plotly() -> None:
    """Start loading plotly.js in the browser now; call it as early in the script as possible.
    It draws nothing (st-key-babysit_plotly_preload, for CSS that hides its empty slot)."""
    _serve_assets()
    _preloader(key=PRELOAD_KEY, data={})


def _ignore() -> None:
    """Streamlit reports a state key only if it has a change callback; we have nothing to do."""


def _serve_assets() -> None:
    # A v1 component is, among other things, Streamlit's public way to serve a folder over HTTP;
    # we never mount one. Registering the same path again is a no-op, and it has to happen on
    # whichever runtime runs this script, so it is done on every call (microseconds).
    for name, folder in _SERVED.items():
        declare_component(name, path=str(folder))


def _checked(figure: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """A Plotly figure (a Figure or its dict) as a mapping of data and layout, or a clear error."""
    if hasattr(figure, "to_plotly_json"):
        figure = figure.to_plotly_json()
    if not isinstance(figure, Mapping):
        raise TypeError(f"figure must be a Plotly figure dict, got {type(figure).__name__}")
    unknown = set(figure) - {"data", "layout"}
    if unknown:
        raise ValueError(f"figure must have only data and layout, got {sorted(unknown)}")
    return figure


def _plain(figure: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The figure as plain lists and dicts, comparable with the one sent before. babysit's own
    figures already are; anything holding numpy or pandas goes through plotly's JSON encoder."""
    figure = _checked(figure)
    plain = {"data": list(figure.get("data", [])), "layout": figure.get("layout", {})}
    return plain if _is_plain(plain) else json.loads(figure_json(plain))


def _is_plain(node: Any) -> bool:
    if isinstance(node, Mapping):
        return isinstance(node, dict) and all(_is_plain(v) for v in node.values())
    if isinstance(node, list):  # point arrays are long and of one kind: their ends tell
        return not node or (_is_plain(node[0]) and _is_plain(node[-1]))
    return isinstance(node, (str, int, float, bool, type(None)))


def figure_json(figure: Mapping[str, Any] | Any) -> str:
    """The figure as JSON that the browser can parse: numpy arrays, pandas, dates, NaN and inf are
    converted by plotly's own encoder (NaN becomes null, which plotly draws as a gap)."""
    figure = _checked(figure)
    return plotly_json.to_json_plotly({"data": figure.get("data", []), "layout": figure.get("layout", {})})


def _message(key: str, figure: dict[str, Any], resync: Any) -> dict[str, Any]:
    """This run's figure message: the whole figure the first time (or when the browser asked for
    it), else a delta on the last one sent, or the very same message when nothing changed."""
    sent = st.session_state.get(_sent_key(key))
    delta = None
    if sent is not None and resync == sent["resync"]:
        delta = figure_delta(sent["figure"], figure)
    if delta is None:
        rev = sent["rev"] + 1 if sent else 1
        return {"full": figure_json(figure), "rev": rev}
    if not delta["traces"] and delta["layout"] is None:
        return sent["message"]
    return {"delta": plotly_json.to_json_plotly(delta), "rev": sent["rev"] + 1, "base": sent["rev"]}


def _remember(key: str, message: dict[str, Any], figure: dict[str, Any], resync: Any) -> None:
    """What the browser holds once ``message`` arrives: the next delta is made against it."""
    st.session_state[_sent_key(key)] = {"rev": message["rev"], "figure": figure, "message": message,
                                        "resync": resync}


def _sent_key(key: str) -> str:
    return f"_babysit_live_chart_sent_{key}"


def forget_sent(key: str) -> None:
    """Call when the chart is not drawn in a run: the next one sends the whole figure."""
    st.session_state.pop(_sent_key(key), None)


def live_chart(figure: Mapping[str, Any], *, key: str, height: int = 640, fit_viewport: bool = False) -> dict | None:
    """Draw `figure` and update it in place on later reruns; return what the user looks at.

    `figure` is a Plotly figure dict (``go.Figure(...).to_plotly_json()``; a Figure works too).
    Returns None until the user first zooms, pans or autoscales; then ``{"x_range": [lo, hi]}``
    (data units, also on a log axis; date strings on a date axis), or ``{"x_range": None}`` after
    an autoscale or reset, so the caller can send a denser view of just that window (use
    `live_chart_view` to read it before building the figure); with ``"follow": True`` when the
    window's right edge was at the figure's ``layout.meta.newest`` (it moves on with new points),
    and ``"full": [branch, ...]`` once the user clicked curves whose ``meta.role`` is "abandoned"
    (the branch in ``customdata``) to see them in full. Subplots are expected to share one
    x axis. The chart takes the column's width and `height` pixels (with ``fit_viewport``, at most
    that: the height from its top to the bottom of the window); its colours and font follow
    the Streamlit theme wherever the figure's layout does not set them. A new ``layout.uirevision``
    resets the user's view; the mode bar's log button toggles the top y axis (``yaxis``).
    Only the first figure is sent whole; later ones as what changed (babysit/ui/figure_delta.py).
    ``st.session_state[key]`` belongs to the chart.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    if isinstance(height, bool) or not isinstance(height, int) or height < MIN_HEIGHT:
        raise ValueError(f"height must be an int >= {MIN_HEIGHT} pixels, got {height!r}")
    _serve_assets()
    plain = _plain(figure)
    state = st.session_state.get(key)
    resync = state.get("resync") if isinstance(state, Mapping) else None
    message = _message(key, plain, resync)
    result = _chart(
        key=key,
        data={**message, "height": height, "fit": fit_viewport, "key": key},
        height="content" if fit_viewport else height,
        on_view_change=_ignore,
        on_resync_change=_ignore,
    )
    # Recorded once the message is on its way; if it never arrives, the browser asks again.
    _remember(key, message, plain, resync)
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
