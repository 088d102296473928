"""The page's script (html.py embeds it): pass selector, lazily built module tree, diff panel, schedule SVGs
(predicted, and measured per rank when the page has a measured run).

Opened with #selftest in the URL, the page clicks through every stage, checks that each click shows that
stage, expands every group, checks that every measured slot and wait was drawn in its rank's lanes, and
writes the outcome and its timings into <pre id="selftest">.
"""

SCRIPT = r"""
"use strict";
const ERRORS = [];
window.addEventListener("error", e => ERRORS.push("error: " + e.message));
window.addEventListener("unhandledrejection", e => ERRORS.push("rejection: " + e.reason));
const D = JSON.parse(document.getElementById("data").textContent);
const BLOCKS = new Map(D.blocks.map(b => [b.namespace, b]));
const trees = [];            // per stage: its module tree, built on first view
const opened = new Map();    // group path -> open?, as the user left it (kept across stages)
let current = 0;

function el(tag, cls, ...kids) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  e.append(...kids);
  return e;
}

function tree(i) {
  if (trees[i]) return trees[i];
  const group = (name, path) => ({name, path, groups: new Map(), nodes: [], total: 0, canonical: 0, comm: 0,
                                  block: BLOCKS.get(path), hasMoe: BLOCKS.has(path)});
  const root = group("", "");
  D.stages[i].nodes.forEach((n, k) => {
    let g = root;
    const ns = D.namespaces[n[2]];
    if (ns) for (const part of ns.split("/")) {
      if (!g.groups.has(part)) g.groups.set(part, group(part, g.path ? g.path + "/" + part : part));
      g = g.groups.get(part);
    }
    g.nodes.push(k);
  });
  (function ownOps(g) {  // a long run of a module's own ops would push its submodules apart: fold it
    g.groups.forEach(ownOps);
    if (g.groups.size && g.nodes.length > 8) {
      const own = group(`(${g.nodes.length} ops of ${g.name || "the model"} itself)`, g.path + "/(own)");
      own.nodes = g.nodes;
      g.nodes = [];
      g.groups.set(own.name, own);
    }
  })(root);
  (function count(g) {
    g.total = g.nodes.length;
    for (const k of g.nodes) {
      const kind = D.stages[i].nodes[k][5];
      if (kind === "canonical" || kind === "comm") g[kind] += 1;
    }
    for (const c of g.groups.values()) {
      count(c);
      g.total += c.total; g.canonical += c.canonical; g.comm += c.comm; g.hasMoe ||= c.hasMoe;
    }
  })(root);
  return trees[i] = root;
}

// Collapsed to the layers by default: a group opens if it has subgroups and is not itself a numbered item.
const isOpen = g => opened.has(g.path) ? opened.get(g.path) : g.groups.size > 0 && !/(^|\/)\d+(\/|$)/.test(g.path);

function groupElement(g) {
  const head = el("div", "head", el("span", "twisty"), el("span", "name", g.name),
                  el("span", "count", g.total + (g.total === 1 ? " node" : " nodes")));
  if (g.block) head.append(el("span", "badge moe", g.block.rewritten ? "MoE block · rewritten" : "MoE block · not rewritten"));
  else if (g.hasMoe) head.append(el("span", "badge moe-inside", "contains MoE"));
  if (g.canonical) head.append(el("span", "badge canonical", g.canonical + " moecompile ops"));
  if (g.comm) head.append(el("span", "badge comm", g.comm + " comm"));
  const body = el("div", "body");
  const box = el("div", "group" + (g.block ? " moe" : ""), head, body);
  box.dataset.path = g.path;
  const show = open => {
    box.classList.toggle("open", open);
    if (open && !body.childElementCount) fill(body, g);  // DOM made on first expand: 32 layers stay cheap
  };
  head.addEventListener("click", () => { const open = !box.classList.contains("open"); opened.set(g.path, open); show(open); });
  show(isOpen(g));
  return box;
}

function fill(body, g) {
  const nodes = D.stages[current].nodes, frag = document.createDocumentFragment();
  for (const c of g.groups.values()) frag.append(groupElement(c));
  for (const k of g.nodes) {
    const [id, label, , inputs, shape, kind, block, args] = nodes[k];
    const row = el("div", "node " + kind + (block >= 0 ? " in-moe" : ""), el("span", "id", id), " = ",
                   el("span", "op", label), "(" + inputs.map(j => nodes[j][0]).join(", ") + ")");
    if (shape) row.append(" ", el("span", "shape", shape));
    if (args) row.title = args;
    frag.append(row);
  }
  body.append(frag);
}

function renderTree() {
  const stage = D.stages[current], box = document.getElementById("tree");
  document.getElementById("graph-title").textContent =
    `stage ${current}: ${stage.name}` + (stage.nodes ? ` (${stage.nodes.length} nodes)` : " (no graph)");
  box.replaceChildren();
  if (stage.error) { box.append(el("pre", "error", stage.error)); return; }
  fill(box, tree(current));
}

function renderChanges() {
  const box = document.getElementById("changes"), stage = D.stages[current], prev = D.stages[current - 1];
  box.replaceChildren();
  if (!prev) { box.append(el("p", "", "The model as given, before any pass.")); return; }
  if (stage.error || prev.error) { box.append(el("p", "", "Not comparable: a graph of these two stages failed to export.")); return; }
  if (!stage.changes.length) { box.append(el("p", "", `${stage.name} left the graph unchanged (op counts per block).`)); return; }
  for (const [groups, ops] of stage.changes) {
    const list = el("div", "ops");
    for (const [label, d] of Object.entries(ops))
      list.append(el("span", "chip " + (d > 0 ? "added" : "removed") + (label.startsWith("moecompile.") ? " canonical" : ""),
                     (d > 0 ? "+" : "−") + Math.abs(d) + " " + label));
    const title = groups.length > 3 ? `${groups.slice(0, 3).join(", ")} … (${groups.length} alike)` : groups.join(", ");
    box.append(el("div", "change" + (groups.some(g => BLOCKS.has(g.replaceAll(".", "/"))) ? " moe" : ""),
                  el("h3", "", title), list));
  }
}

function select(i) {
  current = i;
  document.querySelectorAll("#passes button").forEach((b, k) => b.classList.toggle("active", k === i));
  renderTree();
  renderChanges();
}

function setAll(open) {
  if (!D.stages[current].nodes) return;  // this stage failed to export: no groups
  (function walk(g) { if (g.path) opened.set(g.path, open); g.groups.forEach(walk); })(tree(current));
  renderTree();
}

function reveal(path) {
  const parts = path.split("/");
  parts.forEach((_, k) => opened.set(parts.slice(0, k + 1).join("/"), true));
  renderTree();
  document.querySelector(`.group[data-path="${CSS.escape(path)}"]`)?.scrollIntoView({block: "center"});
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function timeline(s, span) {
  const W = 640, left = 60, lane = {link: 18, compute: 44}, phaseH = 100, x = t => left + (W - left - 10) * t / span;
  const root = svg("svg", {viewBox: `0 0 ${W} ${phaseH * s.phases.length}`, width: "100%", class: "timeline"});
  s.phases.forEach((p, k) => {
    const g = svg("g", {transform: `translate(0 ${k * phaseH})`});
    g.append(svg("text", {x: 0, y: 10, class: "phase"}, `${p.name}: ${p.makespan.toFixed(3)} ms`));
    for (const [name, y] of Object.entries(lane)) g.append(svg("text", {x: 0, y: y + 15, class: "lane"}, name));
    for (const slot of p.slots) {
      const y = lane[slot.lane], w = Math.max(1, x(slot.end) - x(slot.start));
      const r = svg("rect", {x: x(slot.start), y, width: w, height: 20, class: "slot " + slot.step});
      r.append(svg("title", {}, `${slot.step} ${slot.chunk}: ${slot.start.toFixed(3)}–${slot.end.toFixed(3)} ms`));
      g.append(r);
      if (w > 40) g.append(svg("text", {x: x(slot.start) + 3, y: y + 14, class: "slot-label"}, slot.step + slot.chunk));
    }
    for (const [a, b] of p.exposed)
      g.append(svg("rect", {x: x(a), y: lane.link - 3, width: Math.max(1, x(b) - x(a)), height: 26, class: "exposed"}),
               svg("text", {x: x(a), y: 92, class: "exposed-label"}, "exposed"));
    g.append(svg("line", {x1: left, x2: W - 10, y1: 68, y2: 68, class: "axis"}),
             svg("text", {x: left, y: 80, class: "tick"}, "0"),
             svg("text", {x: W - 60, y: 80, class: "tick"}, span.toFixed(3) + " ms"));
    root.append(g);
  });
  return root;
}

// One pair of lanes (link, compute) per rank. Exchanges in flight together share the link lane in rows; the
// rank's waits (exposed communication, red) span the lane, its launch calls are the dark strip below it.
function measuredTimeline(m, span) {
  const W = 640, left = 90, laneH = 24, head = 18, rankH = 2 * laneH + 8, x = t => left + (W - left - 10) * t / span;
  const phaseH = head + rankH * m.phases[0].ranks.length + 26;
  const root = svg("svg", {viewBox: `0 0 ${W} ${phaseH * m.phases.length}`, width: "100%", class: "timeline measured"});
  m.phases.forEach((p, k) => {
    const g = svg("g", {transform: `translate(0 ${k * phaseH})`}), bottom = head + rankH * p.ranks.length;
    g.append(svg("text", {x: 0, y: 10, class: "phase"}, `${p.name}: measured ${p.makespan.toFixed(3)} ms, predicted ` +
      `${p.predicted.toFixed(3)} ms; blocked in waits ` + p.ranks.map(r => `rank ${r.rank} ${r.exposed_ms.toFixed(3)} ms`).join(", ")));
    p.ranks.forEach((r, i) => {
      const lane = {link: head + i * rankH, compute: head + i * rankH + laneH + 4}, rowEnds = [];
      const links = r.slots.filter(s => s.lane === "link").sort((a, b) => a.start - b.start);
      const row = new Map(links.map(s => {  // the first row free at the slot's start
        let j = rowEnds.findIndex(end => end <= s.start);
        if (j < 0) j = rowEnds.push(0) - 1;
        rowEnds[j] = s.end;
        return [s, j];
      }));
      const rowH = (laneH - 4) / Math.max(1, rowEnds.length);
      for (const [name, y] of Object.entries(lane)) g.append(svg("text", {x: 0, y: y + 15, class: "lane"}, `rank ${r.rank} ${name}`));
      for (const slot of r.slots) {
        const y = slot.lane === "link" ? lane.link + 2 + row.get(slot) * rowH : lane.compute + 2;
        const w = Math.max(1, x(slot.end) - x(slot.start)), h = slot.lane === "link" ? rowH : laneH - 4;
        const rect = svg("rect", {x: x(slot.start), y, width: w, height: h, class: "slot measured " + slot.step});
        rect.append(svg("title", {}, `rank ${r.rank} ${slot.step} ${slot.chunk}: ${slot.start.toFixed(3)}–${slot.end.toFixed(3)} ms`));
        g.append(rect);
        if (w > 40 && h >= 10) g.append(svg("text", {x: x(slot.start) + 3, y: y + Math.min(h, 14) - 2, class: "slot-label"}, slot.step + slot.chunk));
      }
      const marks = [["exposed", r.exposed, "blocked in a wait", lane.link, laneH], ["issue", r.issue, "inside a launch call", lane.link + laneH, 3]];
      for (const [cls, spans, what, y, h] of marks) for (const [a, b] of spans) {
        const rect = svg("rect", {x: x(a), y, width: Math.max(1, x(b) - x(a)), height: h, class: cls + " measured"});
        rect.append(svg("title", {}, `rank ${r.rank} ${what}: ${a.toFixed(3)}–${b.toFixed(3)} ms`));
        g.append(rect);
      }
    });
    g.append(svg("line", {x1: left, x2: W - 10, y1: bottom + 2, y2: bottom + 2, class: "axis"}),
             svg("text", {x: left, y: bottom + 14, class: "tick"}, "0"),
             svg("text", {x: W - 60, y: bottom + 14, class: "tick"}, span.toFixed(3) + " ms"));
    root.append(g);
  });
  return root;
}

// Per phase and rank, ms: blocked in waits, link busy while no expert computes (the predicted figure's
// measure), inside launch calls, and the exchanges' spans summed (they overlap when pipelined).
function measuredTable(m) {
  const cells = (tag, values) => el("tr", "", ...values.map(v => el(tag, "", v)));
  const table = el("table", "measured-table", cells("th", ["phase", "rank", "waits", "link, no compute", "launch calls", "exchanges (sum)"]));
  for (const p of m.phases) for (const r of p.ranks)
    table.append(cells("td", [p.name, String(r.rank), ...[r.exposed_ms, r.idle_ms, r.issue_ms, r.link_ms].map(v => v.toFixed(3))]));
  return table;
}

function renderSchedule(s) {
  const m = (D.measured || []).find(l => l.block === s.block), phases = m ? [...s.phases, ...m.phases] : s.phases;
  const span = Math.max(...phases.map(p => p.makespan)) || 1, box = el("div", "layer-schedule");
  box.append(el("h3", "", s.block), el("p", "summary", s.summary));
  if (!m) return box.append(timeline(s, span)), box;
  const total = ps => ps.reduce((t, p) => t + p.makespan, 0).toFixed(3);
  box.append(el("h4", "", `predicted (cost model): ${total(s.phases)} ms fwd+bwd`), timeline(s, span),
             el("h4", "", `measured: ${total(m.phases)} ms fwd+bwd at degree ${m.chunks} ` +
                "(red: the rank blocked in a wait; dark strip: inside an exchange's launch call)"),
             ...(m.tuning ? [el("p", "note", m.tuning)] : []), measuredTimeline(m, span), measuredTable(m));
  return box;
}

function renderStatic() {
  const nav = document.getElementById("passes");
  D.stages.forEach((s, i) => {
    const b = el("button", s.changes.length ? "changed" : "", `${i}. ${s.name}`);
    b.title = s.error ? "export failed" : `${s.nodes.length} nodes`;
    b.addEventListener("click", () => select(i));
    nav.append(b);
  });
  const blocks = document.getElementById("blocks");
  if (!D.blocks.length) blocks.append(el("p", "", "No MoE blocks found."));
  for (const b of D.blocks) {
    const item = el("li", b.rewritten ? "rewritten" : "kept", el("a", "", b.name),
                    b.rewritten ? " rewritten: " : " not rewritten: ", b.details);
    item.firstChild.addEventListener("click", () => reveal(b.namespace));
    blocks.append(item);
  }
  const sched = document.getElementById("schedule");
  if (!D.schedules.length) sched.append(el("p", "note", "No expert-parallel schedule for this model: schedules are " +
    "made only under expert parallelism (optimize(..., mesh=...) on a device mesh with an \"ep\" dimension)."));
  if (D.measured_run) sched.append(el("p", "note", D.measured_run));
  for (const s of D.schedules) sched.append(renderSchedule(s));
  document.getElementById("expand-all").addEventListener("click", () => setAll(true));
  document.getElementById("collapse-all").addEventListener("click", () => { opened.clear(); renderTree(); });
  document.addEventListener("keydown", e => {
    if (e.key === "ArrowRight" && current + 1 < D.stages.length) select(current + 1);
    if (e.key === "ArrowLeft" && current > 0) select(current - 1);
  });
}

function selftest(renderMs) {
  const problems = [], buttons = document.querySelectorAll("#passes button"), switchMs = [];
  let before = null;
  D.stages.forEach((s, i) => {
    const t = performance.now();
    buttons[i].click();
    void document.body.offsetHeight;  // include layout in the time
    switchMs.push(performance.now() - t);
    const view = document.getElementById("tree").textContent + document.getElementById("changes").textContent;
    if (!buttons[i].classList.contains("active")) problems.push(`stage ${i}: its button is not active`);
    if (!document.getElementById("graph-title").textContent.includes(s.name)) problems.push(`stage ${i}: title`);
    if (i && s.changes.length && view === before) problems.push(`stage ${i} (${s.name}) changed nothing on screen`);
    before = view;
  });
  const lifted = D.stages.findIndex(s => s.nodes && s.nodes.some(n => n[5] === "canonical"));
  select(lifted >= 0 ? lifted : 0);
  const t = performance.now();
  setAll(true);
  void document.body.offsetHeight;
  const expandMs = performance.now() - t, rows = document.querySelectorAll("#tree .node").length;
  if (lifted >= 0 && !document.querySelector("#tree .node.canonical"))
    problems.push("no moecompile op row after expand all");
  opened.clear();
  renderTree();
  const measured = measuredDrawn(problems);
  problems.unshift(...ERRORS);  // uncaught errors, from loading the page or from the clicks above
  const result = problems.length ? "FAIL " + problems.join("; ") :
    `ok stages=${D.stages.length} nodes=${D.stages.map(s => s.nodes ? s.nodes.length : 0).join(",")} ` +
    `render_ms=${renderMs.toFixed(1)} switch_max_ms=${Math.max(...switchMs).toFixed(1)} ` +
    `expand_all_ms=${expandMs.toFixed(1)} expanded_rows=${rows}` + measured;
  document.body.append(el("pre", "", result));
  document.body.lastChild.id = "selftest";
}

// Every measured slot and wait drawn, in lanes labelled for every rank; " measured_slots=N waits=M", or "".
function measuredDrawn(problems) {
  if (!D.measured) return "";
  const ranks = D.measured.flatMap(l => l.phases.flatMap(p => p.ranks));
  const want = ranks.reduce((n, r) => n + r.slots.length, 0);
  const waits = ranks.reduce((n, r) => n + r.exposed.length, 0), issues = ranks.reduce((n, r) => n + r.issue.length, 0);
  const drawn = document.querySelectorAll("#schedule svg.measured rect.slot.measured").length;
  const marked = document.querySelectorAll("#schedule svg.measured rect.exposed.measured").length;
  const lanes = document.querySelectorAll("#schedule svg.measured text.lane").length;
  if (!want || drawn !== want) problems.push(`measured lanes: ${drawn} of ${want} slots drawn`);
  if (marked !== waits) problems.push(`measured lanes: ${marked} of ${waits} waits marked`);
  const launches = document.querySelectorAll("#schedule svg.measured rect.issue.measured").length;
  if (launches !== issues) problems.push(`measured lanes: ${launches} of ${issues} launch calls marked`);
  if (lanes !== 2 * ranks.length) problems.push(`measured lanes: ${lanes} lane labels for ${ranks.length} rank phases`);
  return ` measured_slots=${drawn} waits=${marked}`;
}

try {
  renderStatic();
  const changed = D.stages.map(s => s.changes.length > 0).lastIndexOf(true);
  select(changed >= 0 ? changed : D.stages.length - 1);  // the last pass that changed the graph: the rewrite
  void document.body.offsetHeight;
  const renderMs = performance.now();  // since navigation start: reading and parsing the file included
  document.getElementById("render-time").textContent = `rendered in ${renderMs.toFixed(0)} ms`;
  if (location.hash === "#selftest") selftest(renderMs);
} catch (e) {
  ERRORS.push(String(e && e.stack || e));
  document.body.append(el("pre", "", "FAIL " + ERRORS.join("; ")));
  document.body.lastChild.id = "selftest";
}
"""
