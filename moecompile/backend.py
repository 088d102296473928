"""`torch.compile(model, backend="moecompile", options={...})`: moecompile's passes on Dynamo's graphs, then
AOTAutograd and Inductor.

Registered as a `torch_dynamo_backends` entry point (pyproject.toml), so no import is needed. Dynamo calls
the backend once per graph it captured:

    for each selection (top-k, max, argmax) in the graph, modules around it innermost first (≤ 3 levels):
        block = frontend.dynamo.extract(graph, module)      # its nodes as a module of its own
        fast = optimize(block, its real inputs, **options)  # the usual pipeline: find, lift, kernels, validate
                                                            # (symbolic sizes: their values in this call)
        if fast lifted it: the block's nodes → one call of fast (parameters passed in, gradients flow to them)
        else: reported, with the reason (a graph break inside a block shows up here)
    AOTAutograd → forward and backward graphs → Inductor (compile_fx), or run as they are (compiler="eager")
        in either, kernel selection (passes/inductor_kernels.py) on each graph: Inductor's post-grad pass

The canonical ops are custom ops with fake implementations and autograd formulas, so AOTAutograd traces
them into the forward and backward graphs as opaque calls; Inductor generates code for everything around
them (C++ on CPU, Triton on CUDA) and calls moecompile's kernels for them. The lifting runs on Dynamo's
graph, before AOTAutograd; one pass runs inside Inductor: kernel selection, a `CustomGraphPass` handed to
compile_fx as `config_patches={"post_grad_custom_post_pass": ...}`, which sets the backend of every op
node of both graphs for the device they run on (or, with autotune, the fastest measured), never splitting a
forward op from the backward that reads its saved tensors. Its `uuid()` is in Inductor's cache key (None
with autotune: no caching, as measured times decide). The ops each graph holds and what the pass changed
are recorded for explain(); `recorded` runs before the FX-graph cache's lookup, but the pass does not run on
a hit (noted so), and a hit of AOTAutograd's cache skips both graphs' compilation (noted too). Options:
those of optimize() that keep the model's parameters (`kernels`, `validate`, `tolerance`, `capacity_factor`,
`batch_prioritized`; `kernels` also rules the pass), `autotune` (True, or torch.compile's
mode="max-autotune": the pass times the backends; Inductor's own autotuning is not turned on), and
`compiler`: "inductor" (default) or "eager" (AOTAutograd without code generation, the pass included: for
debugging and fast tests). `shortcut` and `mesh` create parameters, which a backend cannot hand back to the
user's optimizer: compile `optimize(model, example_inputs, mesh=..., shortcut=...)`, whose blocks are lifted
already (the backend then finds no selection to lift and compiles the rest).

Changing shapes: Dynamo compiles a frame again for a new shape, with its sizes symbolic from then on
(dynamic=None), or symbolic from the start (dynamic=True); the graph's symbolic sizes (`s0`, `s0 * s1`) are
then graph inputs and nodes. Lifting works on real values: the graph runs once on the example inputs with
each symbolic input replaced by its value in this call (its hint, read without a guard), and each block is
optimized and validated on those concrete values. The lifted block is shape-generic (the canonical ops take
any token count; run_moe flattens [..., D] to [T, D]), so AOTAutograd traces it with the symbolic sizes
without a guard on them and the graph serves every later shape. What still recompiles does with any
backend: a size of 0 or 1 (Dynamo specializes them), a model's own shape-dependent branches.

Importing this module turns on Dynamo's `capture_scalar_outputs` and `capture_dynamic_output_shape_ops`: an
MoE block's data-dependent sizes (token counts per expert, `nonzero`) then stay inside one graph instead of
breaking it.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch
import torch._dynamo
from torch import fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

from moecompile.frontend import dynamo
from moecompile.kernels import BACKENDS
from moecompile.passes.inductor_kernels import InductorKernels, Outcome, op_name
from moecompile.report import MoELayer, Report, file_compiled

log = logging.getLogger("moecompile.backend")
torch._dynamo.config.capture_scalar_outputs = True
torch._dynamo.config.capture_dynamic_output_shape_ops = True

PASSED_ON = ("kernels", "validate", "tolerance", "capacity_factor", "batch_prioritized")  # optimize()'s, accepted
REFUSED = ("shortcut", "mesh", "placement", "overlap", "parallelism", "all_to_all", "ranks_per_node", "num_experts",
           "upcycle_noise")
COMPILERS = ("inductor", "eager")
MAX_LEVELS = 3
ROOT = "(the compiled module)"


def moecompile_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    autotune = bool(options.pop("autotune", False)) or (mode or "").startswith("max-autotune")
    refused = sorted(set(options) & set(REFUSED))
    if refused:
        raise ValueError(f"backend='moecompile': {', '.join(refused)} change the model's parameters, which a "
                         "torch.compile backend cannot hand to your optimizer; compile an optimize() result "
                         f"instead: torch.compile(moecompile.optimize(model, example_inputs, {refused[0]}=...), "
                         "backend='moecompile'), and build the optimizer from its parameters")
    unknown = sorted(set(options) - set(PASSED_ON))
    if unknown or compiler not in COMPILERS:
        raise ValueError(f"backend='moecompile': unknown option(s) {unknown or [compiler]}; options are "
                         f"{', '.join(PASSED_ON)}, autotune and compiler ({' or '.join(COMPILERS)})")
    if options.get("kernels", "auto") not in ("auto", *BACKENDS):  # optimize() would refuse it per block
        raise ValueError(f"backend='moecompile': kernels={options['kernels']!r}; expected 'auto' or one of "
                         f"{', '.join(BACKENDS)}")
    report = lift_blocks(gm, example_inputs, options)
    selection = InductorKernels(options.get("kernels", "auto"), autotune)
    compiled = (_eager if compiler == "eager" else _inductor)(gm, example_inputs, report, selection)
    # registered once compiled: a compilation that raises (Dynamo restarts the frame when AOTAutograd
    # specializes a float under dynamic=True, and calls the backend again) left no graph to explain
    file_compiled(report, example_inputs)
    return compiled


def _eager(gm: fx.GraphModule, example_inputs, report: Report, selection: InductorKernels):
    """AOTAutograd's forward and backward graphs, run as they are after the kernel-selection pass."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def run_as_is(which):
        def compile_graph(graph, _):
            _record_ops(report, graph.graph, which)
            selection(graph.graph)  # as in Inductor: the graphs run are those Inductor would compile
            graph.recompile()
            _record_selection(report, graph.graph, selection.outcomes[-1:], which)
            return make_boxed_func(graph.forward)
        return compile_graph
    return aot_autograd(fw_compiler=run_as_is("forward"), bw_compiler=run_as_is("backward"))(gm, example_inputs)


def _inductor(gm: fx.GraphModule, example_inputs, report: Report, selection: InductorKernels):
    """Inductor's compile_fx, the kernel-selection pass as its post-grad pass, recording each graph's ops."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    seen = []

    def recorded(graph, inputs, **kwargs):  # before the FX-graph cache's lookup: recorded on its hits too
        which = "backward" if kwargs.get("is_backward") else "forward"
        seen.append(which)
        _record_ops(report, graph.graph, which)
        ran = len(selection.outcomes)  # the pass adds one per (sub)graph it runs on: none on a cache hit
        compiled = compile_fx_inner(graph, inputs, **kwargs)
        _record_selection(report, graph.graph, selection.outcomes[ran:], which)
        return compiled
    compiled = compile_fx(gm, example_inputs, inner_compile=recorded,
                          config_patches={"post_grad_custom_post_pass": selection})
    if not seen:  # AOTAutograd's cache held both graphs: Inductor compiled neither here
        report.notes.append("forward and backward graphs: from AOTAutograd's cache (compiled earlier, with the "
                            "ops and kernel choices of then)")
    return compiled




def lift_blocks(gm: fx.GraphModule, example_inputs, options: dict) -> Report:
    """Replace every MoE block of `gm` that moecompile can lift with a call of its optimized version."""
    from moecompile.api import explain, optimize, trying
    report = Report(passes=["dynamo: lift_blocks"])
    found = dynamo.selections(gm)
    if not found:
        return report
    if any(isinstance(v, torch._subclasses.FakeTensor) for v in example_inputs):
        report.notes.append("Dynamo passed fake example inputs: MoE blocks were not lifted in this graph")
        log.warning("moecompile backend: %s", report.notes[-1])
        return report
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    concrete = [_hint(v) for v in example_inputs]
    values = _values(gm, concrete)
    values.update(zip(placeholders, concrete))
    lifted: list[str] = []
    for selection in found:
        paths = dynamo.stack(selection)
        if any(p in lifted for p in ["", *paths]):
            continue  # a second selection in a block already lifted (grouped top-k)
        failed: MoELayer | None = None  # the innermost block read as an MoE that could not be lifted
        for path in ([*reversed(paths), ""])[:MAX_LEVELS]:  # "": the compiled module itself
            try:
                block = dynamo.extract(gm, path, values)
                if block is None:
                    continue  # interleaved with the code around it
                with trying():
                    fast = optimize(block.module, tuple(values[a] for a in block.activations), **options)
            except Exception as e:  # a failure of ours must cost the rewrite, never the user's compile
                failed = failed or MoELayer(path or ROOT, None, None, None, False,
                                            f"internal error: {type(e).__name__}: {e}")
                continue
            layer = next(iter(explain(fast).moe_layers), None)
            if layer is not None and layer.rewritten:
                dynamo.replace(gm, block, _call_with_parameters(fast, block.module.names, len(block.activations)))
                report.moe_layers.append(dataclasses.replace(layer, name=path or ROOT))
                lifted.append(path)
                break
            if layer is not None and failed is None:
                failed = dataclasses.replace(layer, name=path or ROOT)
        else:
            if failed is None:  # no enclosing module reads as an MoE (a top-k elsewhere, or a broken-up block)
                report.notes.append(f"top-k in {paths[-1]} is not MoE routing, or not all of its block is in this "
                                    "graph (a graph break inside the block: torch._dynamo.explain shows where)")
            else:
                report.moe_layers.append(failed)
                log.warning("moecompile backend: %s not lifted: %s", failed.name, failed.reason)
    return report


def _hint(value):
    """A symbolic graph input (dynamic shapes: `s0` for a batch size) as the number it is in this call, read
    without adding a guard: the graph stays general, and real tensors need real sizes."""
    if isinstance(value, dynamo.SYMBOLIC):
        return guarding_hint_or_throw(value.node)
    return value


def _values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, object]:
    """The real value of every node on the example inputs (one forward, no autograd), leaving the user's state
    as it was: the RNG (dropout) and every tensor input but the parameters (buffers a forward updates)."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n] = out = super().run_node(n)
            return out
    state = [(t, t.clone()) for t in example_inputs
             if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        Recorder(gm).run(*example_inputs)
        for t, saved in state:
            t.copy_(saved)
    return values


def _call_with_parameters(fast: torch.nn.Module, names: list[str], n_activations: int):
    """The block as a function of its activations and parameters: the graph's parameter inputs stand in for
    the module's own (torch.func.functional_call), so AOTAutograd differentiates with respect to them."""
    def moe_block(*inputs):
        params = dict(zip(names, inputs[n_activations:]))
        return torch.func.functional_call(fast, params, inputs[:n_activations])
    return moe_block


def _record_ops(report: Report, graph: fx.Graph, which: str) -> None:
    """Note which moecompile ops a forward or backward graph holds, for explain()."""
    ops = Counter(name for n in graph.nodes if (name := op_name(n)))
    report.notes.append(f"{which} graph: " + (", ".join(f"{op} ×{c}" for op, c in sorted(ops.items()))
                                              or "no moecompile ops"))


def _record_selection(report: Report, graph: fx.Graph, outcomes: list[Outcome], which: str) -> None:
    """Note what the kernel-selection pass did to a graph holding moecompile ops, or that it did not run."""
    if not any(op_name(n) for n in graph.nodes):
        return
    if not outcomes:
        report.notes.append(f"{which} graph: kernel selection did not run (Inductor's FX-graph cache held "
                            "this graph, compiled with the choices the pass made then)")
    report.notes += [f"{which} graph: {o}" for o in outcomes if o.nodes or o.error]


