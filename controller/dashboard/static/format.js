// LLM Ops Helper dashboard: formatting helpers, pure functions of their arguments (but
// applyBars). Loaded before chart.js and app.js, which use them.
"use strict";

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

