"""select_kernels: choose, per canonical op of every lifted block, the kernel backend that runs it.

Contract:   sets `spec.kernels[op]` for op in route, dispatch, expert_ffn, combine of every block in
            `ctx.lifted`. With `kernels="auto"` the choice follows the device of the block's router weight
            and the table below; a named backend ("native", "triton", "reference") is used for every op, and
            one that cannot run on the device is an error that says why, not a silent fallback.
Invariants: runs before validate, so the chosen kernels are the ones validated; changes no parameter and
            no graph structure, only which implementation each op dispatches to.
Pseudo-code:
    for lifted block: device = its router weight's device type
        kernels = AUTO[device] if options.kernels == "auto" else {op: options.kernels for op in OPS}
        (auto falls back to native where why_no_triton(device) gives a reason)

Why these defaults: on CPU the native path (per-expert blocked GEMMs, fused activation backward, gathers
instead of scatter-adds) is at least as fast as the reference (within noise) on every op of the large
cases of benchmarks/kernels.py, slower only on two decode-size ops of tens of microseconds (README,
"Kernels"); Triton's CPU mode is an interpreter for testing, far too slow to run models. On CUDA, Triton's
grouped GEMM covers all experts in one launch where the native path launches per expert, and its routing
kernels fuse what native does in several passes.
"""
from __future__ import annotations

from moecompile.ir.spec import OPS
from moecompile.kernels import why_no_triton
from moecompile.passes.registry import CompileContext, register_pass

AUTO = {  # device type → backend per op
    "cuda": dict.fromkeys(OPS, "triton"),
    "cpu": dict.fromkeys(OPS, "native"),
}


@register_pass("select_kernels")
def select_kernels(ctx: CompileContext) -> None:
    for lifted in ctx.lifted:
        spec = lifted.layer.spec
        spec.kernels = kernels_for(ctx.options.kernels, spec.router.get(lifted.block).device.type,
                                   lifted.layer.name)


def kernels_for(choice: str, device: str, where: str) -> dict[str, str]:
    """op → backend for a block on `device` under `optimize(kernels=choice)` (see the module docstring)."""
    if choice == "auto":
        kernels = dict(AUTO.get(device, AUTO["cpu"]))  # other devices: plain torch runs anywhere
        if "triton" in kernels.values() and why_no_triton(device):
            kernels = {op: "native" if k == "triton" else k for op, k in kernels.items()}
        return kernels
    why = why_no_triton(device) if choice == "triton" else None
    if why:
        raise ValueError(f"moecompile: kernels='triton' cannot run {where or 'the model'}: {why}")
    return dict.fromkeys(OPS, choice)
