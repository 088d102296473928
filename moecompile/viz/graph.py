"""The graph after each pass of the default pipeline, as plain data for the views (formats.py, html.py).

Contract:  capture(target) runs `moecompile.optimize` once with the default pipeline plus a snapshot after
           every pass, each snapshot a `torch.export.export(model, example_inputs, strict=False)` of the model
           as that pass left it. Stage 0 ("input") is the model before any pass. A stage whose export fails
           keeps the error text instead of nodes. A .pt2 target is one stage, its saved graph.
Why snapshots and not one optimize() per prefix of the pipeline: passes run once (validate alone costs
seconds), and the graph after pass i is the same either way, since passes run in order on one model.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

import moecompile
from moecompile.passes.registry import PASSES, PIPELINES, register_pass
from moecompile.passes.schedule_overlap import Schedule
from moecompile.report import Report
from moecompile.viz.measure import Measured
from moecompile.viz.targets import Target

SNAPSHOT = "viz:snapshot"
OUTSIDE = "outside MoE blocks"  # the diff's group for nodes in no MoE block


@dataclass
class Node:
    id: str            # the FX node name, unique within its graph
    label: str         # op name ("aten.linear", "moecompile.route") or input / parameter / buffer / constant / output
    namespace: str     # module path joined by "/" ("model/layers/0/mlp"); "" is the model itself
    inputs: list[str]  # ids of the nodes this one reads, in argument order
    shape: str         # output shape(s), e.g. "[2, 16, 32]"
    kind: str          # "canonical" (a moecompile op), "comm" (all-to-all / wait), "op", or the placeholder label
    args: str = ""     # the non-tensor arguments, e.g. a canonical op's kernel backend
    block: str | None = None  # the MoE block (module name, dotted) the node lies in: assign_blocks


@dataclass
class Stage:
    name: str                       # "input", or the pass after which the graph was taken
    nodes: list[Node] | None        # None when export failed
    error: str | None = None
    diff: dict[str, dict[str, int]] = field(default_factory=dict)  # group → op label → nodes added (−: removed)


@dataclass
class MoEBlock:
    name: str          # module name in the model, dotted
    rewritten: bool
    details: str       # explain()'s details, or why the block was not rewritten


@dataclass
class Capture:
    target: str
    stages: list[Stage]
    blocks: list[MoEBlock]
    schedules: dict[str, Schedule]  # block name → its expert-parallel schedule (only under a mesh)
    report: Report | None           # None for a .pt2 file
    measured: Measured | None = None  # a measured expert-parallel run (viz --ranks): its ranks' timelines


def capture(target: Target) -> Capture:
    """The stages of `target`: every pass of the default pipeline, or the saved graph of a .pt2 file."""
    if target.exported is not None:
        nodes = graph_nodes(target.exported)
        # a saved program has no report: its MoE blocks are the modules that call moecompile.route
        names = list(dict.fromkeys(n.namespace.replace("/", ".") for n in nodes if n.label == "moecompile.route"))
        assign_blocks(nodes, names)
        blocks = [MoEBlock(name, True, "found by its moecompile.route op") for name in names]
        return Capture(target.name, [Stage("exported", nodes)], blocks, {}, None)
    snapshots: list[list[Node] | str] = []  # a stage's nodes, or why it has none
    passes = PIPELINES["default"]
    register_pass(SNAPSHOT)(lambda ctx: snapshots.append(_snapshot(ctx.model, ctx.args, ctx.kwargs)))
    PIPELINES["viz:stages"] = [SNAPSHOT] + [step for name in passes for step in (name, SNAPSHOT)]
    try:
        fast = moecompile.optimize(target.model, target.example_inputs, pipeline="viz:stages")
    finally:  # the registry is global: leave it as it was
        del PIPELINES["viz:stages"], PASSES[SNAPSHOT]
    report = moecompile.explain(fast)
    report.passes = [name for name in report.passes if name != SNAPSHOT]
    blocks = [MoEBlock(m.name, m.rewritten, m.reason or m.details) for m in report.moe_layers]
    stages = [Stage(name, None, error=nodes) if isinstance(nodes, str) else
              Stage(name, assign_blocks(nodes, [b.name for b in blocks]))
              for name, nodes in zip(["input", *passes], snapshots)]
    for before, after in zip(stages, stages[1:]):
        after.diff = diff(before.nodes, after.nodes)
    schedules = {m.name: m.spec.parallel.schedule for m in report.moe_layers
                 if m.spec is not None and m.spec.parallel is not None and m.spec.parallel.schedule is not None}
    return Capture(target.name, stages, blocks, schedules, report)


def _snapshot(model, args, kwargs) -> list[Node] | str:
    try:
        program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # shown in place of this stage's graph
        return f"torch.export failed: {type(e).__name__}: {e}"[:3000]
    return graph_nodes(program)


def graph_nodes(program: torch.export.ExportedProgram) -> list[Node]:
    """The program's nodes; parameters and buffers are placed in the module that owns them."""
    sig = program.graph_signature
    owners = {**{k: ("parameter", v) for k, v in sig.inputs_to_parameters.items()},
              **{k: ("buffer", v) for k, v in sig.inputs_to_buffers.items()},
              **{k: ("constant", v) for k, v in sig.inputs_to_lifted_tensor_constants.items()}}
    nodes = []
    for n in program.graph.nodes:
        args = ""
        if n.op == "placeholder":
            label, owner = owners.get(n.name, ("input", ""))
            namespace, kind = owner.rpartition(".")[0].replace(".", "/"), label
        elif n.op == "output":
            label, namespace, kind = "output", "", "output"
        else:
            label = _op_name(n.target)
            stack = n.meta.get("nn_module_stack") or {}
            namespace = list(stack.values())[-1][0].replace(".", "/") if stack else ""
            kind = ("canonical" if label.startswith("moecompile.") else
                    "comm" if "all_to_all" in label or "wait" in label else "op")
            args = ", ".join(_arg_text(a) for a in n.args if not isinstance(a, torch.fx.Node))[:160]
        nodes.append(Node(n.name, label, namespace, [i.name for i in n.all_input_nodes],
                          _shape(n.meta.get("val")), kind, args))
    return nodes


def assign_blocks(nodes: list[Node], blocks: list[str]) -> list[Node]:
    """Set each node's `block`: the MoE block (dotted module name) its namespace lies in, if any."""
    paths = [(b, b.replace(".", "/")) for b in blocks]
    for n in nodes:
        n.block = next((b for b, path in paths if n.namespace == path or n.namespace.startswith(path + "/")), None)
    return nodes


def diff(before: list[Node] | None, after: list[Node] | None) -> dict[str, dict[str, int]]:
    """Op counts added (positive) and removed (negative) per MoE block and for the rest of the model; groups
    in graph order, in each the ops added first (moecompile's first), then those removed."""
    if before is None or after is None:
        return {}
    delta = Counter((n.block or OUTSIDE, n.label) for n in after)
    delta.subtract(Counter((n.block or OUTSIDE, n.label) for n in before))
    order = {g: i for i, g in enumerate(dict.fromkeys(n.block or OUTSIDE for n in after + before))}
    changes: dict[str, dict[str, int]] = {}
    for (group, label), d in sorted(delta.items(), key=lambda kv: (order[kv[0][0]], kv[1] < 0,
                                                                   not kv[0][1].startswith("moecompile."), kv[0][1])):
        if d:
            changes.setdefault(group, {})[label] = d
    return changes


def same_changes(changes: dict[str, dict[str, int]]) -> list[tuple[list[str], dict[str, int]]]:
    """Groups whose changes are identical, together: 16 MoE layers rewritten alike read as one entry."""
    merged: dict[tuple, tuple[list[str], dict[str, int]]] = {}
    for group, ops in changes.items():
        merged.setdefault(tuple(ops.items()), ([], ops))[0].append(group)
    return list(merged.values())


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        namespace, op, overload = str(target).split(".")
        return f"{namespace}.{op}" if overload == "default" else f"{namespace}.{op}.{overload}"
    return getattr(target, "__name__", str(target))


def _shape(val) -> str:
    if isinstance(val, torch.Tensor):
        return str(list(val.shape))
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in val) + ")"
    return "" if val is None else str(val)


def _arg_text(a) -> str:
    if isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
        return "[…]"  # a list of tensors: its members are inputs already
    return str(a)
