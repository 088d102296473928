"""Capture: find where a model routes tokens, and record candidate blocks as FX graphs of aten ops.

Two steps, both on real tensors:

1. `find_routing_sites(model, args, kwargs)` runs the model once and notes, for every top-k-like selection
   (aten.topk / max.dim / argmax), the stack of modules it happened in, with the inputs each of those
   modules received. Candidates for an MoE block are those modules, innermost first.
2. `record(block, args, kwargs)` runs one candidate again under a TorchDispatchMode that writes every aten
   op into a `torch.fx.Graph`, parameters and buffers as named placeholders.

Why a recorder and not torch.export or make_fx: the graph is only *read* (the analysis turns it into a
`MoESpec`, and the lifted block is then validated numerically), never executed, so it may be specialized
to the recorded input. Both torch.export (non-strict) and make_fx refuse the data-dependent expert loop of
transformers 5.x Mixtral (`for e in mask.nonzero()`); running it for real resolves that loop.

Both run under `compile_run`: on private copies of the caller's inputs, in a fixed context whatever the
caller's (no autocast, no inference mode, no saved-tensor hooks or dispatch modes of the caller's, FSDP2
parameters gathered), with the RNG, buffers and module counters put back afterwards: compiling must have no
effect the caller can observe except speed.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import types
import weakref
from dataclasses import dataclass, field
from operator import getitem

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger(__name__)

aten = torch.ops.aten
SELECTIONS = {aten.topk.default, aten.max.dim, aten.argmax.default}


@dataclass
class Site:
    """Where one selection op ran: the module path (outermost first) and each module's inputs."""
    stack: list[str]
    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)


def find_routing_sites(model: nn.Module, args: tuple, kwargs: dict) -> list[Site]:
    """One real forward pass; returns one Site per innermost module that ran a selection op."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[str, tuple, dict]] = []
    sites: dict[str, Site] = {}

    def pre(mod, a, kw):
        if id(mod) in names:
            stack.append((names[id(mod)], a, kw))

    def post(mod, a, kw, out):
        if id(mod) in names and stack and stack[-1][0] == names[id(mod)]:
            stack.pop()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            # routing scores are [T, E] or [B, S, E]; a 4-D max is attention (softmax stability, sinks)
            if func in SELECTIONS and stack and stack[-1][0] not in sites and a[0].dim() <= 3:
                sites[stack[-1][0]] = Site([s[0] for s in stack], {s[0]: (s[1], s[2]) for s in stack})
            return func(*a, **(kw or {}))

    h1 = nn.modules.module.register_module_forward_pre_hook(lambda m, a: pre(m, a, {}))
    h2 = nn.modules.module.register_module_forward_hook(lambda m, a, o: post(m, a, {}, o))
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: _set_kwargs(stack, names, m, kw), with_kwargs=True)
             for m in model.modules()]
    try:
        with torch.no_grad(), Spy():
            model(*args, **kwargs)
    finally:
        h1.remove(), h2.remove()
        for h in hooks:
            h.remove()
    return list(sites.values())


def _set_kwargs(stack, names, mod, kw):
    """Global pre-hooks do not see kwargs; the per-module one fills them in for the frame just pushed."""
    if stack and stack[-1][0] == names.get(id(mod)):
        stack[-1] = (stack[-1][0], stack[-1][1], dict(kw))


def _same_as(func):
    """The aten op a library's op stands for, recorded in its place so the analysis knows one spelling:
    transformers' `grouped_mm_fallback` (what its MoE code calls under torch.compile) is `aten._grouped_mm`
    with the same arguments (x sorted by expert, [E, in, out] weights, int32 cumulative counts)."""
    if func.namespace == "transformers" and func.name().split("::")[-1].split(".")[0] == "grouped_mm_fallback":
        return aten._grouped_mm.default
    return func


class _Recorder(TorchDispatchMode):
    """Runs ops for real and appends each to `graph`; tensors are tracked by identity."""

    def __init__(self, graph: torch.fx.Graph, known: dict[int, tuple[torch.Tensor, torch.fx.Node]]):
        super().__init__()
        self.graph, self.known = graph, known

    def _node_of(self, a):
        if isinstance(a, torch.Tensor):
            hit = self.known.get(id(a))
            if hit is not None and hit[0] is a:
                return hit[1]
            node = self.graph.placeholder(f"const_{len(self.known)}")
            node.meta.update(val=a, kind="const")
            self.known[id(a)] = (a, node)
            return node
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        n_args, n_kwargs = tree_map(self._node_of, (args, kwargs))
        node = self.graph.call_function(_same_as(func), tuple(n_args), n_kwargs)
        node.meta["val"] = out
        if isinstance(out, torch.Tensor):
            self.known[id(out)] = (out, node)  # an in-place op returns `self`: later uses see this version
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.call_function(getitem, (node, i))
                    item.meta["val"] = o
                    self.known[id(o)] = (o, item)
        return out


@dataclass
class Recording:
    """An FX graph of the block's aten ops. `params` maps placeholder nodes to parameter/buffer names;
    `inputs` are the placeholders of the block's tensor inputs; `outputs` the flattened output nodes."""
    graph: torch.fx.Graph
    params: dict[torch.fx.Node, str]
    inputs: list[torch.fx.Node]
    outputs: list[torch.fx.Node | None]


def record(block: nn.Module, args: tuple, kwargs: dict) -> Recording:
    graph = torch.fx.Graph()
    known: dict[int, tuple[torch.Tensor, torch.fx.Node]] = {}
    params = {}
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        node = graph.placeholder(name.replace(".", "_"))
        node.meta.update(val=t, kind="param")
        known[id(t)] = (t, node)
        params[node] = name
    inputs = []
    for i, t in enumerate(x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)):
        node = graph.placeholder(f"input_{i}")
        node.meta.update(val=t, kind="input")
        known[id(t)] = (t, node)
        inputs.append(node)
    with torch.no_grad(), _Recorder(graph, known):
        out = block(*args, **kwargs)
    flat = tree_flatten(out)[0]
    outputs = [known[id(o)][1] if isinstance(o, torch.Tensor) and id(o) in known else None for o in flat]
    graph.output(tuple(outputs))
    recording = Recording(graph, params, inputs, outputs)
    _MATMULS[block] = _matmuls_by_param(recording)
    return recording


# ---- what autocast does to a block ------------------------------------------------------------------------
# Per recorded block, the aten matmul ops that read each parameter (through views and casts). Under
# torch.autocast the original block computes a matmul in autocast's lower precision only if its op has an
# autocast kernel (mm, addmm, bmm, linear... do; aten._grouped_mm, Hugging Face's default expert path, does
# not: its experts stay in fp32 under autocast). The lifted block reads this to do the same (autocast_ops).
_MATMULS: "weakref.WeakKeyDictionary[nn.Module, dict[str, set[str]]]" = weakref.WeakKeyDictionary()
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS"}


def _matmuls_by_param(rec: Recording) -> dict[str, set[str]]:
    from moecompile.frontend.graph import MATMULS, param_read  # graph.py imports this module
    found: dict[str, set[str]] = {}
    for n in rec.graph.nodes:
        if n.op != "call_function" or n.target not in MATMULS:
            continue
        for name in filter(None, (param_read(rec, a) for a in n.args)):
            found.setdefault(name, set()).add(n.target.name())
    return found


def autocast_ops(block: nn.Module, param_names) -> dict[str, bool] | None:
    """Per device type, whether every matmul of the last recording of `block` that reads one of
    `param_names` computes in autocast's lower precision (None: no such matmul was recorded)."""
    ops = set().union(*(_MATMULS.get(block, {}).get(name, set()) for name in param_names))
    if not ops:
        return None
    lowers = {}
    for device, key in AUTOCAST_KEYS.items():
        try:
            lowers[device] = all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for op in ops)
        except RuntimeError:  # a dispatch key this build does not know
            continue
    return lowers


# ---- the conditions of every run while compiling -----------------------------------------------------------
@contextlib.contextmanager
def compile_run(model: nn.Module, args: tuple, kwargs: dict):
    """Runs of the model and of its blocks while compiling happen in here; yields private copies of
    (args, kwargs) to run the model on.

    What the caller observes afterwards is as before: the compile run works on copies of the arguments
    (a KV cache, any object the model mutates; tensors are cloned, modules and the model's own parameters
    and buffers are not), the RNG of the CPU and of the CUDA devices in play is forked, and buffers the
    runs changed (running statistics) and numbers on the modules (counters) are put back. Whatever context
    the first call came in, the runs see the same one: autocast off (the blocks are read and validated in
    their own precision; the rewrite then follows autocast as the original does), outside inference mode
    (whose tensors cannot be differentiated, as validation must, and whose composite ops are not
    decomposed), without the caller's saved-tensor hooks (activation checkpointing would count the compile
    run's tensors as the checkpointed region's) and Python dispatch modes (a FLOP counter, selective
    checkpointing), and with FSDP2's parameters gathered for the whole compilation (blocks are run on their
    own, outside the forward in which FSDP gathers them)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        for device in _autocasting():
            stack.enter_context(torch.autocast(device, enabled=False))
        stack.enter_context(_without_saved_tensors_hooks())
        stack.enter_context(_without_dispatch_modes())
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(model, args, kwargs)))
        stack.enter_context(_restored_module_state(model))
        stack.enter_context(_fsdp_gathered(model))
        yield private_copy((args, kwargs), model)


def _autocasting() -> list[str]:
    on = []
    for device in AUTOCAST_KEYS:
        try:
            if torch.is_autocast_enabled(device):
                on.append(device)
        except RuntimeError:
            continue
    return on


@contextlib.contextmanager
def _without_saved_tensors_hooks():
    """The caller's saved-tensor hooks (torch.utils.checkpoint's, CPU offloading's) off the stack meanwhile."""
    popped = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
        popped.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(popped):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


_TRACING = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY,
            torch._C._TorchDispatchModeKey.FUNCTIONAL)


@contextlib.contextmanager
def _without_dispatch_modes():
    """The caller's Python dispatch modes off meanwhile, unless a tracer's (the call is being traced)."""
    if any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING) or \
            not torch._C._len_torch_dispatch_stack():
        yield
        return
    with _disable_current_modes():
        yield


def _cuda_devices(model: nn.Module, args, kwargs) -> list[int]:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    tensors += [t for t in model.parameters()] + [t for t in model.buffers()]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


_NUMBERS = (bool, int, float)


@contextlib.contextmanager
def _restored_module_state(model: nn.Module):
    """Buffers (the same tensor objects with their old values) and numbers set on modules (counters) as they
    were; what compilation itself adds or replaces (forwards, parameters, submodules) is left alone."""
    buffers, numbers = [], []
    for m in model.modules():
        buffers += [(m, name, b, b._version, b.detach().clone()) for name, b in m._buffers.items() if b is not None]
        numbers += [(m, k, v) for k, v in vars(m).items() if type(v) in _NUMBERS]
    try:
        yield
    finally:
        for m, name, b, version, value in buffers:
            if name in m._buffers and m._buffers[name] is not b:
                m._buffers[name] = b
            if b._version != version:
                with torch.inference_mode(b.is_inference()), torch.no_grad():
                    b.copy_(value)
        for m, k, v in numbers:
            if k in vars(m) and type(vars(m)[k]) in _NUMBERS and vars(m)[k] != v:
                setattr(m, k, v)


@contextlib.contextmanager
def _fsdp_gathered(model: nn.Module):
    """FSDP2 (fully_shard) parameters unsharded for the whole compilation and not resharded after the
    compile run's forwards: the blocks are recorded and validated on their own, outside the forward of the
    FSDP module that gathers them (sharded, they are DTensors a block's own code cannot mix with its
    inputs). Afterwards each parameter group is as sharded as it was. A collective: every rank compiles."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import ShardedState
    except ImportError:  # a build without distributed
        yield
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield
        return
    for m in modules:
        m._get_fsdp_state()._lazy_init()  # a no-op once a forward has run (the first call's root forward has)
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [(g, g.post_forward_mesh_info, g._sharded_state) for g in groups]
    try:
        for m in modules:
            m.unshard()
        for g in groups:
            g.post_forward_mesh_info = None  # no resharding after the compile run's forwards
        yield
    finally:
        for g, mesh_info, state in saved:
            g.post_forward_mesh_info = mesh_info
            if state == ShardedState.SHARDED:
                g._to_sharded()
            elif state == ShardedState.SHARDED_POST_FORWARD:
                g._to_sharded_post_forward()


def private_copy(inputs, model: nn.Module):
    """A copy of `inputs` the compile run may change at will: tensors cloned (detached, normal tensors even
    from inference mode), containers and other objects (a Hugging Face Cache) deep-copied; modules, the
    model's parameters and buffers, and anything reachable from them, kept as they are. An object that
    cannot be deep-copied is used as it is (and logged)."""
    memo = {}
    for m in model.modules():
        memo[id(m)] = m
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    for t in _tensors_in(inputs, memo):
        with torch.no_grad():
            clone = t.detach().clone()
        if t.is_leaf and t.requires_grad and clone.is_floating_point():
            clone.requires_grad_()
        memo[id(t)] = clone
    memo[id(memo)] = [inputs]  # deepcopy keeps what it copied alive here; so do we

    def copy_one(x):
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, _ATOMS):
            return x
        try:
            return copy.deepcopy(x, memo)
        except Exception as e:
            log.info("moecompile: compiling runs the model on %s itself: it could not be copied (%r)",
                     type(x).__name__, e)
            return x
    return tree_map(copy_one, inputs)


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
          torch.memory_format, types.FunctionType, types.BuiltinFunctionType, type, nn.Module)


def _tensors_in(root, skip: dict) -> list[torch.Tensor]:
    """The tensors reachable from `root` through containers and object attributes (not through modules or
    what `skip` holds)."""
    found, seen, todo = [], set(skip), [root]
    while todo:
        x = todo.pop()
        if id(x) in seen or isinstance(x, _ATOMS):
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            todo += list(x.keys()) + list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo += list(x)
        else:
            todo += list(getattr(x, "__dict__", {}).values())
            slots = getattr(type(x), "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                todo.append(getattr(x, slot, None))
    return found
