"""validate: translation validation of every block lift_moe rewrote; a rewrite that fails is undone.

Contract:   each entry of `ctx.lifted` is run, original and rewritten (with the kernels select_kernels
            chose), on the block's recorded input and on a random input of the same scale, comparing
            outputs, the input gradient and every parameter gradient (moecompile/validation.py). Within
            `options.tolerance` the rewrite stays and the spec notes the measured error; otherwise the
            original forward is restored and the layer reports why.
Invariants: a block stays rewritten only if validation passed or the user turned it off
            (`validate=False`); parameters, buffers and the RNG are as before (the caller restores them).
Pseudo-code:
    for lifted in ctx.lifted:
        worst = max(compare(original, rewritten, x) for x in (recorded input, random input))
        if worst > tolerance: block.forward = original; layer.rewritten = False; layer.reason = ...
"""
from __future__ import annotations

import torch

from moecompile.passes.registry import CompileContext, register_pass
from moecompile.validation import compare

VALIDATION_SEEDS = (0, 1)


@register_pass("validate")
def validate(ctx: CompileContext) -> None:
    if not ctx.options.validate:
        return
    for lifted in ctx.lifted:
        reason = _check(lifted, ctx.options.tolerance)
        if reason:
            lifted.block.forward = lifted.original
            lifted.layer.rewritten, lifted.layer.reason = False, reason


def _check(lifted, tolerance) -> str | None:
    """Why the rewrite is rejected, or None; on the recorded input, then on a random one of its scale."""
    block, spec = lifted.block, lifted.layer.spec
    x, rest = lifted.args[0], lifted.args[1:]
    scale = x.float().std().clamp_min(1e-3).item()
    worst, rejudged = 0.0, 0
    for seed in VALIDATION_SEEDS:
        gen = torch.Generator().manual_seed(seed)
        probe = x if seed == 0 else (torch.randn(x.shape, generator=gen) * scale).to(x.dtype).to(x.device)
        try:
            err, n = compare(block, lifted.original, block.forward, probe, rest, lifted.kwargs, seed)
        except Exception as e:
            return f"translation validation could not run the lifted block: {e!r}"
        worst, rejudged = max(worst, err), rejudged + n
    if not worst <= tolerance:
        return (f"translation validation failed: relative error {worst:.2e} > {tolerance:.0e} "
                f"(outputs or gradients differ)")
    spec.notes.append(f"validated: max relative error {worst:.1e}" + (
        f"; {rejudged} tensor(s) off only by fp32 rounding (checked against float64)" if rejudged else ""))
    return None
