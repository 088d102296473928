"""Semantic MoE detection: read a recorded aten graph and lift it into a `MoESpec`.

Nothing here looks at class or attribute names for meaning; names are only used to *address* parameters
(and to group a ModuleList's per-expert parameters, `experts.3.w1.weight` ↔ `experts.{}.w1.weight`).
What makes a block an MoE is its dataflow:

    x ─ matmul(W_r) ─ [scoring] ─ select(top-k) ─┬─ indices ─ (tokens / weights gathered by expert) ─┐
                                                  └─ weights ─ [renorm, scale] ──────── × ─ Σ ─ out ←─┘
    routed matmuls: those that depend on *which* experts were chosen (the top-k indices); their
                    params are the experts'.
    dense matmuls:  those that do not (router, shared expert, shared-expert gate).

Anything the reading cannot place raises `Unsupported` with a reason that `explain()` shows. The spec is
then *validated numerically* against the original block before it is used (passes/lift_moe.py), so a
misreading can cost a rewrite but never a wrong result.
"""
from __future__ import annotations

from operator import getitem

import networkx as nx
import torch
from torch import fx

from moecompile.frontend.capture import SELECTIONS, Recording
from moecompile.frontend.experts import read_experts
from moecompile.frontend.graph import MATMULS, Reader, Unsupported, matmul_operands, shape
from moecompile.ir.spec import CapacitySpec, MoESpec, RouteSpec, WeightRef

aten = torch.ops.aten

def analyze(rec: Recording, block: torch.nn.Module) -> MoESpec:
    if not rec.inputs:
        raise Unsupported("the block takes no tensor input")
    params = {name for name, _ in block.named_parameters()} | {name for name, _ in block.named_buffers()}
    g = Reader(rec, params)
    x = rec.inputs[0]
    D = shape(x)[-1]

    sel, router_mm, router_name = _find_selection(g, D)
    E = shape(sel.args[0])[-1]
    # all selections over the same expert scores (Switch takes argmax for indices and max for values)
    sels = [n for n in rec.graph.nodes if n.op == "call_function" and n.target in SELECTIONS
            and shape(n.args[0])[-1:] == (E,) and g.depends(n, router_mm)]
    top_k = max(n.args[1] if n.target is aten.topk.default else 1 for n in sels)
    route_nodes = set().union(*(g.between(router_mm, n) for n in sels))
    matmuls = [n for n in rec.graph.nodes if n.op == "call_function" and n.target in MATMULS]
    # experts are the matmuls that depend on *which* experts were chosen (a top-k's values alone are not routing)
    chosen = [n for n in sels if n.target is aten.argmax.default] + \
        [u for n in sels for u in n.users if u.target is getitem and u.args[1] == 1]
    routed = [m for m in matmuls if any(g.depends(m, n) for n in chosen)]
    dense = [m for m in matmuls if m not in routed and m is not router_mm]
    if not routed:
        raise Unsupported("a router and a top-k were found, but no expert matmul uses the selection", stage=1)
    targets = {n.target for n in route_nodes}
    scoring = "softmax" if targets & {aten._softmax.default, aten.softmax.int} else \
        "sigmoid" if aten.sigmoid.default in targets else None

    weights_root = _weights_root(g, sels)
    weight_chain = nx.descendants(g.dag, weights_root) - set().union(*(nx.descendants(g.dag, m) | {m} for m in routed))
    weight_chain.add(weights_root)
    renormalize = _renormalizes(weight_chain)
    if scoring is None:  # top-k on raw logits, scored afterwards
        after = {n.target for n in weight_chain}
        if after & {aten._softmax.default, aten.softmax.int}:  # softmax over the chosen k: softmax + renorm
            scoring, renormalize = "softmax", True
        elif aten.sigmoid.default in after:  # sigmoid is monotonic: top-k of logits = top-k of scores
            scoring = "sigmoid"
        else:
            raise Unsupported("routing weights are neither softmax nor sigmoid scores")
    scale = 1.0
    for n in weight_chain:
        if n.target in (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar) and \
                isinstance(n.args[1], (int, float)):
            scale *= float(n.args[1])

    score_bias = _score_bias(g, route_nodes, E)
    n_group, topk_group, group_score = _groups(g, route_nodes, sels, E)
    route = RouteSpec(E, top_k, scoring, renormalize, scale, n_group, topk_group, group_score)

    expert, weights = read_experts(g, routed, E, D)
    shared, (shared_gate, shared_gate_bias) = _shared(g, dense, block, D)
    outputs = _outputs(g, rec, x, router_mm, routed, weight_chain)
    return MoESpec(hidden=D, route=route, expert=expert, router=WeightRef(router_name),
                   weights=weights, router_bias=_bias_of(g, router_mm), score_bias=score_bias,
                   capacity=_capacity(g, sels), shared=shared, shared_gate=shared_gate,
                   shared_gate_bias=shared_gate_bias, outputs=outputs)


def _find_selection(g: Reader, D: int):
    """The last top-k-like op whose scores come from a matmul of the input with an [E, D] parameter."""
    for sel in sorted((n for n in g.rec.graph.nodes if n.op == "call_function" and n.target in SELECTIONS),
                      key=g.order.get, reverse=True):
        E = shape(sel.args[0])[-1] if shape(sel.args[0]) else 0
        for mm in sorted(nx.ancestors(g.dag, sel), key=g.order.get, reverse=True):
            if mm.op != "call_function" or mm.target not in MATMULS:
                continue
            act, w, _ = matmul_operands(mm)
            name, _ = g.source_param(w)
            if name and E in shape(w) and D in shape(w) and g.depends(act, g.rec.inputs[0]):
                return sel, mm, name
    raise Unsupported("no router: no top-k over a linear map of the input to expert logits", stage=0)


def _weights_root(g: Reader, sels):
    """Top-k values, or scores gathered at the top-k indices (DeepSeek-V3 style)."""
    for sel in reversed(sels):
        for u in sel.users:
            if u.target is getitem and u.args[1] == 1:
                gathers = [v for v in u.users if v.target is aten.gather.default]
                if gathers:
                    return gathers[0]
        values = [u for u in sel.users if u.target is getitem and u.args[1] == 0 and u.users]
        if values:
            return values[0]
    raise Unsupported("the routing weights could not be traced from the top-k")


DENOMINATOR_GUARDS = {aten.add.Tensor, aten.add.Scalar, aten.clamp.default, aten.clamp_min.default}


def _renormalizes(chain) -> bool:
    for n in chain:
        if n.target in (aten.div.Tensor, aten.div_.Tensor) and isinstance(n.args[1], fx.Node):
            den = n.args[1]
            while den.target in DENOMINATOR_GUARDS and isinstance(den.args[0], fx.Node):
                den = den.args[0]  # sum + eps, or sum clamped away from zero (Ernie 4.5)
            if den.target in (aten.sum.dim_IntList, aten.sum.default) and den.args[0] in chain:
                return True
    return False


def _score_bias(g: Reader, route_nodes, E: int) -> WeightRef | None:
    for n in route_nodes:
        if n.target in (aten.add.Tensor, aten.add_.Tensor):
            for a in n.args:
                name, _ = g.source_param(a)
                if name and shape(a)[-1:] == (E,):
                    return WeightRef(name)
    return None


def _groups(g: Reader, route_nodes, sels, E: int):
    """Group-limited selection: scores viewed [T, G, E/G], groups scored, the best `topk_group` kept."""
    for n in route_nodes:
        s = shape(n)
        if n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and \
                len(s) == 3 and s[1] * s[2] == E and 1 < s[1] < E:
            G = s[1]
            group_sel = [m for m in route_nodes if m.target in SELECTIONS and m not in sels
                         and shape(m.args[0]) == (s[0], G)]
            if not group_sel:
                raise Unsupported(f"scores are viewed as {G} expert groups but no group selection was found")
            k_group = group_sel[0].args[1] if group_sel[0].target is aten.topk.default else 1
            top2 = any(m.target is aten.topk.default and m.args[1] == 2 and m.args[0] is not None
                       and shape(m.args[0])[-1:] == (E // G,) for m in route_nodes)
            return G, k_group, "top2sum" if top2 else "max"
    return 1, 1, "max"


def _bias_of(g: Reader, mm) -> WeightRef | None:
    _, _, bias = matmul_operands(mm)
    name, _ = g.source_param(bias) if bias is not None else (None, [])
    return WeightRef(name) if name else None


def _shared(g: Reader, dense, block, D: int):
    """Dense matmuls besides the router: a shared expert (one submodule) and its optional sigmoid gate."""
    gate, rest = None, []
    for m in dense:
        act, w, _ = matmul_operands(m)
        name, chain = g.source_param(w)
        if name is None:
            raise Unsupported(f"dense matmul {m.name} has no parameter operand")
        if 1 in shape(w) and any(u.target is aten.sigmoid.default for u in g.users_through_passthrough(m)):
            gate = (WeightRef(name, (), g.param_shape(name) != (1, D)), _bias_of(g, m))
        else:
            rest.append(name)
    if not rest:
        if gate is not None:
            raise Unsupported("a sigmoid gate was found without a shared expert")
        return None, (None, None)
    prefix = _common_module(rest)
    owned = {n for n, _ in block.get_submodule(prefix).named_parameters(prefix=prefix)} if prefix else set()
    if not prefix or not set(rest) <= owned:
        raise Unsupported(f"dense computation besides the router ({', '.join(rest)}) is not one submodule")
    return prefix, gate or (None, None)


def _common_module(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _capacity(g: Reader, sels) -> CapacitySpec | None:
    """Capacity: a cumulative count of tokens per expert compared with a constant (Switch, GShard)."""
    for n in sorted(set().union(*(nx.descendants(g.dag, s) for s in sels)), key=g.order.get):
        if n.target is aten.cumsum.default:
            for u in n.users:
                if u.target in (aten.le.Scalar, aten.lt.Scalar) and isinstance(u.args[1], (int, float)):
                    cap = int(u.args[1]) - (1 if u.target is aten.lt.Scalar else 0)
                    s, dim = shape(n), n.args[1]
                    group = s[dim] if len(s) == 3 else 0
                    return CapacitySpec(cap, group)
    return None  # a cumsum without a comparison is just group offsets (grouped-GEMM dispatch)


def _outputs(g: Reader, rec: Recording, x, router_mm, routed, weight_chain) -> tuple[str, ...]:
    """What each block output is: "out" (the MoE result), "logits" [T, E] or "weights" [T, k]."""
    names = []
    for o in rec.outputs:
        if o is None:
            raise Unsupported("the block returns something other than tensors")
        if shape(o) == shape(x) and any(g.depends(o, m) for m in routed):
            names.append("out")
        elif o in weight_chain and len(shape(o)) == 2:
            names.append("weights")
        elif g.depends(o, router_mm) and not any(g.depends(o, m) for m in routed) and \
                shape(o)[-1:] == shape(router_mm)[-1:] and len(shape(o)) == 2:
            names.append("logits")
        else:
            raise Unsupported(f"block output {shape(o)} is not the MoE result, router logits or weights")
    if names.count("out") != 1:
        raise Unsupported("the block does not return exactly one MoE result")
    return tuple(names)
