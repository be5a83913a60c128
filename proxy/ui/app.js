// DriftSched operator page: a client of the admin REST API, nothing more.
//
// The admin key lives in this tab's sessionStorage (gone when the tab closes, never sent
// anywhere but the admin API of this origin) and goes out as `Authorization: Bearer` on
// every call. Every value from the API is written with textContent, never as HTML.
"use strict";

const KEY_SLOT = "driftsched.adminKey";
// the admin API sits beside the page: /admin/ui -> /admin (also behind a path prefix)
const API = location.pathname.replace(/\/admin\/ui\/?$/, "") + "/admin";
const REFRESH_MS = 3000;

const $ = (id) => document.getElementById(id);
let timer = null;
let busy = false;
let again = false;  // a refresh asked for while one runs (after an action): run it next

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, key = sessionStorage.getItem(KEY_SLOT)) {
  const headers = { authorization: "Bearer " + (key || "") };
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(API + path, {
    method, headers, cache: "no-store", credentials: "omit",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!r.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(r.status, e.code || null, e.message || `HTTP ${r.status}`);
  }
  return data;
}

// -- rendering ---------------------------------------------------------------------------
function el(tag, props, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v);
  }
  for (const c of children) n.append(c instanceof Node ? c : String(c));
  return n;
}

const dash = "\u2014";
function fmt(v, digits = 2) {
  if (v === null || v === undefined) return dash;
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : v.toFixed(digits);
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) return v.length ? v.join(", ") : dash;
  return String(v);
}
const pct = (v) => (v === null || v === undefined ? dash : (100 * v).toFixed(1) + "%");
const when = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : dash);

// columns: [header, row => value (string/number/Node), optional class]
function fill(table, columns, rows, empty) {
  const head = el("tr", {}, ...columns.map(([h]) => el("th", {}, h)));
  const body = rows.length
    ? rows.map((r) => el("tr", { "data-key": String(r.__key ?? "") },
        ...columns.map(([, f, cls]) => {
          const v = f(r);
          return el("td", cls ? { class: cls } : {}, v instanceof Node ? v : fmt(v));
        })))
    : [el("tr", {}, el("td", { colspan: String(columns.length), class: "muted" }, empty))];
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
}

const badge = (text, kind) => el("span", { class: "badge " + kind }, text);

function render(s) {
  const { tenants, usage, keys, backends, sched } = s;
  const usageOf = Object.fromEntries(usage.map((u) => [u.tenant, u]));
  const classOf = Object.fromEntries(tenants.map((t) => [t.name, t.qos_class]));
  const depth = sched.queue_depth || {};
  const drift = sched.drift || {};
  const queued = Object.values(depth).reduce((a, b) => a + b, 0);
  const running = usage.reduce((a, u) => a + u.in_flight, 0);

  $("summary").textContent =
    `policy ${sched.policy} \u00b7 replica ${sched.replica} \u00b7 ${queued} queued \u00b7 ${running} in flight`;

  // queue per class, then per tenant (every tenant, queued or not)
  const classes = {};
  for (const t of tenants) {
    const c = (classes[t.qos_class] ||= { name: t.qos_class, tenants: 0, queued: 0, in_flight: 0, level: null });
    c.tenants += 1;
    c.queued += depth[t.name] || 0;
    c.in_flight += (usageOf[t.name] || {}).in_flight || 0;
    if (drift[t.name]) c.level = drift[t.name].level;
  }
  for (const [name, n] of Object.entries(depth)) {  // queued by a tenant deleted meanwhile
    if (!(name in classOf)) {
      const c = (classes["(deleted)"] ||= { name: "(deleted)", tenants: 0, queued: 0, in_flight: 0, level: null });
      c.queued += n;
    }
  }
  fill($("queue-classes"), [
    ["class", (c) => c.name], ["level", (c) => c.level], ["tenants", (c) => c.tenants],
    ["queued", (c) => c.queued, "num"], ["in flight", (c) => c.in_flight, "num"],
  ], Object.values(classes).map((c) => ({ ...c, __key: c.name })), "no tenants");

  const names = [...new Set([...tenants.map((t) => t.name), ...Object.keys(depth)])].sort();
  fill($("queue-tenants"), [
    ["tenant", (r) => r.name], ["class", (r) => classOf[r.name]],
    ["queued", (r) => depth[r.name] || 0, "num"],
    ["in flight", (r) => (usageOf[r.name] || {}).in_flight ?? null, "num"],
    ["limit", (r) => (drift[r.name] ? drift[r.name].limit : null), "num"],
    ["drift state", (r) => (drift[r.name] ? drift[r.name].state : null)],
  ], names.map((name) => ({ name, __key: name })), "no tenants");

  // engines: the pool's view, the admission holds and the governor's cap side by side
  const loads = Object.fromEntries((sched.engines || []).map((e) => [e.name, e]));
  const gov = (sched.governor && sched.governor.engines) || {};
  fill($("engines"), [
    ["engine", (b) => b.name], ["kind", (b) => b.kind],
    ["state", (b) => badge(b.state, b.state === "healthy" ? "ok" : b.state === "draining" ? "warn" : "bad")],
    ["models", (b) => b.models],
    ["in flight", (b) => b.in_flight, "num"],
    ["held tokens", (b) => (loads[b.name] || {}).held_tokens ?? null, "num"],
    ["seqs", (b) => (loads[b.name] || {}).seqs ?? null, "num"],
    ["KV budget", (b) => (loads[b.name] || {}).budget_tokens ?? b.kv_capacity_tokens, "num"],
    ["KV used", (b) => pct(b.metrics ? b.metrics.kv_cache_usage_perc : null), "num"],
    ["running / waiting", (b) => (b.metrics ? `${fmt(b.metrics.num_requests_running)} / ${fmt(b.metrics.num_requests_waiting)}` : dash)],
    ["seq cap", (b) => (gov[b.name] ? gov[b.name].cap : null), "num"],
    ["restarts", (b) => b.restarts, "num"],
    ["scraped", (b) => (b.metrics && b.metrics.age_s !== null ? `${b.metrics.age_s.toFixed(1)} s ago` : dash)],
    ["", (b) => b.state === "draining"
      ? el("button", { type: "button", class: "undrain", onclick: () => engineAction(b.name, "undrain") }, "Undrain")
      : el("button", { type: "button", class: "drain", onclick: () => engineAction(b.name, "drain") }, "Drain")],
  ], backends.map((b) => ({ ...b, __key: b.name })), "no engines");

  fill($("tenants"), [
    ["tenant", (t) => t.name], ["class", (t) => t.qos_class], ["weight", (t) => t.weight],
    ["rpm", (t) => t.rpm, "num"], ["tpm", (t) => t.tpm, "num"],
    ["max conc.", (t) => t.max_concurrency, "num"], ["daily quota", (t) => t.daily_token_quota, "num"],
    ["TTFT / TPOT SLO ms", (t) => `${fmt(t.ttft_slo_ms, 0)} / ${fmt(t.tpot_slo_ms, 0)}`],
    ["requests", (t) => (usageOf[t.name] || {}).requests ?? null, "num"],
    ["errors", (t) => (usageOf[t.name] || {}).errors ?? null, "num"],
    ["tokens in", (t) => (usageOf[t.name] || {}).tokens_in ?? null, "num"],
    ["tokens out", (t) => (usageOf[t.name] || {}).tokens_out ?? null, "num"],
    ["tokens today", (t) => (usageOf[t.name] || {}).tokens_today ?? null, "num"],
  ], tenants.map((t) => ({ ...t, __key: t.name })), "no tenants");

  const sel = $("key-tenant");
  const chosen = sel.value;
  sel.replaceChildren(...tenants.map((t) => el("option", { value: t.name }, t.name)));
  if (tenants.some((t) => t.name === chosen)) sel.value = chosen;

  // keys: the API lists prefixes only; the full key exists only in the create answer
  const sorted = [...keys].sort((a, b) => b.created_at - a.created_at);
  fill($("keys"), [
    ["key id", (k) => k.key_id], ["tenant", (k) => k.tenant],
    ["prefix", (k) => el("code", {}, k.prefix)], ["label", (k) => k.name || dash],
    ["created", (k) => when(k.created_at)],
    ["status", (k) => (k.active ? badge("active", "ok")
      : badge(k.revoked_at ? "revoked" : "expired", "bad"))],
    ["expires", (k) => when(k.expires_at)],
  ], sorted.map((k) => ({ ...k, __key: k.key_id })), "no keys");

  // scheduler: class attainment (levels named by the classes that use them), governor, drift
  const levelNames = {};
  for (const [t, d] of Object.entries(drift)) {
    const c = classOf[t];
    if (c) (levelNames[d.level] ||= new Set()).add(c);
  }
  const att = Object.entries(sched.slo_attainment || {});
  fill($("attainment"), [
    ["level", ([lv]) => lv], ["classes", ([lv]) => [...(levelNames[lv] || [])].join(", ") || dash],
    ["attainment", ([, a]) => pct(a.attainment), "num"], ["requests", ([, a]) => a.requests, "num"],
  ], att.map((a) => Object.assign(a, { __key: a[0] })), "no completions yet");

  const target = sched.governor ? sched.governor.target_tpot_s : null;
  $("governor-target").textContent = target === null || target === undefined
    ? "no TPOT target" : `target TPOT ${(target * 1000).toFixed(1)} ms`;
  fill($("governor"), [
    ["engine", ([n]) => n], ["cap", ([, g]) => g.cap, "num"], ["max seqs", ([, g]) => g.max_seqs, "num"],
    ["TPOT ms", ([, g]) => (g.tpot_s === null ? null : g.tpot_s * 1000), "num"],
    ["cuts / raises", ([, g]) => `${g.decreases} / ${g.increases}`],
  ], Object.entries(gov).map((g) => Object.assign(g, { __key: g[0] })), "the governor caps no engine");

  const pressure = sched.drift_pressure || [];
  $("drift-pressure").textContent = pressure.length
    ? `under pressure: ${pressure.join(", ")}` : "no class level under SLO pressure";
  const est = sched.estimator || {};
  fill($("drift"), [
    ["tenant", (d) => d.tenant], ["level", (d) => d.level],
    ["state", (d) => badge(d.state, d.state === "drifting" ? "bad" : d.state === "recovering" ? "warn" : "ok")],
    ["ratio", (d) => d.ratio, "num"], ["baseline", (d) => d.baseline, "num"],
    ["samples", (d) => d.samples, "num"],
    ["limit / base", (d) => `${fmt(d.limit)} / ${fmt(d.base_limit)}`],
    ["boost", (d) => d.boost], ["overflow", (d) => d.overflow],
    ["last action", (d) => (d.last_action_at ? `${d.last_action} at ${when(d.last_action_at)}` : d.last_action)],
    ["cuts / raises", (d) => `${d.decreases} / ${d.increases}`],
    ["estimator drift", (d) => (est[d.tenant] ? `${est[d.tenant].drift_detected ? "detected" : "none"} (${est[d.tenant].detections})` : dash)],
  ], Object.values(drift).map((d) => ({ ...d, __key: d.tenant })),
  sched.policy === "driftsched" ? "no tenants" : `the ${sched.policy} policy has no drift controller`);
}

// -- actions -----------------------------------------------------------------------------
function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "muted";
}

async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  again = false;
  try {
    const [tenants, usage, keys, backends, sched] = await Promise.all([
      api("GET", "/tenants"), api("GET", "/usage"), api("GET", "/keys"),
      api("GET", "/backends"), api("GET", "/scheduler"),
    ]);
    render({ tenants, usage, keys, backends, sched });
    setStatus("updated " + new Date().toLocaleTimeString("en-GB"));
  } catch (e) {
    failed(e);
  } finally {
    busy = false;
  }
  if (again && sessionStorage.getItem(KEY_SLOT)) refresh();
}

function failed(e) {
  if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
    signOut(e.message);
  } else {
    setStatus(e.message || String(e), true);
  }
}

async function engineAction(name, op) {
  try {
    const r = await api("POST", `/backends/${encodeURIComponent(name)}/${op}`);
    setStatus(`${name}: ${r.state}`);
  } catch (e) {
    failed(e);
  }
  await refresh();
}

async function createKey(ev) {
  ev.preventDefault();
  const tenant = $("key-tenant").value;
  if (!tenant) return;
  try {
    const label = $("key-name").value.trim();
    const k = await api("POST", `/tenants/${encodeURIComponent(tenant)}/keys`, label ? { name: label } : {});
    $("new-key-prefix").textContent = k.prefix;
    $("new-key-tenant").textContent = k.tenant;
    $("new-key-value").value = k.key;
    $("new-key").hidden = false;
    $("key-name").value = "";
    setStatus(`created ${k.key_id} (${k.prefix})`);
  } catch (e) {
    failed(e);
  }
  await refresh();
}

function hideNewKey() {
  $("new-key-value").value = "";
  $("new-key").hidden = true;
}

// -- session -----------------------------------------------------------------------------
function showDashboard() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("session").hidden = false;
  refresh();
  schedule();
}

function schedule() {
  clearInterval(timer);
  timer = $("auto").checked ? setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS) : null;
}

function signOut(message) {
  clearInterval(timer);
  sessionStorage.removeItem(KEY_SLOT);
  hideNewKey();
  // no data outlives the session: empty every table
  for (const t of document.querySelectorAll("#dashboard table")) t.replaceChildren();
  $("summary").textContent = "";
  $("dashboard").hidden = true;
  $("session").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("");
  $("admin-key").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  const key = $("admin-key").value;
  $("login-error").textContent = "";
  try {
    await api("GET", "/tenants", undefined, key);  // the key is kept only once it works
  } catch (e) {
    $("login-error").textContent = e.status === 401 ? "The admin key was refused." : e.message;
    return;
  }
  $("admin-key").value = "";
  sessionStorage.setItem(KEY_SLOT, key);
  showDashboard();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("key-form").addEventListener("submit", createKey);
  $("refresh").addEventListener("click", refresh);
  $("auto").addEventListener("change", schedule);
  $("signout").addEventListener("click", () => signOut("Signed out."));
  $("new-key-dismiss").addEventListener("click", hideNewKey);
  $("new-key-copy").addEventListener("click", async () => {
    const v = $("new-key-value");
    try { await navigator.clipboard.writeText(v.value); setStatus("key copied"); }
    catch (_) { v.select(); setStatus("select the key and copy it"); }
  });
  if (sessionStorage.getItem(KEY_SLOT)) showDashboard();
  else $("admin-key").focus();
});
