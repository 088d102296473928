"""Our me-json output read by Google Model Explorer's own graph processing, in a browser.

Model Explorer's Python package does not parse a graphs JSON file: its server hands the file to the web app,
which accepts a JSON list of {id, nodes} as one collection of graphs and sends each graph to its web worker
(the bundled web_app/worker-*.js) as a "process graph" request. That worker builds the model graph the UI
draws: op nodes, a layer (group node) per namespace level, edges from incomingEdges (an edge whose source
node does not exist is dropped silently), then lays out the top level with dagre. This test runs that
worker's script, unmodified, in headless Chromium (it measures labels with OffscreenCanvas, so not in
Node; on the page rather than in a Worker, handed its `self` and `postMessage`, so that the DOM dump waits
for it) on every stage of our file, and checks what came out against what we wrote.
"""
import importlib.util
import json
import re
from pathlib import Path

import pytest
from test_cli import browse

from moecompile.viz import render

PROCESS_GRAPH_REQ, PROCESS_GRAPH_RESP, PROGRESS = 0, 1, 8  # the worker's event types, as its bundle reads them

PAGE = """<!DOCTYPE html><meta charset="utf-8"><pre id="out">pending</pre>
<script type="application/json" id="graphs">GRAPHS</script>
<script type="text/plain" id="worker">WORKER</script>
<script>
// The worker's script, run on the page: its `self` and `postMessage` given to it, so the page's DOM dump
// waits for it (a real Worker would answer after the dump)
const graphs = JSON.parse(document.getElementById("graphs").textContent), results = [];
let onRequest = null, errors = [];
const workerSelf = {addEventListener: (type, fn) => { if (type === "message") onRequest = fn; }};
const fromWorker = m => {
  if (m.eventType === PROGRESS && m.error) errors.push(m.error);
  if (m.eventType !== RESP) return;
  const g = m.modelGraph, ops = g.nodes.filter(n => n.nodeType === 0);
  results.push({id: g.id, errors, ops: ops.map(n => [n.id, n.label, n.nsParentId || ""]),
                groups: g.nodes.filter(n => n.nodeType === 1).map(n => n.id),
                edges: ops.flatMap(n => (n.incomingEdges || []).map(e => [e.sourceNodeId, n.id])),
                laidOut: g.rootNodes.every(n => Number.isFinite(n.x) && Number.isFinite(n.y))});
  errors = [];
};
try {
  new Function("self", "postMessage", document.getElementById("worker").textContent)(workerSelf, fromWorker);
  for (const graph of graphs)  // what the app sends for a newly opened graph
    onRequest({data: {eventType: REQ, graph, showOnNodeItemTypes: {}, nodeDataProviderRuns: {}, config: {},
                      paneId: "pane", groupNodeChildrenCountThreshold: 1000, flattenLayers: false,
                      keepLayersWithASingleChild: false, initialLayout: true}});
  document.getElementById("out").textContent = JSON.stringify(results);
} catch (e) {
  document.getElementById("out").textContent = "FAIL " + (e.stack || e);
}
</script>"""


@pytest.fixture(scope="module")
def worker_js():
    spec = importlib.util.find_spec("model_explorer")
    if spec is None:
        pytest.skip("ai-edge-model-explorer is not installed (pip install ai-edge-model-explorer: its TFLite "
                    "adapter library is ~480 MB, so it is not in the dev extra)")
    found = sorted((Path(spec.origin).parent / "web_app").glob("worker-*.js"))
    assert len(found) == 1, f"expected one bundled worker in model_explorer/web_app, found {found}"
    return found[0].read_text(encoding="utf-8")


def model_explorer_graphs(me_json: str, worker: str, chromium, tmp_path) -> list[dict]:  # noqa: F811
    """Every graph of `me_json` as Model Explorer's worker processed it: op nodes [id, label, layer],
    layer ids, edges [source, target], the errors it reported, whether the top level was laid out."""
    assert "</" not in worker  # it sits in a <script> element
    page = PAGE.replace("REQ", str(PROCESS_GRAPH_REQ)).replace("RESP", str(PROCESS_GRAPH_RESP))
    page = page.replace("PROGRESS", str(PROGRESS)).replace("GRAPHS", me_json.replace("</", "<\\/"))
    (tmp_path / "me.html").write_text(page.replace("WORKER", worker), encoding="utf-8")
    dom, _ = browse(chromium, tmp_path / "me.html", tmp_path, url_suffix="")
    out = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S).group(1)
    assert out.startswith("["), out[:500]
    return json.loads(out.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def kept_layers(nodes: list[dict]) -> set[str]:
    """The namespaces Model Explorer shows as layers by default: every level of every node's namespace,
    except a layer with a single child (node or layer), whose child it shows in the enclosing layer."""
    children: dict[str, set] = {}
    for n in nodes:
        parts = n["namespace"].split("/") if n["namespace"] else []
        children.setdefault(n["namespace"], set()).add(n["id"])
        for k in range(1, len(parts) + 1):
            children.setdefault("/".join(parts[:k - 1]), set()).add("/".join(parts[:k]) + "/")
    return {ns for ns, kids in children.items() if ns and len(kids) > 1}


def layer_of(namespace: str, kept: set[str]) -> str:
    """The group id of the innermost kept layer holding `namespace`, "" at the top level."""
    parts = namespace.split("/") if namespace else []
    inner = next(("/".join(parts[:k]) for k in range(len(parts), 0, -1) if "/".join(parts[:k]) in kept), "")
    return f"{inner}___group___" if inner else ""


def test_model_explorer_reads_every_stage(worker_js, tiny_captured, chromium, tmp_path):  # noqa: F811
    """Nodes, layers and edges of each stage (the one whose export failed included) come out of Model
    Explorer's processing as we wrote them (layers of one child folded, as it does by default), with no
    error and the top level laid out."""
    me_json = render(tiny_captured, "me-json")
    ours = json.loads(me_json)
    theirs = model_explorer_graphs(me_json, worker_js, chromium, tmp_path)
    assert [g["id"] for g in theirs] == [g["id"] for g in ours] == [s.name for s in tiny_captured.stages]
    for mine, seen in zip(ours, theirs):
        assert seen["errors"] == [] and seen["laidOut"], (seen["id"], seen["errors"])
        assert [n[:2] for n in seen["ops"]] == [[n["id"], n["label"]] for n in mine["nodes"]]
        kept = kept_layers(mine["nodes"])
        assert sorted(seen["groups"]) == sorted(f"{ns}___group___" for ns in kept)
        assert [n[2] for n in seen["ops"]] == [layer_of(n["namespace"], kept) for n in mine["nodes"]]
        assert sorted(seen["edges"]) == sorted([e["sourceNodeId"], n["id"]] for n in mine["nodes"]
                                               for e in n["incomingEdges"])
        assert len(seen["edges"]) > len(mine["nodes"]) // 2 or len(mine["nodes"]) == 1
    lifted = theirs[[s.name for s in tiny_captured.stages].index("lift_moe")]
    route = next(n for n in lifted["ops"] if n[1] == "moecompile.route")
    assert route[2] == "blocks/1/ffn___group___" and "blocks/1/ffn___group___" in lifted["groups"]
    assert len(theirs[5]["ops"]) == 1 and theirs[5]["ops"][0][:2] == ["export_error", "export failed"]
