// babysit live chart: a Plotly figure that updates in place (see babysit/ui/live_chart.py).
//
// Streamlit imports this module once per page and calls the default export again whenever the
// element's data (or the theme) changes, with the same parentElement for as long as the element
// stays mounted. So the plot div, the figure it draws and everything the user did to it live in
// `views`, keyed by that element. The server sends the whole figure once and then deltas (what
// changed: babysit/ui/figure_delta.py); each is applied at once, in order, and the newest figure
// drawn when plotly is free. A delta that does not follow the figure held here (a lost message, a
// remount) asks the server for the whole figure again. plotly.js is loaded once per page, from the
// URL the server sends, and shared by every chart.
//
// The axis ranges are this module's, not plotly's uirevision machinery's: a person's zoom on an
// axis is kept until they autoscale it (double-click); a y axis nobody zoomed takes the range the
// server fitted to the live curve (layout.meta.fit: {axis: {linear, log}}), or everything under
// "show all" (a click on the note the server puts on the axis); an x zoom whose right edge was at
// the newest point (layout.meta.newest) moves on with new points, one into the past stays put.
// A click on a faint abandoned branch (a trace with meta.role "abandoned", the branch in
// customdata) asks the server to draw it in full; a click on a branch in full folds it back.

const views = new WeakMap();

// Relayout keys that Plotly.react already keeps under a stable uirevision (zoom, pan, autoscale) or
// that only follow the container size. Every other user edit (axis type, anything an updatemenu
// sets) is not covered by uirevision, so we re-apply it ourselves after each update.
const KEPT_BY_PLOTLY = /(^|\.)(range(\[\d+\])?|autorange)$|^(autosize|width|height)$/;
const RANGE_EDIT = /^([xy]axis\d*)\.(range(\[[01]\])?|autorange)$/;
const AXIS_KEY = /^[xy]axis\d*$/;
const SHOW_ALL_AXES = ["yaxis", "yaxis2", "yaxis5"]; // what "show all" widens: losses and metrics
const FOLLOW_SLACK = 0.02; // a zoom whose right edge is this close (of its width) to the newest point follows
const MAX_FULL = 6; // branches drawn in full at once (the server holds the same bound)
const DEFAULT_UIREVISION = "babysit-live-chart";
const POINT_KEYS = ["x", "y", "text"];
const MIN_FIT_HEIGHT = 360; // px: below this a fitted chart stops shrinking and the page scrolls
const FIT_MARGIN = 12; // px left under a chart fitted to the window

// A small "log scale" glyph for the mode bar: an axis corner and a concave curve (SVG coordinates).
const LOG_ICON = {
  width: 1000,
  height: 1000,
  path:
    "M80 80 H200 V800 H920 V920 H80 Z " +
    "M260 740 C340 420 540 250 920 220 V340 C600 370 430 500 380 760 Z",
};

// plotly.js is loaded by the component's stub (babysit/ui/live_chart.py: _ENSURE_PLOTLY_JS), which
// runs before this module is even fetched and leaves its promise on window (one per page, shared
// by every chart and every revision of this module).
function plotlyLoaded() {
  return window.__babysitPlotly || Promise.reject(new Error("plotly.js could not be loaded; retrying on the next update"));
}

// "updatemenus[0].active" -> ["updatemenus", 0, "active"]
function parsePath(path) {
  const parts = [];
  for (const piece of path.split(".")) {
    const m = piece.match(/^([^[\]]+)((?:\[\d+\])*)$/);
    if (!m) return null;
    parts.push(m[1]);
    for (const idx of m[2].matchAll(/\[(\d+)\]/g)) parts.push(Number(idx[1]));
  }
  return parts;
}

function getPath(obj, parts) {
  let node = obj;
  for (const p of parts) {
    if (node === null || typeof node !== "object") return undefined;
    node = node[p];
  }
  return node;
}

function setPath(obj, parts, value) {
  let node = obj;
  for (let i = 0; i < parts.length - 1; i++) {
    const p = parts[i];
    if (node[p] === null || typeof node[p] !== "object") {
      node[p] = typeof parts[i + 1] === "number" ? [] : {};
    }
    node = node[p];
  }
  node[parts[parts.length - 1]] = value;
}

const isPlainObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

// {"yaxis": {"type": "log"}} and {"yaxis.type": "log"} are the same edit to Plotly.relayout.
function flatten(edit, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(edit)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (isPlainObject(v)) flatten(v, key, out);
    else out[key] = v;
  }
  return out;
}

// Fill `defaults` in wherever `layout` says nothing, so the figure's own choices always win.
function mergeUnder(defaults, layout) {
  for (const [k, v] of Object.entries(defaults)) {
    if (layout[k] === undefined) layout[k] = v;
    else if (isPlainObject(v) && isPlainObject(layout[k])) mergeUnder(v, layout[k]);
  }
  return layout;
}

// The Streamlit theme reaches the component as --st-* custom properties on an ancestor.
function themeLayout(el, layout) {
  const css = getComputedStyle(el);
  const v = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const text = v("--st-text-color", "#31333f");
  const grid = v("--st-border-color-light", "rgba(49, 51, 63, 0.1)");
  const line = v("--st-border-color", "rgba(49, 51, 63, 0.2)");
  const colorway = v("--st-chart-categorical-colors", "")
    .split(",")
    .map((c) => c.trim())
    .filter(Boolean);
  const defaults = {
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: v("--st-background-color", "#ffffff"),
    font: { color: text, family: v("--st-font", "sans-serif") },
    legend: { bgcolor: "rgba(0,0,0,0)" },
    hoverlabel: { font: { family: v("--st-font", "sans-serif") } },
    margin: { l: 56, r: 16, t: 32, b: 40 },
  };
  if (colorway.length) defaults.colorway = colorway;
  const axis = { gridcolor: grid, zerolinecolor: line, linecolor: line };
  for (const key of new Set(["xaxis", "yaxis", ...Object.keys(layout).filter((k) => AXIS_KEY.test(k))])) {
    defaults[key] = axis;
  }
  return mergeUnder(defaults, layout);
}

function createView(parentElement) {
  const root = document.createElement("div");
  root.className = "babysit-live-chart";
  root.style.width = "100%";
  parentElement.appendChild(root);
  const view = {
    root,
    gd: null,
    busy: false,
    component: null,
    uirevision: undefined,
    serverLayout: {},
    sticky: new Map(), // relayout key -> {user, server}: user edits Plotly.react would undo
    lastSent: undefined, // JSON of the last x_range reported, so we never report twice
    renders: 0,
    observer: null,
    config: null,
    model: null, // the figure the server has sent so far ({data, layout}), deltas applied
    rev: undefined, // its revision
    dirty: false, // model changed since it was last drawn
    settings: null, // the newest message's height and fit
    fitted: null, // the height a fitted chart was given
    zoom: new Map(), // axis name -> {type, range}: a person's zoom, kept until they autoscale that axis
    follow: false, // the x zoom moves on with new points
    reportedLo: null, // the left edge of the x window last reported
    yAll: false, // "show all": the loss and metrics axes autorange over everything drawn
    full: [], // branches asked for in full
    axisRevision: 0,
    drawnLayout: null, // the server's layout of the figure on screen (set once it is drawn)
  };
  views.set(parentElement, view);
  return view;
}

// What the server hears: the x window (data units, null for the whole run), whether it follows
// new points, and the branches asked for in full. Only when it changed: an unchanged value would
// only cost a rerun.
function report(view) {
  const x = view.zoom.get("xaxis");
  const axis = view.gd && view.gd._fullLayout && view.gd._fullLayout.xaxis;
  let xRange = null;
  if (x) {
    xRange = x.range.slice();
    // A log axis keeps its range in decades; the server thinks in data units.
    if (axis && axis.type === "log") xRange = xRange.map((v) => 10 ** v);
    view.reportedLo = toLinear(axis, x.range[0]);
  } else {
    view.reportedLo = null;
  }
  const state = { x_range: xRange };
  if (x && view.follow) state.follow = true;
  if (view.full.length) state.full = view.full.slice();
  const json = JSON.stringify(state);
  if (json === view.lastSent) return;
  if (view.lastSent === undefined && xRange === null && !view.full.length) return; // nothing to say yet
  view.lastSent = json;
  view.component.setStateValue("view", state);
}

// Range values in plotly's own numbers (a date axis: milliseconds) and back.
function toLinear(axis, value) {
  return axis && axis.r2l ? axis.r2l(value) : Number(value);
}

function fromLinear(axis, value) {
  return axis && axis.type !== "date" && axis.l2r ? axis.l2r(value) : value;
}

// The newest point's x (layout.meta.newest): of the figure held, or (``drawn``) of the one on screen,
// which a person's zoom is measured against (the figure held may be a refresh ahead of it).
function newestX(view, drawn = false) {
  const layout = drawn ? view.drawnLayout : view.model && view.model.layout;
  const meta = layout && layout.meta;
  return meta && typeof meta.newest === "number" ? meta.newest : null;
}

function onRelayout(view, edit) {
  const flat = flatten(edit);
  for (const [key, value] of Object.entries(flat)) {
    if (KEPT_BY_PLOTLY.test(key)) continue;
    const parts = parsePath(key);
    if (parts) view.sticky.set(key, { parts, user: value, server: getPath(view.serverLayout, parts) });
  }
  const full = view.gd._fullLayout;
  const touched = new Set();
  for (const key of Object.keys(flat)) {
    const m = key.match(RANGE_EDIT);
    if (m) touched.add(m[1]);
  }
  let xTouched = false;
  let refit = false;
  for (const name of touched) {
    const axis = full[name];
    if (!axis) continue;
    if (flat[`${name}.autorange`] === true || axis.autorange === true) {
      view.zoom.delete(name);
      if (name.startsWith("y")) refit = true; // back to the server's fit, not plotly's everything
    } else {
      view.zoom.set(name, { type: axis.type, range: axis.range.slice() });
    }
    if (name.startsWith("x")) xTouched = true;
  }
  if (xTouched) {
    // Subplots share x (matched axes move together): the first x axis speaks for them.
    const first = [...touched].find((name) => name.startsWith("x"));
    if (first !== "xaxis") {
      if (view.zoom.has(first)) view.zoom.set("xaxis", { ...view.zoom.get(first) });
      else view.zoom.delete("xaxis");
    }
    const x = view.zoom.get("xaxis");
    const newest = newestX(view, true);
    if (x && newest !== null) {
      const [lo, hi] = x.range.map((v) => toLinear(full.xaxis, v));
      view.follow = hi >= newest - FOLLOW_SLACK * (hi - lo);
    } else {
      view.follow = false;
    }
    report(view);
  }
  if (refit) redraw(view);
}

function redraw(view) {
  view.dirty = true;
  if (!view.busy) pump(view);
}

// "show all" and back: a click on the note the server puts on a fitted axis.
function onAnnotationClick(view, event) {
  const name = (event && event.annotation && event.annotation.name) || "";
  if (name.startsWith("babysit-clip-")) view.yAll = true;
  else if (name.startsWith("babysit-fit-")) view.yAll = false;
  else return;
  for (const axis of SHOW_ALL_AXES) view.zoom.delete(axis);
  redraw(view);
}

// A click on a faint abandoned branch asks for it in full; on a branch in full, folds it back.
function onPointClick(view, event) {
  const point = event && event.points && event.points[0];
  const meta = (point && point.data && point.data.meta) || {};
  let branch = null;
  if (meta.role === "abandoned") branch = point.customdata;
  else if (meta.role === "full") branch = meta.branch;
  if (typeof branch !== "number") return;
  const at = view.full.indexOf(branch);
  if (at >= 0) view.full.splice(at, 1);
  else view.full = view.full.concat([branch]).slice(-MAX_FULL);
  report(view);
}

// The ranges this module owns (see the top of the file), set on the layout about to be drawn.
function applyRanges(view, layout, data) {
  view.axisRevision += 1;
  for (const key of Object.keys(layout)) {
    // A new revision per axis each time: plotly then keeps no range of its own across updates.
    if (AXIS_KEY.test(key) && isPlainObject(layout[key])) layout[key].uirevision = view.axisRevision;
  }
  const typeOf = (name) => (layout[name] && layout[name].type) || "linear";
  for (const [name, zoom] of [...view.zoom]) {
    if (name.startsWith("y") && zoom.type && zoom.type !== typeOf(name)) {
      view.zoom.delete(name); // a zoom in other units (the axis went log since): let it go
      continue;
    }
    if (!isPlainObject(layout[name])) layout[name] = {};
    layout[name].range = zoom.range.slice();
    layout[name].autorange = false;
  }
  // Following: once the newest point passes the right edge, the window moves on with it.
  const x = view.zoom.get("xaxis");
  const newest = newestX(view);
  const axis = view.gd && view.gd._fullLayout && view.gd._fullLayout.xaxis;
  if (x && view.follow && newest !== null && axis) {
    let [lo, hi] = x.range.map((v) => toLinear(axis, v));
    if (newest > hi) {
      const width = hi - lo;
      hi = newest + FOLLOW_SLACK * width;
      lo = hi - width;
      x.range = [fromLinear(axis, lo), fromLinear(axis, hi)];
      layout.xaxis.range = x.range.slice();
      // Ask for the denser data of the new window once it has moved by half its width.
      if (view.reportedLo === null || lo - view.reportedLo > width / 2) report(view);
    }
  }
  const meta = layout.meta || {};
  for (const [name, fit] of Object.entries(meta.fit || {})) {
    if (!isPlainObject(layout[name]) || view.zoom.has(name)) continue;
    if (view.yAll && SHOW_ALL_AXES.includes(name)) {
      delete layout[name].range;
      layout[name].autorange = true;
    } else {
      layout[name].range = (typeOf(name) === "log" ? fit.log : fit.linear).slice();
      layout[name].autorange = false;
    }
  }
  // Markers for the points off the scale, and the notes: those of each axis's type, or none.
  const kind = (name) => (typeOf(name) === "log" ? "log" : "linear");
  for (let i = 0; i < data.length; i++) {
    const clip = data[i].meta && data[i].meta.clip;
    if (clip) data[i] = { ...data[i], visible: !view.yAll && clip === kind(data[i].meta.axis) };
  }
  for (const note of layout.annotations || []) {
    const m = (note.name || "").match(/^babysit-(clip-(linear|log)|fit)-(\w+)$/);
    if (m) note.visible = m[1] === "fit" ? view.yAll : !view.yAll && m[2] === kind(m[3]);
  }
}

function makeConfig(Plotly) {
  return {
    displaylogo: false,
    responsive: false, // we follow the container, not the window (see the ResizeObserver)
    // No "share to Plotly Cloud": the dashboard stays on this machine.
    modeBarButtonsToRemove: ["lasso2d", "select2d", "sendChartToCloud"],
    modeBarButtonsToAdd: [
      {
        name: "Toggle log scale (top y axis)",
        icon: LOG_ICON,
        click: (gd) =>
          Plotly.relayout(gd, { "yaxis.type": gd._fullLayout.yaxis.type === "log" ? "linear" : "log" }),
      },
    ],
  };
}

// Apply one delta to the figure held (see babysit/ui/figure_delta.py: apply_delta).
function applyDelta(model, delta) {
  for (const change of delta.traces) {
    if (change.trace) {
      model.data[change.i] = change.trace;
      continue;
    }
    const trace = { ...model.data[change.i] }; // a new object with new arrays: Plotly.react redraws it
    for (const key of POINT_KEYS) {
      if (change[key]) trace[key] = (trace[key] || []).slice(0, change[key].keep).concat(change[key].add);
    }
    model.data[change.i] = trace;
  }
  if (delta.layout) model.layout = delta.layout;
}

// Take one message from the server: the whole figure, a delta on the figure held, or the same
// message again (nothing to do).
function accept(view, data) {
  view.settings = data;
  if (data.rev === view.rev) return;
  if (data.full !== undefined) {
    view.model = JSON.parse(data.full);
    view.rev = data.rev;
    view.dirty = true;
  } else if (data.delta !== undefined) {
    if (view.model && view.rev === data.base) {
      applyDelta(view.model, JSON.parse(data.delta));
      view.rev = data.rev;
      view.dirty = true;
    } else {
      // A unique value: each request reruns the server's chart once, which then sends it all.
      view.component.setStateValue("resync", `${Date.now()}-${Math.random()}`);
    }
  }
}

// A chart fitted to the window takes the height from its top to the window's bottom (never more
// than the server's height, never less than MIN_FIT_HEIGHT); measured when it first appears and
// when the window is resized, not on every update, so it never jumps while being read.
function chartHeight(view) {
  const { height, fit } = view.settings;
  if (!fit) return height;
  if (view.fitted === null) {
    const top = view.root.getBoundingClientRect().top + window.scrollY;
    view.fitted = Math.round(Math.max(MIN_FIT_HEIGHT, Math.min(height, window.innerHeight - top - FIT_MARGIN)));
  }
  return view.fitted;
}

async function render(view, Plotly) {
  const figure = { data: [...view.model.data], layout: view.model.layout };
  const serverLayout = figure.layout || {};
  const layout = themeLayout(view.root, JSON.parse(JSON.stringify(serverLayout)));
  if (layout.uirevision === undefined || layout.uirevision === null) layout.uirevision = DEFAULT_UIREVISION;
  if (view.uirevision !== undefined && !same(view.uirevision, layout.uirevision)) {
    // The server asked for a fresh view: drop the user's edits and say the window is the whole run.
    view.sticky.clear();
    view.zoom.clear();
    view.follow = false;
    view.yAll = false;
    view.full = [];
    if (view.lastSent !== undefined) report(view);
  }
  view.uirevision = layout.uirevision;
  // Re-apply user edits that uirevision does not cover, unless the server has since changed the
  // same attribute itself (then the server's new value wins, as uirevision does for ranges).
  for (const [key, edit] of view.sticky) {
    if (same(getPath(serverLayout, edit.parts), edit.server)) setPath(layout, edit.parts, edit.user);
    else view.sticky.delete(key);
  }
  view.serverLayout = serverLayout;
  applyRanges(view, layout, figure.data);
  delete layout.meta; // ours (fits, the newest point), not plotly's: changed each refresh, it would cost a redraw
  // The element's height is the server's (or fitted to the window); the width follows the column.
  delete layout.width;
  delete layout.height;
  layout.autosize = true;
  view.root.style.height = `${chartHeight(view)}px`;

  if (!view.gd) {
    view.gd = document.createElement("div");
    view.gd.style.width = "100%";
    view.gd.style.height = "100%";
    view.root.appendChild(view.gd);
    view.config = makeConfig(Plotly);
    await Plotly.react(view.gd, figure.data || [], layout, view.config);
    view.gd.on("plotly_relayout", (edit) => onRelayout(view, edit));
    view.gd.on("plotly_clickannotation", (event) => onAnnotationClick(view, event));
    view.gd.on("plotly_click", (event) => onPointClick(view, event));
    // Keep the pressed button of an updatemenu in step with the edit we re-apply.
    view.gd.on("plotly_buttonclicked", (ev) => {
      const index = ev && ev.menu && ev.menu._index;
      if (typeof index === "number") {
        const parts = ["updatemenus", index, "active"];
        view.sticky.set(`updatemenus[${index}].active`, {
          parts,
          user: ev.active,
          server: getPath(view.serverLayout, parts),
        });
      }
    });
    let queued = false;
    view.observer = new ResizeObserver(() => {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        queued = false;
        if (view.gd && view.gd.isConnected) Plotly.Plots.resize(view.gd);
      });
    });
    view.observer.observe(view.root);
    window.addEventListener("resize", () => {
      if (!view.settings || !view.settings.fit || !view.root.isConnected) return;
      view.fitted = null;
      view.root.style.height = `${chartHeight(view)}px`;
    });
  } else {
    await Plotly.react(view.gd, figure.data || [], layout, view.config);
  }
  view.drawnLayout = serverLayout; // on screen now: a person's zoom is measured against this
  if (view.renders === 0) performance.mark("babysit:first-chart");
  view.renders += 1;
  view.root.dataset.renders = String(view.renders);
  const newest = newestX(view, true);
  if (newest !== null) view.root.dataset.newest = String(newest); // what a zoom that follows follows
}

// Draw the newest figure; updates that arrive while one is drawn are applied to it meanwhile and
// drawn together next.
async function pump(view) {
  view.busy = true;
  try {
    const Plotly = await plotlyLoaded();
    while (view.dirty) {
      view.dirty = false;
      await render(view, Plotly);
    }
    view.root.querySelector(".babysit-live-chart-error")?.remove();
  } catch (err) {
    console.error("babysit live chart:", err);
    let box = view.root.querySelector(".babysit-live-chart-error");
    if (!box) {
      box = document.createElement("pre");
      box.className = "babysit-live-chart-error";
      box.style.cssText = "color: var(--st-red-color, #c00); white-space: pre-wrap; margin: 0";
      view.root.prepend(box);
    }
    box.textContent = `live chart: ${err && err.message ? err.message : err}`;
  } finally {
    view.busy = false;
  }
}

function destroy(parentElement) {
  const view = views.get(parentElement);
  if (!view) return;
  views.delete(parentElement);
  view.observer?.disconnect();
  if (view.gd && window.Plotly) window.Plotly.purge(view.gd);
  view.root.remove();
}

export default function liveChart(component) {
  const { data, parentElement } = component;
  if (!views.has(parentElement)) performance.mark("babysit:first-figure-message");
  const view = views.get(parentElement) || createView(parentElement);
  view.component = component; // the newest setStateValue (its fragment and form ids may change)
  view.root.dataset.key = data.key;
  accept(view, data);
  if (!view.busy && view.dirty) pump(view);
  // Streamlit keeps only the last cleanup and runs it on unmount, but it also runs a cleanup at
  // once when a newer update won the race for the module import; only the first means "gone".
  return () => {
    if (!parentElement.isConnected) destroy(parentElement);
  };
}
