"""lift_moe: replace each detected MoE block's forward with the canonical ops.

Contract:   for every Site from find_moe, the innermost enclosing module whose recorded graph reads as an
            MoE (frontend/analyze.py) and whose lifted form passes translation validation gets
            `forward = run_moe(spec, ...)`; every other site is reported with the reason it was left alone.
Invariants: parameters are the original `Parameter` objects (views taken per call), module names and
            state_dict keys are unchanged; a block is never rewritten unless validation passed (or the
            user turned validation off); no exception from analysis escapes: it becomes a reason.
Pseudo-code:
    for site in sites:
        for module in site.stack innermost → outwards (at most 3 levels, never spanning two sites):
            try: spec = analyze(record(module, its inputs)); break
            except Unsupported as e: keep the most advanced failure
        if spec and validate(original forward, run_moe(spec), random inputs): install
        report(name, E, k, scoring, rewritten, reason)
"""
from __future__ import annotations

import logging
import types

import torch

from moecompile.frontend.analyze import Unsupported, analyze
from moecompile.frontend.capture import Site, record
from moecompile.ir.lowering import run_moe
from moecompile.passes.registry import CompileContext, register_pass
from moecompile.report import MoELayer
from moecompile.validation import compare

log = logging.getLogger(__name__)
MAX_LEVELS = 3
VALIDATION_SEEDS = (0, 1)


@register_pass("lift_moe")
def lift_moe(ctx: CompileContext) -> None:
    claimed: set[str] = set()
    for site in ctx.sites:
        if any(_within(site.stack[-1], name) for name in claimed):
            continue  # a second selection inside a block already lifted (e.g. grouped top-k)
        layer = _lift_site(ctx, site, others=[s for s in ctx.sites if s is not site])
        if layer is None:
            continue
        claimed.add(layer.name)
        ctx.report.moe_layers.append(layer)


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _lift_site(ctx: CompileContext, site: Site, others: list[Site]) -> MoELayer | None:
    best: tuple[Unsupported, str] | None = None
    for name in reversed(site.stack[-MAX_LEVELS:]):
        if any(_within(o.stack[-1], name) for o in others):
            break  # this module spans another routing site: it is not one block
        block = ctx.model.get_submodule(name)
        args, kwargs = site.inputs[name]
        try:
            recording = record(block, args, kwargs)
        except Exception as e:  # e.g. inputs that were consumed (a KV cache): cannot inspect, not evidence
            log.info("moecompile: could not re-run %s to inspect it: %r", name, e)
            continue
        try:
            spec = analyze(recording, block)
        except Unsupported as e:
            if best is None or e.stage > best[0].stage:
                best = (e, name)
            continue
        except Exception as e:  # a bug of ours must cost a rewrite, never the user's model
            log.warning("moecompile: analysis of %s failed: %r", name, e)
            best = (Unsupported(f"internal error while reading the block: {e!r}", stage=2), name)
            continue
        _note_router_module(spec, name, site)
        return _install(ctx, name, block, spec, args, kwargs)
    if best is None or best[0].stage <= 1:  # no router, or a router with no experts: not an MoE
        ctx.report.notes.append(f"top-k in {site.stack[-1] or 'the model'} is not MoE routing (no router)")
        return None
    err, name = best
    return MoELayer(name, None, None, None, rewritten=False, reason=str(err))


def _note_router_module(spec, block_name: str, site: Site) -> None:
    """If the selection ran in a submodule that owns the router weight, remember it and how it was called."""
    inner = site.stack[-1]
    rel = inner[len(block_name):].lstrip(".") if block_name else inner
    if inner != block_name and spec.router.name.startswith(rel + "."):
        router_args, _ = site.inputs[inner]
        if router_args and isinstance(router_args[0], torch.Tensor):
            spec.router_module, spec.router_module_flat = rel, router_args[0].dim() == 2


def _install(ctx, name, block, spec, args, kwargs) -> MoELayer:
    layer = MoELayer(name, spec.num_experts, spec.top_k, spec.route.scoring, rewritten=False, spec=spec)
    if not args or not isinstance(args[0], torch.Tensor):
        layer.reason = "the block's hidden states are not its first positional argument"
        return layer

    def lifted(self, x, *rest, **kw):
        return run_moe(spec, self, x)

    rewritten = types.MethodType(lifted, block)
    if ctx.options.validate:
        layer.reason = _validate(block, block.forward, rewritten, args, kwargs, spec, ctx.options.tolerance)
        if layer.reason:
            return layer
    block.forward = rewritten
    layer.rewritten = True
    return layer


def _validate(block, original, rewritten, args, kwargs, spec, tolerance) -> str | None:
    """Why the rewrite is rejected, or None; on the recorded input, then on a random one of its scale."""
    x, rest = args[0], args[1:]
    scale = x.float().std().clamp_min(1e-3).item()
    worst, rejudged = 0.0, 0
    for seed in VALIDATION_SEEDS:
        gen = torch.Generator().manual_seed(seed)
        probe = x if seed == 0 else (torch.randn(x.shape, generator=gen) * scale).to(x.dtype)
        try:
            err, n = compare(block, original, rewritten, probe, rest, kwargs, seed)
        except Exception as e:
            return f"translation validation could not run the lifted block: {e!r}"
        worst, rejudged = max(worst, err), rejudged + n
    if not worst <= tolerance:
        return (f"translation validation failed: relative error {worst:.2e} > {tolerance:.0e} "
                f"(outputs or gradients differ)")
    spec.notes.append(f"validated: max relative error {worst:.1e}" + (
        f"; {rejudged} tensor(s) off only by fp32 rounding (checked against float64)" if rejudged else ""))
    return None
