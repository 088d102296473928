"""Semantic MoE detection: read a recorded aten graph and lift it into a `MoESpec`.

Nothing here looks at class or attribute names for meaning; names are only used to *address* parameters
(and to group a ModuleList's per-expert parameters, `experts.3.w1.weight` ↔ `experts.{}.w1.weight`).
What makes a block an MoE is its dataflow:

    x ─ matmul(W_r) ─ [scoring] ─ select(top-k) ─┬─ indices ─ (tokens / weights gathered by expert) ─┐
                                                  └─ weights ─ [renorm, scale] ──────── × ─ Σ ─ out ←─┘
    routed matmuls: those that depend on the selection; their params are the experts'.
    dense matmuls:  those that do not (router, shared expert, shared-expert gate).

Anything the reading cannot place raises `Unsupported` with a reason that `explain()` shows. The spec is
then *validated numerically* against the original block before it is used (passes/lift_moe.py), so a
misreading can cost a rewrite but never a wrong result.
"""
from __future__ import annotations

import re
from operator import getitem

import networkx as nx
import torch
from torch import fx

from moecompile.frontend.capture import SELECTIONS, Recording
from moecompile.ir.spec import CapacitySpec, ExpertSpec, ExpertWeights, MoESpec, RouteSpec, WeightRef

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._grouped_mm.default}
# ops that change how a tensor is viewed or typed, never its values
PASSTHROUGH = {aten.t.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
               aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
               aten.squeeze.default, aten.expand.default, aten.clone.default, aten.contiguous.default,
               aten._to_copy.default, aten.alias.default, aten.detach.default, aten.select.int,
               aten.slice.Tensor, aten.index.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
               aten.chunk.default, aten.unbind.int, aten.lift_fresh.default, getitem}
TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}


class Unsupported(Exception):
    """The block was understood as far as the message says, and no further.

    `stage` says how far: 0 no router (not an MoE at all), 1 a router but no experts, 2 experts found but
    not understood, 3 understood but failed translation validation."""

    def __init__(self, message: str, stage: int = 2):
        super().__init__(message)
        self.stage = stage


def shape(n) -> tuple:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


class Reader:
    """Graph queries shared by the steps of `analyze`."""

    def __init__(self, rec: Recording, param_names: set[str]):
        self.rec, self.names = rec, param_names
        self.dag = nx.DiGraph()
        for n in rec.graph.nodes:
            self.dag.add_node(n)
            for a in n.all_input_nodes:
                self.dag.add_edge(a, n)
        self.order = {n: i for i, n in enumerate(rec.graph.nodes)}

    def source_param(self, n) -> tuple[str | None, list[fx.Node]]:
        """Follow view-like ops back to a parameter: (name, chain of nodes from the param to n)."""
        chain = []
        while isinstance(n, fx.Node):
            chain.append(n)
            if n in self.rec.params:
                return self.rec.params[n], chain[::-1]
            if n.op != "call_function" or n.target not in PASSTHROUGH:
                return None, []
            n = n.args[0]
        return None, []

    def param_shape(self, name: str) -> tuple:
        return next(shape(n) for n, pname in self.rec.params.items() if pname == name)

    def depends(self, n, on) -> bool:
        return n is on or nx.has_path(self.dag, on, n)

    def between(self, src, dst) -> set[fx.Node]:
        return (nx.descendants(self.dag, src) & nx.ancestors(self.dag, dst)) | {src, dst}

    def users_through_passthrough(self, n) -> list[fx.Node]:
        """n's consumers, looking through view-like ops."""
        out = []
        for u in n.users:
            if u.op == "call_function" and u.target in PASSTHROUGH and u.target is not aten.index.Tensor:
                out.extend(self.users_through_passthrough(u))
            else:
                out.append(u)
        return out


def matmul_operands(n) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(activation-side, weight-side, bias) candidates of a matmul node, in call order."""
    if n.target in (aten.addmm.default, aten.baddbmm.default):
        return n.args[1], n.args[2], n.args[0]
    return n.args[0], n.args[1], None


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
    notes = []

    weights_root = _weights_root(g, sels)
    weight_chain = nx.descendants(g.dag, weights_root) - set().union(*(nx.descendants(g.dag, m) | {m} for m in routed))
    weight_chain.add(weights_root)
    renormalize = _renormalizes(weight_chain)
    if scoring is None:  # top-k on raw logits, softmax over the chosen k: same as softmax + renormalize
        if not {n.target for n in weight_chain} & {aten._softmax.default, aten.softmax.int}:
            raise Unsupported("routing weights are neither softmax nor sigmoid scores")
        scoring, renormalize = "softmax", True
    scale = 1.0
    for n in weight_chain:
        if n.target in (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar) and \
                isinstance(n.args[1], (int, float)):
            scale *= float(n.args[1])

    score_bias = _score_bias(g, route_nodes, E)
    n_group, topk_group, group_score = _groups(g, route_nodes, sels, E)
    route = RouteSpec(E, top_k, scoring, renormalize, scale, n_group, topk_group, group_score)

    expert, weights = _experts(g, routed, router_mm, x, E, D)
    shared, (shared_gate, shared_gate_bias) = _shared(g, dense, block, D)
    outputs = _outputs(g, rec, x, router_mm, routed, weight_chain)
    return MoESpec(hidden=D, route=route, expert=expert, router=WeightRef(router_name),
                   weights=weights, router_bias=_bias_of(g, router_mm), score_bias=score_bias,
                   capacity=_capacity(g, sels), shared=shared, shared_gate=shared_gate,
                   shared_gate_bias=shared_gate_bias,
                   outputs=outputs, notes=notes)


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


def _renormalizes(chain) -> bool:
    for n in chain:
        if n.target in (aten.div.Tensor, aten.div_.Tensor) and isinstance(n.args[1], fx.Node):
            den = n.args[1]
            while den.target in (aten.add.Tensor, aten.add.Scalar) and isinstance(den.args[0], fx.Node):
                den = den.args[0]  # sum + eps
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
    name, chain = g.source_param(bias) if bias is not None else (None, [])
    return _ref(name, chain) if name else None


def _ref(name: str, chain, transpose: bool = False) -> WeightRef:
    """WeightRef for a parameter reached through `chain`, keeping only integer selects (expert index)."""
    index = tuple(n.args[2] for n in chain if n.target is aten.select.int and n.args[1] == 0)
    return WeightRef(name, index, transpose)


def _experts(g: Reader, routed, router_mm, x, E: int, D: int) -> tuple[ExpertSpec, ExpertWeights]:
    """Roles of the routed matmuls: first layer (reads tokens) and second layer (reads the activation)."""
    info = []
    for m in routed:
        act, w, bias = matmul_operands(m)
        name, chain = g.source_param(w)
        if name is None:
            act, w = w, act
            name, chain = g.source_param(w)
        if name is None:
            raise Unsupported(f"routed matmul {m.name} has no parameter operand")
        info.append((m, act, name, chain, bias))
    firsts = [i for i in info if not any(g.depends(i[1], o[0]) for o in info if o is not i)]
    seconds = [i for i in info if i not in firsts]
    if not seconds:
        raise Unsupported("experts have a single linear layer; expected an FFN of two")
    # one expert instance: its second-layer matmul and the first-layer matmuls feeding it
    m2 = seconds[0]
    feeding = [i for i in firsts if g.depends(m2[1], i[0])]
    if len(feeding) not in (1, 2):
        raise Unsupported(f"an expert's second layer reads {len(feeding)} first-layer matmuls")
    body = set().union(*(g.between(i[0], m2[0]) for i in feeding))
    activation, alpha, limit = _activation(body, feeding, m2[0])
    gate, up = _gate_and_up(g, feeding, activation, body, m2[0])
    refs = {"w1": _expert_refs(g, gate, E, D, first=True), "w2": _expert_refs(g, m2, E, D, first=False)}
    if up is not None:
        refs["w3"] = _expert_refs(g, up, E, D, first=True)
    for key, part in (("b1", gate), ("b2", m2), ("b3", up)):
        if part is not None:
            b = _expert_bias(g, part, E)
            if b is not None:
                refs[key] = b
    has_bias = "b1" in refs
    if has_bias != ("b2" in refs):
        raise Unsupported("experts have a bias on one layer only")
    return ExpertSpec(activation, has_bias, alpha, limit), ExpertWeights(**refs)


def _activation(body, feeding, m2):
    targets = {n.target for n in body}
    gated = any(n.target in (aten.mul.Tensor,) and all(isinstance(a, fx.Node) for a in n.args[:2])
                and all(any(nx_dep(a, f[0]) for f in feeding) for a in n.args[:2]) for n in body) \
        and (len(feeding) == 2 or _is_split(feeding[0][0], body))
    if targets & {aten.clamp.default, aten.clamp_max.default, aten.clamp_min.default} and aten.sigmoid.default in targets:
        alpha = next((float(n.args[1]) for n in body if n.target in (aten.mul.Tensor, aten.mul.Scalar)
                      and isinstance(n.args[1], (int, float))), 1.702)
        limit = next((float(n.args[2] if n.target is aten.clamp.default else n.args[1]) for n in body
                      if n.target in (aten.clamp.default, aten.clamp_max.default)
                      and isinstance((n.args[2] if n.target is aten.clamp.default and len(n.args) > 2 else n.args[-1]), (int, float))), 7.0)
        return "clamped_swiglu", alpha, limit
    gelu = next((n for n in body if n.target is aten.gelu.default), None)
    if gelu is not None:
        tanh = gelu.kwargs.get("approximate", "none") == "tanh"
        return ("geglu" if gated else "gelu_tanh" if tanh else "gelu"), 1.702, 7.0
    if targets & {aten.silu.default} or aten.sigmoid.default in targets:
        return ("swiglu" if gated else "silu"), 1.702, 7.0
    if aten.relu.default in targets:
        return "relu", 1.702, 7.0
    raise Unsupported(f"unrecognized expert activation among {sorted(str(t) for t in targets)}")


def nx_dep(a, root) -> bool:
    """Does node a depend on root? (plain FX walk, for small subgraphs)"""
    seen, todo = set(), [a]
    while todo:
        n = todo.pop()
        if n is root:
            return True
        if isinstance(n, fx.Node) and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor}


def _split_base(mm):
    """The node a fused projection is split from: the matmul, or its in-place/out-of-place bias add."""
    adds = [u for u in mm.users if u.target in (aten.add.Tensor, aten.add_.Tensor)]
    return adds[0] if len(mm.users) == 1 and adds else mm


def _is_split(mm, body) -> bool:
    return any(u.target in SPLITS for u in _split_base(mm).users if u in body)


NONLINEAR = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default}


def _gate_and_up(g: Reader, feeding, activation, body, m2):
    """Which first-layer output goes through the nonlinearity (gate) and which multiplies it (up).

    A fused [2F, D] weight becomes two WeightRefs with row ranges (chunk/split) or strides (slice)."""
    nonlin = [n for n in body if n.target in NONLINEAR]
    if activation not in ("swiglu", "geglu", "clamped_swiglu"):
        return feeding[0], None
    if len(feeding) == 2:
        a, b = feeding
        a_gate = any(nx_dep(n, a[0]) for n in nonlin)
        return (a, b) if a_gate else (b, a)
    m, act, name, chain, bias = feeding[0]
    parts = []
    for u in _split_base(m).users:
        if u.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            size = shape(m)[-1] // 2
            for item in u.users:
                start = item.args[1] * size
                parts.append((item, slice(start, start + size)))
        elif u.target is aten.slice.Tensor:
            start, end = u.args[2] if len(u.args) > 2 else 0, u.args[3] if len(u.args) > 3 else None
            step = u.args[4] if len(u.args) > 4 else 1
            parts.append((u, slice(start, None if end is None or end >= 2 ** 62 else end, step)))
    if len(parts) != 2:
        raise Unsupported("fused gate/up projection is split in a way that is not understood")
    gate_part = next((p for p in parts if any(nx_dep(n, p[0]) for n in nonlin)), None)
    if gate_part is None:
        raise Unsupported("cannot tell the gate half from the up half of the fused projection")
    up_part = parts[1] if gate_part is parts[0] else parts[0]
    return (m, act, name, chain, bias, gate_part[1]), (m, act, name, chain, bias, up_part[1])


def _expert_refs(g: Reader, info, E: int, D: int, first: bool) -> list[WeightRef]:
    """Per-expert [out, in] views of a routed matmul's weight, from a stacked tensor or a ModuleList."""
    m, act, name, chain, bias, *part = info
    val = next(n.meta["val"] for n, pname in g.rec.params.items() if pname == name)
    template = _per_expert_template(name, g.names, E)
    if template is not None:
        names, per = [template.format(i) for i in range(E)], tuple(val.shape)
        index_of = lambda e: ()  # noqa: E731
    elif val.dim() == 3 and val.shape[0] == E:
        names, per = [name] * E, tuple(val.shape[1:])
        index_of = lambda e: (e,)  # noqa: E731
    else:
        raise Unsupported(f"expert weight {name} {tuple(val.shape)} is neither per-expert nor stacked [E, ...]")
    if len(per) != 2:
        raise Unsupported(f"expert weight {name} has per-expert shape {per}")
    transpose = _is_in_out_layout(per, chain, D, first, g)
    rows = part[0] if part else None
    refs = []
    for e, n in enumerate(names):
        index = index_of(e)
        if rows is not None:
            index = index + ((rows,) if not transpose else (slice(None), rows))
        refs.append(WeightRef(n, index, transpose))
    return refs


def _is_in_out_layout(per, chain, D, first, g) -> bool:
    """True when the weight is stored [in, out] (x @ W), False for nn.Linear's [out, in]."""
    a, b = per
    if first:
        if b == D and a != D:
            return False
        if a == D and b != D:
            return True
    else:
        if a == D and b != D:
            return False
        if b == D and a != D:
            return True
    flips = sum(1 for n in chain if n.target in TRANSPOSES)
    return flips % 2 == 0


def _per_expert_template(name: str, names: set[str], E: int) -> str | None:
    """'experts.3.fc.weight' → 'experts.{}.fc.weight' when all E siblings exist (also 'expert_3')."""
    for m in re.finditer(r"\d+", name):
        template = name[:m.start()] + "{}" + name[m.end():]
        if all(template.format(i) in names for i in range(E)):
            return template
    return None


def _expert_bias(g: Reader, info, E: int) -> list[WeightRef] | None:
    m, act, name, chain, bias, *part = info
    if bias is None:
        adds = [u for u in m.users if u.target in (aten.add.Tensor, aten.add_.Tensor)]
        bias = next((a for u in adds for a in u.args if isinstance(a, fx.Node) and a is not m
                     and g.source_param(a)[0]), None)
    if bias is None:
        return None
    bname, _ = g.source_param(bias)
    val = next(n.meta["val"] for n in g.rec.params if g.rec.params[n] == bname)
    template = _per_expert_template(bname, g.names, E)
    rows = part[0] if part else None
    if template is not None:
        return [WeightRef(template.format(e), (rows,) if rows else ()) for e in range(E)]
    if val.dim() == 2 and val.shape[0] == E:
        return [WeightRef(bname, (e, rows) if rows else (e,)) for e in range(E)]
    raise Unsupported(f"expert bias {bname} {tuple(val.shape)} is neither per-expert nor stacked")


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
