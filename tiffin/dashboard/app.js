// Tiffin's dashboard: polls /dashboard/data, keeps a short time series per model and version in
// the page, draws it on <canvas> (no library, no CDN), and sends admin actions to the admin API
// with the token pasted in the header. Every chart says how many points it drew in data-points,
// so a test (or a person) can tell an empty chart from a flat one.
"use strict";

const POLL_MS = 2000;
const KEEP = 150; // points per series: 5 minutes at the poll rate
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
const series = {}; // model -> version -> {t: [], rate: [], p95: [], err: []}
const catalogue = {}; // model -> [versions] from /models
let last = null;

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(2) + " %");

// --- charts ------------------------------------------------------------------------------------

function sizeCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 120;
  if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return [ctx, w, h];
}

function axes(ctx, w, h, max, unit) {
  ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#6b7280"; ctx.font = "10px system-ui";
  for (const f of [0, 0.5, 1]) {
    const y = h - 14 - f * (h - 24);
    ctx.beginPath(); ctx.moveTo(34, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(fmt(max * f, max < 10 ? 2 : 0) + unit, 0, y + 3);
  }
}

// lines: [{name, points: [[t, v], ...]}]
// floor: the smallest top of the scale (an error rate of 0 % is drawn on 0..1 %, not 0..0)
function lineChart(canvas, lines, unit, floor = 1e-9) {
  const [ctx, w, h] = sizeCanvas(canvas);
  const all = lines.flatMap((l) => l.points);
  canvas.dataset.points = String(all.length);
  canvas.dataset.series = String(lines.filter((l) => l.points.length).length);
  if (!all.length) { ctx.fillStyle = "#9ca3af"; ctx.fillText("waiting for traffic", 40, h / 2); return; }
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
  const max = Math.max(Math.max(...all.map((p) => p[1])) * 1.1, floor);
  axes(ctx, w, h, max, unit);
  const x = (t) => 36 + ((t - t0) / (t1 - t0)) * (w - 40);
  const y = (v) => h - 14 - (v / max) * (h - 24);
  lines.forEach((line, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 1.5; ctx.beginPath();
    line.points.forEach(([t, v], j) => (j ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
    ctx.stroke();
    if (line.points.length === 1) { ctx.fillStyle = ctx.strokeStyle; ctx.fillRect(x(line.points[0][0]) - 2, y(line.points[0][1]) - 2, 4, 4); }
  });
}

// bars: [{name, buckets: {"<=0.05": n, ...}}]: each version's share of its predictions per bucket
function distributionChart(canvas, bars) {
  const [ctx, w, h] = sizeCanvas(canvas);
  const labels = [...new Set(bars.flatMap((b) => Object.keys(b.buckets)))]
    .sort((a, b) => parseFloat(a.slice(2)) - parseFloat(b.slice(2)));
  let points = 0;
  if (!labels.length) {
    canvas.dataset.points = "0";
    ctx.fillStyle = "#9ca3af"; ctx.fillText("no predictions yet", 40, h / 2); return;
  }
  const shares = bars.map((b) => {
    const total = Object.values(b.buckets).reduce((a, c) => a + c, 0) || 1;
    return labels.map((l) => (b.buckets[l] || 0) / total);
  });
  const max = Math.max(...shares.flat(), 1e-9);
  axes(ctx, w, h, max * 100, "%");
  const slot = (w - 40) / labels.length, bw = Math.max(slot / Math.max(bars.length, 1) - 1, 1);
  shares.forEach((row, i) => {
    ctx.fillStyle = COLORS[i % COLORS.length];
    row.forEach((s, j) => {
      if (s > 0) points++;
      const bh = (s / max) * (h - 24);
      ctx.fillRect(36 + j * slot + i * bw, h - 14 - bh, bw, bh);
    });
  });
  ctx.fillStyle = "#6b7280";
  ctx.fillText("0", 36, h - 2); ctx.fillText(labels[labels.length - 1].slice(2), w - 24, h - 2);
  canvas.dataset.points = String(points);
}

// --- per model cards ---------------------------------------------------------------------------

function modelCard(model) {
  let card = document.getElementById("model-" + model);
  if (card) return card;
  const chart = (kind, caption) => el("figure", { class: "chart" },
    el("figcaption", { text: caption }),
    el("canvas", { "data-chart": kind, "data-model": model, "data-points": "0" }));
  card = el("div", { class: "model", id: "model-" + model, "data-model": model },
    el("h3", { text: model }),
    el("table", { class: "versions" }, el("thead", {}, el("tr", {},
      ...["version", "weight", "req/s", "requests", "p50 ms", "p95 ms", "p99 ms", "error rate", "mean score"]
        .map((t) => el("th", { text: t })))), el("tbody")),
    el("div", { class: "legend" }),
    el("div", { class: "charts" },
      chart("rate", "requests / s"), chart("p95", "p95 latency (ms)"),
      chart("errors", "error rate (%)"), chart("distribution", "prediction distribution")));
  $("#models").append(card);
  return card;
}

function record(model, version, recent, at) {
  if (recent.rate_per_s === null) return; // this worker's first look: no rate yet
  const s = ((series[model] ||= {})[version] ||= { t: [], rate: [], p95: [], err: [] });
  s.t.push(at); s.rate.push(recent.rate_per_s);
  s.p95.push(recent.latency_ms.p95); s.err.push(recent.error_rate === null ? null : 100 * recent.error_rate);
  for (const k of ["t", "rate", "p95", "err"]) if (s[k].length > KEEP) s[k].shift();
}

function points(model, version, key) {
  const s = (series[model] || {})[version];
  if (!s) return [];
  return s.t.map((t, i) => [t, s[key][i]]).filter((p) => p[1] !== null && p[1] !== undefined);
}

function renderModels(data) {
  $("#window").textContent = data.thresholds.window_s;
  for (const [model, entry] of Object.entries(data.models)) {
    const versions = Object.entries(entry.versions);
    versions.forEach(([v, stats]) => record(model, v, stats.recent, data.generated_at));
    const served = versions.some(([, s]) => s.total.requests > 0);
    const existing = document.getElementById("model-" + model);
    if (!served && !existing) continue; // a model nobody has called yet: no empty charts
    const card = modelCard(model);
    const body = card.querySelector("tbody");
    body.replaceChildren(...versions.map(([v, s]) => el("tr", { "data-version": v },
      ...[v + (s.shadow ? " (shadow)" : ""), s.weight + " %", fmt(s.recent.rate_per_s, 2), s.total.requests,
        fmt(s.recent.latency_ms.p50), fmt(s.recent.latency_ms.p95), fmt(s.recent.latency_ms.p99),
        pct(s.recent.error_rate), fmt(s.total.prediction_mean, 3)].map((t) => el("td", { text: String(t) })))));
    card.querySelector(".legend").replaceChildren(...versions.map(([v], i) =>
      el("span", {}, el("i", { style: "background:" + COLORS[i % COLORS.length] }), v)));
    const lines = (key) => versions.map(([v]) => ({ name: v, points: points(model, v, key) }));
    lineChart(card.querySelector('[data-chart="rate"]'), lines("rate"), "");
    lineChart(card.querySelector('[data-chart="p95"]'), lines("p95"), "");
    lineChart(card.querySelector('[data-chart="errors"]'), lines("err"), "", 1);
    distributionChart(card.querySelector('[data-chart="distribution"]'),
      versions.map(([v, s]) => ({ name: v, buckets: s.total.prediction_distribution })));
  }
}

// --- tables --------------------------------------------------------------------------------------

const row = (...cells) => el("tr", {}, ...cells.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: String(c) }))));
const weights = (w) => Object.entries(w).map(([v, p]) => `${v}: ${p} %`).join(", ") || "–";

function renderTraffic(data) {
  $("#splits tbody").replaceChildren(...Object.entries(data.models)
    .filter(([, e]) => Object.keys(e.weights).length)
    .map(([m, e]) => { const r = row(m, weights(e.weights), e.stable || "–", e.shadows.join(", ") || "–"); r.dataset.model = m; return r; }));
  $("#deployments tbody").replaceChildren(...data.deployments.map((d) => {
    let action = "";
    if (d.status === "in_progress") {
      action = el("button", { "data-action": "rollback", "data-deployment": d.id, text: "Roll back" });
      action.onclick = () => admin("POST", `/deployments/${encodeURIComponent(d.id)}/rollback`, null, "#action-result");
    } else if (d.status === "completed") {
      action = el("button", { "data-action": "activate", text: `Back to ${d.stable_version}` });
      action.onclick = () => admin("POST", `/models/${encodeURIComponent(d.family + ":" + d.stable_version)}/activate`, null, "#action-result");
    }
    const r = row(d.family, d.strategy, d.target_version, d.stable_version, d.weight + " %", d.status, d.verdict, action);
    r.dataset.deployment = d.id;
    return r;
  }));
  if (!data.deployments.length) $("#deployments tbody").append(el("tr", {}, el("td", { class: "empty", colspan: "8", text: "no deployments" })));
  $("#ab-tests tbody").replaceChildren(...data.ab_tests.map((t) =>
    row(t.test_id, t.model_a, t.model_b, (100 * t.traffic_split).toFixed(0) + " % to B", t.status, t.verdict || "–")));
  if (!data.ab_tests.length) $("#ab-tests tbody").append(el("tr", {}, el("td", { class: "empty", colspan: "6", text: "no A/B tests" })));
}

function renderHealth(data) {
  const alerts = data.alerts;
  $("#alert-count").textContent = alerts.length;
  $("#alerts").replaceChildren(...(alerts.length ? alerts.map((a) => el("li", { class: a.severity, "data-alert": a.name },
    `${a.severity.toUpperCase()} ${a.name}: ${a.message} (since ${new Date(a.since * 1000).toLocaleTimeString()})`))
    : [el("li", { class: "empty", text: "no active alerts" })]));
  const fresh = Object.entries(data.feature_freshness.models).flatMap(([m, vs]) =>
    Object.entries(vs).map(([v, age]) => row(m, v, fmt(age, 0) + " s" + (age > data.thresholds.freshness_s ? " (stale)" : ""))));
  $("#freshness tbody").replaceChildren(...(fresh.length ? fresh : [el("tr", {}, el("td", { class: "empty", colspan: "3", text: "no feature-store requests yet" }))]));
  const mem = data.memory;
  $("#memory").textContent = `${(mem.used_bytes / 2 ** 20).toFixed(0)} MiB of ${(mem.limit_bytes / 2 ** 20).toFixed(0)} MiB `
    + `(${pct(mem.fraction)}, ${mem.source === "cgroup" ? "container limit" : "this replica on the host"}); this worker ${(mem.worker_rss_bytes / 2 ** 20).toFixed(0)} MiB`;
  $("#breaker").textContent = data.circuit_breaker.state;
}

async function renderDrift(data) {
  const box = $("#drift");
  if (!data.drift_served) { box.replaceChildren(el("p", { class: "empty", text: "no drift data" })); return; }
  const items = [];
  for (const model of Object.keys(data.models)) {
    try {
      const r = await fetch(`/drift/${encodeURIComponent(model)}`);
      if (r.status !== 200) continue;
      const body = await r.json();
      items.push(el("li", { "data-model": model }, el("b", { text: model + ": " }), JSON.stringify(body).slice(0, 300)));
    } catch (e) { /* the next poll tries again */ }
  }
  box.replaceChildren(items.length ? el("ul", {}, ...items) : el("p", { class: "empty", text: "no drift data" }));
}

// --- admin actions ---------------------------------------------------------------------------

async function admin(method, path, body, outputSel) {
  const out = $(outputSel);
  const token = $("#token").value.trim();
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  out.dataset.status = "pending"; out.textContent = "…";
  try {
    const r = await fetch(path, { method, headers, body: body === null ? undefined : JSON.stringify(body) });
    const text = await r.text();
    let message = text;
    try { const j = JSON.parse(text); message = j.error || JSON.stringify(j); } catch (e) { /* not JSON */ }
    out.dataset.status = String(r.status);
    out.textContent = `${r.status}${r.status === 401 ? " unauthorized" : ""}: ${message}`;
  } catch (e) {
    out.dataset.status = "error"; out.textContent = String(e);
  }
  poll();
}

function splitInputs() {
  const model = $("#split-model").value;
  const current = (last && last.models[model] && last.models[model].weights) || {};
  const versions = [...new Set([...(catalogue[model] || []), ...Object.keys(current)])];
  $("#split-weights").replaceChildren(...versions.map((v) => el("label", {}, v + " ",
    el("input", { type: "number", min: "0", max: "100", step: "1", name: v, "data-version": v, value: String(current[v] || 0) }))));
}

function fillModelSelect() {
  const select = $("#split-model");
  const names = Object.keys(catalogue).sort();
  if (select.options.length === names.length) return;
  const chosen = select.value;
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (chosen) select.value = chosen;
  splitInputs();
}

$("#split-model").addEventListener("change", splitInputs);
$("#split-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const body = {};
  for (const input of $("#split-weights").querySelectorAll("input")) {
    const value = parseInt(input.value, 10);
    if (value > 0) body[input.dataset.version] = value;
  }
  admin("POST", `/v1/traffic-split?model=${encodeURIComponent($("#split-model").value)}`, body, "#split-result");
});

// --- polling ---------------------------------------------------------------------------------

async function loadCatalogue() {
  const r = await fetch("/models");
  if (r.status !== 200) return;
  for (const m of (await r.json()).models) catalogue[m.name] = m.versions.map((v) => v.version);
  fillModelSelect();
}

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  try {
    const r = await fetch("/dashboard/data");
    if (r.status !== 200) throw new Error(`/dashboard/data answered ${r.status}`);
    last = await r.json();
    renderModels(last); renderTraffic(last); renderHealth(last); renderDrift(last);
    const polls = Number(document.body.dataset.polls || 0) + 1;
    if (polls === 1) splitInputs(); // the current weights, once known
    document.body.dataset.polls = String(polls);
    $("#status").dataset.state = "ok";
    $("#status").textContent = "live, " + new Date(last.generated_at * 1000).toLocaleTimeString();
  } catch (e) {
    $("#status").dataset.state = "error"; $("#status").textContent = String(e.message || e);
  } finally {
    polling = false;
  }
}

loadCatalogue().then(poll);
setInterval(poll, POLL_MS);
