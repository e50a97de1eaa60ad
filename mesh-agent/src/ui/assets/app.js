// mesh visualizer. Plain JS, no build step: the agent embeds this file (include_str!).
// The agent streams `overview` frames (the whole cluster as its view has it) and `event`
// frames over Server-Sent Events; the page keeps its elements keyed by node and task so a
// new card animates in and nothing flickers. All text goes through textContent.
"use strict";

const byId = (id) => document.getElementById(id);
const TICKER_LINES = 12;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

// A stable colour per service: the same service is the same colour on every screen.
// Hues 80-160 (greens) are skipped: green means "running" on a card.
function serviceColour(name) {
  let h = 2166136261;
  for (let i = 0; i < name.length; i++) {
    h ^= name.charCodeAt(i);
    h = Math.imul(h, 16777619) >>> 0;
  }
  return `hsl(${(160 + (h % 280)) % 360} 70% 62%)`;
}

let clockSkew = 0; // agent time minus browser time
function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() + clockSkew - ms) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

// Keeps a container's keyed children in the given order, creating and removing as needed.
function reconcile(container, items, key, create, update) {
  const existing = new Map();
  for (const child of Array.from(container.children)) {
    if (child.dataset.key) existing.set(child.dataset.key, child);
    else child.remove();
  }
  let prev = null;
  for (const item of items) {
    const k = key(item);
    let node = existing.get(k);
    if (node) existing.delete(k);
    else {
      node = create(item);
      node.dataset.key = k;
    }
    update(node, item);
    const want = prev ? prev.nextSibling : container.firstChild;
    if (want !== node) container.insertBefore(node, want);
    prev = node;
  }
  for (const gone of existing.values()) gone.remove();
}

function renderServices(services) {
  const strip = byId("services");
  if (services.length === 0) {
    strip.replaceChildren(el("div", "empty", "no services yet — meshctl service create …"));
    return;
  }
  const empty = strip.querySelector(".empty");
  if (empty) empty.remove();
  reconcile(strip, services, (s) => s.name, (s) => {
    const c = el("div", "svc");
    c.style.setProperty("--svc", serviceColour(s.name));
    const head = el("div", "head");
    head.append(el("span", "name", s.name), el("span", "mode"), el("span", "replicas"));
    const bar = el("div", "bar");
    bar.append(el("div"));
    c.append(head, bar, el("div", "ports"), el("div", "update"), el("div", "pending"));
    return c;
  }, (c, s) => {
    c.dataset.service = s.name;
    c.querySelector(".mode").textContent = s.mode;
    const r = c.querySelector(".replicas");
    const desired = s.desired === null ? "–" : s.desired;
    r.textContent = `${s.running}/${desired}`;
    r.classList.toggle("short", s.desired !== null && s.running < s.desired);
    const pct = s.desired ? Math.min(100, (100 * s.running) / s.desired) : (s.running ? 100 : 0);
    c.querySelector(".bar > div").style.width = `${pct}%`;
    const ports = s.ports.length ? s.ports.join("  ") : "no published ports";
    c.querySelector(".ports").textContent = s.vip ? `${ports}  ·  vip ${s.vip}` : ports;
    const u = c.querySelector(".update");
    if (s.update) {
      const st = s.update.state;
      u.textContent = st === "updating"
        ? `updating to v${s.spec_version}: ${s.update.updated} done, ${s.update.outdated} to go`
        : `update completed · v${s.spec_version}`;
      u.className = `update ${st}`;
    } else {
      u.textContent = `v${s.spec_version}`;
      u.className = "update";
    }
    c.querySelector(".pending").textContent = s.pending ? `pending: ${s.pending}` : "";
  });
}

function renderNodes(o) {
  const tasksByNode = new Map();
  for (const t of o.tasks) {
    if (!tasksByNode.has(t.node)) tasksByNode.set(t.node, []);
    tasksByNode.get(t.node).push(t);
  }
  reconcile(byId("nodes"), o.nodes, (n) => n.name, () => {
    const col = el("section", "node");
    const head = el("div", "nhead");
    const title = el("div", "title");
    title.append(el("span", "dot"), el("span", "nname"), el("span", "self", "this node"));
    head.append(title, el("div", "addr"), el("div", "badges"));
    col.append(head, el("div", "tasks"));
    return col;
  }, (col, n) => {
    const status = n.status.toLowerCase();
    const availability = n.availability.toLowerCase();
    col.dataset.node = n.name;
    col.dataset.status = status;
    col.className = `node ${status === "down" ? "down" : ""} ${availability === "drain" ? "drain" : ""}`;
    col.querySelector(".dot").className = `dot ${status === "ready" ? "live" : "lost"}`;
    col.querySelector(".nname").textContent = n.name;
    col.querySelector(".self").style.display = n.self ? "" : "none";
    col.querySelector(".addr").textContent = n.address || "no address yet";
    const badges = col.querySelector(".badges");
    const b = [el("span", `badge ${status}`, status), el("span", `badge ${availability}`, availability)];
    for (const [k, v] of Object.entries(n.labels)) b.push(el("span", "badge label", v ? `${k}=${v}` : k));
    badges.replaceChildren(...b);
    renderTasks(col.querySelector(".tasks"), tasksByNode.get(n.name) || []);
  });
}

function renderTasks(container, tasks) {
  if (tasks.length === 0) {
    if (!container.querySelector(".none")) container.replaceChildren(el("div", "none", "no tasks"));
    return;
  }
  const none = container.querySelector(".none");
  if (none) none.remove();
  reconcile(container, tasks, (t) => t.id || `${t.node}/${t.name}`, (t) => {
    const c = el("div", "card");
    c.style.setProperty("--svc", serviceColour(t.service));
    const top = el("div", "ctop");
    top.append(el("span", "cname", t.name), el("span", "state"));
    c.append(top, el("div", "meta"), el("div", "err"));
    return c;
  }, (c, t) => {
    const state = t.state.toLowerCase();
    c.dataset.task = t.name;
    c.dataset.service = t.service;
    c.dataset.state = state;
    c.querySelector(".state").textContent = state;
    const meta = [`slot ${t.slot}`, `v${t.spec_version}`];
    meta.push(t.health ? `health ${t.health}` : "no health check");
    if (t.backend) meta.push(`lb ${t.backend}`);
    if (t.since_ms) meta.push(ago(t.since_ms));
    c.querySelector(".meta").replaceChildren(...meta.map((m) => el("span", "", m)));
    c.querySelector(".err").textContent = t.error || "";
  });
}

function render(o) {
  clockSkew = o.time_ms - Date.now();
  byId("cluster").textContent = o.cluster;
  byId("viewer").textContent = `· viewed from ${o.node}`;
  const ready = o.nodes.filter((n) => n.status === "Ready").length;
  byId("stat-nodes").textContent = `${ready}/${o.nodes.length}`;
  byId("stat-services").textContent = o.services.length;
  byId("stat-tasks").textContent = o.tasks.filter((t) => t.state === "Running").length;
  renderServices(o.services);
  renderNodes(o);
  document.body.dataset.ready = "true";
}

function tick(e) {
  const li = el("li", e.action);
  const at = new Date(e.time_ms).toISOString().replace("T", " ").replace("Z", "");
  li.append(el("span", "t", at), el("span", "k", `${e.type} ${e.action}`), el("span", "", e.actor));
  const details = [];
  if (e.node && e.node !== e.actor) details.push(`node=${e.node}`);
  for (const [k, v] of Object.entries(e.attributes || {})) details.push(`${k}=${v}`);
  if (details.length) li.append(el("span", "", `  (${details.join(", ")})`));
  const ticker = byId("ticker");
  ticker.prepend(li);
  while (ticker.children.length > TICKER_LINES) ticker.lastChild.remove();
}

function connect() {
  const conn = (cls, text) => {
    byId("conn-dot").className = `dot ${cls}`;
    byId("conn-text").textContent = text;
  };
  const source = new EventSource("/api/stream");
  source.onopen = () => {
    // A reconnect replays the recent events: start the ticker afresh.
    byId("ticker").replaceChildren();
    conn("live", "live");
  };
  source.onerror = () => conn("lost", "reconnecting…");
  source.addEventListener("overview", (m) => render(JSON.parse(m.data)));
  source.addEventListener("event", (m) => tick(JSON.parse(m.data)));
}

connect();
