"""Public entry points: `optimize(model)` and `explain(model)`."""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch._dynamo
from torch import nn

from moecompile.ir.spec import DropStats
from moecompile.kernels import BACKENDS
from moecompile.passes.registry import CompileContext, Options, run_pipeline
from moecompile.report import Report

_STATE = "_moecompile"


def optimize(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
             validate: bool = True, tolerance: float = 1e-4, pipeline: str = "default",
             kernels: str = "auto", mesh=None, placement=None, overlap="off", parallelism: str = "ep",
             shortcut: str | None = None,
             all_to_all: str = "auto", ranks_per_node: int | None = None,
             num_experts: int | None = None, upcycle_noise: float = 0.0, capacity_factor: float | None = None,
             batch_prioritized: bool = False) -> nn.Module:
    """Return an optimized model: same class, call signature, outputs, parameters and state_dict keys.

    The returned module is a structural copy of `model` that shares its `Parameter` objects (so one
    optimizer trains both, and `model` stays available as the eager reference). MoE blocks are found and
    rewritten at the first call, with the inputs of that call, or now when `example_inputs` is given.
    `kernels` picks the kernel backend of the MoE ops: "auto" (native on CPU, Triton on CUDA), or
    "native", "triton" or "reference" for every op.

    Expert parallelism: with `mesh` (a `torch.distributed` DeviceMesh, e.g. dims ("dp", "ep")), every rank
    keeps the experts its "ep" rank owns (E / ep each, or `placement` experts per rank) and tokens reach them
    by all-to-all. The optimized copy then holds new, smaller Parameters for the sharded experts, so it is
    compiled now, from `example_inputs`, and the optimizer must be built from the returned model's
    parameters. `parallelism="adaptive"` (a 1-D mesh) lays the experts out as Tutel does instead, each rank
    owning a unique slice, so the parallelism r (0: data parallel; 1: expert + data parallel; up to the ranks
    per expert: + model parallel) can change at every step with nothing migrated (runtime/adaptive.py;
    `set_parallelism`). `overlap` pipelines each MoE layer's exchanges with its expert computation: "off", a
    pipelining degree (int), or "auto" (chosen per layer by the cost model). On a multi-node mesh
    (`ranks_per_node` consecutive ep ranks per node) `all_to_all="2dh"` exchanges rows by the hierarchical
    all-to-all (intra-node, then inter-node with larger messages), "linear" by the flat one, and "auto" lets
    the cost model choose per layer (runtime/hierarchical.py).

    `shortcut="scmoe"` changes the architecture (explain() says so): each MoE block that follows a dense
    block routes top-1 on a shortcut from that block and adds a gated shared expert on its own input
    (passes/shortcut.py). New parameters are added to the returned model: build the optimizer after.
    `shortcut="dgmoe"` instead applies the block's experts top-1 twice, on the shortcut and on its own input.
    On a dense model, `shortcut="scmoe", num_experts=E` upcycles every second block's FFN into a ScMoE block:
    E experts copied from the previous block's FFN (plus `upcycle_noise` relative Gaussian noise), the
    block's own FFN as the shared expert.

    `capacity_factor` x applies Tutel's capacity rule to every MoE block lifted from the model, over its own
    routing (dropless, or its fixed capacity; what a dropped token contributes stays the block's): per
    capacity group of G tokens (the block's own groups, else all of a call's tokens; a rank's under
    expert parallelism), x > 0: C = ⌈k·x·G/E⌉; x = 0: the smallest C that drops nothing in the call;
    x < 0: that, capped at ⌈k·|x|·G/E⌉ (ir/spec.py RoutingOverride). `batch_prioritized=True`: where a
    capacity drops slots, the tokens with the largest router score keep theirs first (V-MoE). Validation
    then proves the lift with the block's own routing and the options against the reference kernels
    (passes/validate.py). `set_routing()` changes top-k and these options later, between calls.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"moecompile.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if kernels != "auto" and kernels not in BACKENDS:
        raise ValueError(f"moecompile.optimize: kernels={kernels!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    if shortcut not in (None, "scmoe", "dgmoe"):
        raise ValueError(f"moecompile.optimize: shortcut={shortcut!r}; expected None, 'scmoe' or 'dgmoe'")
    if num_experts is not None and (shortcut != "scmoe" or num_experts < 2):
        raise ValueError(f"moecompile.optimize: num_experts={num_experts!r} upcycles a dense model and needs "
                         "shortcut='scmoe' and at least 2 experts")
    if (mesh is not None or shortcut) and example_inputs is None and example_kwargs is None:
        raise ValueError("moecompile.optimize(mesh=... or shortcut=...) needs example_inputs: both change the "
                         "model's parameters (expert shards, new shortcut parameters), so this must happen before "
                         "you build the optimizer, not at the first call")
    if not (overlap in ("off", "auto") or (isinstance(overlap, int) and not isinstance(overlap, bool) and overlap >= 1)):
        raise ValueError(f"moecompile.optimize: overlap={overlap!r}; expected 'off', 'auto' or a pipelining degree >= 1")
    if all_to_all not in ("auto", "linear", "2dh") or (ranks_per_node is not None and ranks_per_node < 1) or \
            (all_to_all == "2dh" and ranks_per_node is None):
        raise ValueError(f"moecompile.optimize: all_to_all={all_to_all!r}, ranks_per_node={ranks_per_node!r}; "
                         "expected 'auto', 'linear' or '2dh' (which needs ranks_per_node >= 1)")
    if parallelism not in ("ep", "adaptive") or (parallelism == "adaptive" and (mesh is None or mesh.ndim != 1
                                                                                or shortcut is not None)):
        raise ValueError(f"moecompile.optimize: parallelism={parallelism!r}; expected 'ep', or 'adaptive' with a "
                         "1-D mesh (adaptive parallelism spans the whole mesh: its r = 0 is data parallelism) "
                         "and no shortcut")
    _check_routing("optimize", capacity_factor, batch_prioritized)
    options = Options(validate=validate, tolerance=tolerance, pipeline=pipeline, kernels=kernels, mesh=mesh,
                      placement=None if placement is None else tuple(placement), overlap=overlap,
                      parallelism=parallelism, all_to_all=all_to_all, ranks_per_node=ranks_per_node,
                      shortcut=shortcut, num_experts=num_experts, upcycle_noise=upcycle_noise,
                      capacity_factor=None if capacity_factor is None else float(capacity_factor),
                      batch_prioritized=batch_prioritized)
    fast = _share_parameters_copy(model)
    if example_inputs is not None or example_kwargs is not None:
        _compile(fast, tuple(example_inputs or ()), dict(example_kwargs or {}), options)
    else:
        def first_call(self, *args, **kwargs):
            del self.forward  # compiling runs the model: with the class's forward, not this one
            try:
                _compile(self, args, kwargs, options)
            except BaseException:
                self.forward = first_call.__get__(self)  # compile again at the next call
                raise
            return self(*args, **kwargs)
        fast.forward = first_call.__get__(fast)
        setattr(fast, _STATE, None)
    return fast


def explain(model: nn.Module) -> Report:
    """What moecompile found and did in `model`: an `optimize()` result, or a `torch.compile(...,
    backend="moecompile")` one (every graph compiled so far)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        from moecompile.backend import reports_for
        compiled = reports_for(model._orig_mod)
        if getattr(model._orig_mod, _STATE, False) is False:
            return compiled
        inner = explain(model._orig_mod)  # an optimize() result, compiled: its blocks, and the compiled graphs
        graphs = compiled.notes if compiled.passes else []  # (no passes: nothing compiled with the backend yet)
        return Report(inner.moe_layers, inner.notes + graphs, inner.passes + compiled.passes)
    ctx = getattr(model, _STATE, False)
    if ctx is False:
        raise ValueError("explain() takes a model returned by moecompile.optimize() or by torch.compile(model, "
                         "backend='moecompile')")
    if ctx is None:
        return Report(notes=["not compiled yet: moecompile compiles at the first call "
                             "(or pass example_inputs= to optimize())"])
    return ctx.report


_KEEP = object()  # set_routing: leave this setting as it is


def set_routing(model: nn.Module, *, top_k: int | None = None, capacity_factor=_KEEP, batch_prioritized=_KEEP
                ) -> None:
    """Change the routing of every MoE block of an optimize() result, from its next call on, without
    recompiling (each call reads the block's spec). Settings not passed stay as they are.

    `top_k`: experts per token, 1 ≤ k ≤ E (with a group limit, at most the experts of the kept groups).
    Route, dispatch, capacity, combine and the renormalization follow k (the routing weights become
    [T, k]); the scoring, renormalization and scale stay as read at compile time, so a model that changes
    more than k with k (one that renormalizes only when k > 1, as Tutel's gate and GPT-MoE here do) differs
    where it does, and losses computed outside the blocks from the model's config (Hugging Face's auxiliary
    loss) keep the config's k. `capacity_factor` and `batch_prioritized`: as optimize()'s; capacity_factor
    None restores each block's own capacity. Nothing is validated again: the lift was proven at compile
    time, and the ops are tested for any k, capacity and slot order against the reference kernels."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("set_routing() takes the optimize() result; torch.compile it after changing the routing")
    ctx = getattr(model, _STATE, False)
    if not ctx:
        raise ValueError("set_routing() takes a model returned by moecompile.optimize() that has compiled (after "
                         "its first call, or pass example_inputs= to optimize())")
    changes = {}
    if capacity_factor is not _KEEP:
        _check_routing("set_routing", capacity_factor, False)
        changes["capacity_factor"] = None if capacity_factor is None else float(capacity_factor)
    if batch_prioritized is not _KEEP:
        _check_routing("set_routing", None, batch_prioritized)
        changes["batch_prioritized"] = batch_prioritized
    layers = ctx.report.moe_layers
    left = [layer.name or "(the model)" for layer in layers if not layer.rewritten]
    if left:
        raise ValueError(f"set_routing(): MoE block(s) {', '.join(left)} were not rewritten (explain() says why), "
                         "so their routing cannot be changed")
    for layer in layers if top_k is not None else ():
        r, shortcut = layer.spec.route, layer.spec.shortcut
        selectable = r.num_experts * r.topk_group // r.n_group if r.n_group > 1 else r.num_experts
        if type(top_k) is not int or not 1 <= top_k <= selectable:
            raise ValueError(f"set_routing(top_k={top_k!r}): expected an int in [1, {selectable}] for {layer.name}")
        if shortcut is not None and shortcut.kind == "dgmoe" and top_k != 1:
            raise ValueError(f"set_routing(top_k={top_k}): {layer.name} is a DGMoE block, top-1 by construction")
    for layer in layers:
        spec = layer.spec
        spec.routing = dataclasses.replace(spec.routing, **changes)
        if top_k is not None:
            spec.route = dataclasses.replace(spec.route, top_k=top_k)
            layer.top_k = top_k


def _check_routing(where: str, capacity_factor, batch_prioritized) -> None:
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or
                                        not isinstance(capacity_factor, (int, float)) or
                                        not math.isfinite(capacity_factor)):
        raise ValueError(f"moecompile.{where}: capacity_factor={capacity_factor!r}; expected None or a finite "
                         "number (> 0: a fixed factor, 0: no drops, < 0: no drops up to a factor of -x)")
    if not isinstance(batch_prioritized, bool):
        raise ValueError(f"moecompile.{where}: batch_prioritized={batch_prioritized!r}; expected True or False")


def set_parallelism(model: nn.Module, r: int | None, degree: int | None = None, algorithm: str | None = None
                    ) -> None:
    """Fix the parallelism `r` (and the pipelining degree, the all-to-all algorithm: "linear", or "2dh" on a
    multi-node mesh) of every block of an `optimize(parallelism="adaptive")` model from its next call on, on
    every rank alike (the exchanges are collectives); r=None hands them back to each block's adaptive table.
    Nothing moves: every r runs on the same layout."""
    from moecompile.runtime.adaptive import AdaptiveExperts
    blocks = [m.spec.parallel for m in explain(model).moe_layers
              if m.spec is not None and isinstance(m.spec.parallel, AdaptiveExperts)]
    if not blocks:
        raise ValueError("set_parallelism needs a model from moecompile.optimize(..., parallelism='adaptive')")
    for parallel in blocks:
        parallel.pin(r, degree, algorithm)


def _compile(model: nn.Module, args: tuple, kwargs: dict, options: Options) -> None:
    """Run the pipeline without side effects on the user's state: compiling runs the model (to find and
    validate blocks), which would otherwise advance the RNG (dropout, jitter) and running statistics."""
    ctx = CompileContext(model, args, kwargs, options)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]):
            run_pipeline(ctx)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    for layer in ctx.report.moe_layers:  # compiling ran the blocks: count from the user's first call on
        if layer.spec is not None:
            layer.spec.drops = DropStats()
    setattr(model, _STATE, ctx)


def _share_parameters_copy(module: nn.Module) -> nn.Module:
    """Copy the module tree (new Module objects, same Parameters and buffers)."""
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    for attr in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_hooks",
                 "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if attr in new.__dict__:
            new.__dict__[attr] = copy.copy(module.__dict__[attr])
    new._modules = {k: None if m is None else _share_parameters_copy(m) for k, m in module._modules.items()}
    return new


