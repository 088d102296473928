"""validate: translation validation of every block lift_moe rewrote; a rewrite that fails is undone.

Contract:   each entry of `ctx.lifted` is run, original and rewritten (with the kernels select_kernels
            chose), on the block's recorded input, on a random input of the same scale, on the recorded
            input cut to one token per sequence and doubled in length (sizes of the recorded call must not
            be baked in), and in the other train/eval mode, comparing outputs, the input gradient, every
            parameter gradient and every buffer after the call (gradients only on the first two inputs:
            the other runs look for a size or mode not modelled) (moecompile/validation.py). Within
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
        worst = max(compare(original, rewritten with own routing, x) for x in (recorded, random, 1 and 2S
                                                                                 tokens, other mode))
        if routing options and kernels != reference:
            worst2 = max(compare(rewrite on reference kernels, rewritten, x) for x in (...))
        if worst or worst2 > tolerance: block.forward = original; layer.rewritten = False; layer.reason = ...
"""
from __future__ import annotations

import contextlib
import dataclasses
import io

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from moecompile.ir.lowering import run_moe
from moecompile.ir.spec import OPS, DropStats, RoutingOverride, dtype_name
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
    """Why the rewrite is rejected, or None. In the block's mode: on the recorded input, on a random one of
    its scale, and on the recorded input at other token counts (one token per sequence, as in decoding, and
    twice the sequence: a size read from the recorded call, such as a capacity group, shows there); then on
    the recorded input in the other mode (train/eval), where a block may do more (a load counter updated only
    in training). Against the original block, or (`against`) the rewrite on the reference kernels."""
    block, spec = lifted.block, lifted.layer.spec
    module, want = (block, lifted.original) if against is None else (against, against.forward)
    tolerance, why = _allowed(spec, tolerance) if against is None else (tolerance, "")
    x, rest = lifted.args[0], lifted.args[1:]
    scale = x.float().std().clamp_min(1e-3).item()
    gen = torch.Generator().manual_seed(VALIDATION_SEEDS[1])
    noise = (torch.randn(x.shape, generator=gen) * scale).to(x.dtype).to(x.device)
    # (mode, input, seed, gradients too): outputs and buffers suffice to show a size or mode not modelled
    runs = [(block.training, x, VALIDATION_SEEDS[0], True), (block.training, noise, VALIDATION_SEEDS[1], True)]
    runs += [(block.training, other, VALIDATION_SEEDS[0], False) for other in _other_token_counts(x, rest, lifted.kwargs)]
    runs.append((not block.training, x, VALIDATION_SEEDS[0], False))
    worst, where, rejudged = 0.0, None, 0
    modes = {m: m.training for m in module.modules()}
    try:
        for training, probe, seed, grads in runs:
            module.train(training)
            # a graph Dynamo recorded for one shape may refuse another, and torch.fx prints the failing line
            # of its generated code to stderr before raising: not for the user to read
            quiet = contextlib.redirect_stderr(io.StringIO()) if probe.shape != x.shape else contextlib.nullcontext()
            try:
                with quiet:
                    err, label, n = compare(module, want, block.forward, probe, rest, lifted.kwargs, seed, grads)
            except Exception as e:
                with quiet:
                    refused = probe.shape != x.shape and _raises(want, probe, rest, lifted.kwargs)
                if refused:
                    continue  # the original refuses this shape too
                return f"translation validation could not run the lifted block on {list(probe.shape)}: {e!r}"
            if not err <= worst:
                worst, where = err, (label, training, list(probe.shape))
            rejudged += n
    finally:
        for m, training in modes.items():
            m.training = training
    what = "" if against is None else f" the routing options ({_options(spec.routing)}) against the reference kernels"
    if not worst <= tolerance:
        return f"translation validation{' of' + what if what else ''} failed: {_difference(*where, worst, tolerance)}{why}"
    spec.notes.append(f"validated{what}{why}: max relative error {worst:.1e}" + (
        f"; {rejudged} tensor(s) off only by fp32 rounding (checked against float64)" if rejudged else ""))
    return None


RAISED_STEPS = 4  # rounding steps of a precision the original rounds to and the rewrite does not: measured up to
                  # 1.7 (relative to the largest value, over outputs and gradients) for bf16 and fp16 stages of
                  # the blocks of tests/test_precision.py


def _allowed(spec, tolerance: float) -> tuple[float, str]:
    """(relative error accepted against the original, why, "" when it is `tolerance`): where the rewrite
    computes in the model's precision stages the original rounds lower (optimize(precision="model")), the
    original's own rounding error in them, RAISED_STEPS steps (eps) of the coarsest such precision."""
    if not spec.raised_stages:
        return tolerance, ""
    dtype = max((d for _, d in spec.raised_stages), key=lambda d: torch.finfo(d).eps)
    allowed = max(tolerance, RAISED_STEPS * torch.finfo(dtype).eps)
    stages = ", ".join(stage for stage, _ in spec.raised_stages)
    return allowed, (f" (within {allowed:.1e}: the original rounds its {stages} to {dtype_name(dtype)}, the rewrite "
                     "does not, precision='model')")


def _other_token_counts(x: torch.Tensor, rest: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The recorded hidden states [..., S, D] cut to one token per sequence and doubled to 2S (with the
    sequence reversed), when nothing else the block takes could depend on S."""
    if x.dim() < 2 or x.shape[-2] < 2 or any(isinstance(t, torch.Tensor) for t in tree_flatten((rest, kwargs))[0]):
        return []
    return [x[..., :1, :], torch.cat([x, x.flip(-2)], dim=-2)]


def _raises(fn, x, rest, kwargs) -> bool:
    try:
        with torch.no_grad():
            fn(x, *rest, **kwargs)
    except Exception:
        return True
    return False


def _difference(label: str, training: bool, shape: list[int], err: float, tolerance: float) -> str:
    """What differs, in words: a buffer the rewrite does not update as the block does, or a tensor."""
    mode = "training" if training else "eval"
    if label.startswith("buffer "):
        return (f"the block updates its buffer '{label[7:]}' in its forward ({mode} mode) and the rewrite does not "
                f"reproduce that update (relative error {err:.2e})")
    return f"{label} differs in {mode} mode on input {shape} by a relative error of {err:.2e} > {tolerance:.0e}"


def _options(routing: RoutingOverride) -> str:
    return ", ".join(f"{f.name}={getattr(routing, f.name)!r}" for f in dataclasses.fields(routing)
                     if getattr(routing, f.name) != f.default)
