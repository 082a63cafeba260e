// The status page: polls /api/status every 2 s (same-origin JSON: counters and gauges,
// never a payload, token or metadata value) and draws small charts as SVG.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const LIMITS = ["RATE_LIMITED", "ROOM_FULL", "MESSAGE_TOO_LARGE", "METADATA_TOO_LARGE"];
let token = sessionStorage.getItem("status-token") || "";
let timer = null;

function say(text, isError) { $("message").textContent = text; $("message").className = isError ? "error" : ""; }

function cell(text) { const td = document.createElement("td"); td.textContent = String(text); return td; }

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map(([k, v]) => { const tr = document.createElement("tr"); tr.append(cell(k), cell(v)); return tr; }));
}

function chart(id, values) {
  const svg = $(id);
  if (values.length === 1) values = [values[0], values[0]];  // a line, not an invisible point
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? 300 / (values.length - 1) : 300;
  const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(58 - (v / max) * 54).toFixed(1)}`).join(" ");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts || "0,58 300,58");
  svg.replaceChildren(line);
}

function duration(sec) {
  const h = Math.floor(sec / 3600), m = Math.floor((sec % 3600) / 60);
  return h ? `${h} h ${m} min` : `${m} min ${Math.floor(sec % 60)} s`;
}

function render(data) {
  const m = data.metrics;
  $("instances").textContent = m.cluster ? m.cluster.instances : 1;
  $("rooms").textContent = m.cluster ? m.cluster.active_rooms : m.active_rooms;
  $("peers").textContent = m.cluster ? m.cluster.active_connections : m.active_connections;
  $("sockets").textContent = m.open_websockets;
  $("store").textContent = `${data.store_kind}: ${data.store}`;
  $("uptime").textContent = duration(m.uptime_sec);
  fillTable("roles", Object.entries(m.peers_by_role).sort());
  const codes = m.errors_by_code || {};
  fillTable("limits", [...LIMITS.map((c) => [c, codes[c] || 0]),
    ["frames dropped: rate limit", m.rate_limited_drops], ["frames dropped: full outbox", m.outbox_overflows],
    ["signals dropped", m.dropped_signals]]);
  for (const key of ["connects", "messages", "limits"]) {
    const values = data.rates.map((r) => r[key]);
    chart(`chart-${key}`, values);
    $(`${key}-now`).textContent = values.length ? `(${values[values.length - 1]})` : "";
  }
  $("updated").textContent = new Date().toLocaleTimeString();
  $("board").hidden = false;
}

async function poll() {
  try {
    const resp = await fetch("/api/status", { credentials: "same-origin",
      headers: token ? { Authorization: `Bearer ${token}` } : {} });
    if (resp.status === 401 || resp.status === 403) {
      $("auth").hidden = false;
      say(resp.status === 401 ? "This server shows its status to operators only." : "That identity is not an operator.", true);
      return;
    }
    if (!resp.ok) throw new Error(`the server answered ${resp.status}`);
    $("auth").hidden = true;
    say("");
    render(await resp.json());
  } catch (e) {
    say(`Could not reach the server (${e.message}); retrying.`, true);
  }
  timer = setTimeout(poll, POLL_MS);
}

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("status-token", token);
  clearTimeout(timer);
  poll();
});

poll();
