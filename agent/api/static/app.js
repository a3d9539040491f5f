// ebpf-agent console. Plain JavaScript, no build step, no third-party code.
// Every value that comes from the agent (event fields above all: argv is attacker-chosen
// text) reaches the page through textContent or setAttribute, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  who: null, monitors: [], timers: [], source: null, buffer: [], missed: 0,
  received: 0, pending: 0, paused: false, fresh: [], selectedSyscall: null, lastCpu: null,
  edited: {},
};

// -- small DOM helpers ------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind === "info" ? "info" : "";
  box.hidden = !text;
}

function detailText(data, status) {
  if (data && typeof data.detail === "string") return data.detail;
  if (data && Array.isArray(data.detail)) {
    return data.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  return `HTTP ${status}`;
}

// -- API --------------------------------------------------------------------------------
async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    return { ok: false, status: 0, data: { detail: `the agent cannot be reached (${e})` } };
  }
  let data = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) data = await response.json().catch(() => null);
  if (response.status === 401 && path !== "/auth/session") loggedOut("session ended: log in again");
  return { ok: response.ok, status: response.status, data };
}

// -- login ------------------------------------------------------------------------------
async function boot() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  wireEvents();
  const r = await api("GET", "/auth/session");
  if (r.ok) start(r.data);
  else loggedOut("");
}

async function login(ev) {
  ev.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  input.value = "";  // the page keeps no copy of the token
  if (!token) return;
  const r = await api("POST", "/auth/session", { token });
  if (r.ok) {
    showMessage("");
    start(r.data);
  } else {
    showMessage(r.status === 401 ? "wrong token" : detailText(r.data, r.status));
  }
}

async function logout() {
  await api("DELETE", "/auth/session");
  loggedOut("logged out");
}

function loggedOut(message) {
  stop();
  state.who = null;
  $("console").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login-view").hidden = false;
  if (message) showMessage(message, "info");
}

function start(who) {
  state.who = who;
  $("login-view").hidden = true;
  $("console").hidden = false;
  $("logout").hidden = who.via !== "session";
  $("who").textContent = who.auth === "none"
    ? "open: no authentication (api.auth: none)"
    : `${who.name} (${who.scope} scope)`;
  $("audit-section").hidden = who.scope !== "control";
  stop();
  refreshMonitors().then(connectEvents);
  refreshTargets();
  refreshStats();
  every(2000, refreshStats);
  every(3000, refreshMonitors);
  every(5000, refreshTargets);
  every(3000, refreshSyscalls);
  every(3000, refreshTopLists);
  refreshContainers();
  every(3000, refreshContainers);
  every(250, flushEvents);
  if (who.scope === "control") { refreshAudit(); every(5000, refreshAudit); }
}

function every(ms, fn) { state.timers.push(setInterval(fn, ms)); }

function stop() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  if (state.source) { state.source.close(); state.source = null; }
}

// -- monitors ---------------------------------------------------------------------------
async function refreshMonitors() {
  const r = await api("GET", "/monitors");
  if (!r.ok) return;
  state.monitors = r.data;
  const box = $("monitors");
  for (const m of r.data) {
    let card = box.querySelector(`[data-monitor-card="${CSS.escape(m.name)}"]`);
    if (!card) { card = monitorCard(m); box.append(card); }
    const badge = card.querySelector(".badge");
    badge.textContent = m.state;
    badge.className = `badge ${m.state}`;
    card.querySelector(".reason").textContent = m.reason || "";
    const options = card.querySelector("textarea");
    if (!state.edited[m.name]) options.value = JSON.stringify(m.options || {}, null, 2);
    card.querySelector(".start").textContent = m.state === "running" ? "Apply" : "Start";
    card.querySelector(".start").disabled = m.state === "unsupported";
  }
  const select = $("f-monitor");
  for (const m of r.data) {
    if (![...select.options].some((o) => o.value === m.name)) {
      select.append(el("option", { value: m.name, text: m.name }));
    }
  }
}

function monitorCard(m) {
  const name = m.name;
  const msg = el("span", { class: "msg", "data-testid": `monitor-${name}-message` });
  const options = el("textarea", {
    rows: 3, spellcheck: "false", "data-testid": `monitor-${name}-options`,
    oninput: () => { state.edited[name] = true; },
  });
  return el("div", { class: "monitor", "data-monitor-card": name },
    el("div", { class: "head" },
      el("span", { class: "name", text: name }),
      el("span", { class: "badge", "data-testid": `monitor-${name}-state` }),
      el("span", { class: "desc", text: m.description || "" })),
    el("div", { class: "reason", "data-testid": `monitor-${name}-reason` }),
    options,
    el("div", { class: "buttons" },
      el("button", { type: "button", class: "start primary",
        "data-testid": `monitor-${name}-start`, onclick: () => startMonitor(name, options, msg) },
        "Start"),
      el("button", { type: "button", "data-testid": `monitor-${name}-stop`,
        onclick: () => stopMonitor(name, msg) }, "Stop"),
      msg));
}

async function startMonitor(name, textarea, msg) {
  let options;
  try {
    options = JSON.parse(textarea.value || "{}");
  } catch (e) {
    msg.textContent = `options are not JSON: ${e.message}`;
    return;
  }
  msg.textContent = "starting...";
  const r = await api("POST", `/monitors/${encodeURIComponent(name)}/start`, options);
  msg.textContent = r.ok ? "" : detailText(r.data, r.status);
  if (r.ok) state.edited[name] = false;
  refreshMonitors();
}

async function stopMonitor(name, msg) {
  msg.textContent = "stopping...";
  const r = await api("POST", `/monitors/${encodeURIComponent(name)}/stop`);
  msg.textContent = r.ok ? "" : detailText(r.data, r.status);
  refreshMonitors();
}

// -- targets ----------------------------------------------------------------------------
async function refreshTargets() {
  const r = await api("GET", "/targets");
  if (!r.ok) return;
  const t = r.data;
  const box = $("targets");
  const focused = document.activeElement && box.contains(document.activeElement)
    && document.activeElement.tagName === "INPUT" && document.activeElement.type === "text";
  if (focused) return;  // do not redraw under the user's typing
  box.replaceChildren(
    ...["pids", "uids", "comms"].map((kind) => targetRow(kind, t[kind])),
    el("label", {},
      el("input", { type: "checkbox", "data-testid": "follow-children",
        checked: t.follow_children, onchange: (e) => setFollow(e.target.checked) }),
      " follow children"),
    el("span", { class: "msg", id: "targets-msg", "data-testid": "targets-message" }));
}

function targetRow(kind, values) {
  const input = el("input", { type: "text", size: 10, placeholder: `add ${kind.slice(0, -1)}`,
    "data-testid": `target-${kind}-input` });
  const add = async () => {
    const raw = input.value.trim();
    if (!raw) return;
    const items = raw.split(/[\s,]+/).filter(Boolean)
      .map((v) => (kind === "comms" ? v : Number(v)));
    const r = await api("POST", `/targets/${kind}`, items);
    input.value = "";
    targetsResult(r);
  };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") add(); });
  return el("div", { class: "targets-row", "data-testid": `targets-${kind}` },
    el("span", { class: "kind", text: kind }),
    ...values.map((v) => el("span", { class: "chip" }, String(v),
      el("button", { type: "button", title: `remove ${v}`, "aria-label": `remove ${v}`,
        onclick: async () => targetsResult(
          await api("DELETE", `/targets/${kind}/${encodeURIComponent(v)}`)) }, "\u00d7"))),
    input,
    el("button", { type: "button", "data-testid": `target-${kind}-add`, onclick: add }, "Add"));
}

async function setFollow(on) {
  targetsResult(await api("PUT", "/targets/follow_children", on));
}

function targetsResult(r) {
  if (!r.ok) showMessage(`targets: ${detailText(r.data, r.status)}`);
  if (document.activeElement) document.activeElement.blur();
  refreshTargets();
}

// -- stats ------------------------------------------------------------------------------
function fmtBytes(n) {
  return n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
}

async function refreshStats() {
  const r = await api("GET", "/stats");
  if (!r.ok) return;
  const a = r.data.agent;
  let cpu = "";
  if (state.lastCpu) {
    const dt = a.uptime_s - state.lastCpu.uptime;
    if (dt > 0) cpu = `${(100 * (a.cpu_s - state.lastCpu.cpu) / dt).toFixed(1)} %`;
  }
  state.lastCpu = { cpu: a.cpu_s, uptime: a.uptime_s };
  $("agent-stats").replaceChildren(
    el("span", {}, "CPU ", el("b", { "data-testid": "agent-cpu", text: cpu || "…" })),
    el("span", {}, "CPU time ", el("b", { text: `${a.cpu_s.toFixed(1)} s` })),
    el("span", {}, "RSS ", el("b", { "data-testid": "agent-rss", text: fmtBytes(a.rss_bytes) })),
    el("span", {}, "uptime ", el("b", { text: `${Math.round(a.uptime_s)} s` })),
    el("span", {}, "stream subscribers ",
      el("b", { text: (r.data.streams.subscribers || []).length })));
  const rows = Object.values(r.data.monitors).map((m) => el("tr",
    { "data-testid": `stats-${m.name}` },
    el("td", { text: m.name }), el("td", { text: m.state }),
    el("td", { text: m.events_seen_kernel ?? "" }),
    el("td", { text: m.events_delivered ?? "" }),
    el("td", { text: m.state === "running"
      ? (m.events_dropped_kernel || 0) + (m.events_dropped_userspace || 0) : "" }),
    el("td", { text: m.events_per_second ?? "" })));
  $("monitor-stats").tBodies[0].replaceChildren(...rows);
}

// -- syscall tables and histogram ------------------------------------------------------
async function refreshSyscalls() {
  const running = state.monitors.some((m) => m.name === "syscall" && m.state === "running");
  $("syscall-section").hidden = !running;
  if (!running) return;
  const byCount = await api("GET", "/monitors/syscall/stats?sort=count&limit=10");
  if (!byCount.ok) return;
  const timed = byCount.data.syscalls.length > 0 && byCount.data.syscalls[0].total_ns !== null;
  const byTime = timed ? await api("GET", "/monitors/syscall/stats?sort=time&limit=10") : null;
  syscallTable($("sc-count"), byCount.data.syscalls, (s) => String(s.count));
  syscallTable($("sc-time"), byTime && byTime.ok ? byTime.data.syscalls : [],
    (s) => fmtNs(s.total_ns));
  const all = [...byCount.data.syscalls, ...(byTime && byTime.ok ? byTime.data.syscalls : [])];
  if (!state.selectedSyscall && all.length) state.selectedSyscall = all[0].name;
  const chosen = all.find((s) => s.name === state.selectedSyscall);
  drawHistogram(chosen);
}

// -- top lists: any running monitor whose stats describe "top_lists" ---------------------
// Each list says its key columns and the column it is ordered by ({key, sort, rows}), so
// one panel serves every monitor that has one (file: most opened / most failing paths).
async function refreshTopLists() {
  const running = state.monitors.filter((m) => m.state === "running" && m.name !== "syscall");
  const panels = [];
  for (const m of running) {
    const r = await api("GET", `/monitors/${encodeURIComponent(m.name)}/stats?limit=10`);
    if (!r.ok || !r.data || typeof r.data.top_lists !== "object" || !r.data.top_lists) continue;
    for (const [name, list] of Object.entries(r.data.top_lists)) {
      panels.push(topListTable(m.name, name, list));
    }
  }
  $("toplists-section").hidden = panels.length === 0;
  $("toplists").replaceChildren(...panels);
}

function topListTable(monitor, name, list) {
  const rows = Array.isArray(list.rows) ? list.rows : [];
  const key = list.key || [];
  // "sort": the column, or the columns whose sum, orders the list.
  const sorts = Array.isArray(list.sort) ? list.sort : [list.sort];
  const cols = [...key, ...sorts,
    ...Object.keys(rows[0] || {}).filter((c) => !key.includes(c) && !sorts.includes(c))];
  return el("div", {},
    el("h3", { text: `${monitor}: ${name.replaceAll("_", " ")}` }),
    el("table", { class: "grid", "data-testid": `toplist-${monitor}-${name}` },
      el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { text: c })))),
      el("tbody", {}, ...rows.map((row) => el("tr", { "data-row": key.map((k) => row[k]).join(" ") },
        ...cols.map((c) => el("td", { text: String(row[c] ?? "") })))))));
}

function fmtNs(ns) {
  if (ns >= 1e9) return `${(ns / 1e9).toFixed(2)} s`;
  if (ns >= 1e6) return `${(ns / 1e6).toFixed(2)} ms`;
  return `${(ns / 1e3).toFixed(1)} us`;
}

function syscallTable(table, rows, value) {
  table.tBodies[0].replaceChildren(...rows.map((s) => el("tr", {
    class: s.name === state.selectedSyscall ? "selected" : "",
    "data-syscall": s.name,
    onclick: () => { state.selectedSyscall = s.name; refreshSyscalls(); },
  }, el("td", { text: s.name }), el("td", { text: value(s) }))));
}

function bucketLabel(i) {
  const ns = 2 ** i;
  if (ns < 1e3) return `${ns}ns`;
  if (ns < 1e6) return `${Math.round(ns / 1e3)}us`;
  if (ns < 1e9) return `${Math.round(ns / 1e6)}ms`;
  return `${Math.round(ns / 1e9)}s`;
}

function drawHistogram(row) {
  const svg = $("histogram");
  const ns = "http://www.w3.org/2000/svg";
  const title = $("hist-title");
  svg.replaceChildren();
  if (!row || !Array.isArray(row.histogram) || !row.histogram.length) {
    title.textContent = row ? `${row.name}: no latency histogram (latency or histogram off)`
      : "latency histogram";
    return;
  }
  title.textContent = `${row.name}: latency histogram (calls per log2 bucket)`;
  const h = row.histogram;
  let first = h.findIndex((v) => v > 0);
  let last = h.length - 1 - [...h].reverse().findIndex((v) => v > 0);
  if (first < 0) { first = 0; last = h.length - 1; }
  const slots = h.slice(first, last + 1);
  const max = Math.max(1, ...slots);
  const width = 400 / slots.length;
  slots.forEach((v, i) => {
    const barH = Math.max(v ? 1 : 0, (v / max) * 120);
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", String(i * width + 1));
    rect.setAttribute("y", String(130 - barH));
    rect.setAttribute("width", String(Math.max(1, width - 2)));
    rect.setAttribute("height", String(barH));
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `>= ${bucketLabel(first + i)}: ${v}`;
    rect.append(tip);
    svg.append(rect);
    if (i % Math.ceil(slots.length / 8) !== 0) return;  // labels must not overlap
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", String(i * width + 1));
    label.setAttribute("y", "145");
    label.textContent = bucketLabel(first + i);
    svg.append(label);
  });
}

// -- audit ------------------------------------------------------------------------------
async function refreshAudit() {
  const r = await api("GET", "/audit?limit=50");
  if (!r.ok) return;
  const rows = r.data.entries.slice().reverse().map((e) => el("tr", {},
    el("td", { text: e.time.replace("T", " ").replace("Z", "") }),
    el("td", { text: e.token ?? "-" }), el("td", { text: e.client }),
    el("td", { text: `${e.method} ${e.path}` }), el("td", { text: e.status }),
    el("td", { class: "mono", text: e.body ?? "" })));
  $("audit").tBodies[0].replaceChildren(...rows);
}

// -- events -----------------------------------------------------------------------------
function wireEvents() {
  for (const id of ["f-monitor", "f-pid", "f-uid", "f-comm", "f-text", "f-rows"]) {
    $(id).addEventListener("input", renderEvents);
  }
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) { state.pending = 0; state.fresh = []; renderEvents(); }
    counters();
  });
  $("clear").addEventListener("click", () => {
    state.buffer = []; state.fresh = []; renderEvents();
  });
}

function connectEvents() {
  if (state.source) state.source.close();
  // Same origin: the session cookie goes along; the token is never in the URL.
  const source = new EventSource("/events");
  state.source = source;
  const names = new Set(["message", ...state.monitors.map((m) => m.name)]);
  for (const name of names) source.addEventListener(name, onEvent);
  source.addEventListener("dropped", (e) => {
    try { state.missed += JSON.parse(e.data).missed || 0; } catch (_) { /* ignore */ }
    counters();
  });
  source.addEventListener("open", () => streamState("live"));
  source.addEventListener("error", () => streamState(
    source.readyState === EventSource.CLOSED ? "closed" : "reconnecting"));
}

function streamState(text) {
  $("stream-state").textContent = text;
}

function maxRows() { return Number($("f-rows").value) || 500; }

function onEvent(e) {
  let data;
  try { data = JSON.parse(e.data); } catch (_) { return; }
  const monitor = data.monitor || e.type;
  const ev = { monitor, data, raw: e.data };
  state.received += 1;
  state.buffer.push(ev);
  if (state.buffer.length > 2000) state.buffer.splice(0, state.buffer.length - 2000);
  if (state.paused) { state.pending += 1; return; }
  state.fresh.push(ev);
  if (state.fresh.length > 2000) state.fresh.splice(0, state.fresh.length - 2000);
}

// Rows are added in batches (4 per second), not per event: a flood of events costs the
// page one DOM update per batch, bounded by the row limit.
function flushEvents() {
  const fresh = state.fresh;
  state.fresh = [];
  if (fresh.length) {
    const limit = maxRows();
    const fragment = document.createDocumentFragment();
    let added = 0;
    for (let i = fresh.length - 1; i >= 0 && added < limit; i--) {
      const ev = fresh[i];
      if (!matches(ev.monitor, ev.data)) continue;
      fragment.append(eventRow(ev.monitor, ev.data, ev.raw));
      added += 1;
    }
    const body = $("events").tBodies[0];
    body.prepend(fragment);
    trimRows(body);
  }
  counters();
}

function trimRows(body) {
  const rows = body.querySelectorAll("tr.event-row");
  for (let i = rows.length - 1; i >= maxRows(); i--) {
    const next = rows[i].nextSibling;
    if (next && next.classList && next.classList.contains("expanded")) next.remove();
    rows[i].remove();
  }
}

function matches(monitor, d) {
  const want = (id) => $(id).value.trim();
  if (want("f-monitor") && monitor !== want("f-monitor")) return false;
  if (want("f-pid") && String(d.pid) !== want("f-pid")) return false;
  if (want("f-uid") && String(d.uid) !== want("f-uid")) return false;
  if (want("f-comm") && !String(d.comm ?? "").includes(want("f-comm"))) return false;
  const text = want("f-text").toLowerCase();
  if (text && !JSON.stringify(d).toLowerCase().includes(text)) return false;
  return true;
}

// The details column: the monitor's declared one-line rendering (GET /monitors
// `summary`, the template `run --format console` prints), without the fields the row
// shows in its own columns. Text only: the result goes into textContent.
const RENDER = {
  errno: (v, d) => (d.error ? `${v} ${d.error}` : String(v)),  // events name their errno
  us: (v) => (typeof v === "number" ? (v / 1000).toFixed(1) : ""),
  words: (v) => (Array.isArray(v) ? v.join(" ").replace(/\n/g, "\\n") : ""),
  opt_ns: (v) => (v === null || v === undefined ? "" : ` ${v} ns`),
};
const IN_COLUMNS = new Set(["pid", "uid", "comm"]);

function summary(monitor, d) {
  const info = state.monitors.find((m) => m.name === monitor);
  const template = info && info.summary;
  if (!template) {
    const rest = { ...d };
    for (const k of ["monitor", "timestamp", "ts_ns", "pid", "uid", "comm"]) delete rest[k];
    return JSON.stringify(rest);
  }
  return template
    .replace(/(^|\s)(\w+)=\{(\w+)\}/g, (all, sp, label, key) => (IN_COLUMNS.has(key) ? "" : all))
    .replace(/\{(\w+)(?::(\w+))?\}/g, (all, key, spec) => {
      const v = d[key];
      if (spec && RENDER[spec]) return RENDER[spec](v, d);
      if (v === null || v === undefined) return "";
      return Array.isArray(v) ? v.join(" ") : String(v);
    })
    .replace(/\s+/g, " ").trim();
}

function eventRow(monitor, d, raw) {
  const row = el("tr", {
    class: "event-row", "data-testid": "event-row", "data-monitor": monitor,
    "data-pid": d.pid ?? "", "data-event": raw,
  },
  el("td", { class: "mono", text: String(d.timestamp ?? "").slice(11, 23) }),
  el("td", { text: monitor }), el("td", { text: d.pid ?? "" }),
  el("td", { text: d.uid ?? "" }), el("td", { text: d.comm ?? "" }),
  el("td", { class: "mono", "data-testid": "event-workload", text: workload(d),
             title: d.cgroup ?? "" }),
  el("td", { class: "details", text: summary(monitor, d) }));
  row.addEventListener("click", () => {
    const next = row.nextSibling;
    if (next && next.classList.contains("expanded")) { next.remove(); return; }
    row.after(el("tr", { class: "expanded", "data-testid": "event-json" },
      el("td", { colspan: 7 }, el("pre", { text: JSON.stringify(d, null, 2) }))));
    if (d.process_id || d.pid) openProcess(d.process_id, d.pid);
  });
  return row;
}

// Where an event or a process ran: its container (12 hex digits, as `docker ps` shows
// it), else its systemd unit.
function workload(d) {
  if (typeof d.container_id === "string" && d.container_id) return d.container_id.slice(0, 12);
  if (typeof d.unit === "string" && d.unit) return d.unit;
  return "";
}

// -- processes (GET /processes/by-id/{id}, else /processes/{pid}) --------------------------
async function openProcess(processId, pid) {
  let r = null;
  if (processId) r = await api("GET", `/processes/by-id/${encodeURIComponent(processId)}`);
  if ((!r || r.status === 404) && pid !== undefined && pid !== null && pid !== "") {
    r = await api("GET", `/processes/${encodeURIComponent(String(pid))}`);
  }
  $("process-section").hidden = false;
  const view = $("process-view");
  if (!r || !r.ok) {
    $("process-message").textContent = r ? detailText(r.data, r.status) : "no process";
    view.replaceChildren();
    return;
  }
  $("process-message").textContent = "";
  const p = r.data;
  const facts = [
    ["pid", p.pid], ["ppid", p.ppid], ["comm", p.comm], ["uid", p.uid],
    ["state", processState(p)], ["workload", workload(p) || p.cgroup || ""],
    ["exe", p.exe ?? ""], ["argv", Array.isArray(p.argv) ? p.argv.join(" ") : ""],
    ["process_id", p.process_id], ["started", p.start_time ?? ""],
  ];
  view.replaceChildren(
    el("table", { class: "grid", "data-testid": "process-detail",
                  "data-process-id": p.process_id ?? "", "data-pid": p.pid ?? "" },
      el("tbody", null, ...facts.map(([k, v]) => el("tr", null,
        el("th", { text: k }), el("td", { class: "mono", text: v ?? "" }))))),
    el("h3", { text: "ancestors (parent first)" }),
    processList("ancestors", p.ancestors || []),
    el("h3", { text: "children" }),
    processList("children", p.children || []));
}

function processState(p) {
  if (p.alive !== false) return "alive";
  if (p.exit_signal) return `killed by signal ${p.exit_signal}${p.core_dumped ? " (core)" : ""}`;
  return `exited ${p.exit_code}`;
}

function processList(kind, list) {
  if (!list.length) return el("p", { class: "note", "data-testid": `process-${kind}`, text: "none" });
  return el("ul", { "data-testid": `process-${kind}` }, ...list.map((q) => el("li", null,
    el("a", {
      href: "#", "data-testid": "process-link", "data-process-id": q.process_id ?? "",
      "data-pid": q.pid ?? "",
      onclick: (e) => { e.preventDefault(); openProcess(q.process_id, q.pid); },
      text: `${q.pid} ${q.comm ?? ""}${workload(q) ? " [" + workload(q) + "]" : ""}`,
    }))));
}

// -- containers (GET /containers) ---------------------------------------------------------
async function refreshContainers() {
  const r = await api("GET", "/containers");
  if (!r.ok) return;
  const rows = (r.data.containers || []).map((c) => {
    const events = c.events || {};
    const total = Object.values(events).reduce((a, b) => a + (Number(b) || 0), 0);
    const per = Object.keys(events).sort().map((k) => `${k}:${events[k]}`).join(" ");
    return el("tr", { "data-testid": "container-row", "data-container-id": c.container_id,
                      "data-events": total },
      el("td", { class: "mono", text: String(c.container_id).slice(0, 12),
                 title: c.container_id }),
      el("td", { class: "mono", text: c.pod_uid ?? "" }),
      el("td", { text: (c.units || []).join(", ") }),
      el("td", { text: `${total} (${per})` }),
      el("td", { class: "mono", text: String(c.last_seen ?? "").slice(11, 23) }));
  });
  $("containers").tBodies[0].replaceChildren(...rows);
  $("containers-note").textContent = r.data.evicted
    ? `${r.data.evicted} containers evicted (stream.max_containers ${r.data.capacity})` : "";
}

function renderEvents() {
  state.fresh = [];  // the buffer holds them: drawn below, not again by flushEvents
  const body = $("events").tBodies[0];
  const limit = maxRows();
  const rows = [];
  for (let i = state.buffer.length - 1; i >= 0 && rows.length < limit; i--) {
    const ev = state.buffer[i];
    if (matches(ev.monitor, ev.data)) rows.push(eventRow(ev.monitor, ev.data, ev.raw));
  }
  body.replaceChildren(...rows);
  counters();
}

function counters() {
  $("ev-received").textContent = String(state.received);
  $("ev-shown").textContent = String($("events").tBodies[0].querySelectorAll("tr.event-row").length);
  $("ev-missed").textContent = String(state.missed);
  $("ev-pending").textContent = String(state.pending);
  $("ev-pending-wrap").hidden = !state.paused;
}

boot();
