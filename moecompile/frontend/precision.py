"""The precision a block computes its experts in, when it is not the block's own.

Contract:   experts_dtype(recording, spec) → the dtype of the block's expert matmuls when the block casts
            to a lower precision for them (e.g. a bf16 grouped GEMM inside an fp32 model: inputs and
            weights cast down, results cast back), else None. Read from the recorded values: every matmul
            that reads an expert weight (through views and casts) must produce the same dtype. The
            lowering then runs the expert kernels in that dtype (ir/lowering.expert_ffn), so the rewrite
            rounds where the original does; validation checks it against a float64 evaluation that keeps
            those casts (validation.py).
"""
from __future__ import annotations

import torch

from moecompile.frontend.capture import Recording
from moecompile.frontend.graph import MATMULS, Unsupported, param_read
from moecompile.ir.spec import MoESpec, WeightRef


def experts_dtype(rec: Recording, spec: MoESpec) -> torch.dtype | None:
    names = {ref.name for refs in vars(spec.weights).values() if refs is not None
             for ref in (refs if isinstance(refs, list) else [refs]) if isinstance(ref, WeightRef)}
    found = {n.meta["val"].dtype for n in rec.graph.nodes
             if n.op == "call_function" and n.target in MATMULS and any(param_read(rec, a) in names for a in n.args)}
    block_dtype = rec.inputs[0].meta["val"].dtype if rec.inputs else None
    if len(found) > 1:
        raise Unsupported(f"the experts' matmuls compute in several precisions ({', '.join(sorted(map(str, found)))})")
    dtype = next(iter(found), block_dtype)
    if block_dtype is None or dtype == block_dtype or not dtype.is_floating_point:
        return None
    if torch.finfo(dtype).bits >= torch.finfo(block_dtype).bits:
        raise Unsupported(f"the experts compute in {dtype}, above the block's own {block_dtype}")
    return dtype
