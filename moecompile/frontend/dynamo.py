"""Dynamo graphs: find the MoE blocks in an FX graph that torch.compile hands a backend, and cut them out.

Dynamo flattens the model into one graph per frame: parameters are placeholders (their `grapharg.source`
names the attribute path, `L['self']._modules['layers']._modules['0']...`), and every node carries the
stack of modules it was traced in (`meta["nn_module_stack"]`). A block is the set of nodes traced inside one
module path. `extract(gm, path, inputs)` turns such a set into an `nn.Module` that the rest of moecompile
can read like any user module:

    BlockModule                    # the block's parameters at their paths relative to the block
      forward(*activations)        # runs the block's nodes, copied into a graph of their own

so the usual pipeline (find_moe → lift_moe → ... → validate) lifts it, and `replace(gm, block, fn)` swaps
the block's nodes for one call of `fn(*activations, *parameters)`.

With dynamic shapes the graph also computes symbolic sizes (`s0 * s1` tokens). Dynamo computes each once and
reuses the node wherever the size recurs, so a node traced in one block may feed the next: such size
arithmetic belongs to no block (`size_arithmetic`), and a block reads it as an input, like `s0` itself.
"""
from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass

import torch
from torch import fx, nn

# the selections a router makes (Dynamo records torch-level calls: functions and Tensor methods)
SELECTIONS = {torch.topk, "topk", torch.max, "max", torch.argmax, "argmax"}


@functools.lru_cache(maxsize=None)  # a graph's nodes share a few hundred paths; extract() reads them often
def module_path(source: str) -> str:
    """`L['self']._modules['layers']._modules['0'].mlp[1]` → `layers.0.mlp.1` (a name in named_modules())."""
    s = re.sub(r"^L\['self'\]\.?", "", source)
    s = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", "." + s)
    s = re.sub(r"\[(?:'([^']+)'|(\d+))\]", lambda m: "." + (m.group(1) or m.group(2)), s)
    return s.strip(".")


def stack(node: fx.Node) -> list[str]:
    """The module paths `node` was traced in, outermost first (the root's own code: [])."""
    return [module_path(path) for path, _ in node.meta.get("nn_module_stack", {}).values()]


def selections(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that select top-k-like over scores: each names, through its stack, a candidate MoE block.
    Routing scores are [T, E] or [B, S, E]; a 4-D max is attention's (softmax stability, sinks)."""
    def scores_dim(n):
        first = n.args[0] if n.args else None
        value = first.meta.get("example_value") if isinstance(first, fx.Node) else None
        return value.dim() if isinstance(value, torch.Tensor) else 0
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in SELECTIONS
            and stack(n) and scores_dim(n) <= 3]


def parameter_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Placeholder → the qualified name of the model parameter or buffer it stands for."""
    out = {}
    for n in gm.graph.nodes:
        arg = n.meta.get("grapharg")
        if n.op == "placeholder" and arg is not None and re.search(r"_(?:parameters|buffers)\[", arg.source.name):
            out[n] = module_path(arg.source.name)
    return out


SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def size_arithmetic(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that compute a symbolic size from the graph's symbolic inputs alone (dynamic shapes: `s0 * s1`
    for a token count). Dynamo computes each such expression once per graph and reuses the node wherever
    the value recurs, so one traced in a block may feed the next block too: it belongs to no block. A block
    reads it as an input; the sizes a block derives from its tensors' data (`nonzero`, `.item()`) stay its own."""
    found: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method") and isinstance(n.meta.get("example_value"), SYMBOLIC) and \
                all(a in found or (a.op == "placeholder" and isinstance(a.meta.get("example_value"), SYMBOLIC))
                    for a in n.all_input_nodes):
            found.add(n)
    return found


@dataclass
class Block:
    path: str                      # module path of the block in the model
    module: nn.Module              # BlockModule: its parameters, forward(*activations)
    nodes: list[fx.Node]           # the block's nodes in gm, in graph order
    activations: list[fx.Node]     # gm nodes the block reads that are not parameters
    parameters: list[fx.Node]      # gm placeholders of the parameters it reads, in module.names order
    outputs: list[fx.Node]         # block nodes read after the block


class BlockModule(nn.Module):
    """A block cut out of a Dynamo graph; parameters registered at their paths below the block."""

    def __init__(self, graph_module: fx.GraphModule, names: list[str], tensors: list[torch.Tensor],
                 children: dict[str, nn.Module]):
        super().__init__()
        for name, child in children.items():  # submodules the lowering may call (a shared expert)
            self.add_module(name, child)
        # placeholders: activations, then parameters in `names` order. Not a submodule: the pipeline must see
        # the block's code as this module's own (the graph's parameters are inputs, not attributes)
        object.__setattr__(self, "graph_module", graph_module)
        self.names = names
        for name, t in zip(names, tensors):
            owner, _, attr = name.rpartition(".")
            if owner.split(".")[0] in children:
                continue  # the child registered it
            module = self
            for part in owner.split(".") if owner else ():
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
                if not isinstance(module, nn.Module):
                    raise ValueError(f"cannot rebuild the parameter path {name!r}: {part!r} is not a submodule")
            if isinstance(t, nn.Parameter):
                module.register_parameter(attr, t)
            else:
                module.register_buffer(attr, t)

    def forward(self, *activations):
        # looked up at every call, so torch.func.functional_call can substitute the graph's own inputs
        return self.graph_module(*activations, *(_lookup(self, n) for n in self.names))


def _lookup(module: nn.Module, name: str) -> torch.Tensor:
    for part in name.split("."):
        module = getattr(module, part)
    return module


def extract(gm: fx.GraphModule, path: str, values: dict[fx.Node, object]) -> Block | None:
    """The nodes traced inside module `path` ("": all of the compiled module's) as a Block; None if there are
    none, or if they are interleaved with other code so that one call cannot replace them. `values`: the real
    value of every placeholder (a parameter's is the Parameter itself)."""
    params = parameter_names(gm)
    prefix = path + "." if path else ""
    shared = size_arithmetic(gm)
    inside = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n not in shared
              and (not path or path in stack(n))]
    if not inside:
        return None
    members = set(inside)
    reads = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes if a not in members))
    weights = [a for a in reads if a in params and params[a].startswith(prefix)]
    # tensors first: the pipeline reads the first argument as the block's hidden states
    activations = sorted((a for a in reads if a not in weights),
                         key=lambda a: not isinstance(a.meta.get("example_value"), torch.Tensor))
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start = max([order[inside[0]]] + [order[a] + 1 for a in activations])
    if any(order[u] < start for o in outputs for u in o.users if u not in members):
        return None  # interleaved with the code around it: no single call can stand in for it
    graph = fx.Graph()
    env = {a: graph.placeholder(a.name) for a in activations + weights}
    for n in inside:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
    names = [params[w][len(prefix):] for w in weights]
    children = {}
    for child in dict.fromkeys(n.split(".")[0] for n in names if "." in n):
        block = extract(gm, prefix + child, values)
        if block is not None:  # else (a ModuleList, never called itself) a container is enough
            children[child] = block.module
    module = BlockModule(fx.GraphModule(gm, graph), names, [values[w] for w in weights], children)
    return Block(path, module, inside, activations, weights, outputs)


def replace(gm: fx.GraphModule, block: Block, fn) -> None:
    """Swap the block's nodes in gm for `fn(*activations, *parameters)`, which returns what they did."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_input = max(block.activations, key=order.__getitem__, default=None)
    before = block.nodes[0] if last_input is None or order[last_input] < order[block.nodes[0]] else last_input.next
    with gm.graph.inserting_before(before):
        call = gm.graph.call_function(fn, tuple(block.activations + block.parameters))
        results = [call] if len(block.outputs) == 1 else \
            [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(block.outputs))]
    for old, new in zip(block.outputs, results):
        new.meta = dict(old.meta)
        old.replace_all_uses_with(new)
    for n in reversed(block.nodes):
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
