// The corsproxy console: one page, six screens chosen by the URL's #fragment, every datum from /console/api/.
// Everything that came from a request (origins, paths, notes) is put into the page as text, never as HTML.

import { formatNumber, lineChart } from "./charts.js";

const VIEWS = ["overview", "refusals", "origins", "explain", "audit", "configuration"];
const session = { actor: null, csrf: null };
let timers = [];
let generation = 0; // bumped on every navigation: late answers for a screen no longer shown are dropped

// -- DOM helpers -------------------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "for") node.htmlFor = value;
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function field(label, input, hint = null) {
  const id = input.id;
  return h("div", { class: "field" }, h("label", { for: id }, label), input, hint && h("p", { class: "hint" }, hint));
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function ago(seconds, now) {
  const s = Math.max(0, Math.round(now - seconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function every(ms, fn) {
  timers.push(setInterval(fn, ms));
}

function view() {
  return document.getElementById("view");
}

function messageBox(id) {
  return h("div", { id, class: "message", role: "status" });
}

// A table whose cells carry their column's name, so that a narrow screen can show each row as a small card.
function table(attrs, columns, rows) {
  const body = h("tbody", {}, rows);
  for (const row of body.rows) {
    [...row.cells].forEach((cell, index) => cell.setAttribute("data-label", columns[index] || ""));
  }
  return h(
    "table",
    { ...attrs, class: "stack" },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    body,
  );
}

// replaceChildren() would turn a null into the text "null": leave the empty ones out.
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function show(box, ok, title, lines = []) {
  fill(box, h("p", { class: ok ? "ok" : "error" }, title));
  if (lines.length) box.append(h("ul", {}, lines.map((line) => h("li", {}, line))));
  box.setAttribute("role", ok ? "status" : "alert");
}

// -- the API -----------------------------------------------------------------------------------------------------

class SignedOut extends Error {}

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin", cache: "no-store" };
  if (method !== "GET") init.headers["X-CSRF-Token"] = session.csrf || "";
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch("api/" + path, init);
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { error: `HTTP ${response.status}` };
  }
  if (response.status === 401 && path !== "session") {
    signedOut(data.reason || "Your session has ended: sign in again.");
    throw new SignedOut(data.reason);
  }
  return { ok: response.ok, status: response.status, data };
}

function problem(data) {
  return [data.error, data.reason].filter(Boolean).join(": ");
}

// A configuration problem as `corsproxy check` prints it: "path: message".
function problemLines(problems) {
  return (problems || []).map((p) => (p.path ? `${p.path}: ${p.message}` : p.message));
}

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== undefined && value !== null && value !== "") q.set(key, value);
  const text = q.toString();
  return text ? "?" + text : "";
}

// -- sign-in -----------------------------------------------------------------------------------------------------

function signedIn(data) {
  session.actor = data.actor;
  session.csrf = data.csrf;
  document.getElementById("sign-in").hidden = true;
  document.getElementById("nav").hidden = false;
  const who = document.getElementById("who");
  who.textContent = data.actor;
  who.hidden = false;
  document.getElementById("sign-out").hidden = false;
  route();
}

function signedOut(reason = "") {
  stopTimers();
  generation += 1;
  session.actor = session.csrf = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  document.getElementById("sign-out").hidden = true;
  fill(view());
  document.getElementById("sign-in").hidden = false;
  document.getElementById("sign-in-error").textContent = reason;
  document.getElementById("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const error = document.getElementById("sign-in-error");
  error.textContent = "";
  const { ok, data } = await api("POST", "session", { token: input.value });
  input.value = "";
  if (ok) signedIn(data);
  else {
    error.textContent = problem(data) || "sign-in refused";
    input.focus();
  }
}

async function signOut() {
  try {
    await api("DELETE", "session");
  } finally {
    signedOut("Signed out.");
  }
}

// -- routing -----------------------------------------------------------------------------------------------------

function stopTimers() {
  for (const t of timers) clearInterval(t);
  timers = [];
}

function current() {
  const [name, params] = location.hash.slice(1).split("?");
  return { name: VIEWS.includes(name) ? name : "overview", params: new URLSearchParams(params || "") };
}

function route() {
  if (!session.csrf) return;
  stopTimers();
  generation += 1;
  const { name, params } = current();
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const screen = { overview, refusals, origins, explain, audit, configuration }[name];
  fill(view());
  screen(params, generation).catch((error) => {
    if (!(error instanceof SignedOut)) view().append(h("p", { class: "error", role: "alert" }, String(error)));
  });
}

function heading(text) {
  const title = h("h1", { tabindex: "-1" }, text);
  view().append(title);
  return title;
}

function focusHeading() {
  const title = view().querySelector("h1");
  if (title && document.activeElement === document.body) title.focus({ preventScroll: true });
}

// -- Overview ----------------------------------------------------------------------------------------------------

async function overview(params, gen) {
  heading("Overview");
  let span = params.get("window") === "3600" ? 3600 : 900;
  const choice = h(
    "fieldset",
    { class: "inline" },
    h("legend", {}, "Chart window"),
    [
      [900, "Last 15 minutes"],
      [3600, "Last hour"],
    ].map(([value, label]) =>
      h(
        "label",
        { class: "radio" },
        h("input", {
          type: "radio",
          name: "window",
          value,
          checked: value === span,
          onchange: () => {
            span = value;
            refreshCharts();
          },
        }),
        label,
      ),
    ),
  );
  const status = h("div", { class: "cards", id: "status" });
  const charts = h("div", { class: "charts", id: "charts" });
  view().append(status, choice, charts);
  focusHeading();

  async function refreshStatus() {
    const { data } = await api("GET", "overview");
    if (gen !== generation) return;
    const reloads = data.reloads || {};
    const file = data.origins_file || {};
    const warnings = data.config.warnings || [];
    fill(status,
      h("section", { class: "card", id: "card-store" }, h("h2", {}, "Origin store"), h("p", { class: "big" }, data.store.entries.toLocaleString("en")), h("p", { class: "muted" }, "entries in " + data.store.path)),
      h(
        "section",
        { class: "card", id: "card-config" },
        h("h2", {}, "Configuration"),
        h("p", {}, data.config.source),
        h("p", { class: "muted" }, `mode ${data.config.mode}; this worker started ${when(data.worker.started)}`),
        h("p", {}, `reloads: ${reloads.applied || 0} applied, ${reloads.refused || 0} refused`),
      ),
      h(
        "section",
        { class: "card", id: "card-file" },
        h("h2", {}, "Origins file"),
        file.path
          ? [
              h("p", {}, file.path),
              h("p", { class: file.applied ? "ok" : "error" }, file.applied ? "applied" : "not applied (missing or refused: see the log)"),
              h("p", { class: "muted" }, `syncs: ${(file.syncs || {}).applied || 0} applied, ${(file.syncs || {}).refused || 0} refused`),
            ]
          : h("p", { class: "muted" }, "none configured (origins_file.path)"),
      ),
      h(
        "section",
        { class: "card", id: "card-warnings" },
        h("h2", {}, "Warnings"),
        warnings.length ? h("ul", {}, warnings.map((w) => h("li", {}, w))) : h("p", { class: "muted" }, "none"),
      ),
    );
  }

  async function refreshCharts() {
    const { data } = await api("GET", "series" + query({ window: span }));
    if (gen !== generation) return;
    const common = { start: data.start, step: data.step };
    fill(charts,
      lineChart({ id: "chart-requests", title: "Requests per second, by kind and decision", series: data.requests, unit: "/s", ...common }),
      lineChart({ id: "chart-refusals", title: "Refusals per second, by reason", series: data.refusals, unit: "/s", ...common }),
      lineChart({ id: "chart-status", title: "Upstream responses per second, by status class", series: data.status, unit: "/s", ...common }),
      lineChart({ id: "chart-latency", title: "Upstream latency percentiles", series: data.upstream_latency_ms, unit: "ms", ...common }),
      lineChart({ id: "chart-duration", title: "Request duration percentiles (all requests)", series: data.duration_ms, unit: "ms", ...common }),
    );
  }

  await Promise.all([refreshStatus(), refreshCharts()]);
  every(5000, () => refreshStatus().catch(() => {}));
  every(5000, () => refreshCharts().catch(() => {}));
}

// -- Refusals ----------------------------------------------------------------------------------------------------

async function refusals(params, gen) {
  heading("Refusals");
  view().append(
    h("p", { class: "muted" }, "The most recent refused requests across all workers, grouped by origin; updated every second."),
  );
  const list = h("div", { id: "refusal-list" });
  view().append(list);
  focusHeading();
  let shown = "";

  async function refresh() {
    const { data } = await api("GET", "refusals");
    if (gen !== generation) return;
    const key = JSON.stringify(data.groups);
    if (key === shown) return; // unchanged: keep the DOM (and the keyboard focus) as it is
    shown = key;
    if (!data.groups.length) {
      fill(list, h("p", { class: "muted", id: "no-refusals" }, "No refused requests recorded yet."));
      return;
    }
    fill(list,
      ...data.groups.map((group) =>
        h(
          "section",
          { class: "card refusal-group", "data-origin": group.origin },
          h(
            "div",
            { class: "group-head" },
            h("h2", {}, group.origin || "(malformed Origin header)"),
            h("span", { class: "muted" }, `${group.count} refused, last ${ago(group.last, data.now)}`),
            group.allowable
              ? h("button", { type: "button", class: "allow", onclick: () => (location.hash = "#origins?add=" + encodeURIComponent(group.origin)) }, "Allow…")
              : null,
          ),
          h(
            "div",
            { class: "table-wrap" },
            table(
              {},
              ["Time", "Kind", "Method", "Path", "Reason", "Count", ""],
              group.requests.map((r) =>
                  h(
                    "tr",
                    {},
                    h("td", {}, when(r.last)),
                    h("td", {}, r.kind),
                    h("td", {}, r.method),
                    h("td", { class: "path" }, r.path),
                    h("td", {}, h("code", {}, r.reason)),
                    h("td", { class: "num" }, r.count),
                    h(
                      "td",
                      {},
                      h(
                        "button",
                        {
                          type: "button",
                          class: "secondary explain",
                          onclick: () => {
                            const p = { origin: r.origin, path: r.path, headers: r.headers };
                            if (r.kind === "preflight" && r.method !== "OPTIONS") p.method = r.method;
                            location.hash = "#explain" + query(p);
                          },
                          "aria-label": `Explain ${r.method} ${r.path} from ${r.origin || "a malformed origin"}`,
                        },
                        "Explain",
                      ),
                    ),
                  ),
                ),
            ),
          ),
        ),
      ),
    );
  }

  await refresh();
  every(1000, () => refresh().catch(() => {}));
}

// -- Origins -----------------------------------------------------------------------------------------------------

async function origins(params, gen) {
  heading("Origins");
  const search = h("input", { id: "origin-search", type: "search", value: params.get("q") || "", autocomplete: "off", spellcheck: "false" });
  const searchForm = h(
    "form",
    { class: "row", id: "search-form", role: "search" },
    field("Search (the start of an origin; the scheme may be left out)", search),
    h("button", { type: "submit" }, "Search"),
  );
  const tableBox = h("div", { id: "origin-table", class: "table-wrap" });
  const pager = h("div", { class: "row pager" });
  const timing = h("p", { class: "muted", id: "page-timing" });

  // The add / change form.
  const fOrigin = h("input", { id: "add-origin", autocomplete: "off", spellcheck: "false", required: true });
  const fPolicy = h("select", { id: "add-policy" });
  const fTtl = h("input", { id: "add-ttl", autocomplete: "off", placeholder: "e.g. 7d" });
  const fExpires = h("input", { id: "add-expires", autocomplete: "off", placeholder: "e.g. 2026-12-31T00:00:00Z" });
  const fNote = h("input", { id: "add-note", autocomplete: "off" });
  const checkButton = h("button", { type: "button", id: "add-check" }, "Check");
  const commitButton = h("button", { type: "submit", id: "add-commit", disabled: true }, "Commit");
  const result = messageBox("add-result");
  const addForm = h(
    "form",
    { id: "add-form", class: "card", "aria-labelledby": "add-title" },
    h("h2", { id: "add-title" }, "Add or change an origin"),
    h("p", { class: "muted" }, "Check runs every safety check a write makes and shows its warnings; Commit writes it (audited as " + session.actor + ")."),
    h("div", { class: "grid" }, field("Origin or pattern", fOrigin), field("Policy", fPolicy), field("Expires after (ttl)", fTtl), field("Or expires at", fExpires), field("Note", fNote)),
    h("div", { class: "row" }, checkButton, commitButton),
    result,
  );
  view().append(addForm, searchForm, timing, tableBox, pager);
  focusHeading();

  let checked = null; // the body that passed Check; Commit sends exactly it
  const body = () => ({
    origin: fOrigin.value.trim(),
    policy: fPolicy.value || null,
    ttl: fTtl.value.trim() || null,
    expires: fExpires.value.trim() || null,
    note: fNote.value,
  });
  for (const input of [fOrigin, fPolicy, fTtl, fExpires, fNote]) {
    input.addEventListener("input", () => {
      checked = null;
      commitButton.disabled = true;
    });
  }

  async function check() {
    const { data } = await api("POST", "origins/check", body());
    if (data.ok) {
      checked = { ...body(), origin: data.origin };
      commitButton.disabled = false;
      const lines = (data.warnings || []).map((w) => "warning: " + w);
      if (data.replaces) lines.push(`replaces the current entry (policy ${data.replaces.policy}, source ${data.replaces.source})`);
      show(result, true, `${data.origin} passes every check under policy ${data.policy}.`, lines);
    } else {
      checked = null;
      commitButton.disabled = true;
      show(result, false, "Refused: " + problem(data));
    }
  }

  async function commit(event) {
    event.preventDefault();
    if (!checked) return;
    const { origin, ...rest } = checked;
    const payload = {};
    for (const [key, value] of Object.entries(rest)) if (value !== null && value !== "") payload[key] = value;
    const { ok, status, data } = await api("PUT", "origins/" + encodeURIComponent(origin), payload);
    checked = null;
    commitButton.disabled = true;
    if (ok) {
      show(result, true, `${status === 201 ? "Added" : "Changed"} ${data.origin} (policy ${data.policy}, source ${data.source}).`, (data.warnings || []).map((w) => "warning: " + w));
      load(cursors[cursors.length - 1]);
    } else show(result, false, "Refused: " + problem(data));
  }

  checkButton.addEventListener("click", () => check().catch(() => {}));
  addForm.addEventListener("submit", (event) => commit(event).catch(() => {}));

  function edit(entry) {
    fOrigin.value = entry.origin;
    fPolicy.value = entry.policy;
    fTtl.value = "";
    fExpires.value = entry.expires || "";
    fNote.value = entry.note || "";
    checked = null;
    commitButton.disabled = true;
    fill(result);
    fOrigin.focus();
  }

  async function remove(entry, button) {
    if (button.dataset.armed !== "yes") {
      button.dataset.armed = "yes";
      button.textContent = "Confirm removal";
      button.setAttribute("aria-label", "Confirm removal of " + entry.origin);
      return;
    }
    const { ok, data } = await api("DELETE", "origins/" + encodeURIComponent(entry.origin));
    if (ok) show(result, true, `Removed ${data.removed}.`);
    else show(result, false, "Refused: " + problem(data));
    load(cursors[cursors.length - 1]);
  }

  let cursors = [""];
  async function load(after) {
    const { data } = await api("GET", "origins" + query({ q: search.value.trim(), after, limit: 50 }));
    if (gen !== generation) return;
    if (!fPolicy.options.length) {
      for (const name of data.policies) fPolicy.append(h("option", { value: name }, name));
    }
    timing.textContent = `${data.total.toLocaleString("en")} entries in the store; this page answered in ${formatNumber(data.elapsed_ms, "ms")} (server).`;
    timing.dataset.elapsedMs = String(data.elapsed_ms);
    const rows = data.origins.map((entry) =>
      h(
        "tr",
        { "data-origin": entry.origin },
        h("td", { class: "origin" }, entry.origin),
        h("td", {}, entry.policy),
        h("td", {}, entry.expires ? [entry.expires, entry.expired ? h("span", { class: "error" }, " (expired)") : null] : "never"),
        h("td", {}, entry.source),
        h("td", {}, entry.note),
        h(
          "td",
          { class: "actions" },
          entry.declared_in
            ? h("span", { class: "muted read-only" }, "read-only: change it in " + entry.declared_in)
            : [
                h("button", { type: "button", class: "secondary", onclick: () => edit(entry), "aria-label": "Edit " + entry.origin }, "Edit"),
                h("button", { type: "button", class: "danger", onclick: (e) => remove(entry, e.currentTarget).catch(() => {}), "aria-label": "Remove " + entry.origin }, "Remove"),
              ],
        ),
      ),
    );
    fill(tableBox,
      rows.length
        ? table({ id: "origins-table" }, ["Origin", "Policy", "Expires", "Source", "Note", ""], rows)
        : h("p", { class: "muted" }, search.value.trim() ? "No entry starts with that." : "The store is empty."),
    );
    const page = cursors.length;
    fill(pager,
      h("button", { type: "button", class: "secondary", id: "page-prev", disabled: page <= 1, onclick: () => { cursors.pop(); load(cursors[cursors.length - 1]); } }, "Previous"),
      h("span", { id: "page-number" }, `page ${page}`),
      h("button", { type: "button", class: "secondary", id: "page-next", disabled: !data.next, onclick: () => { cursors.push(data.next); load(data.next); } }, "Next"),
    );
  }

  searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    cursors = [""];
    load("").catch(() => {});
  });
  await load("");
  const add = params.get("add");
  if (add) {
    fOrigin.value = add;
    fOrigin.focus();
    await check();
  }
}

// -- Explain -----------------------------------------------------------------------------------------------------

async function explain(params, gen) {
  heading("Explain");
  const inputs = {
    origin: h("input", { id: "explain-origin", required: true, autocomplete: "off", spellcheck: "false", value: params.get("origin") || "" }),
    method: h("input", { id: "explain-method", autocomplete: "off", placeholder: "blank: an actual GET", value: params.get("method") || "" }),
    headers: h("input", { id: "explain-headers", autocomplete: "off", placeholder: "e.g. content-type,x-api-key", value: params.get("headers") || "" }),
    path: h("input", { id: "explain-path", autocomplete: "off", value: params.get("path") || "/" }),
  };
  const out = h("div", { id: "explain-result" });
  const form = h(
    "form",
    { class: "card", id: "explain-form" },
    h("p", { class: "muted" }, "The server's own decision engine on the running configuration and store, as ", h("code", {}, "corsproxy explain"), " runs it."),
    h(
      "div",
      { class: "grid" },
      field("Origin", inputs.origin),
      field("Preflight for method", inputs.method),
      field("Request headers", inputs.headers),
      field("Path", inputs.path),
    ),
    h("button", { type: "submit" }, "Explain"),
  );
  view().append(form, out);
  focusHeading();

  async function run(event) {
    if (event) event.preventDefault();
    const { ok, data } = await api(
      "GET",
      "explain" + query({ origin: inputs.origin.value.trim(), method: inputs.method.value.trim(), headers: inputs.headers.value.trim(), path: inputs.path.value.trim() || "/" }),
    );
    if (gen !== generation) return;
    if (!ok) {
      fill(out, h("p", { class: "error", role: "alert" }, problem(data)));
      return;
    }
    const row = (name, value, id) => [h("dt", {}, name), h("dd", { id }, value)];
    fill(out,
      h(
        "section",
        { class: "card" },
        h("h2", { class: data.allowed ? "ok" : "error", id: "explain-decision" }, `${data.allowed ? "allowed" : "refused"} (${data.reason})`),
        h(
          "dl",
          {},
          row("Request", data.request, "explain-request"),
          row("Matched", data.matched || "(no entry)", "explain-matched"),
          row("Policy", data.policy || "–", "explain-policy"),
          row("Route", data.route || "no route (the store)", "explain-route"),
          row("Why", data.why, "explain-why"),
          row("Fix", data.fix || "–", "explain-fix"),
          row("Response CORS headers", data.headers.length ? h("pre", {}, data.headers.map(([n, v]) => `${n}: ${v}`).join("\n")) : "none", "explain-headers-out"),
        ),
      ),
    );
  }

  form.addEventListener("submit", (event) => run(event).catch(() => {}));
  if (inputs.origin.value) await run();
}

// -- Audit -------------------------------------------------------------------------------------------------------

function change(event) {
  const parts = [];
  const o = event.old || {};
  const n = event.new || {};
  for (const key of ["policy", "expires", "note", "source"]) {
    if (o[key] !== n[key]) parts.push(`${key}: ${o[key] ?? "–"} → ${n[key] ?? "–"}`);
  }
  return parts.join("; ");
}

async function audit(params, gen) {
  heading("Audit");
  const origin = h("input", { id: "audit-origin", autocomplete: "off", spellcheck: "false", value: params.get("origin") || "" });
  const actor = h("input", { id: "audit-actor", autocomplete: "off", spellcheck: "false", value: params.get("actor") || "" });
  const form = h("form", { class: "row", id: "audit-form" }, field("Origin", origin), field("Actor (contains)", actor), h("button", { type: "submit" }, "Filter"));
  const out = h("div", { id: "audit-result", class: "table-wrap" });
  view().append(form, out);
  focusHeading();

  async function load(event) {
    if (event) event.preventDefault();
    const { ok, data } = await api("GET", "audit" + query({ origin: origin.value.trim(), actor: actor.value.trim(), limit: 200 }));
    if (gen !== generation) return;
    if (!ok) {
      fill(out, h("p", { class: "error", role: "alert" }, problem(data)));
      return;
    }
    const events = data.events.slice().reverse(); // newest first
    fill(out,
      events.length
        ? table(
            { id: "audit-table" },
            ["Time", "Action", "Origin", "Actor", "Change"],
            events.map((e) => h("tr", {}, h("td", {}, e.time), h("td", {}, e.action), h("td", { class: "origin" }, e.origin), h("td", {}, e.actor), h("td", {}, change(e)))),
          )
        : h("p", { class: "muted" }, "No audit events match."),
      data.scanned ? h("p", { class: "muted" }, `The actor filter searched the newest ${data.scanned} events.`) : null,
    );
  }

  form.addEventListener("submit", (event) => load(event).catch(() => {}));
  await load();
}

// -- Configuration -----------------------------------------------------------------------------------------------

async function configuration(params, gen) {
  heading("Configuration");
  const checkButton = h("button", { type: "button", id: "config-check" }, "Check the file");
  const reloadButton = h("button", { type: "button", id: "config-reload", disabled: true }, "Reload");
  const result = messageBox("config-result");
  const pre = h("pre", { id: "config-json", class: "config", tabindex: "0", "aria-label": "Effective configuration" });
  view().append(
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Reload"),
      h("p", { class: "muted" }, "Check validates the configuration file as a reload would and changes nothing; Reload is offered once it passes."),
      h("div", { class: "row" }, checkButton, reloadButton),
      result,
    ),
    h("section", { class: "card" }, h("h2", {}, "Effective configuration (secrets redacted)"), pre),
  );
  focusHeading();

  async function check() {
    const { data } = await api("POST", "config/check", {});
    reloadButton.disabled = !data.ok;
    if (data.ok) show(result, true, `${data.config} is valid.`, (data.warnings || []).map((w) => "warning: " + w));
    else show(result, false, `${data.config} is refused; the running configuration stays:`, problemLines(data.problems));
  }

  async function reload() {
    reloadButton.disabled = true;
    const { ok, data } = await api("POST", "reload", {});
    if (ok) show(result, true, `Reloading ${data.config}: new workers start on it while the current ones finish their requests.`);
    else show(result, false, "Reload refused: " + problem(data), problemLines(data.problems));
  }

  checkButton.addEventListener("click", () => check().catch(() => {}));
  reloadButton.addEventListener("click", () => reload().catch(() => {}));
  const { data } = await api("GET", "config");
  if (gen !== generation) return;
  pre.textContent = JSON.stringify(data, null, 2);
}

// -- start -------------------------------------------------------------------------------------------------------

async function start() {
  document.getElementById("sign-in-form").addEventListener("submit", (event) => signIn(event).catch(() => {}));
  document.getElementById("sign-out").addEventListener("click", () => signOut().catch(() => {}));
  window.addEventListener("hashchange", route);
  const { ok, data } = await api("GET", "session");
  if (ok && data.signed_in) signedIn(data);
  else signedOut("");
}

start();
