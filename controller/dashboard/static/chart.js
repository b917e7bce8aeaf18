// LLM Ops Helper dashboard: the load chart of the selected deployment (a <canvas>, no library).
//
// Drawn from the autoscaler's decision records, oldest first: the load it saw, its forecast
// (placed at the time it predicts for), the forecast's upper bound, and the capacity of the
// replicas that were ready (capacity per replica × ready). A decision without a value breaks
// that series' line; a lone point is drawn as a dot. Loaded after format.js (clock) and
// before app.js, which calls drawLoadChart().
"use strict";

const CHART_SERIES = [
  { key: "load", label: "load", color: "#4fc3f7", width: 2 },
  { key: "forecast", label: "forecast", color: "#ffb74d", width: 2 },
  { key: "upper", label: "forecast upper bound", color: "#ffb74d", width: 1, dash: [4, 4] },
  { key: "capacity", label: "capacity (ready × per replica)", color: "#81c784", width: 2, dash: [8, 3] },
];

const present = (v) => v !== null && v !== undefined && !Number.isNaN(v);

// Each series: [t, value] points, with null where a decision had no value (a gap in the line).
function loadChartPoints(decisions) {
  const out = { load: [], forecast: [], upper: [], capacity: [] };
  for (const x of decisions) {
    const load = x.inputs ? x.inputs.tokens_per_s : null;
    out.load.push(present(load) ? [x.ts, load] : null);
    const f = x.forecast || {};
    const ahead = x.ts + (f.horizon_s || 0); // what it predicts for
    out.forecast.push(present(f.point) ? [ahead, f.point] : null);
    out.upper.push(present(f.upper) ? [ahead, f.upper] : null);
    const each = x.capacity ? x.capacity.tokens_per_s : null;
    // Only the record's ready count matches the legend; a record without inputs has none (its
    // `current` is the desired count): a gap rather than a wrong line.
    const ready = x.inputs ? x.inputs.ready : null;
    out.capacity.push(present(each) && present(ready) ? [x.ts, each * ready] : null);
  }
  return out;
}

function niceMax(v) {
  const step = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

// Consecutive points, split at the gaps.
function runs(series) {
  const out = [];
  let run = [];
  for (const p of series) {
    if (p) { run.push(p); continue; }
    if (run.length) out.push(run);
    run = [];
  }
  if (run.length) out.push(run);
  return out;
}

function drawLoadChart(canvas, legend, decisions) {
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth || 640;
  const cssHeight = canvas.clientHeight || 220;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, cssWidth, cssHeight);
  const points = loadChartPoints(decisions);
  const all = Object.values(points).flat().filter(Boolean);
  canvas.dataset.points = String(all.length);
  legend.innerHTML = CHART_SERIES.map((s) => `<span class="key" data-series="${s.key}"`
    + ` data-count="${points[s.key].filter(Boolean).length}"><i class="swatch-${s.key}"></i>`
    + `${s.label}</span>`).join("");
  const pad = { left: 48, right: 12, top: 10, bottom: 22 };
  const w = cssWidth - pad.left - pad.right;
  const h = cssHeight - pad.top - pad.bottom;
  g.font = "11px ui-monospace, SFMono-Regular, Menlo, monospace";
  g.fillStyle = "#8a94a6";
  if (!all.length) {
    g.fillText("no load reported yet", pad.left + 8, pad.top + h / 2);
    return;
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
  const top = niceMax(Math.max(...all.map((p) => p[1]), 1));
  const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * w;
  const y = (v) => pad.top + h - (v / top) * h;
  g.strokeStyle = "#263040";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i += 1) {
    const v = (top * i) / 4;
    g.beginPath(); g.moveTo(pad.left, y(v)); g.lineTo(pad.left + w, y(v)); g.stroke();
    g.fillText(v >= 1000 ? `${(v / 1000).toFixed(1)}k` : v.toFixed(v < 10 ? 1 : 0), 4, y(v) + 4);
  }
  const now = decisions.length ? decisions[decisions.length - 1].ts : t1;
  if (now < t1) { // the forecast reaches past the last decision: mark "now"
    g.strokeStyle = "#56607a"; g.setLineDash([2, 3]);
    g.beginPath(); g.moveTo(x(now), pad.top); g.lineTo(x(now), pad.top + h); g.stroke();
    g.setLineDash([]);
    g.fillText("now", x(now) + 3, pad.top + 10);
  }
  g.fillText(clock(t0), pad.left, cssHeight - 6);
  const last = clock(t1);
  g.fillText(last, pad.left + w - g.measureText(last).width, cssHeight - 6);
  for (const s of CHART_SERIES) {
    g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = s.width;
    g.setLineDash(s.dash || []);
    for (const run of runs(points[s.key])) {
      if (run.length === 1) { // nothing to join: a dot
        const [[t, v]] = run;
        g.beginPath(); g.arc(x(t), y(v), s.width + 1, 0, 2 * Math.PI); g.fill();
        continue;
      }
      g.beginPath();
      run.forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
      g.stroke();
    }
  }
  g.setLineDash([]);
}
