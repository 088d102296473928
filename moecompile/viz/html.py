"""One self-contained HTML page of a Capture: inline CSS and script, the data as JSON in the page, no network.

The page: a button per stage (the input and each pass), the graph of the chosen stage as groups by module
path (collapsed to the layers; a group's rows are made when it is first opened), what the pass changed,
the MoE blocks, and each expert-parallel layer's schedule as a timeline (or a note that there is none): the
cost model's prediction and, from `viz --ranks`, each rank's measured lanes of the last training step.
"""
from __future__ import annotations

import html
import json
import re

from moecompile.viz.graph import Capture, same_changes
from moecompile.viz.page_js import SCRIPT
from moecompile.viz.schedule import measured_data, measured_title, schedule_data


def page_data(capture: Capture) -> dict:
    """Compact JSON for the script: a node is [id, label, namespace index, input indices, shape, kind,
    MoE block index or -1, args] (arrays, not objects: a 32-layer model has thousands of nodes per stage);
    a stage's changes are [[groups], {op: added}] with identical groups merged."""
    namespaces = sorted({n.namespace for s in capture.stages for n in s.nodes or []})
    ns_index = {ns: i for i, ns in enumerate(namespaces)}
    block_index = {b.name: i for i, b in enumerate(capture.blocks)}
    stages = []
    for stage in capture.stages:
        nodes = None
        if stage.nodes is not None:
            position = {n.id: i for i, n in enumerate(stage.nodes)}
            nodes = [[n.id, n.label, ns_index[n.namespace], [position[i] for i in n.inputs], n.shape, n.kind,
                      block_index.get(n.block, -1), n.args] for n in stage.nodes]
        stages.append({"name": stage.name, "error": stage.error, "changes": same_changes(stage.diff), "nodes": nodes})
    return {"target": capture.target, "namespaces": namespaces, "stages": stages,
            "blocks": [{"name": b.name, "namespace": b.name.replace(".", "/"), "rewritten": b.rewritten,
                        "details": b.details} for b in capture.blocks],
            "schedules": [schedule_data(block, s) for block, s in capture.schedules.items()],
            "measured": measured_data(capture.measured) if capture.measured else None,
            "measured_run": measured_title(capture.measured) if capture.measured else ""}


def to_html(capture: Capture) -> str:
    # "</" inside the JSON would end its <script> element early
    data = json.dumps(page_data(capture), separators=(",", ":")).replace("</", "<\\/")
    rewritten = sum(b.rewritten for b in capture.blocks)
    parts = {"title": html.escape(capture.target), "style": STYLE, "script": SCRIPT, "data": data,
             "summary": f"{len(capture.blocks)} MoE block(s), {rewritten} rewritten"}
    return re.sub(r"\{(title|summary|style|script|data)\}", lambda m: parts[m[1]], PAGE)  # one pass: no re-expansion


STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { padding: 8px 16px; background: #263238; color: #fff; display: flex; gap: 16px; align-items: baseline; }
header h1 { font-size: 16px; margin: 0; } header .muted { color: #b0bec5; }
#passes { padding: 8px 16px; display: flex; flex-wrap: wrap; gap: 6px; border-bottom: 1px solid #ddd; background: #fff; }
#passes button { font: inherit; padding: 4px 10px; border: 1px solid #90a4ae; border-radius: 4px; background: #fff; cursor: pointer; }
#passes button.changed { border-color: #6a1b9a; } #passes button.changed::after { content: " ●"; color: #6a1b9a; }
#passes button.active { background: #37474f; color: #fff; }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(320px, 2fr); gap: 12px; padding: 12px 16px; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin-bottom: 12px; }
h2 { font-size: 14px; margin: 4px 0 8px; } h3 { font-size: 13px; margin: 8px 0 4px; }
.toolbar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin-bottom: 6px; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 4px; border-radius: 3px; font-size: 12px; }
.group { margin-left: 14px; border-left: 1px solid #e0e0e0; }
#tree > .group { margin-left: 0; }
.group > .head { cursor: pointer; padding: 2px 4px; display: flex; gap: 8px; align-items: center; }
.group > .head:hover { background: #eceff1; }
.group > .body { display: none; } .group.open > .body { display: block; }
.twisty::before { content: "▸"; color: #607d8b; } .group.open > .head .twisty::before { content: "▾"; }
.name { font-weight: 600; } .count { color: #78909c; font-size: 12px; }
.badge { font-size: 11px; padding: 0 5px; border-radius: 3px; }
.moe, .badge.moe { background: #fff3e0; } .group.moe { border-left: 3px solid #ef6c00; }
.badge.moe { border: 1px solid #ef6c00; } .badge.moe-inside { border: 1px dashed #ef6c00; color: #e65100; }
.canonical, .badge.canonical { background: #f3e5f5; border: 1px solid #8e24aa; }
.comm, .badge.comm { background: #e1f5fe; border: 1px solid #0288d1; }
.node { font: 12px ui-monospace, monospace; margin-left: 18px; padding: 1px 4px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.node.in-moe { background: #fff8ef; } .node.canonical { font-weight: 600; }
.node.parameter, .node.buffer, .node.constant { color: #90a4ae; }
.node .op { color: #1565c0; } .node.canonical .op { color: #6a1b9a; } .node .shape { color: #2e7d32; }
.change { border-left: 3px solid #b0bec5; padding-left: 8px; margin-bottom: 8px; }
.change.moe { border-left-color: #ef6c00; }
.chip { display: inline-block; font: 11px ui-monospace, monospace; padding: 1px 5px; margin: 2px; border-radius: 3px; }
.chip.added { background: #e8f5e9; } .chip.removed { background: #ffebee; } .chip.canonical { border: 1px solid #8e24aa; }
#blocks li a { color: #e65100; cursor: pointer; text-decoration: underline; font-weight: 600; }
#blocks li.kept a { color: #c62828; }
pre.error { white-space: pre-wrap; color: #b71c1c; }
.timeline text { font-size: 11px; } .timeline .phase { font-weight: 600; }
.slot { stroke: #fff; } .slot.send, .slot.return { fill: #4fc3f7; } .slot.experts { fill: #81c784; } .slot.side { fill: #4db6ac; }
.exposed { fill: #e53935; fill-opacity: .25; stroke: #e53935; } .exposed-label { fill: #c62828; font-size: 10px; }
.timeline.measured .lane { font-size: 10px; } .issue { fill: #01579b; }
.measured-table { border-collapse: collapse; font-size: 12px; } .measured-table td, .measured-table th { padding: 1px 6px; }
h4 { font-size: 12px; margin: 6px 0 2px; color: #37474f; }
.axis { stroke: #90a4ae; } .note { color: #546e7a; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moecompile: {title}</title>
<style>{style}</style></head>
<body>
<header><h1>moecompile · {title}</h1><span class="muted">{summary}</span><span class="muted" id="render-time"></span></header>
<nav id="passes" aria-label="passes"></nav>
<main>
  <div>
    <section>
      <div class="toolbar"><h2 id="graph-title"></h2>
        <button id="expand-all">expand all</button><button id="collapse-all">collapse to layers</button></div>
      <div class="toolbar legend">legend:
        <span class="moe" style="border-left:3px solid #ef6c00">MoE block</span>
        <span class="canonical">canonical moecompile op</span>
        <span class="comm">communication (all-to-all / wait)</span>
        <span style="color:#90a4ae">parameter / buffer</span>
        <span class="exposed-key" style="background:#ffcdd2">exposed communication (schedule: predicted or measured waits)</span></div>
      <div id="tree"></div>
    </section>
  </div>
  <aside>
    <section><h2>Changed by this pass</h2><div id="changes"></div></section>
    <section><h2>MoE blocks</h2><ul id="blocks"></ul></section>
    <section><h2>Expert-parallel schedule</h2><div id="schedule"></div></section>
  </aside>
</main>
<script type="application/json" id="data">{data}</script>
<script>{script}</script>
</body></html>
"""
