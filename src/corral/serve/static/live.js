// corral's live view: sandboxes with their recent use, the alert stream, an incident's
// timeline, and freeze / kill. Plain DOM, no framework, nothing fetched from elsewhere.
//
// The API token travels only in the Authorization header. It is read once from the URL
// fragment (which browsers never send to a server) or typed into the form, then kept in
// sessionStorage (this tab only) and removed from the address bar. The stream is read
// with fetch() because EventSource cannot send a header.
//
// Everything the page shows is text that agents and their commands control (command
// lines, file names), so it is only ever set through textContent, never parsed as HTML.
"use strict";

(() => {
  const API = "/apis/live/v1";
  const TOKEN_KEY = "corral-live-token";
  const EVENTS_SHOWN = 300;
  const SANDBOX_POLL_MS = 2000;
  const HOST_POLL_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    token: null,
    events: [], // newest first: {key, ev, li}
    keys: new Set(),
    rows: new Map(), // sandbox id -> tr
    started: false,
    streamAbort: null,
    selected: null,
  };

  class AuthError extends Error {}

  // ------------------------------------------------------------------ small helpers
  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  const pad = (n) => String(n).padStart(2, "0");
  function clock(ts) {
    const d = new Date(ts * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function duration(s) {
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function notice(text, isError) {
    const p = $("#notice");
    p.textContent = text;
    p.classList.toggle("error", !!isError);
  }

  // ------------------------------------------------------------------ auth and API
  function readToken() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (state.token) h.Authorization = `Bearer ${state.token}`;
    return h;
  }

  async function api(path, options) {
    const opts = Object.assign({ cache: "no-store" }, options || {});
    opts.headers = headers(opts.headers);
    const res = await fetch(API + path, opts);
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (res.status === 401) throw new AuthError((body && body.error) || "unauthorized");
    if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
    return body;
  }

  function showAuth(message) {
    $("#main").hidden = true;
    $("#auth").hidden = false;
    $("#forget").hidden = true;
    if (message) $("#auth-message").textContent = message;
    setConn(false, "not connected");
    if (state.streamAbort) state.streamAbort.abort();
  }

  async function check() {
    let hosts;
    try {
      hosts = await api("/hosts");
    } catch (e) {
      if (e instanceof AuthError) {
        showAuth(state.token
          ? "That token was not accepted (it is wrong, or no longer valid). Paste another one, "
            + "or open this page as /live#token=YOUR_TOKEN."
          : "This page needs an API token for corral serve. Open it as /live#token=YOUR_TOKEN, "
            + "or paste the token here. It is kept in this tab only and sent in the "
            + "Authorization header, never in a URL.");
      } else {
        showAuth(`corral serve did not answer: ${e.message}`);
      }
      return;
    }
    $("#auth").hidden = true;
    $("#main").hidden = false;
    $("#forget").hidden = !state.token;
    renderHosts(hosts);
    if (!state.streamAbort || state.streamAbort.signal.aborted) {
      openStream();
      loadEvents();
    }
    refreshSandboxes();
    if (!state.started) {
      state.started = true;
      setInterval(refreshSandboxes, SANDBOX_POLL_MS);
      setInterval(refreshHosts, HOST_POLL_MS);
    }
  }

  // ------------------------------------------------------------------ hosts
  function renderHosts(body) {
    const who = body.local_only ? "local (no token)" : body.user + (body.operator ? " (operator)" : "");
    $("#who").textContent = who;
    const ul = $("#hosts");
    ul.replaceChildren(...body.hosts.map((h) => el("li", { "data-host": h.name },
      el("b", { text: h.name }),
      ` · ${h.running} running` + (h.frozen ? ` · ${h.frozen} frozen` : "")
        + ` · up ${duration(h.uptime_s)}`)));
  }

  async function refreshHosts() {
    try { renderHosts(await api("/hosts")); } catch (e) { if (e instanceof AuthError) showAuth(); }
  }

  // ------------------------------------------------------------------ sandboxes
  // A minute on a fixed time axis, newest at the right edge: a sandbox that started a few
  // seconds ago draws a short line at the right, not a stretched one.
  function spark(times, values, max, cls) {
    const w = 90, h = 22, span = 60;
    const newest = times.length ? times[times.length - 1] : 0;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", `spark ${cls}`);
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    const pts = [];
    values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const x = Math.max(0, w - ((newest - times[i]) / span) * w);
      const y = h - 1 - (Math.min(v, max) / max) * (h - 2);
      pts.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    if (pts.length === 1) pts.unshift(`${w - 2},${pts[0].split(",")[1]}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts.join(" "));
    svg.append(line);
    return svg;
  }

  function metricCell(td, times, values, max, cls, text) {
    td.replaceChildren(el("span", { class: "metric" }, spark(times, values, max, cls), el("span", { class: "val", text })));
  }

  function newRow(sb) {
    const tr = el("tr", { "data-sandbox": sb.id });
    for (const name of ["id", "host", "owner", "profile", "state", "alerts", "cpu", "mem", "gpu", "acts"]) {
      tr.append(el("td", { class: name }));
    }
    const freeze = el("button", { type: "button", class: "freeze", "data-act": "freeze", text: "Freeze",
      title: "hold every process where it is, for inspection", onclick: () => act(sb.id, "freeze") });
    const kill = el("button", { type: "button", class: "kill", "data-act": "kill", text: "Kill",
      title: "stop the sandbox: every process ends", onclick: () => act(sb.id, "kill") });
    tr.querySelector("td.acts").append(freeze, kill);
    return tr;
  }

  function updateRow(tr, sb) {
    const cells = (name) => tr.querySelector(`td.${name}`);
    tr.dataset.state = sb.state;
    cells("id").textContent = sb.id;
    cells("id").title = sb.run_id ? `run ${sb.run_id}` : "";
    cells("host").textContent = sb.host;
    cells("owner").textContent = sb.owner;
    cells("profile").textContent = sb.profile;
    const st = el("span", { class: `state ${sb.state}`, text: sb.state, title: sb.reason || "" });
    cells("state").replaceChildren(st);
    cells("alerts").replaceChildren(el("span", { class: `alerts-n${sb.alerts ? " some" : ""}`, text: String(sb.alerts) }));
    const s = sb.samples || [];
    const last = s.length ? s[s.length - 1] : null;
    const times = s.map((x) => x[0]);
    const cpu = s.map((x) => x[1]);
    metricCell(cells("cpu"), times, cpu, Math.max(sb.cpus || 1, 0.1), "cpu",
      last && last[1] !== null ? `${last[1].toFixed(2)} cores` : "–");
    const mem = s.map((x) => x[2]);
    const memMax = Math.max(16 * 1024 * 1024, ...mem.filter((v) => v !== null).map((v) => v * 1.15));
    metricCell(cells("mem"), times, mem, memMax, "mem", last ? bytes(last[2]) : "–");
    const gpu = s.map((x) => x[3]);
    if (!s.length || gpu.every((v) => v === null)) {
      cells("gpu").replaceChildren(el("span", { class: "none", text: "none", title: "no GPU telemetry on this host" }));
    } else {
      metricCell(cells("gpu"), times, gpu, 100, "gpu", last && last[3] !== null ? `${Math.round(last[3])} %` : "–");
    }
    tr.querySelector('button[data-act="freeze"]').disabled = sb.state !== "running";
    tr.querySelector('button[data-act="kill"]').disabled = sb.state === "stopped";
  }

  async function refreshSandboxes() {
    let body;
    try { body = await api("/sandboxes"); } catch (e) {
      if (e instanceof AuthError) showAuth();
      return;
    }
    const tbody = $("#sandboxes tbody");
    const seen = new Set();
    for (const sb of body.sandboxes) {
      seen.add(sb.id);
      let tr = state.rows.get(sb.id);
      if (!tr) { tr = newRow(sb); state.rows.set(sb.id, tr); }
      updateRow(tr, sb);
      tbody.append(tr); // moves an existing row into the server's order
    }
    for (const [id, tr] of state.rows) {
      if (!seen.has(id)) { tr.remove(); state.rows.delete(id); }
    }
    $("#no-sandboxes").hidden = body.sandboxes.length > 0;
  }

  async function act(id, verb) {
    const tr = state.rows.get(id);
    const buttons = tr ? tr.querySelectorAll("button") : [];
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const body = await api(`/sandboxes/${encodeURIComponent(id)}/${verb}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({}),
      });
      notice(`${id}: ${body.sandbox.state}${body.sandbox.reason ? ` (${body.sandbox.reason})` : ""}`);
      if (tr) updateRow(tr, body.sandbox);
    } catch (e) {
      if (e instanceof AuthError) { showAuth(); return; }
      notice(`${verb} ${id} failed: ${e.message}`, true);
    }
    refreshSandboxes();
    refreshHosts();
  }

  // ------------------------------------------------------------------ the stream
  function setConn(on, text) {
    const c = $("#conn");
    c.classList.toggle("on", on);
    c.classList.toggle("off", !on);
    c.textContent = text;
  }

  async function openStream() {
    const ctrl = new AbortController();
    state.streamAbort = ctrl;
    try {
      const res = await fetch(`${API}/stream`, {
        headers: headers({ Accept: "text/event-stream" }), cache: "no-store", signal: ctrl.signal,
      });
      if (res.status === 401) { showAuth(); return; }
      if (!res.ok || !res.body) throw new Error(`${res.status}`);
      setConn(true, "live");
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          onBlock(block);
        }
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
    }
    if (ctrl.signal.aborted) return;
    setConn(false, "reconnecting…");
    setTimeout(() => { openStream(); loadEvents(); }, 2000);
  }

  function onBlock(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const k = line.indexOf(":");
      const field = k < 0 ? line : line.slice(0, k);
      let v = k < 0 ? "" : line.slice(k + 1);
      if (v.startsWith(" ")) v = v.slice(1);
      if (field === "event") name = v;
      else if (field === "data") data.push(v);
    }
    if (name === "lagged") { loadEvents(); return; }
    if (!data.length) return;
    const ev = JSON.parse(data.join("\n"));
    addEvent(ev);
    if (ev.kind !== "denial") { refreshSandboxes(); refreshHosts(); }
  }

  async function loadEvents() {
    try {
      const body = await api("/events?limit=200");
      body.events.forEach(addEvent);
    } catch (e) {
      if (e instanceof AuthError) showAuth();
    }
  }

  function eventKey(ev) {
    return ev.seq ? `${ev.host}:${ev.seq}` : `${ev.host}:${ev.kind}:${ev.sandbox}:${ev.ts}`;
  }

  function eventItem(ev) {
    const clickable = ev.kind === "alert" || ev.kind === "denial";
    const badge = ev.kind === "alert" ? (ev.severity || "alert") : ev.kind === "denial" ? "refused" : ev.kind;
    const li = el("li", {
      class: `event ${ev.kind}`,
      "data-kind": ev.kind,
      "data-seq": ev.seq,
      "data-host": ev.host,
      "data-sandbox": ev.sandbox,
      "data-action-id": ev.action_id || "",
      // When this page first showed it, against the ledger's time (the tests measure it).
      "data-shown-at": (Date.now() / 1000).toFixed(3),
      "data-ts": ev.ts,
      tabindex: clickable ? "0" : null,
      onclick: clickable ? () => openTimeline(ev, li) : null,
    },
    el("div", { class: "top" },
      el("span", { class: "t", text: clock(ev.ts) }),
      el("span", { class: `badge ${ev.kind === "alert" ? ev.severity || "" : ev.kind}`, text: badge }),
      el("span", { class: "title", text: ev.title || ev.kind }),
      el("span", { class: "sb", text: `${ev.sandbox} · ${ev.owner}` })),
    ev.what ? el("div", { class: "what", text: ev.what }) : null,
    ev.detail ? el("div", { class: "detail", text: ev.detail }) : null);
    if (clickable) li.addEventListener("keydown", (e) => { if (e.key === "Enter") openTimeline(ev, li); });
    return li;
  }

  function addEvent(ev) {
    const key = eventKey(ev);
    if (state.keys.has(key)) return;
    state.keys.add(key);
    const li = eventItem(ev);
    const list = $("#events");
    let at = state.events.findIndex((x) => x.ev.ts < ev.ts);
    if (at < 0) at = state.events.length;
    state.events.splice(at, 0, { key, ev, li });
    const after = state.events[at + 1];
    if (after) list.insertBefore(li, after.li); else list.append(li);
    while (state.events.length > EVENTS_SHOWN) {
      const old = state.events.pop();
      old.li.remove();
      state.keys.delete(old.key);
    }
    $("#no-events").hidden = true;
  }

  // ------------------------------------------------------------------ the timeline
  async function openTimeline(ev, li) {
    if (state.selected) state.selected.classList.remove("selected");
    state.selected = li;
    li.classList.add("selected");
    let tl;
    try {
      tl = await api(`/incidents/${ev.seq}?host=${encodeURIComponent(ev.host)}`);
    } catch (e) {
      if (e instanceof AuthError) { showAuth(); return; }
      notice(`no timeline for that event: ${e.message}`, true);
      return;
    }
    const panel = $("#timeline");
    panel.dataset.seq = String(tl.seq);
    $("#tl-title").textContent = `${ev.kind === "alert" ? "Incident" : "Refusal"}: ${ev.title}`;
    const facts = [
      ["host", tl.host], ["sandbox", tl.sandbox], ["owner", tl.owner],
      ["run", tl.run_id], ["episode", tl.episode], ["step", tl.step],
      ["action", tl.action_id], ["command", tl.command], ["record", `#${tl.seq}`],
    ];
    $("#tl-facts").replaceChildren(...facts.flatMap(([k, v]) => [
      el("dt", { text: k }),
      el("dd", { "data-field": k, text: v === null || v === undefined || v === "" ? "–" : String(v) }),
    ]));
    const t0 = tl.entries.length ? tl.entries[0].ts : 0;
    $("#tl-entries tbody").replaceChildren(...tl.entries.map((e) => el("tr", {
      class: `${e.kind} ${e.label.split(" ").pop()}`, "data-seq": e.seq, "data-kind": e.kind,
    },
    el("td", { class: "off", text: `+${(e.ts - t0).toFixed(3)}` }),
    el("td", { class: "time", text: clock(e.ts) }),
    el("td", { class: "lbl", text: e.label }),
    el("td", { class: "txt", text: e.text }))));
    const more = $("#tl-more");
    more.hidden = !tl.truncated;
    more.textContent = tl.truncated ? "Only the first records of this action are shown; `corral log` has them all." : "";
    panel.hidden = false;
    panel.scrollIntoView({ block: "nearest" });
  }

  // ------------------------------------------------------------------ start
  function start() {
    state.token = readToken();
    $("#auth-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const v = $("#token-input").value.trim();
      if (!v) return;
      sessionStorage.setItem(TOKEN_KEY, v);
      state.token = v;
      $("#token-input").value = "";
      check();
    });
    $("#forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
    // A token pasted into the address bar of an open page changes only the fragment,
    // which reloads nothing.
    window.addEventListener("hashchange", () => {
      if (/(?:^#|&)token=/.test(location.hash)) { state.token = readToken(); check(); }
    });
    $("#tl-close").addEventListener("click", () => {
      $("#timeline").hidden = true;
      if (state.selected) state.selected.classList.remove("selected");
    });
    check();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
