"""validate: translation validation of every block lift_moe rewrote; a rewrite that fails is undone.

Contract:   each entry of `ctx.lifted` is run, original and rewritten (with the kernels select_kernels
            chose), on the block's recorded input and on a random input of the same scale, comparing
            outputs, the input gradient and every parameter gradient (moecompile/validation.py). Within
            `options.tolerance` the rewrite stays and the spec notes the measured error; otherwise the
            original forward is restored and the layer reports why.
            With routing options over the block's own (optimize(capacity_factor=, batch_prioritized=):
            `spec.routing`) the original no longer computes the same function, so two checks: (1) the
            rewrite with the block's own routing against the original, which proves the lift; (2) the
            rewrite with the options against the same rewrite run on the reference kernels (whose float64
            evaluation is then the truth for rounding questions), which proves the chosen kernels compute
            the options as kernels/reference.py defines them (capacity rule, drops, slot order). Together:
            the block computes the original's function with its capacity and slot order replaced as
            reference.py defines them, nothing else changed. (Check (2) is void when the kernels are the
            reference's.)
Invariants: a block stays rewritten only if validation passed or the user turned it off
            (`validate=False`); parameters, buffers and the RNG are as before (the caller restores them).
Pseudo-code:
    for lifted in ctx.lifted:
        worst = max(compare(original, rewritten with own routing, x) for x in (recorded input, random input))
        if routing options and kernels != reference:
            worst2 = max(compare(rewrite on reference kernels, rewritten, x) for x in (...))
        if worst or worst2 > tolerance: block.forward = original; layer.rewritten = False; layer.reason = ...
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moecompile.ir.lowering import run_moe
from moecompile.ir.spec import OPS, DropStats, RoutingOverride
from moecompile.passes.registry import CompileContext, register_pass
from moecompile.validation import compare

VALIDATION_SEEDS = (0, 1)


@register_pass("validate")
def validate(ctx: CompileContext) -> None:
    if not ctx.options.validate:
        return
    for lifted in ctx.lifted:
        spec = lifted.layer.spec
        routing, spec.routing = spec.routing, RoutingOverride()
        try:
            reason = _check(lifted, ctx.options.tolerance)
        finally:
            spec.routing = routing
        if not reason and routing != RoutingOverride() and set(spec.kernels.values()) != {"reference"}:
            reason = _check(lifted, ctx.options.tolerance, against=ReferenceRewrite(lifted.block, spec))
        if reason:
            lifted.block.forward = lifted.original
            lifted.layer.rewritten, lifted.layer.reason = False, reason


class ReferenceRewrite(nn.Module):
    """The block's rewrite on the reference kernels, as a module of its own: what check (2) compares with.
    Its class's forward is the rewrite, so validation's float64 evaluation (the class's forward on a float64
    copy) evaluates the rewrite, not the original block; its parameters are the block's, in order."""

    def __init__(self, block: nn.Module, spec):
        super().__init__()
        self.block = block
        self.spec = dataclasses.replace(spec, kernels=dict.fromkeys(OPS, "reference"), drops=DropStats())

    def forward(self, x, *rest, **kwargs):
        return run_moe(self.spec, self.block, x)


def _check(lifted, tolerance, against: ReferenceRewrite | None = None) -> str | None:
    """Why the rewrite is rejected, or None; on the recorded input, then on a random one of its scale, in
    the block's mode; then on the recorded input in the other mode (train/eval), where a block may do more
    (a load counter updated only in training). Against the original block, or (`against`) the rewrite on
    the reference kernels."""
    block, spec = lifted.block, lifted.layer.spec
    module, want = (block, lifted.original) if against is None else (against, against.forward)
    x, rest = lifted.args[0], lifted.args[1:]
    scale = x.float().std().clamp_min(1e-3).item()
    worst, where, rejudged = 0.0, None, 0
    modes = {m: m.training for m in module.modules()}
    runs = [(block.training, seed) for seed in VALIDATION_SEEDS] + [(not block.training, VALIDATION_SEEDS[0])]
    try:
        for training, seed in runs:
            module.train(training)
            gen = torch.Generator().manual_seed(seed)
            probe = x if seed == 0 else (torch.randn(x.shape, generator=gen) * scale).to(x.dtype).to(x.device)
            try:
                err, label, n = compare(module, want, block.forward, probe, rest, lifted.kwargs, seed)
            except Exception as e:
                return f"translation validation could not run the lifted block: {e!r}"
            if not err <= worst:
                worst, where = err, (label, training)
            rejudged += n
    finally:
        for m, training in modes.items():
            m.training = training
    what = "" if against is None else f" the routing options ({_options(spec.routing)}) against the reference kernels"
    if not worst <= tolerance:
        return f"translation validation{' of' + what if what else ''} failed: {_difference(*where, worst, tolerance)}"
    spec.notes.append(f"validated{what}: max relative error {worst:.1e}" + (
        f"; {rejudged} tensor(s) off only by fp32 rounding (checked against float64)" if rejudged else ""))
    return None


def _difference(label: str, training: bool, err: float, tolerance: float) -> str:
    """What differs, in words: a buffer the rewrite does not update as the block does, or a tensor."""
    mode = "training" if training else "eval"
    if label.startswith("buffer "):
        return (f"the block updates its buffer '{label[7:]}' in its forward ({mode} mode) and the rewrite does not "
                f"reproduce that update (relative error {err:.2e})")
    return f"{label} differs in {mode} mode by a relative error of {err:.2e} > {tolerance:.0e}"


def _options(routing: RoutingOverride) -> str:
    return ", ".join(f"{f.name}={getattr(routing, f.name)!r}" for f in dataclasses.fields(routing)
                     if getattr(routing, f.name) != f.default)
