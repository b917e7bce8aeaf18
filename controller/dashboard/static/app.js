// LLM Ops Helper dashboard: plain JavaScript, no dependencies, no build step.
//
// The overview arrives over GET /api/v1/stream (Server-Sent Events read with fetch(), since
// EventSource cannot send an Authorization header); the selected deployment's decisions and
// model versions, the anomalies and the resolved alerts are polled. Every element a test or a
// script may read carries a stable id or data attribute (data-host, data-gpu, data-version...).
"use strict";

const TOKEN_KEY = "llmops_token";
const POLL_MS = 5000;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 15000;
const ARM_MS = 5000; // a destructive button's second click must come within this

const ui = {
  token: null,
  overview: null,
  selected: null,
  stream: null,      // AbortController of the open stream
  pollTimer: null,
  armed: null,       // {button, timer} of a button waiting for its confirming click
  decisions: [],
};

const $ = (id) => document.getElementById(id);

// -- formatting --------------------------------------------------------------------------------

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function num(value, digits = 0) {
  return value === null || value === undefined || Number.isNaN(value) ? "—"
    : Number(value).toFixed(digits);
}

function gib(bytes) {
  return bytes === null || bytes === undefined ? "—" : (bytes / 2 ** 30).toFixed(1);
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = bytes;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(ts, now) {
  if (!ts) return "—";
  const s = Math.max(0, (now ?? Date.now() / 1000) - ts);
  if (s < 60) return `${s.toFixed(0)}s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)}m ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)}h ago`;
  return `${(s / 86400).toFixed(1)}d ago`;
}

function clock(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString([], { hour12: false }) : "—";
}

function pct(part, whole) {
  return part === null || part === undefined || !whole ? null : (100 * part) / whole;
}

// A bar: its width is set after insertion (inline styles are refused by the page's CSP).
function bar(label, value, text, level) {
  const width = value === null || value === undefined ? 0 : Math.max(0, Math.min(100, value));
  return `<div class="metric"><span class="k">${label}</span>`
    + `<div class="bar ${level || ""}"><i data-pct="${width.toFixed(1)}"></i></div>`
    + `<span class="v">${text}</span></div>`;
}

function applyBars(root) {
  for (const el of root.querySelectorAll("[data-pct]")) el.style.width = `${el.dataset.pct}%`;
}

function level(value, warn, crit) {
  if (value === null || value === undefined) return "";
  return value >= crit ? "crit" : value >= warn ? "warn" : "";
}

// -- API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const token = ui.token;
  const headers = { Authorization: `Bearer ${token}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  const text = await response.text();
  // Signed out (or in as someone else) meanwhile: this answer belongs to no one on the page.
  if (ui.token !== token) throw new ApiError(0, "signed out");
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    if (response.status === 401) signOut(`token refused: ${message}`);
    throw new ApiError(response.status, message);
  }
  return body;
}

// -- sign-in -----------------------------------------------------------------------------------

function tokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!match) return false;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search); // out of the history
  return true;
}

function showSignIn(message) {
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  setLive("offline");
}

async function signIn() {
  ui.token = sessionStorage.getItem(TOKEN_KEY);
  if (!ui.token) { showSignIn(""); return; }
  let first;
  try {
    first = await api("/api/v1/overview");
  } catch (err) {
    if (err.status !== 401) showSignIn(`cannot reach the controller: ${err.message}`);
    return;
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  render(first);
  startStream();
  poll();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  ui.token = null;
  if (ui.stream) ui.stream.abort();
  ui.stream = null;
  clearTimeout(ui.pollTimer);
  disarm();
  // Nothing of what the last token could read stays in the page.
  ui.overview = null;
  ui.selected = null;
  ui.decisions = [];
  for (const id of ["summary", "hosts"]) $(id).innerHTML = "";
  for (const id of ["deployments", "decisions", "versions", "alerts", "resolved", "anomalies"]) {
    $(id).tBodies[0].innerHTML = "";
  }
  $("detail").hidden = true;
  $("rollback-result").textContent = "";
  $("rollback-result").dataset.status = "";
  $("last-update").dataset.ts = "";
  $("last-update").textContent = "—";
  showSignIn(message || "signed out");
}

// -- the live stream ---------------------------------------------------------------------------

function setLive(state) {
  const el = $("live-status");
  el.dataset.state = state;
  el.textContent = state;
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

async function startStream() {
  if (ui.stream) ui.stream.abort();
  const controller = new AbortController();
  ui.stream = controller;
  let backoff = BACKOFF_MIN_MS;
  while (ui.stream === controller) {
    try {
      const response = await fetch("/api/v1/stream", {
        headers: { Authorization: `Bearer ${ui.token}`, Accept: "text/event-stream" },
        signal: controller.signal, cache: "no-store",
      });
      if (response.status === 401) { signOut("token refused by the stream"); return; }
      if (!response.ok || !response.body) throw new Error(`stream: ${response.status}`);
      setLive("live");
      backoff = BACKOFF_MIN_MS;
      await readEvents(response.body, (name, data) => {
        if (name === "overview") render(JSON.parse(data));
      });
    } catch (err) {
      if (controller.signal.aborted) return;
    }
    if (ui.stream !== controller) return;
    setLive("reconnecting");
    await sleep(backoff * (0.75 + Math.random() / 2));
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  }
}

async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // a keep-alive comment
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// -- the overview ------------------------------------------------------------------------------

function render(o) {
  ui.overview = o;
  const stamp = $("last-update");
  stamp.dataset.ts = String(o.ts);
  stamp.textContent = `updated ${clock(o.ts)}`;
  renderSummary(o);
  renderHosts(o);
  renderDeployments(o);
  renderAlerts(o);
  if (!ui.selected && o.deployments.length) select(o.deployments[0].name);
  else if (ui.selected) renderDetailHead();
}

function renderSummary(o) {
  const gpus = o.hosts.flatMap((h) => h.gpus);
  const online = o.hosts.filter((h) => h.online).length;
  const bad = (health) => gpus.filter((g) => g.health === health).length;
  const crit = o.alerts.filter((a) => a.severity === "critical").length;
  $("summary").innerHTML = [
    `<span id="sum-hosts" data-online="${online}" data-total="${o.hosts.length}">`
      + `<b>${online}</b>/${o.hosts.length} hosts</span>`,
    `<span id="sum-gpus" data-total="${gpus.length}"><b>${gpus.length}</b> GPUs`
      + (bad("critical") ? ` <em class="crit">${bad("critical")} critical</em>` : "")
      + (bad("warning") ? ` <em class="warn">${bad("warning")} warning</em>` : "") + "</span>",
    `<span id="sum-deployments"><b>${o.deployments.length}</b> deployments</span>`,
    `<span id="sum-alerts" data-firing="${o.alerts.length}" class="${crit ? "crit" : ""}">`
      + `<b>${o.alerts.length}</b> alerts firing</span>`,
  ].join("");
}

function renderHosts(o) {
  $("fleet-count").textContent = `${o.hosts.length} hosts`;
  const root = $("hosts");
  root.innerHTML = o.hosts.map((h) => {
    const state = h.online ? "online" : `offline${h.offline_reason ? ` (${h.offline_reason})` : ""}`;
    const gpus = h.gpus.map((g) => {
      const mem = pct(g.memory_used_bytes, g.memory_total_bytes);
      return `<div class="gpu health-${g.health}" id="gpu-${esc(h.host)}-${g.index}"`
        + ` data-host="${esc(h.host)}" data-gpu="${g.index}" data-health="${g.health}"`
        + ` data-util="${g.util_pct ?? ""}" data-temp="${g.temperature_c ?? ""}"`
        + ` data-mem-used="${g.memory_used_bytes ?? ""}">`
        + `<div class="gpu-head"><span class="dot"></span><b>GPU ${g.index}</b>`
        + `<span class="dim" title="${esc(g.uuid)}">${esc(g.name)}</span>`
        + `<span class="power">${num(g.power_w)} W</span></div>`
        + bar("util", g.util_pct, `${num(g.util_pct)}%`, level(g.util_pct, 90, 101))
        + bar("mem", mem, `${gib(g.memory_used_bytes)}/${gib(g.memory_total_bytes)} GiB`,
          level(mem, 90, 97))
        + bar("temp", g.temperature_c, `${num(g.temperature_c)} °C`,
          level(g.temperature_c, 80, 88))
        + (g.error ? `<div class="error">${esc(g.error)}</div>` : "")
        + "</div>";
    }).join("");
    return `<article class="host ${h.online ? "" : "down"}" id="host-${esc(h.host)}"`
      + ` data-host="${esc(h.host)}" data-online="${h.online}" data-last-ts="${h.last_ts ?? ""}">`
      + `<div class="host-head"><b>${esc(h.host)}</b>`
      + `<span class="badge ${h.online ? "ok" : "crit"}">${esc(state)}</span>`
      + (h.alerts ? `<span class="badge warn">${h.alerts} alert${h.alerts > 1 ? "s" : ""}</span>` : "")
      + `<span class="dim right">${h.agent_version ? `agent ${esc(h.agent_version)} · ` : ""}`
      + `seen ${ago(h.last_ts, o.ts)}</span></div>`
      + `<div class="host-metrics">cpu <b>${num(h.cpu_pct)}%</b> · mem`
      + ` <b>${num(h.memory_used_pct)}%</b></div>`
      + `<div class="gpus">${gpus || '<span class="dim">no GPUs reported</span>'}</div>`
      + "</article>";
  }).join("") || '<p class="dim">no agent has reported yet</p>';
  applyBars(root);
}

function stateClass(state) {
  return { ready: "ok", starting: "warn", pending: "warn", draining: "dim", stopping: "dim",
    failed: "crit" }[state] || "warn";
}

function renderDeployments(o) {
  const body = $("deployments").tBodies[0];
  body.innerHTML = o.deployments.map((d) => {
    const replicas = d.replicas.map((r) => `<span class="replica badge ${stateClass(r.state)}"`
      + ` data-replica="${esc(r.name)}" data-state="${esc(r.state)}"`
      + ` title="${esc(r.reason || r.url || "")}">${esc(r.host || "unplaced")}`
      + `${r.gpus.length ? `:${r.gpus.join(",")}` : ""} v${r.version ?? "?"} ${esc(r.state)}</span>`)
      .join(" ");
    const phase = { available: "ok", progressing: "warn", failed: "crit" }[d.phase] || "warn";
    return `<tr id="dep-${esc(d.name)}" data-deployment="${esc(d.name)}"`
      + ` data-version="${d.version ?? ""}" data-phase="${esc(d.phase)}"`
      + ` data-ready="${d.replicas_ready}" data-desired="${d.replicas_desired}"`
      + ` class="${d.name === ui.selected ? "selected" : ""}">`
      + `<td><b>${esc(d.name)}</b></td>`
      + `<td>${esc(d.model)} <span class="version">v${d.version ?? "?"}</span></td>`
      + `<td>${esc(d.runtime || "—")}</td>`
      + `<td><span class="badge ${phase}" title="${esc(d.message || "")}">${esc(d.phase)}</span></td>`
      + `<td>${d.replicas_ready}/${d.replicas_desired}</td>`
      + `<td>${esc(d.autoscale_mode)}</td><td class="replicas">${replicas}</td></tr>`;
  }).join("") || '<tr><td colspan="7" class="dim">no deployments</td></tr>';
}

function where(x) {
  const parts = [];
  if (x.host) parts.push(x.host);
  if (x.gpu !== null && x.gpu !== undefined) parts.push(`GPU ${x.gpu}`);
  if (x.replica) parts.push(x.replica);
  return parts.join(" · ") || "—";
}

function renderAlerts(o) {
  $("alerts-count").textContent = `${o.alerts.length}`;
  $("alerts").tBodies[0].innerHTML = o.alerts.map((a) => `<tr class="alert"`
    + ` data-alert="${esc(a.id)}" data-rule="${esc(a.rule)}" data-severity="${esc(a.severity)}">`
    + `<td><span class="badge ${a.severity === "critical" ? "crit" : "warn"}">`
    + `${esc(a.severity)}</span></td><td>${esc(a.rule)}</td><td>${esc(where(a))}</td>`
    + `<td>${esc(a.summary)}</td><td>${ago(a.started_at, o.ts)}</td></tr>`).join("")
    || '<tr><td colspan="5" class="dim">nothing firing</td></tr>';
}

// -- the selected deployment -------------------------------------------------------------------

function current() {
  return ui.overview && ui.overview.deployments.find((d) => d.name === ui.selected);
}

function select(name) {
  ui.selected = name;
  disarm();
  $("rollback-result").textContent = "";
  $("rollback-result").dataset.status = "";
  $("detail").hidden = false;
  for (const row of $("deployments").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.deployment === name);
  }
  renderDetailHead();
  pollSelected();
}

function renderDetailHead() {
  const d = current();
  if (!d) return;
  const title = $("detail-title");
  title.dataset.deployment = d.name;
  title.textContent = `${d.name} · ${d.model} v${d.version ?? "?"}`;
  const button = $("rollback-btn");
  if (ui.armed && ui.armed.button === button) return;
  button.dataset.deployment = d.name;
  button.textContent = d.previous_version ? `Roll back to v${d.previous_version}` : "Roll back";
}

async function pollSelected() {
  const name = ui.selected;
  const d = current();
  if (!name) return;
  try {
    const body = await api(`/api/v1/deployments/${encodeURIComponent(name)}/decisions?limit=240`);
    if (name !== ui.selected) return;
    ui.decisions = body.decisions.slice().reverse(); // oldest first
    $("decisions-mode").textContent = `mode ${body.mode ?? "—"}`;
    renderDecisions();
    drawChart();
  } catch (err) {
    if (err.status === 404) { ui.decisions = []; renderDecisions(); drawChart(); }
  }
  if (d && d.model) {
    try {
      const model = await api(`/api/v1/models/${encodeURIComponent(d.model)}`);
      if (name === ui.selected) renderVersions(model);
    } catch (err) {
      $("versions").tBodies[0].innerHTML = `<tr><td colspan="8" class="error">${esc(err.message)}</td></tr>`;
    }
  }
}

function renderDecisions() {
  const latest = ui.decisions.slice(-8).reverse();
  $("decisions").tBodies[0].innerHTML = latest.map((x) => {
    const moved = x.desired > x.current ? "up" : x.desired < x.current ? "down" : "hold";
    return `<tr class="decision ${moved}" data-rule="${esc(x.rule)}" data-applied="${x.applied}">`
      + `<td>${clock(x.ts)}</td><td>${x.current} → <b>${x.desired}</b>`
      + `${x.applied ? ' <span class="badge ok">applied</span>' : ""}</td>`
      + `<td>${esc(x.rule)}</td><td class="reason">${esc(x.reason)}`
      + `${x.error ? ` <span class="error">${esc(x.error)}</span>` : ""}</td></tr>`;
  }).join("") || '<tr><td colspan="4" class="dim">no decisions (autoscale off, or none yet)</td></tr>';
}

function renderVersions(model) {
  if (ui.armed && $("versions").contains(ui.armed.button)) return; // keep a pending confirm
  const d = current();
  $("model-name").textContent = model.name;
  const aliases = {};
  for (const [alias, version] of Object.entries(model.aliases || {})) {
    (aliases[version] = aliases[version] || []).push(alias);
  }
  const rows = model.versions.slice().sort((a, b) => b.version - a.version);
  $("versions").tBodies[0].innerHTML = rows.map((v) => {
    const running = d && d.version === v.version;
    const action = running ? '<span class="badge ok">running</span>'
      : `<button type="button" class="small rollback-to" data-ref="${esc(v.ref)}">`
        + `Switch to v${v.version}</button>`;
    const tags = (v.aliases && v.aliases.length ? v.aliases : aliases[v.version] || []).join(", ");
    return `<tr data-model-version="${v.version}" class="${running ? "selected" : ""}">`
      + `<td><b>v${v.version}</b></td><td>${esc(v.stage)}</td><td>${esc(tags || "—")}</td>`
      + `<td>${esc(v.runtime)}</td><td>${size(v.artifact ? v.artifact.size_bytes : null)}</td>`
      + `<td>${clock(v.created_at)} <span class="dim">${esc(v.created_by)}</span></td>`
      + `<td>${esc(v.description || "")}</td><td>${action}</td></tr>`;
  }).join("") || '<tr><td colspan="8" class="dim">no versions</td></tr>';
}

// -- rollback ----------------------------------------------------------------------------------

function disarm() {
  if (!ui.armed) return;
  clearTimeout(ui.armed.timer);
  ui.armed.button.classList.remove("armed");
  ui.armed.button.textContent = ui.armed.label;
  ui.armed = null;
  renderDetailHead();
}

// The first click arms the button, the second (within ARM_MS) acts.
function confirmClick(button, prompt, action) {
  if (ui.armed && ui.armed.button === button) {
    disarm();
    action();
    return;
  }
  disarm();
  const label = button.textContent;
  button.classList.add("armed");
  button.textContent = prompt;
  ui.armed = { button, label, timer: setTimeout(disarm, ARM_MS) };
}

async function rollback(name, version) {
  const out = $("rollback-result");
  out.dataset.status = "pending";
  out.className = "result";
  out.textContent = `rolling back ${name}…`;
  try {
    const body = await api(`/api/v1/deployments/${encodeURIComponent(name)}/rollback`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(version ? { version } : {}),
    });
    out.dataset.status = "ok";
    out.classList.add("ok");
    out.textContent = `${name} → ${body.version}: ${body.phase}${body.message ? ` (${body.message})` : ""}`;
  } catch (err) {
    out.dataset.status = err.status === 403 ? "forbidden" : "error";
    out.classList.add("error");
    out.textContent = err.status === 403
      ? `not allowed: rolling back needs an operator token (${err.message})`
      : `rollback failed: ${err.message}`;
  }
  pollSelected();
}

// -- chart -------------------------------------------------------------------------------------

const SERIES = [
  { key: "load", label: "load", color: "#4fc3f7", width: 2 },
  { key: "forecast", label: "forecast", color: "#ffb74d", width: 2 },
  { key: "upper", label: "forecast upper bound", color: "#ffb74d", width: 1, dash: [4, 4] },
  { key: "capacity", label: "capacity (ready × per replica)", color: "#81c784", width: 2, dash: [8, 3] },
];

function chartPoints() {
  const out = { load: [], forecast: [], upper: [], capacity: [] };
  for (const x of ui.decisions) {
    if (x.inputs && x.inputs.tokens_per_s !== null) out.load.push([x.ts, x.inputs.tokens_per_s]);
    const ahead = x.ts + ((x.forecast && x.forecast.horizon_s) || 0); // what it predicts for
    if (x.forecast && x.forecast.point !== null) out.forecast.push([ahead, x.forecast.point]);
    if (x.forecast && x.forecast.upper !== null) out.upper.push([ahead, x.forecast.upper]);
    const each = x.capacity && x.capacity.tokens_per_s;
    if (each !== null && each !== undefined) out.capacity.push([x.ts, each * x.current]);
  }
  return out;
}

function drawChart() {
  const canvas = $("load-chart");
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth || 640;
  const cssHeight = canvas.clientHeight || 220;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, cssWidth, cssHeight);
  const points = chartPoints();
  const all = Object.values(points).flat();
  canvas.dataset.points = String(all.length);
  $("chart-legend").innerHTML = SERIES.map((s) => `<span class="key" data-series="${s.key}"`
    + ` data-count="${points[s.key].length}"><i class="swatch-${s.key}"></i>${s.label}</span>`)
    .join("");
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
  const now = ui.decisions.length ? ui.decisions[ui.decisions.length - 1].ts : t1;
  if (now < t1) { // the forecast reaches past the last decision: mark "now"
    g.strokeStyle = "#56607a"; g.setLineDash([2, 3]);
    g.beginPath(); g.moveTo(x(now), pad.top); g.lineTo(x(now), pad.top + h); g.stroke();
    g.setLineDash([]);
    g.fillText("now", x(now) + 3, pad.top + 10);
  }
  g.fillText(clock(t0), pad.left, cssHeight - 6);
  const last = clock(t1);
  g.fillText(last, pad.left + w - g.measureText(last).width, cssHeight - 6);
  for (const s of SERIES) {
    const series = points[s.key];
    if (!series.length) continue;
    g.strokeStyle = s.color; g.lineWidth = s.width; g.setLineDash(s.dash || []);
    g.beginPath();
    series.forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
    g.stroke();
  }
  g.setLineDash([]);
}

function niceMax(v) {
  const step = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

// -- polling of what the stream does not carry -------------------------------------------------

async function poll() {
  clearTimeout(ui.pollTimer);
  if (!ui.token) return;
  await Promise.allSettled([pollSelected(), pollAnomalies(), pollResolved()]);
  if (ui.token) ui.pollTimer = setTimeout(poll, POLL_MS);
}

async function pollAnomalies() {
  const body = await api("/api/v1/anomalies?limit=15");
  $("anomalies").tBodies[0].innerHTML = body.anomalies.map((a) => `<tr class="anomaly"`
    + ` data-host="${esc(a.host)}" data-series="${esc(a.series)}"><td>${clock(a.ts)}</td>`
    + `<td>${esc(where(a))}</td><td>${esc(a.series)}<span class="dim"> ${esc(a.feature)}</span></td>`
    + `<td>${esc(a.summary)}</td><td>${num(a.score, 2)}</td></tr>`).join("")
    || '<tr><td colspan="5" class="dim">none recorded</td></tr>';
}

async function pollResolved() {
  const body = await api("/api/v1/alerts?state=resolved&limit=8");
  $("resolved").tBodies[0].innerHTML = body.alerts.map((a) => `<tr class="resolved"`
    + ` data-rule="${esc(a.rule)}"><td>${clock(a.resolved_at || a.ts)}</td><td>${esc(a.rule)}</td>`
    + `<td>${esc(where(a))}</td><td>${esc(a.summary)}</td></tr>`).join("")
    || '<tr><td colspan="4" class="dim">none</td></tr>';
}

// -- wiring ------------------------------------------------------------------------------------

function init() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    signIn();
  });
  $("sign-out").addEventListener("click", () => signOut("signed out"));
  $("deployments").addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-deployment]");
    if (row && row.dataset.deployment !== ui.selected) select(row.dataset.deployment);
  });
  $("rollback-btn").addEventListener("click", (event) => {
    const d = current();
    if (!d) return;
    const target = d.previous_version ? `v${d.previous_version}` : "the previous version";
    confirmClick(event.currentTarget, `Confirm: roll ${d.name} back to ${target}`,
      () => rollback(d.name, null));
  });
  $("versions").addEventListener("click", (event) => {
    const button = event.target.closest("button.rollback-to");
    const d = current();
    if (!button || !d) return;
    confirmClick(button, `Confirm: ${d.name} → ${button.dataset.ref}`,
      () => rollback(d.name, button.dataset.ref));
  });
  window.addEventListener("hashchange", () => { if (tokenFromFragment()) signIn(); });
  window.addEventListener("resize", () => { if (ui.selected) drawChart(); });
  tokenFromFragment();
  signIn();
}

init();
