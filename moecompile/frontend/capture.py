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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import getitem

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

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
    return Recording(graph, params, inputs, outputs)
