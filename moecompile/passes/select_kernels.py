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
        decode_slots = the most tokens·k of a call that take the decode path (decode_slots below)
        stacked_path = stacked weights, native expert kernel, on CPU (stacked_path below)
        fast_path = a plain block (fast_path below): eager calls without autograd skip the op wrappers
        bag_slots = fast-path fp32 blocks, in model order while their weight copies fit in
                    options.decode_copy_bytes: SLOTS_PER_EXPERT·E (kernels/bagged.py); else 0
        onednn = native expert kernel and first-layer weights kernels/onednn.py takes (for explain())

Why these defaults: on CPU the native path (per-expert blocked GEMMs, fused activation backward, gathers
instead of scatter-adds) is at least as fast as the reference (within noise) on every op of the large
cases of benchmarks/kernel_ops.py, slower only on two decode-size ops of tens of microseconds (docs/benchmarks.md,
"Kernels"); Triton's CPU mode is an interpreter for testing, far too slow to run models. On CUDA, Triton's
grouped GEMM covers all experts in one launch where the native path launches per expert, and its routing
kernels fuse what native does in several passes.
"""
from __future__ import annotations

import torch

from moecompile.ir.spec import OPS
from moecompile.kernels import bagged, onednn, why_no_triton
from moecompile.kernels.activations import is_stacked
from moecompile.passes.registry import CompileContext, register_pass

AUTO = {  # device type → backend per op
    "cuda": dict.fromkeys(OPS, "triton"),
    "cpu": dict.fromkeys(OPS, "native"),
}


@register_pass("select_kernels")
def select_kernels(ctx: CompileContext) -> None:
    copy_left = ctx.options.decode_copy_bytes
    for lifted in ctx.lifted:
        spec = lifted.layer.spec
        spec.kernels = kernels_for(ctx.options.kernels, spec.router.get(lifted.block).device.type,
                                   lifted.layer.name)
        spec.decode_slots = decode_slots(spec, lifted.block)
        spec.stacked_path = stacked_path(spec, lifted.block)
        spec.fast_path = fast_path(spec, lifted.block)
        spec.bag_slots, copy = bag_slots(spec, lifted.block, copy_left)
        spec.onednn = (spec.kernels["expert_ffn"] == "native"
                       and onednn.takes_weight(spec.weights.fetch(lifted.block)["w1"][0]))
        copy_left -= max(copy, 0)
        if copy < 0:
            spec.notes.append(f"no decode copy: its {-copy / 2**20:.1f} MiB exceed what optimize(decode_copy_bytes=) "
                              f"leaves ({copy_left / 2**20:.1f} MiB)")


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


DECODE_BYTES = 4 << 20  # the most expert weight one decode-path call may gather (CPU: about an L2/L3 share)


def decode_slots(spec, block) -> int:
    """The most token-slots (tokens·k) of an eager call that take the decode path (kernels/batched.py
    decode_ffn): 0 unless every expert weight is one stacked [E, ...] tensor and the ops are not the
    reference's. It copies each slot's expert weights, where the grouped path reads each chosen expert's
    once but visits it (native.expert_ffn_forward): measured here (1 thread on a shared machine, no_grad),
    the copy wins for Qwen3-MoE-like experts (64 of 0.4 MB, top-8) at 1 token (1.5 vs 2.0 ms a layer)
    and loses from 4 tokens on, and loses for Mixtral-like ones (8 of 6 MB, top-2) at any size (12.3 vs
    7.3 ms at 1 token). So: slots whose gathered weights stay within DECODE_BYTES, and at most a quarter
    of the experts (with more slots, most experts are chosen and the grouped path reads each once)."""
    if spec.kernels["expert_ffn"] == "reference" or not _stacked(spec, block):
        return 0  # E per-expert tensors: decode_ffn gathers from stacked ones
    w = spec.weights.fetch(block)
    per_expert = sum(ws[0][0].numel() * ws[0].element_size() for ws in w.values() if ws)
    return min(spec.num_experts // 4, DECODE_BYTES // max(per_expert, 1))


def stacked_path(spec, block) -> bool:
    """Whether eager calls may run the experts by kernels/batched.py stacked_ffn (all experts as one bmm
    over rows padded per expert; ir/lowering.batched_path decides per call): with stacked [E, ...] weights
    (a bmm reads them in place), on CPU with the native kernels (the Triton grouped GEMM spreads its
    experts over a GPU already; the per-call host read of the counts would be a sync there)."""
    return (spec.kernels["expert_ffn"] == "native" and spec.router.get(block).device.type == "cpu"
            and _stacked(spec, block))


def fast_path(spec, block) -> bool:
    """Whether eager calls without autograd may take ir/fast_path.fast_call: native kernels on CPU, stacked
    expert weights without biases, and none of what it leaves to the general path: a capacity, buffer
    updates, a score bias or expert groups, precisions of the block's own for the experts or the combine,
    outputs other than out, logits and weights. (What later passes or the user may set, a shortcut,
    expert parallelism, a routing override, is checked per call.)"""
    w = spec.weights.fetch(block)
    return (stacked_path(spec, block) and all(k == "native" for k in spec.kernels.values())
            and not any(w[b] for b in ("b1", "b2", "b3")) and spec.capacity is None and not spec.buffer_updates
            and spec.score_bias is None and spec.route.n_group == 1 and spec.expert.dtype is None
            and spec.combine_dtype is None and set(spec.outputs) <= {"out", "logits", "weights"})


def bag_slots(spec, block, copy_left: int) -> tuple[int, int]:
    """(the most token-slots of a fast-path call that take kernels/bagged.py, the bytes of its weight copy)
    for fast-path blocks whose expert weights are float32 (the form sums in its table's precision, where a
    low-precision original rounds after each matmul) and whose copy fits in `copy_left`; (0, 0) for other
    blocks, (0, -bytes) where only the copy does not fit."""
    if not spec.fast_path:
        return 0, 0
    w = spec.weights.fetch(block)
    stacked = [w[r][0] for r in ("w1", "w2", "w3") if w[r]]
    nbytes = bagged.table_bytes(*stacked)
    if any(t.dtype != torch.float32 for t in stacked):
        return 0, 0
    if nbytes > copy_left:
        return 0, -nbytes
    return bagged.SLOTS_PER_EXPERT * spec.num_experts, nbytes


def _stacked(spec, block) -> bool:
    """Whether every expert weight of the block is one stacked [E, ...] tensor."""
    w = spec.weights.fetch(block)
    return all(is_stacked(ws, 3 if role[0] == "w" else 2) for role, ws in w.items() if ws)
