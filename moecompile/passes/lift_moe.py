"""lift_moe: replace each detected MoE block's forward with the canonical ops.

Contract:   for every Site from find_moe, the innermost enclosing module whose recorded graph reads as an
            MoE (frontend/analyze.py) gets `forward = run_moe(spec, ...)` and is listed in `ctx.lifted` for
            the validate pass (which undoes any rewrite that fails); every other site is reported with the
            reason it was left alone. The rewrite runs with optimize()'s routing options over the block's
            own (`spec.routing`: capacity_factor, batch_prioritized; validate checks both).
Invariants: parameters are the original `Parameter` objects (views taken per call), module names and
            state_dict keys are unchanged; no exception from analysis escapes: it becomes a reason.
Pseudo-code:
    for site in sites:
        for module in site.stack innermost → outwards (at most 3 levels, never spanning two sites):
            try: spec = analyze(record(module, its inputs)); the precision of its router, experts and
                  combine (or, with precision="model", what the original rounds to); spec.buffer_updates =
                  its buffer additions; break
            except Unsupported as e: keep the most advanced failure
        if spec: install run_moe(spec); ctx.lifted += (layer, block, original forward, recorded inputs)
        report(name, E, k, scoring, rewritten, reason)
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from moecompile.frontend import buffer_updates, precision
from moecompile.frontend.analyze import Unsupported, analyze
from moecompile.frontend.capture import Site, record
from moecompile.ir.lowering import run_moe
from moecompile.ir.spec import RoutingOverride
from moecompile.passes.registry import CompileContext, InstalledForward, Lifted, register_pass
from moecompile.report import MoELayer

log = logging.getLogger(__name__)
MAX_LEVELS = 3


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
            precision.read(recording, spec, ctx.options.precision)
            spec.buffer_updates = _buffer_updates(block, recording, args, kwargs, spec)
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


def _buffer_updates(block: nn.Module, recording, args, kwargs, spec) -> tuple:
    """What the block adds to its buffers per call, read from its recordings in both train/eval modes (a
    counter updated only `if self.training` does not show in a model compiled in eval mode)."""
    buffers = {name for name, _ in block.named_buffers()}
    if not buffers:
        return ()
    recordings, modes = {block.training: recording}, {m: m.training for m in block.modules()}
    try:
        block.train(not block.training)
        recordings[block.training] = record(block, args, kwargs)
    except Exception as e:  # the other mode stays unread: validation checks it
        log.info("moecompile: could not record %s in its other train/eval mode: %r", type(block).__name__, e)
    finally:
        for module, training in modes.items():
            module.training = training
    updates = buffer_updates.read(recordings, buffers, spec.num_experts, spec.top_k)
    spec.notes.extend(f"carries over {update.describe()}" for update in updates)
    return updates


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

    spec.routing = RoutingOverride(ctx.options.capacity_factor, ctx.options.batch_prioritized)
    spec.input_dims = _dims_required(block, args, kwargs)
    ctx.lifted.append(Lifted(layer, block, block.forward, args, kwargs))
    block.forward = LiftedForward(spec, block)
    layer.rewritten = True
    return layer


def _dims_required(block: nn.Module, args: tuple, kwargs: dict) -> int | None:
    """The number of dims the block's hidden states must have: that of the recorded call if the original
    refuses its tokens flattened to [T, D] (`B, S, D = x.shape`), else None (it takes any [..., D])."""
    x = args[0]
    if x.dim() <= 2:
        return None
    try:
        with torch.no_grad():
            block.forward(x.reshape(-1, x.shape[-1]), *args[1:], **kwargs)  # compile_run restores what it changes
    except Exception:
        return x.dim()
    return None


class LiftedForward(InstalledForward):
    # `block.forward` of a rewritten block: run_moe(spec, block, x). The spec is the one explain()'s report
    # holds (set_routing() changes both, also after pickling: pickle keeps shared objects shared).

    def __init__(self, spec, block: nn.Module):
        self.spec, self.module = spec, block

    def __call__(self, x, *rest, **kwargs):
        return run_moe(self.spec, self.module, x)
