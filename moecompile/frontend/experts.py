"""Reading the experts' FFN from the routed matmuls: layers, activation, gate/up halves, weight layout.

One expert instance is enough to read the structure (its second-layer matmul and the first-layer matmuls
feeding it); the parameters are then addressed for all E experts, either as one stacked `[E, ...]`
parameter or as E per-expert parameters found by name pattern (`experts.{}.w1.weight`).
"""
from __future__ import annotations

import re
from operator import getitem

import torch
from torch import fx

from moecompile.frontend.graph import TRANSPOSES, Reader, Unsupported, matmul_operands, shape
from moecompile.ir.spec import GATED_ACTIVATIONS, ExpertSpec, ExpertWeights, WeightRef

aten = torch.ops.aten


def read_experts(g: Reader, routed, E: int, D: int) -> tuple[ExpertSpec, ExpertWeights]:
    """Roles of the routed matmuls: first layer (reads tokens) and second layer (reads the activation)."""
    info = []
    for m in routed:
        act, w, bias = matmul_operands(m)
        name, chain = g.source_param(w)
        if name is None:
            act, w = w, act
            name, chain = g.source_param(w)
        if name is None:
            raise Unsupported("a matrix product that depends on the expert choice multiplies two computed tensors "
                              "(no expert weight): the tokens reach the experts in a way not understood")
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
    activation, alpha, limit = _activation(g, body, feeding)
    gate, up = _gate_and_up(g, feeding, activation, body)
    fused = _fused_layout(gate, up)
    if fused:  # keep the projection whole: one GEMM per expert, gradients in the weight's own layout
        gate, up = gate[:5], None
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
    if has_bias and "w3" in refs and "b3" not in refs:
        raise Unsupported("the experts' gate projection has a bias and their up projection none")
    return ExpertSpec(activation, has_bias, fused, alpha, limit), ExpertWeights(**refs)


def _fused_layout(gate, up) -> str:
    """"halves" or "interleaved" when gate and up are the two halves of one projection's output."""
    if up is None or len(gate) < 6 or gate[0] is not up[0]:
        return ""
    (gs, ge, gstep), (us, ue, ustep) = ((p.start or 0, p.stop, p.step or 1) for p in (gate[5], up[5]))
    if gstep == ustep == 1 and gs == 0 and ge == us:
        return "halves"
    if gstep == ustep == 2 and (gs, us) == (0, 1):
        return "interleaved"
    return ""  # e.g. [up; gate]: read as two separate row ranges


CLAMPS = {aten.clamp.default, aten.clamp_max.default, aten.clamp_min.default}
DEFAULTS = (1.702, 7.0)  # alpha, limit: only meaningful for clamped_swiglu


def _activation(g: Reader, body, feeding):
    """(activation, alpha, limit) from the ops between an expert's two layers."""
    targets = {n.target for n in body}
    gated = any(n.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in n.args[:2])
                and all(any(g.depends(a, f[0]) for f in feeding) for a in n.args[:2]) for n in body) \
        and (len(feeding) == 2 or _is_split(feeding[0][0], body))
    if targets & CLAMPS and aten.sigmoid.default in targets:
        return ("clamped_swiglu",) + _clamped_constants(body)
    gelu = next((n for n in body if n.target is aten.gelu.default), None)
    if gelu is not None:
        tanh = gelu.kwargs.get("approximate", "none") == "tanh"
        return ("geglu" if gated else "gelu_tanh" if tanh else "gelu",) + DEFAULTS
    if targets & {aten.silu.default} or aten.sigmoid.default in targets:
        return ("swiglu" if gated else "silu",) + DEFAULTS
    if aten.relu.default in targets:
        return ("relu",) + DEFAULTS
    ops = sorted({t.__name__ if t is getitem else t._opname for t in targets if callable(t)})
    raise Unsupported(f"unrecognized expert activation: the ops between the experts' two layers ({', '.join(ops)}) "
                      "are not ReLU, GELU, SiLU or their gated forms (SwiGLU, GeGLU, gpt-oss's clamped SwiGLU)")


def _clamped_constants(body) -> tuple[float, float]:
    """gpt-oss style g·σ(α·g) with g = min(gate, limit): α scales the sigmoid's input; the limit is the
    upper bound of the clamp that has no lower bound (the gate's)."""
    sigmoid = next(n for n in body if n.target is aten.sigmoid.default)
    scaled = sigmoid.args[0]
    if not (isinstance(scaled, fx.Node) and scaled.target in (aten.mul.Tensor, aten.mul.Scalar)
            and isinstance(scaled.args[1], (int, float))):
        raise Unsupported("clamped activation: the sigmoid's input is not the gate times a constant")
    gate_clamps = [n for n in body if (n.target is aten.clamp.default and len(n.args) > 2 and n.args[1] is None)
                   or n.target is aten.clamp_max.default]
    if len(gate_clamps) != 1:
        raise Unsupported("clamped activation: cannot tell which clamp bounds the gate")
    return float(scaled.args[1]), float(gate_clamps[0].args[-1])


SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor}


def _split_base(mm):
    """The node a fused projection is split from: the matmul, or its in-place/out-of-place bias add."""
    adds = [u for u in mm.users if u.target in (aten.add.Tensor, aten.add_.Tensor)]
    return adds[0] if len(mm.users) == 1 and adds else mm


def _is_split(mm, body) -> bool:
    return any(u.target in SPLITS for u in _split_base(mm).users if u in body)


NONLINEAR = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default}


def _gate_and_up(g: Reader, feeding, activation, body):
    """Which first-layer output goes through the nonlinearity (gate) and which multiplies it (up).

    For a fused [2F, D] projection, each part carries the feature range it takes of the output
    (chunk/split: contiguous halves; slice: strided), read by `_fused_layout`."""
    nonlin = [n for n in body if n.target in NONLINEAR]
    if activation not in GATED_ACTIVATIONS:
        return feeding[0], None
    if len(feeding) == 2:
        a, b = feeding
        a_gate = any(g.depends(n, a[0]) for n in nonlin)
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
    gate_part = next((p for p in parts if any(g.depends(n, p[0]) for n in nonlin)), None)
    if gate_part is None:
        raise Unsupported("cannot tell the gate half from the up half of the fused projection")
    up_part = parts[1] if gate_part is parts[0] else parts[0]
    return (m, act, name, chain, bias, gate_part[1]), (m, act, name, chain, bias, up_part[1])


def _expert_refs(g: Reader, info, E: int, D: int, first: bool) -> WeightRef | list[WeightRef]:
    """[out, in] views of a routed matmul's weight: one stacked ref, or one ref per expert (ModuleList)."""
    m, act, name, chain, bias, *part = info
    val = g.param(name)
    template = _per_expert_template(name, g.names, E)
    if template is not None or (E == 1 and val.dim() == 2):  # (a dense FFN read as one expert: read_dense_ffn)
        per = tuple(val.shape)
    elif val.dim() == 3 and val.shape[0] == E:
        per = tuple(val.shape[1:])
    else:
        raise Unsupported(f"expert weight {name} {tuple(val.shape)} is neither per-expert nor stacked [E, ...]")
    if len(per) != 2:
        raise Unsupported(f"expert weight {name} has per-expert shape {per}")
    transpose = _is_in_out_layout(per, chain, D, first, g)
    index = () if not part else (part[0],) if not transpose else (slice(None), part[0])
    if template is None:
        return [WeightRef(name, index, transpose)] if val.dim() == 2 else WeightRef(name, index, transpose, stacked=True)
    return [WeightRef(template.format(e), index, transpose) for e in range(E)]


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


def _expert_bias(g: Reader, info, E: int) -> WeightRef | list[WeightRef] | None:
    m, act, name, chain, bias, *part = info
    if bias is None:  # added after the matmul (through the views a batched matmul's result takes)
        adds = [u for u in g.users_through_passthrough(m) if u.target in (aten.add.Tensor, aten.add_.Tensor)]
        bias = next((a for u in adds for a in u.args if isinstance(a, fx.Node) and a is not m
                     and g.source_param(a)[0]), None)
    if bias is None:
        return None
    bname, _ = g.source_param(bias)
    val = g.param(bname)
    template = _per_expert_template(bname, g.names, E)
    index = (part[0],) if part else ()
    if template is not None:
        return [WeightRef(template.format(e), index) for e in range(E)]
    if val.dim() == 2 and val.shape[0] == E:
        return WeightRef(bname, index, stacked=True)
    if E == 1 and val.dim() == 1:
        return [WeightRef(bname, index)]
    raise Unsupported(f"expert bias {bname} {tuple(val.shape)} is neither per-expert nor stacked")


def read_dense_ffn(module: torch.nn.Module, x: torch.Tensor) -> tuple[ExpertSpec, ExpertWeights]:
    """A dense feed-forward module (e.g. a transformer block's MLP), read from its recorded graph on input
    x [..., D] as one expert: its structure, and WeightRefs (lists of one) to its own parameters. Raises
    Unsupported when the module is not a two-layer FFN (attention, norms, ...)."""
    from moecompile.frontend.capture import record
    from moecompile.frontend.graph import MATMULS
    rec = record(module, (x,), {})
    names = {n for n, _ in module.named_parameters()}
    g = Reader(rec, names)
    matmuls = [n for n in rec.graph.nodes if n.op == "call_function" and n.target in MATMULS]
    if not 2 <= len(matmuls) <= 3 or any(n.target in ATTENTION for n in rec.graph.nodes):
        raise Unsupported(f"not a two-layer feed-forward module ({len(matmuls)} matmuls, or attention)")
    return read_experts(g, matmuls, 1, x.shape[-1])


ATTENTION = {aten._softmax.default, aten.softmax.int, aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten.scaled_dot_product_attention.default}
