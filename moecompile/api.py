"""Public entry points: `optimize(model)` and `explain(model)`."""
from __future__ import annotations

import copy

import torch
import torch._dynamo
from torch import nn

from moecompile.kernels import BACKENDS
from moecompile.passes.registry import CompileContext, Options, run_pipeline
from moecompile.report import Report

_STATE = "_moecompile"


def optimize(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
             validate: bool = True, tolerance: float = 1e-4, pipeline: str = "default",
             kernels: str = "auto", mesh=None, placement=None, overlap="off", shortcut: str | None = None,
             num_experts: int | None = None, upcycle_noise: float = 0.0) -> nn.Module:
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
    parameters. `overlap` pipelines each MoE layer's exchanges with its expert computation: "off", a
    pipelining degree (int), or "auto" (chosen per layer by the cost model).

    `shortcut="scmoe"` changes the architecture (explain() says so): each MoE block that follows a dense
    block routes top-1 on a shortcut from that block and adds a gated shared expert on its own input
    (passes/shortcut.py). New parameters are added to the returned model: build the optimizer after.
    `shortcut="dgmoe"` instead applies the block's experts top-1 twice, on the shortcut and on its own input.
    On a dense model, `shortcut="scmoe", num_experts=E` upcycles every second block's FFN into a ScMoE block:
    E experts copied from the previous block's FFN (plus `upcycle_noise` relative Gaussian noise), the
    block's own FFN as the shared expert.
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
    options = Options(validate=validate, tolerance=tolerance, pipeline=pipeline, kernels=kernels, mesh=mesh,
                      placement=None if placement is None else tuple(placement), overlap=overlap,
                      shortcut=shortcut, num_experts=num_experts, upcycle_noise=upcycle_noise)
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


