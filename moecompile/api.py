"""Public entry points: `optimize(model)` and `explain(model)`."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import logging
import math
import sys
import types
import warnings

import torch
from torch import nn

from moecompile.frontend.capture import autocast_ops, compile_run
from moecompile.ir.spec import DropStats
from moecompile.kernels import BACKENDS
from moecompile.passes.registry import CompileContext, InstalledForward, Options, run_pipeline
from moecompile.report import STATE, Report, compiled_reports

_STATE = STATE
log = logging.getLogger(__name__)
# set while the torch.compile backend tries candidate blocks: it reports the outcome itself, so the warning of
# a compile that rewrote nothing (every try on a router-only submodule) would be noise
_TRYING = contextvars.ContextVar("moecompile_trying", default=False)


@contextlib.contextmanager
def trying():
    """Within it, compiles are the backend's tries: no warning when one rewrites nothing."""
    token = _TRYING.set(True)
    try:
        yield
    finally:
        _TRYING.reset(token)


def optimize(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
             validate: bool = True, tolerance: float = 1e-4, pipeline: str = "default",
             kernels: str = "auto", precision: str = "original", mesh=None, placement=None, overlap="off", parallelism: str = "ep",
             shortcut: str | None = None,
             all_to_all: str = "auto", ranks_per_node: int | None = None,
             num_experts: int | None = None, upcycle_noise: float = 0.0, capacity_factor: float | None = None,
             batch_prioritized: bool = False, decode_copy_bytes: int = 1 << 30) -> nn.Module:
    """Return an optimized model: same class, call signature, outputs, parameters and state_dict keys.

    The returned module is a structural copy of `model` that shares its `Parameter` and buffer objects (so
    one optimizer trains both, and `model` stays available as the eager reference). Its MoE blocks are
    found, rewritten into the canonical ops and validated against the original at the first call, with
    that call's inputs, or now when example inputs are given. A block that is not understood, or whose
    rewrite fails validation, keeps its original code; `explain()` says why. `model` may itself be an
    optimize() result: it is returned as it is, keeping the options it was optimized with (a warning names
    those of this call that differ), and compiled now if it was not and example inputs are given. The
    result pickles (`torch.save`) and deep-copies, before and after its first call.

    Compilation:
        model: the `nn.Module` to optimize: your own code or a Hugging Face model, dense or MoE.
        example_inputs: a tuple of positional arguments to compile with now; None compiles at the first call.
        example_kwargs: a dict of keyword arguments to compile with now (with or without example_inputs).
        validate: run translation validation and undo every rewrite that fails it; False skips it.
        tolerance: the largest relative error validation accepts, for outputs, gradients and buffers.
        pipeline: the pass pipeline to run, by name (passes/registry.py).

    Kernels:
        kernels: the kernel backend of the MoE ops: "auto" (native on CPU, Triton on CUDA), or "native",
            "triton" or "reference" for every op.
        precision: "original": every stage of a block (router, experts, combine) computes in the precision
            the original computes it in, also where it casts below the model's (a bf16 grouped GEMM in an
            fp32 model); "model": such stages compute in the model's precision instead, finer than the
            original's rounding (explain() says so per block; validation then allows that rounding's error).
        decode_copy_bytes: the most bytes of expert-weight copies the model may keep for calls without autograd
            of few tokens on CPU (decode): such calls run each expert as weighted sums of rows of an
            input-major copy of its weights, about 2x faster than through the stored layout. A block's copy
            is made at its first such call and renewed when its weights change; blocks are admitted in model
            order while their copies fit (explain() says which). 0: no copies.

    Expert parallelism:
        mesh: a `torch.distributed` DeviceMesh; every rank keeps the experts its "ep" rank owns (E / ep each)
            and tokens reach them by all-to-all. The result then holds new, smaller expert Parameters: it is
            compiled now (example inputs are required) and the optimizer must be built from its parameters.
        placement: how many experts each ep rank owns, in rank order (default: E / ep each).
        overlap: pipelining of each MoE layer's exchanges with its expert computation: "off", a degree (int
            >= 1), or "auto" (chosen per layer by the cost model, then re-tuned from measured times).
        parallelism: "ep", or "adaptive" (a 1-D mesh, no shortcut): Tutel's layout, each rank owning a unique
            slice of the experts, so the parallelism r (0: data parallel; 1: expert + data parallel; up to the
            ranks per expert: + model parallel) can change at every step (`set_parallelism`).
        all_to_all: "linear" (flat), "2dh" (hierarchical: intra-node, then inter-node; needs ranks_per_node)
            or "auto" (the cost model chooses per layer).
        ranks_per_node: consecutive ep ranks per node, on a multi-node mesh.

    Shortcut:
        shortcut: None, "scmoe" or "dgmoe": changes the architecture (explain() says so). "scmoe": each MoE
            block that follows another block routes top-1 on a shortcut from it and adds a gated shared
            expert on its own input; "dgmoe": the block's experts top-1 twice, on the shortcut and on its own
            input. Adds parameters: needs example inputs, and build the optimizer after.
        num_experts: with shortcut="scmoe" on a dense model: upcycle every second block's FFN into a ScMoE
            block of this many experts, copied from the previous block's FFN.
        upcycle_noise: relative Gaussian noise added to the upcycled experts' weights.

    Routing:
        capacity_factor: Tutel's capacity rule for every rewritten block, per capacity group of G tokens:
            x > 0: C = ceil(k*x*G/E); 0: the smallest C that drops nothing in the call; x < 0: that, capped
            at ceil(k*|x|*G/E). None keeps each block's own routing (dropless, or its fixed capacity).
        batch_prioritized: where a capacity drops slots, the tokens with the largest router score keep theirs
            first (V-MoE), instead of first come, first served.

    Returns:
        The optimized model: a new module of the same class whose blocks are rewritten (or will be, at its
        first call).

    Raises:
        TypeError: `model` is not an `nn.Module`.
        ValueError: an option value is out of range or options conflict (the message names them); `mesh` or
            `shortcut` without example inputs; `model` already sharded with `fully_shard` (optimize first,
            then shard); `kernels="triton"` on a device Triton cannot run on.
        RuntimeError: the model itself raised when run on the compile inputs (the example inputs or the first
            call's; moecompile.passes.find_moe.ModelRaised, the model's error as its __cause__).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"moecompile.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if kernels != "auto" and kernels not in BACKENDS:
        raise ValueError(f"moecompile.optimize: kernels={kernels!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    if precision not in ("original", "model"):
        raise ValueError(f"moecompile.optimize: precision={precision!r}; expected 'original' or 'model'")
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
    if isinstance(decode_copy_bytes, bool) or not isinstance(decode_copy_bytes, int) or decode_copy_bytes < 0:
        raise ValueError(f"moecompile.optimize: decode_copy_bytes={decode_copy_bytes!r}; expected a number of bytes >= 0")
    options = Options(validate=validate, tolerance=tolerance, pipeline=pipeline, kernels=kernels, precision=precision,
                      mesh=mesh,
                      placement=None if placement is None else tuple(placement), overlap=overlap,
                      parallelism=parallelism, all_to_all=all_to_all, ranks_per_node=ranks_per_node,
                      shortcut=shortcut, num_experts=num_experts, upcycle_noise=upcycle_noise,
                      capacity_factor=None if capacity_factor is None else float(capacity_factor),
                      batch_prioritized=batch_prioritized, decode_copy_bytes=decode_copy_bytes)
    _refuse_sharded(model)
    if getattr(model, _STATE, False) is not False:  # optimize() of an optimize() result
        return _optimize_again(model, options, example_inputs, example_kwargs)
    fast = _share_parameters_copy(model)
    if example_inputs is not None or example_kwargs is not None:
        _compile(fast, tuple(example_inputs or ()), dict(example_kwargs or {}), options)
    else:
        fast.forward = FirstCall(fast, options)  # compiles at the first call (FirstCall.__call__)
        setattr(fast, _STATE, None)
    return fast


def _torch_compiled(model: nn.Module) -> bool:
    """Whether `model` is a torch.compile wrapper; without importing Dynamo (slow), which made every one."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule)


def _refuse_sharded(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("moecompile.optimize: the model is already sharded with fully_shard (FSDP2); optimize it "
                         "first, then apply fully_shard to the optimized model (its layers, then the root)")


class FirstCall(InstalledForward):
    # `fast.forward` of an optimize() result until its first call, which compiles the model with that call's
    # inputs (then removes itself) and runs it. An object, not a closure, so that the model pickles and
    # deep-copies before its first call (and compiles at the first call after loading); it presents the
    # model's forward signature (InstalledForward).

    def __init__(self, model: nn.Module, options: Options):
        self.module, self.options = model, options
        self.previous = model.__dict__.get("forward")  # an instance forward the model already had
        if isinstance(self.previous, types.MethodType) and isinstance(self.previous.__self__, nn.Module):
            self.previous = types.MethodType(self.previous.__func__, model)  # bound to the copied model
        self.state = "pending"  # → "compiling" → "compiled"
        self.notes: list[str] = []  # for the report, once compiled

    @property
    def __wrapped__(self):
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def __call__(self, *args, **kwargs):
        if self.state != "pending":  # compiling (the compile run went through a wrapper of this forward)
            return self.__wrapped__(*args, **kwargs)  # or compiled and still called through such a wrapper
        installed = self.compile(args, kwargs)
        # the model's __call__ already ran its hooks: run its (new) forward, not the model again
        return (self.module.forward if installed else self.__wrapped__)(*args, **kwargs)

    def compile(self, args: tuple, kwargs: dict) -> bool:
        """Compile the model now (it then runs with its own forward); True if this was its forward."""
        model = self.module
        installed = model.__dict__.get("forward") is self
        if installed:  # compiling runs the model: with its own forward, not this one
            del model.forward
            if self.previous is not None:
                model.forward = self.previous
        self.state = "compiling"
        try:
            _compile(model, tuple(args), dict(kwargs), self.options)
        except BaseException:
            self.state = "pending"
            if installed:
                model.forward = self  # compile again at the next call
            raise
        self.state = "compiled"
        getattr(model, _STATE).report.notes.extend(self.notes)
        return installed


def _first_call_of(model: nn.Module) -> FirstCall | None:
    """The FirstCall of a lazy optimize() result, also under wrappers that set `__wrapped__`."""
    forward, seen = model.__dict__.get("forward"), 0
    while forward is not None and not isinstance(forward, FirstCall) and seen < 100:
        forward, seen = getattr(forward, "__wrapped__", None), seen + 1
    return forward if isinstance(forward, FirstCall) else None


AGAIN = "already optimized by moecompile: returned as it is, blocks kept as rewritten"


def _optimize_again(model: nn.Module, options: Options, example_inputs, example_kwargs) -> nn.Module:
    """optimize() of an optimize() result: the same model, with the options it was optimized with (its
    blocks were rewritten from the original's code, which only the original still runs); compiled now if it
    has not been and example inputs are given. explain() says so, and names options of this call not applied."""
    ctx, first = getattr(model, _STATE), _first_call_of(model)
    kept = ctx.options if ctx else first.options if first is not None else options
    differ = [f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(Options)
              if getattr(options, f.name) != getattr(kept, f.name)]
    note = AGAIN + (f" (options of the later call not applied: {', '.join(differ)})" if differ else "")
    if differ:
        warnings.warn(f"moecompile.optimize: the model is {note}; optimize the original model to change them",
                      stacklevel=3)
    if ctx:
        if note not in ctx.report.notes:
            ctx.report.notes.append(note)
    elif first is not None:
        if note not in first.notes:
            first.notes.append(note)
        if first.state == "pending" and (example_inputs is not None or example_kwargs is not None):
            first.compile(tuple(example_inputs or ()), dict(example_kwargs or {}))
    return model


def explain(model: nn.Module) -> Report:
    """What moecompile found and did in `model`.

    Args:
        model: an `optimize()` result (compiled or not), or a `torch.compile(..., backend="moecompile")` one
            (every graph compiled so far).

    Returns:
        A `Report`: one `MoELayer` per MoE block found, with whether it was rewritten and why not, plus
        model-wide notes and the passes that ran. Printed, it is a table. Before a lazy model's first call
        it holds only a note saying so.

    Raises:
        ValueError: `model` comes from neither `optimize()` nor the moecompile `torch.compile` backend.
    """
    if _torch_compiled(model):
        compiled = compiled_reports(model._orig_mod)
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
        first = _first_call_of(model)
        return Report(notes=["not compiled yet: moecompile compiles at the first call "
                             "(or pass example_inputs= to optimize())"] + (first.notes if first else []))
    return ctx.report


def _check_routing(where: str, capacity_factor, batch_prioritized) -> None:
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or
                                        not isinstance(capacity_factor, (int, float)) or
                                        not math.isfinite(capacity_factor)):
        raise ValueError(f"moecompile.{where}: capacity_factor={capacity_factor!r}; expected None or a finite "
                         "number (> 0: a fixed factor, 0: no drops, < 0: no drops up to a factor of -x)")
    if not isinstance(batch_prioritized, bool):
        raise ValueError(f"moecompile.{where}: batch_prioritized={batch_prioritized!r}; expected True or False")


def _compile(model: nn.Module, args: tuple, kwargs: dict, options: Options) -> None:
    """Run the pipeline without side effects on the caller's state: compiling runs the model and its blocks
    (to find and validate them), on private copies of the inputs and in a context of its own whatever the
    caller's (frontend/capture.py compile_run: autocast, inference mode, activation checkpointing, FSDP2)."""
    with compile_run(model, args, kwargs) as (args, kwargs):
        ctx = CompileContext(model, args, kwargs, options)
        run_pipeline(ctx)
    for lifted in ctx.lifted:
        spec = lifted.layer.spec
        if lifted.layer.rewritten and spec is not None:
            _note_autocast(spec, lifted.block)
    for layer in ctx.report.moe_layers:  # compiling ran the blocks: count from the user's first call on
        if layer.spec is not None:
            layer.spec.drops = DropStats()
    setattr(model, _STATE, ctx)
    if not _TRYING.get() and not any(layer.rewritten for layer in ctx.report.moe_layers):
        why = [f"{layer.name or 'the whole model'}: {layer.reason}" for layer in ctx.report.moe_layers] + ctx.report.notes
        log.warning("moecompile: no block of this %s was rewritten; it runs as the original model%s",
                    type(model).__name__, f" ({'; '.join(why)})" if why else "")


def _note_autocast(spec, block: nn.Module) -> None:
    """What torch.autocast does to the original block's expert matmuls, per device type, for the rewrite to do
    the same (ir/lowering.py autocast_experts): lower precision for mm/addmm/bmm experts, none for
    aten._grouped_mm ones."""
    roles = [getattr(spec.weights, role) for role in ("w1", "w2", "w3")]
    names = [ref.name for refs in roles if refs is not None for ref in (refs if isinstance(refs, list) else [refs])]
    lowers = autocast_ops(block, names)
    if lowers is not None:
        spec.expert_autocast = lowers


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


