"""Semantic MoE detection: read a recorded aten graph and lift it into a `MoESpec`.

Nothing here looks at class or attribute names for meaning; names are only used to *address* parameters
(and to group a ModuleList's per-expert parameters, `experts.3.w1.weight` ↔ `experts.{}.w1.weight`).
What makes a block an MoE is its dataflow:

    x ─ matmul(W_r) ─ [scoring] ─ select(top-k) ─┬─ indices ─ (tokens / weights gathered by expert) ─┐
                                                  └─ weights ─ [renorm, scale] ──────── × ─ Σ ─ out ←─┘
    routed matmuls: those that depend on *which* experts were chosen (the top-k indices); their
                    params are the experts'.
    dense matmuls:  those that do not (router, shared expert, shared-expert gate).

Group-limited routing is read by frontend/groups.py; a block that dispatches by products of a one-hot capacity
mask with the tokens (GShard, Switch's mask formulation, ST-MoE) by frontend/dispatch_mask.py (`_mask_spec`).

Anything the reading cannot place raises `Unsupported` with a reason that `explain()` shows. The spec is
then *validated numerically* against the original block before it is used (passes/lift_moe.py), so a
misreading can cost a rewrite but never a wrong result.
"""
from __future__ import annotations

import math
from operator import getitem

import torch
from torch import fx

from moecompile._lazy import nx
from moecompile.frontend.capture import SELECTIONS, Recording
from moecompile.frontend.dispatch_mask import (capacities_at, capacity_rule, is_first_choice_count, mask_products,
                                               read_aux, read_mask_dispatch, refuse_random_in_training)
from moecompile.frontend.experts import read_experts
from moecompile.frontend.graph import MATMULS, TRANSPOSES, Reader, Unsupported, matmul_operands, shape
from moecompile.frontend.groups import read_groups
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
    if mask_products(g, routed)[1]:  # tokens multiplied with a routing mask: the GShard family
        return _mask_spec(g, block, x, router_mm, router_name, sels, routed, dense)
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
    route = RouteSpec(E, top_k, scoring, renormalize, scale, **read_groups(g, route_nodes, sels, E))

    expert, weights = read_experts(g, routed, E, D)
    shared, (shared_gate, shared_gate_bias) = _shared(g, dense, block, D)
    outputs = _outputs(g, rec, x, router_mm, routed, weight_chain)
    return MoESpec(hidden=D, route=route, expert=expert, router=WeightRef(router_name),
                   weights=weights, router_bias=_bias_of(g, router_mm), score_bias=score_bias,
                   capacity=_capacity(g, sels, x, E), shared=shared, shared_gate=shared_gate,
                   shared_gate_bias=shared_gate_bias, outputs=outputs)


def _mask_spec(g: Reader, block, x, router_mm, router_name, sels, routed, dense) -> MoESpec:
    """A block that dispatches by a one-hot capacity mask (frontend/dispatch_mask.py) as a MoESpec."""
    D, E = shape(x)[-1], shape(router_mm)[-1]
    m = read_mask_dispatch(g, router_mm, sels, routed, E)
    refuse_random_in_training(g, block)
    route = RouteSpec(E, m.top_k, m.scoring, m.renormalize, later_above=m.later_above,
                      renormalize_kept=m.renormalize_kept)
    capacity, group = None, 0
    if m.capacity is not None:
        groups = _capacity_group(g, m.count, x, E)
        def per_group(s):  # tokens per capacity group of hidden states of shape s: what the rule reads
            return s[-2] if groups["group"] == "sequence" else groups.get("group_size") or math.prod(s[:-1])
        group = per_group(shape(x))
        factor, floor = capacity_rule(capacities_at(g, block, {group: m.capacity}, per_group, m.top_k, E), m.top_k, E)
        capacity = CapacitySpec(m.capacity, order="choice", factor=factor, min_capacity=floor, **groups)
    expert, weights = read_experts(g, m.experts, E, D)
    shared, (shared_gate, shared_gate_bias) = _shared(g, dense, block, D)
    names, aux = [], None
    for o in g.rec.outputs:
        if o is not None and shape(o) == shape(x) and any(g.depends(o, e) for e in m.experts):
            names.append("out")
        elif o is not None and shape(o) == () and g.depends(o, router_mm) and \
                not any(g.depends(o, e) for e in m.experts):
            names.append("aux")
            aux = read_aux(g, o, router_mm, m.first, m.tests, group)
        elif o is not None and is_first_choice_count(g, o, m.first, E):
            names.append("counts")
        else:
            raise Unsupported(f"block output {list(shape(o))} is not the MoE result, an auxiliary loss or the "
                              "count of tokens per first choice")
    if names.count("out") != 1 or names.count("aux") > 1:
        raise Unsupported("the block does not return one MoE result and at most one auxiliary loss")
    return MoESpec(hidden=D, route=route, expert=expert, router=WeightRef(router_name), weights=weights,
                   router_bias=_bias_of(g, router_mm), capacity=capacity, shared=shared, shared_gate=shared_gate,
                   shared_gate_bias=shared_gate_bias, outputs=tuple(names), aux=aux)


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
    raise Unsupported("the weights the experts' outputs are combined with could not be traced from the top-k: "
                      "neither its values nor the scores gathered at the chosen experts")


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
            raise Unsupported("a matrix product besides the router and the experts multiplies two computed tensors "
                              "(no weight), e.g. attention inside the block: it is not a shared expert")
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


COMPARED = {aten.le.Scalar: "count <= ...", aten.lt.Scalar: "count < ...", aten.le.Tensor: "count <= a tensor",
            aten.lt.Tensor: "count < a tensor", aten.ge.Scalar: "count >= ...", aten.gt.Scalar: "count > ...",
            aten.ge.Tensor: "count >= a tensor", aten.gt.Tensor: "count > a tensor"}
CAPACITY_TESTS = set(COMPARED)
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _capacity(g: Reader, sels, x, E: int) -> CapacitySpec | None:
    """Capacity: a running count of each expert's tokens (a cumsum of the one-hot choices over tokens)
    compared with a constant (Switch, GShard): an expert keeps the tokens whose count is within it. The
    count runs within capacity groups, read by `_capacity_group`. The constant is read as the capacity of
    every group of every call: the recording cannot show whether model code computed it from the shape of
    the call it was recorded on (Hugging Face Switch's `expert_capacity` is a config constant)."""
    for n in sorted(set().union(*(nx.descendants(g.dag, s) for s in sels)), key=g.order.get):
        if n.target is not aten.cumsum.default:
            continue
        tests = [u for u in n.users if u.target in CAPACITY_TESTS]
        s = shape(n)
        if not tests or not s or n.args[1] % len(s) == len(s) - 1:
            # without a comparison: group offsets (grouped-GEMM dispatch); along the last dim: a sum over
            # experts (or of 1-D counts), not a count of tokens
            continue
        test = tests[0]
        bound = test.args[1]
        if test.target not in (aten.le.Scalar, aten.lt.Scalar) or isinstance(bound, bool) or \
                not isinstance(bound, (int, float)):
            raise Unsupported(f"tokens are counted per expert and compared ({COMPARED[test.target]}) with "
                              "something other than a constant capacity (count <= C or count < C)")
        # count <= c keeps floor(c) tokens; count < c keeps ceil(c) - 1; at least none
        capacity = max(0, math.floor(bound) if test.target is aten.le.Scalar else math.ceil(bound) - 1)
        return CapacitySpec(capacity, **_capacity_group(g, n, x, E))
    return None


def _capacity_group(g: Reader, count, x, E: int) -> dict:
    """What one capacity group is (CapacitySpec.group): the tokens the count runs over, for any call.

    The count is a cumsum over one token dim of a [tokens..., E] tensor. Its token dims are the input's
    own, x [..., S, D] → [..., S] (Switch: the router applied to x itself, its logits [B, S, E]): counted
    along S, a group is each sequence, S = x.shape[-2] in every call. Flattened, [T]: all the tokens of a
    call. Regrouped by model code ([n, G] from a reshape): the sizes are recorded as the ints of this one
    call, so a G that equals a size of the input (its sequence length, say) may have been computed from it;
    only a reshape written with -1 for the number of groups and a size no input has reads as a fixed group
    of G tokens. aten's own regrouping, which restores a matmul's leading dims (linear or matmul on an N-d
    tensor: flatten, mm, `_unsafe_view` back), takes its sizes from the tensor and is not model code.
    Anything else is refused: assuming would bake this call's shape into every call."""
    src, dim = count.args[0], count.args[1]
    s, xs = shape(src), shape(x)[:-1]
    T = math.prod(xs)
    if T == 0:
        raise Unsupported("the block was recorded on no tokens: its capacity groups cannot be read")
    dim = dim % len(s) if s else dim
    lead = s[:-1]
    if len(s) < 2 or s[-1] != E or dim != len(s) - 2 or math.prod(lead) != T:
        raise Unsupported(f"tokens are counted per expert over dim {dim} of a {list(s)} tensor: a layout other "
                          f"than [tokens..., {E} experts] counted along its last token dim (input {list(shape(x))})")
    path = g.between(x, count)
    turned = sorted((n for n in path if n.target in TRANSPOSES), key=g.order.get)
    if turned:
        raise Unsupported("tokens are counted per expert after a transpose: capacity groups "
                          "that are not runs of consecutive tokens")
    if len(lead) == 1:
        return dict(group="call")
    splits = sorted((n for n in path if n.target in RESHAPES and len(_token_dims(shape(n), T) or ()) >= 2
                     and not _restores_leading_dims(n, T)), key=g.order.get)
    G = lead[-1]
    if not splits and lead == xs:
        return dict(group="sequence")
    what = (f"capacity groups of {G} tokens (tokens counted per expert in a {list(s)} tensor, hidden states "
            f"{list(shape(x))})")
    if not splits:
        raise Unsupported(f"{what}: the token dims do not come from the input's by any reshape understood")
    sizes = [list(n.args[1]) if len(n.args) > 1 else None for n in splits]
    if len(lead) != 2 or any(_token_dims(shape(n), T) != lead or sz is None or sz[:2] != [-1, G]
                             for n, sz in zip(splits, sizes)):
        last = splits[-1]
        linear = " (F.linear with a bias on [..., S, D] records this way too)" \
            if last.args[0].target is aten.addmm.default else ""
        raise Unsupported(f"{what}: the tokens are reshaped (to {sizes[-1]}){linear} with sizes recorded "
                          "as this call's numbers; whether a group is each sequence of the input, a fixed number of "
                          "tokens or a fixed number of groups cannot be told from one call")
    taken = set(xs) | {T} | {d for i in g.rec.inputs[1:] for d in shape(i)}
    if G in taken:
        raise Unsupported(f"{what}: the tokens are reshaped to [-1, {G}, ...] and {G} "
                          f"is also a size of the inputs (hidden states {list(shape(x))}): a fixed group of {G} tokens "
                          "and a group computed from the input's shape cannot be told apart from one call (an "
                          f"example input with another sequence length can tell them)")
    return dict(group="fixed", group_size=G)


def _token_dims(s: tuple, T: int) -> tuple | None:
    """The leading dims of a tensor of shape `s` that hold the T tokens (the longest prefix of product T),
    or None."""
    found, p = None, 1
    for i, d in enumerate(s):
        p *= d
        if p == T:
            found = tuple(s[:i + 1])
        elif p > T:
            break
    return found


def _restores_leading_dims(n, T: int) -> bool:
    """n is aten's `_unsafe_view` of a matmul's output back to the leading dims of the tensor the matmul
    flattened (linear and matmul on an N-d input): sizes aten took from that tensor, not model constants.
    (A user's reshape of a matmul's output records as `view`: it never produces `_unsafe_view` there.)"""
    m = n.args[0]
    if n.target is not aten._unsafe_view.default or not isinstance(m, fx.Node) or m.target not in MATMULS:
        return False
    for a in matmul_operands(m)[:2]:
        if isinstance(a, fx.Node) and a.target in RESHAPES and isinstance(a.args[0], fx.Node) and \
                len(_token_dims(shape(a), T) or ()) == 1 and \
                _token_dims(shape(a.args[0]), T) == _token_dims(shape(n), T):
            return True
    return False


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
