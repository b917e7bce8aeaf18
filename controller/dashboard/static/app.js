// LLM Ops Helper dashboard: plain JavaScript, no dependencies, no build step.
//
// The overview arrives over GET /api/v1/stream (Server-Sent Events read with fetch(), since
// EventSource cannot send an Authorization header); the selected deployment's decisions and
// model versions, the anomalies and the resolved alerts are polled. Every element a test or a
// script may read carries a stable id or data attribute (data-host, data-gpu, data-version...).
// Loaded after format.js (formatting helpers) and chart.js (the load chart).
//
// What goes wrong is logged: console.error for what should not happen (a rendering bug, an
// error answer), console.warn for a lost connection (retried); being signed out is neither.
"use strict";

const TOKEN_KEY = "llmops_token";
const POLL_MS = 5000;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 15000;
const SILENT_MS = 10000; // a stream with no event (or keep-alive) for this long is reconnected
const ARM_MS = 5000; // a destructive button's second click must come within this

const ui = {
  token: null,
  overview: null,
  selected: null,
  stream: null,      // {stopped, attempt: AbortController} of the running stream loop
  pollGen: 0,        // sign-in generation: a poll loop of an older one stops
  pollTimer: null,
  armed: null,       // {button, label, ref, timer} of a button waiting for its confirming click
  decisions: [],
};

const $ = (id) => document.getElementById(id);

// -- API ---------------------------------------------------------------------------------------

// status 0: no answer (the network failed); stale: an answer for a token no longer in use.
class ApiError extends Error {
  constructor(status, message, stale = false) {
    super(message);
    this.status = status;
    this.stale = stale;
  }
}

async function api(path, options = {}) {
  const token = ui.token;
  const headers = { Authorization: `Bearer ${token}`, ...(options.headers || {}) };
  let response;
  let text;
  try {
    response = await fetch(path, { ...options, headers, cache: "no-store" });
    text = await response.text();
  } catch (err) {
    throw new ApiError(0, `cannot reach the controller: ${err.message}`);
  }
  // Signed out (or in as someone else) meanwhile: this answer belongs to no one on the page.
  if (ui.token !== token) throw new ApiError(0, "signed out", true);
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    if (response.status === 401) signOut(`token refused: ${message}`);
    throw new ApiError(response.status, message);
  }
  return body;
}

// What a caught error deserves: nothing for a stale answer or a refused token (signed out
// already), a warning when the controller cannot be reached, an error otherwise.
function report(err) {
  if (err instanceof ApiError && (err.stale || err.status === 401)) return;
  if (err instanceof ApiError && err.status === 0) console.warn(err.message);
  else console.error(err);
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
  stopStream();
  clearTimeout(ui.pollTimer);
  const gen = ++ui.pollGen;
  ui.token = sessionStorage.getItem(TOKEN_KEY);
  if (!ui.token) { showSignIn(""); return; }
  let first;
  try {
    first = await api("/api/v1/overview");
  } catch (err) {
    if (gen !== ui.pollGen) return; // another sign-in (or a sign-out) came meanwhile
    if (err.status !== 401) { // a refused token has shown the sign-in form already
      if (!(err instanceof ApiError)) console.error(err);
      showSignIn(err.status === 0 ? err.message : `sign-in failed: ${err.message}`);
    }
    return;
  }
  if (gen !== ui.pollGen) return;
  $("signin").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  render(first);
  startStream();
  poll(gen);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  ui.token = null;
  ui.pollGen += 1;
  stopStream();
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

// A connection that failed or went quiet: retried, and only warned about.
class StreamLost extends Error {}

function stopStream() {
  if (!ui.stream) return;
  ui.stream.stopped = true;
  if (ui.stream.attempt) ui.stream.attempt.abort();
  ui.stream = null;
}

async function startStream() {
  stopStream();
  const run = { stopped: false, attempt: null };
  ui.stream = run;
  let backoff = BACKOFF_MIN_MS;
  while (!run.stopped) {
    // One controller per connection: whatever ends it (error, watchdog, sign-out) closes it.
    const attempt = new AbortController();
    run.attempt = attempt;
    let watchdog = null;
    const heard = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => attempt.abort(new StreamLost("no event for 10 s")), SILENT_MS);
    };
    try {
      heard();
      let response;
      try {
        response = await fetch("/api/v1/stream", {
          headers: { Authorization: `Bearer ${ui.token}`, Accept: "text/event-stream" },
          signal: attempt.signal, cache: "no-store",
        });
      } catch (err) {
        throw new StreamLost(`stream: ${err.message}`);
      }
      if (response.status === 401) { signOut("token refused by the stream"); return; }
      if (!response.ok || !response.body) throw new StreamLost(`stream: ${response.status}`);
      setLive("live");
      backoff = BACKOFF_MIN_MS;
      await readEvents(response.body, heard, (name, data) => {
        if (name === "overview") render(JSON.parse(data));
      });
    } catch (err) {
      if (run.stopped) return;
      if (err instanceof StreamLost) console.warn(err.message);
      else console.error(err); // a bug in reading or drawing an event: shown, then retried
    } finally {
      clearTimeout(watchdog);
      attempt.abort(); // the connection never outlives its attempt
    }
    if (run.stopped) return;
    setLive("reconnecting");
    await sleep(backoff * (0.75 + Math.random() / 2));
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  }
}

// Calls heard() on every chunk and onEvent(name, data) on every event, until the stream ends.
async function readEvents(body, heard, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        throw new StreamLost(`stream: ${err.message}`);
      }
      if (chunk.done) return;
      heard();
      buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
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
  } finally {
    reader.cancel().catch(() => {});
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
  if (ui.selected && !o.deployments.some((d) => d.name === ui.selected)) deselect(); // deleted
  if (!ui.selected && o.deployments.length) select(o.deployments[0].name);
  else if (ui.selected) renderDetailHead();
}

function renderSummary(o) {
  const gpus = o.hosts.flatMap((h) => h.gpus);
  const online = o.hosts.filter((h) => h.online).length;
  const bad = (health) => gpus.filter((g) => g.health === health).length;
  const crit = o.alerts.filter((a) => a.severity === "critical").length;
  const n = (count, one, many) => `<b>${count}</b> ${count === 1 ? one : many}`;
  $("summary").innerHTML = [
    `<span id="sum-hosts" data-online="${online}" data-total="${o.hosts.length}">`
      + `<b>${online}</b>/${o.hosts.length} ${o.hosts.length === 1 ? "host" : "hosts"}</span>`,
    `<span id="sum-gpus" data-total="${gpus.length}">${n(gpus.length, "GPU", "GPUs")}`
      + (bad("critical") ? ` <em class="crit">${bad("critical")} critical</em>` : "")
      + (bad("warning") ? ` <em class="warn">${bad("warning")} warning</em>` : "") + "</span>",
    `<span id="sum-deployments">${n(o.deployments.length, "deployment", "deployments")}</span>`,
    `<span id="sum-alerts" data-firing="${o.alerts.length}" class="${crit ? "crit" : ""}">`
      + `${n(o.alerts.length, "alert", "alerts")} firing</span>`,
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
    // Why a replica is not ready (or failed) is written out, not only in a tooltip.
    const replicas = d.replicas.map((r) => `<div class="replica"`
      + ` data-replica="${esc(r.name)}" data-state="${esc(r.state)}">`
      + `<span class="badge ${stateClass(r.state)}" title="${esc(r.url || r.name)}">`
      + `${esc(r.host || "unplaced")}${r.gpus.length ? `:${r.gpus.join(",")}` : ""}`
      + ` v${r.version ?? "?"} ${esc(r.state)}</span>`
      + (r.state !== "ready" && r.reason ? `<span class="why">${esc(r.reason)}</span>` : "")
      + "</div>").join("");
    const phase = { available: "ok", progressing: "warn", failed: "crit" }[d.phase] || "warn";
    return `<tr id="dep-${esc(d.name)}" data-deployment="${esc(d.name)}"`
      + ` data-version="${d.version ?? ""}" data-phase="${esc(d.phase)}"`
      + ` data-ready="${d.replicas_ready}" data-desired="${d.replicas_desired}"`
      + ` class="${d.name === ui.selected ? "selected" : ""}">`
      + `<td><b>${esc(d.name)}</b></td>`
      + `<td>${esc(d.model)} <span class="version">v${d.version ?? "?"}</span></td>`
      + `<td>${esc(d.runtime || "—")}</td>`
      + `<td><span class="badge ${phase}">${esc(d.phase)}</span>`
      + `${d.message ? `<span class="why">${esc(d.message)}</span>` : ""}</td>`
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
  pollSelected().catch(report);
}

function deselect() {
  ui.selected = null;
  ui.decisions = [];
  disarm();
  $("detail").hidden = true;
  $("rollback-result").textContent = "";
  $("rollback-result").dataset.status = "";
  for (const id of ["decisions", "versions"]) $(id).tBodies[0].innerHTML = "";
}

function renderDetailHead() {
  const d = current();
  if (!d) return;
  const title = $("detail-title");
  title.dataset.deployment = d.name;
  title.textContent = `${d.name} · ${d.model} v${d.version ?? "?"}`;
  const button = $("rollback-btn");
  if (ui.armed && ui.armed.button === button) {
    if (ui.armed.ref === d.previous_ref) return;
    disarm(); // where a rollback goes changed since the first click: ask again
    return;   // (disarm() drew the head again)
  }
  // previous_ref in full (it may name another model); nothing before: nothing to roll back to.
  button.dataset.deployment = d.name;
  button.dataset.ref = d.previous_ref || "";
  button.disabled = !d.previous_ref;
  button.textContent = d.previous_ref ? `Roll back to ${d.previous_ref}` : "Nothing to roll back to";
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
    if (err.status === 404) { ui.decisions = []; renderDecisions(); drawChart(); } else report(err);
  }
  if (d && d.model) {
    try {
      const model = await api(`/api/v1/models/${encodeURIComponent(d.model)}`);
      if (name === ui.selected) renderVersions(model);
    } catch (err) {
      if (err.stale || name !== ui.selected) return;
      report(err);
      $("versions").tBodies[0].innerHTML = `<tr><td colspan="8" class="error">${esc(err.message)}</td></tr>`;
    }
  }
}

function drawChart() {
  drawLoadChart($("load-chart"), $("chart-legend"), ui.decisions);
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

// The first click arms the button, the second (within ARM_MS) acts on the ref it showed.
function confirmClick(button, ref, prompt, action) {
  if (ui.armed && ui.armed.button === button) {
    const armed = ui.armed.ref;
    disarm();
    action(armed);
    return;
  }
  disarm();
  const label = button.textContent;
  button.classList.add("armed");
  button.textContent = prompt;
  ui.armed = { button, label, ref, timer: setTimeout(disarm, ARM_MS) };
}

// Always to an explicit version (the one the button showed): the server never picks another.
async function rollback(name, version) {
  const out = $("rollback-result");
  out.dataset.status = "pending";
  out.className = "result";
  out.textContent = `rolling back ${name}…`;
  try {
    const body = await api(`/api/v1/deployments/${encodeURIComponent(name)}/rollback`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ version }),
    });
    out.dataset.status = "ok";
    out.classList.add("ok");
    out.textContent = `${name} → ${body.version}: ${body.phase}${body.message ? ` (${body.message})` : ""}`;
  } catch (err) {
    if (err.stale) return; // signed out meanwhile: the page is someone else's now
    out.dataset.status = err.status === 403 ? "forbidden" : "error";
    out.classList.add("error");
    out.textContent = err.status === 403
      ? `not allowed: rolling back needs an operator token (${err.message})`
      : `rollback failed: ${err.message}`;
    if (err.status !== 403 && err.status !== 409) report(err);
  }
  pollSelected().catch(report);
}

// -- polling of what the stream does not carry -------------------------------------------------

// One loop per sign-in: a loop of an older generation ends instead of rescheduling.
async function poll(gen) {
  if (gen !== ui.pollGen || !ui.token) return;
  clearTimeout(ui.pollTimer);
  const results = await Promise.allSettled([pollSelected(), pollAnomalies(), pollResolved()]);
  for (const r of results) if (r.status === "rejected") report(r.reason);
  if (gen === ui.pollGen && ui.token) ui.pollTimer = setTimeout(() => poll(gen), POLL_MS);
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
    const button = event.currentTarget;
    const armed = ui.armed && ui.armed.button === button;
    if (!d || (!armed && !d.previous_ref)) return;
    confirmClick(button, d.previous_ref, `Confirm: roll ${d.name} back to ${d.previous_ref}`,
      (ref) => rollback(d.name, ref));
  });
  $("versions").addEventListener("click", (event) => {
    const button = event.target.closest("button.rollback-to");
    const d = current();
    if (!button || !d) return;
    confirmClick(button, button.dataset.ref, `Confirm: ${d.name} → ${button.dataset.ref}`,
      (ref) => rollback(d.name, ref));
  });
  window.addEventListener("hashchange", () => { if (tokenFromFragment()) signIn(); });
  window.addEventListener("resize", () => { if (ui.selected) drawChart(); });
  tokenFromFragment();
  signIn();
}

init();
