"""Writers of a Capture: Model Explorer graphs JSON, plain text, Graphviz dot and SVG (html.py: the page).

Contract: each `to_<format>(capture)` returns the file's text. me-json and text hold every stage; dot and
svg show one stage (the last unless `stage` names another), since Graphviz lays out one graph per file.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter

from moecompile.viz.graph import Capture, Node, Stage, same_changes
from moecompile.viz.schedule import measured_lines, schedule_lines


class GraphvizMissing(RuntimeError):
    """Graphviz's `dot` is not on PATH."""


def to_me_json(capture: Capture) -> str:
    """Google Model Explorer's graphs JSON: a list of graphs, one per stage, id = the stage's name."""
    graphs = []
    for stage in capture.stages:
        nodes = [_me_node(n) for n in stage.nodes or []]
        if stage.error:  # Model Explorer shows attrs: the error becomes a lone node that carries it
            nodes = [{"id": "export_error", "label": "export failed", "namespace": "",
                      "attrs": [{"key": "error", "value": stage.error}], "incomingEdges": [], "outputsMetadata": []}]
        graphs.append({"id": stage.name, "nodes": nodes})
    return json.dumps(graphs, separators=(",", ":"))


def _me_node(n: Node) -> dict:
    attrs = [{"key": "kind", "value": n.kind}] + ([{"key": "moe_block", "value": n.block}] if n.block else [])
    attrs += [{"key": "args", "value": n.args}] if n.args else []
    return {"id": n.id, "label": n.label, "namespace": n.namespace, "attrs": attrs,
            "incomingEdges": [{"sourceNodeId": src, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)}
                              for i, src in enumerate(n.inputs)],
            "outputsMetadata": [{"id": "0", "attrs": [{"key": "shape", "value": n.shape}]}] if n.shape else []}


def to_text(capture: Capture) -> str:
    """Per stage: node counts, what the pass changed, then one line per node."""
    lines = [f"moecompile viz {capture.target}: {len(capture.stages)} stage(s)"]
    lines += [f"MoE block {b.name}: {'rewritten' if b.rewritten else 'not rewritten'}; {b.details}"
              for b in capture.blocks]
    for i, stage in enumerate(capture.stages):
        lines += ["", f"== stage {i}: {stage.name} =="]
        if stage.error:
            lines.append(stage.error)
            continue
        kinds = Counter(n.kind for n in stage.nodes)
        lines.append(f"{len(stage.nodes)} nodes: " + ", ".join(f"{k} {c}" for k, c in sorted(kinds.items())))
        lines += diff_lines(stage) if i else []
        lines += [f"  {n.id} = {n.label}({', '.join(n.inputs)}{'; ' + n.args if n.args else ''})"
                  f"{' : ' + n.shape if n.shape else ''}  [{n.namespace or '/'}]" for n in stage.nodes]
    lines.append("")
    for block, schedule in capture.schedules.items():
        lines += schedule_lines(block, schedule)
    if not capture.schedules:
        lines.append("no expert-parallel schedule (the model was not optimized with a device mesh)")
    lines += measured_lines(capture.measured) if capture.measured else []
    return "\n".join(lines) + "\n"


def diff_lines(stage: Stage) -> list[str]:
    if not stage.diff:
        return ["changed: nothing"]
    return [f"changed in {', '.join(groups)}: " + ", ".join(f"{d:+d} {label}" for label, d in ops.items())
            for groups, ops in same_changes(stage.diff)]


def to_dot(capture: Capture, stage: str | None = None) -> str:
    """One stage as a Graphviz digraph with a cluster per layer (module path up to its first index)."""
    chosen = pick_stage(capture, stage)
    if chosen.error:
        return f'digraph "{chosen.name}" {{ error [shape=box, label={_q(chosen.error[:300])}]; }}\n'
    clusters: dict[str, list[Node]] = {}
    for n in chosen.nodes:
        if n.kind not in ("parameter", "buffer", "constant"):  # weights would double the picture's size
            clusters.setdefault(_layer(n.namespace), []).append(n)
    shown = {n.id for group in clusters.values() for n in group}
    out = [f'digraph "{chosen.name}" {{', "  rankdir=TB; node [shape=box, fontsize=10, style=filled, "
           'fillcolor=white];']
    for i, (layer, nodes) in enumerate(clusters.items()):
        indent = "    " if layer else "  "
        if layer:
            out += [f"  subgraph cluster_{i} {{", f"    label={_q(layer)};"]
        for n in nodes:
            color = {"canonical": "plum", "comm": "lightskyblue"}.get(n.kind, "moccasin" if n.block else "white")
            out.append(f"{indent}{_q(n.id)} [label={_q(n.label + chr(10) + n.shape)}, fillcolor={color}];")
        out += ["  }"] if layer else []
    out += [f"  {_q(src)} -> {_q(n.id)};" for nodes in clusters.values() for n in nodes
            for src in n.inputs if src in shown]
    return "\n".join(out + ["}"]) + "\n"


def to_svg(capture: Capture, stage: str | None = None) -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizMissing("--format svg needs Graphviz's `dot` on PATH (install Graphviz), "
                              "or write --format dot / html instead")
    return subprocess.run([dot, "-Tsvg"], input=to_dot(capture, stage), capture_output=True, text=True,
                          check=True).stdout


def pick_stage(capture: Capture, name: str | None) -> Stage:
    """The stage called `name` (a pass name, "input", or its index); the last stage when None."""
    if name is None:
        return capture.stages[-1]
    for i, stage in enumerate(capture.stages):
        if name in (stage.name, str(i)):
            return stage
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in capture.stages)}")


def _layer(namespace: str) -> str:
    """'model/layers/3/mlp/gate' → 'model/layers/3': a cluster per layer keeps 32 layers readable."""
    m = re.match(r"(.*?/\d+)(/|$)", namespace)
    return m.group(1) if m else namespace.split("/")[0]


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid quoted dot ID
