"""The precision a block computes each stage in (router, experts, combine), when it is not the block's own.

Contract:   read(recording, spec, precision) → None; sets spec.route.dtype, spec.expert.dtype and
            spec.combine_dtype to the dtype the block computes that stage in where it casts to a lower
            precision for it (e.g. a bf16 grouped GEMM inside an fp32 model: inputs and weights cast down,
            results cast back), else None; spec.combine_sums_once when that combine is a matmul (one
            rounding of each token's sum) rather than products and index_add (a rounding per step).
            Read from the recorded values: the router stage is the matmuls that read the router weight, the
            experts' those that read an expert weight (through views and casts: graph.param_read), the
            combine the ops that weight and sum the experts' outputs (after their last matmuls, up to the
            block's result, expert biases aside). The lowering runs each stage in its dtype (ir/lowering.py),
            so the rewrite rounds where the original does; validation checks it against a float64 evaluation
            that keeps those casts (validation.py).
            With precision="model" (optimize's explicit option) the stages stay in the block's precision and
            spec.raised_stages records what the original rounds to, for explain() and validation's tolerance.
A router or combine above the block's precision (DeepSeek-V3's fp32 router in a bf16 model) is left as
the rewrite computes it: its rounding is finer than the block's, and validation judges it against float64.
"""
from __future__ import annotations

import dataclasses

import torch

from moecompile._lazy import nx
from moecompile.frontend.capture import Recording
from moecompile.frontend.graph import MATMULS, PASSTHROUGH, Reader, Unsupported, param_read
from moecompile.ir.spec import MoESpec, WeightRef, dtype_name


def read(rec: Recording, spec: MoESpec, precision: str = "original") -> None:
    block = rec.inputs[0].meta["val"].dtype if rec.inputs else None
    if block is None or not block.is_floating_point:
        return
    experts = _names(spec.weights.w1, spec.weights.w2, spec.weights.w3)
    combine_ops = _combine_ops(rec, spec)
    found = {"router": _below(_matmul_dtypes(rec, {spec.router.name}), block),
             "experts": _experts_dtype(rec, experts, block),
             "combine": _below({n.meta["val"].dtype for n in combine_ops}, block)}
    by_matmul = _combines_by_matmul(combine_ops, found["combine"])
    found = {stage: dtype for stage, dtype in found.items() if dtype is not None}
    if precision == "model":
        spec.raised_stages = tuple(found.items())
        spec.notes += [f"{stage} computed in {dtype_name(block)}, not in the original's {dtype_name(dtype)} "
                       "(precision='model')"
                       for stage, dtype in found.items()]
        return
    spec.route = dataclasses.replace(spec.route, dtype=found.get("router"))
    spec.expert = dataclasses.replace(spec.expert, dtype=found.get("experts"))
    spec.combine_dtype = found.get("combine")
    spec.combine_sums_once = by_matmul
    spec.notes += [f"{stage} computed in {dtype_name(dtype)}, as the block casts it" for stage, dtype in found.items()]


def _experts_dtype(rec: Recording, names: set[str], block: torch.dtype) -> torch.dtype | None:
    """Every matmul that reads an expert weight must produce the same dtype, the block's or a lower one."""
    found = _matmul_dtypes(rec, names)
    if len(found) > 1:
        raise Unsupported(f"the experts' matmuls compute in several precisions ({', '.join(sorted(map(str, found)))})")
    dtype = next(iter(found), block)
    if dtype.is_floating_point and torch.finfo(dtype).bits > torch.finfo(block).bits:
        raise Unsupported(f"the experts compute in {dtype}, above the block's own {block}")
    return _below(found, block)


def _names(*roles) -> set[str]:
    return {ref.name for refs in roles if refs is not None for ref in (refs if isinstance(refs, list) else [refs])
            if isinstance(ref, WeightRef)}


def _matmul_dtypes(rec: Recording, names: set[str]) -> set[torch.dtype]:
    return {n.meta["val"].dtype for n in rec.graph.nodes
            if n.op == "call_function" and n.target in MATMULS and any(param_read(rec, a) in names for a in n.args)}


def _combine_ops(rec: Recording, spec: MoESpec) -> list:
    """The ops between the experts' last matmuls and the block's result that compute (views and casts only
    move values; an expert bias added after the last matmul is the experts')."""
    g, second, expert_params = Reader(rec, set()), _names(spec.weights.w2), _names(*vars(spec.weights).values())
    last = [n for n in rec.graph.nodes if n.op == "call_function" and n.target in MATMULS
            and any(param_read(rec, a) in second for a in n.args)]
    out = rec.outputs[spec.outputs.index("out")]
    after = (set().union(*(nx.descendants(g.dag, m) for m in last)) & nx.ancestors(g.dag, out)) | {out}
    return [n for n in after
            if n.op == "call_function" and n.target not in PASSTHROUGH and isinstance(n.meta.get("val"), torch.Tensor)
            and not any(param_read(rec, a) in expert_params for a in n.args)]


def _combines_by_matmul(combine_ops: list, dtype: torch.dtype | None) -> bool:
    """Whether a combine in `dtype` (its ops: _combine_ops) is a matmul (GShard's einsum of the combine
    weights with the experts' outputs): its operands are rounded to `dtype` and summed at higher precision,
    with one rounding of the sum, where elementwise weighting and index_add round each product and each
    partial sum."""
    return dtype is not None and any(n.target in MATMULS and n.meta["val"].dtype == dtype for n in combine_ops)


def _below(found: set[torch.dtype], block: torch.dtype) -> torch.dtype | None:
    """The lowest floating precision among `found` if it is below the block's own, else None."""
    floats = [d for d in found if d.is_floating_point]
    lowest = min(floats, key=lambda d: torch.finfo(d).bits, default=block)
    return lowest if torch.finfo(lowest).bits < torch.finfo(block).bits else None
