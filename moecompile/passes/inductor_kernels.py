"""inductor_kernels: choose, on Inductor's post-grad graphs, the kernel backend of every canonical op node.

Contract:   an Inductor `CustomGraphPass` (backend.py installs it as `post_grad_custom_post_pass`, so it runs on
            the forward and the backward graph of every compiled graph, after AOTAutograd has partitioned
            them; backend.py's eager compiler runs it on the same graphs). For each call of a `moecompile::*`
            op it sets the last argument, `backend`, to `select_kernels.kernels_for(kernels, device)[op
            family]` (the family of `expert_ffn_backward` is `expert_ffn`), the device read from the fake
            values of the node's tensor inputs; a named backend that cannot run there leaves the node as it
            is, with the reason, as a backend that would break the invariants does. With
            `autotune` (and kernels="auto") it times the family's forward op on random inputs of the node's
            sizes under every backend the node may take and keeps the fastest. `self.outcomes` says what
            each call changed, kept and timed, for the backend's report.
Invariants: what crosses between the two graphs stays valid: a node only takes a backend whose saved tensors
            the other graph reads the same way. The forward ops save their inputs and outputs, whatever
            runs them, except `expert_ffn` (with save=True), whose saved g1, u, a, h are its backend's own:
            native and triton save the same shapes, so they may swap if the forward and the backward graph
            swap together; "reference" saves nothing and recomputes (its backward is plain torch ops, no
            `*_backward` node), so it never replaces, and is never replaced by, another backend there, and
            no `*_backward` node becomes "reference". Autotune's choice for a family is a deterministic
            function of (family, device, the forward op's argument sizes, dtypes and scalars, candidates),
            timed once per process: the forward graph's `expert_ffn` and the backward graph's
            `expert_ffn_backward`, compiled separately, read the same arguments and so choose alike. No
            node, shape or value changes otherwise; a failure inside the pass keeps the graph as it was;
            timing draws from a generator of its own, not the user's RNG.
Pseudo-code:
    for node calling moecompile::<op>: family = op without "_backward"; device = its inputs' device
        allowed = backends the node may take (the invariants); want = kernels_for(kernels, device)[family]
        if autotune and kernels == "auto" and the node carries the forward op's arguments (not route's or
            dispatch's backward: they lack the scores and token indices) and every size has a hint:
            want = argmin over allowed ∩ runnable of time(forward op under b, random inputs of those sizes)
        if want in allowed: node.backend = want          (else kept, and said why)
    uuid() = sha256(this file, select_kernels.py, kernels, TRITON_INTERPRET); None with autotune

Why here and not only in select_kernels: select_kernels chooses when a block is lifted, on the device of its
parameters then; this pass chooses on the graphs Inductor compiles, for the devices and sizes they will run
with, and only there can it time a candidate at those sizes. Why the forward op is what is timed, for the
backward nodes too: a backward op reads what its forward produced (token order, saved activations), which
random inputs cannot stand for without running the forward, and expert_ffn's two nodes must choose alike
anyway; the cost is that a backend with the faster forward and the slower backward is chosen all the same.
Why uuid() is None with autotune: the choice then rests on measured times, which Inductor's cache key cannot
see; a forward graph served by the cache beside a backward graph compiled afresh could pair one backend's
saved tensors with another's backward. Without autotune the output is a function of the graph, this source,
the options and whether Triton can run (the Triton version is in Inductor's key already, TRITON_INTERPRET in
ours).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, optimization_hint
from torch.utils._python_dispatch import _disable_current_modes

from moecompile.kernels import BACKENDS, why_no_triton
from moecompile.passes import select_kernels

# (family, device, forward-argument signature, backend) → median ms of the forward op: one timing per
# process, so every graph compiled here (forward and backward alike) chooses from the same numbers
_TIMES: dict[tuple, float] = {}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Outcome:
    """What one call of the pass did to one graph."""
    nodes: int = 0
    changed: Counter = field(default_factory=Counter)   # (op, old, new) → nodes
    kept: dict[str, str] = field(default_factory=dict)  # op → why the wanted backend was not set
    timed: dict[str, dict[str, float]] = field(default_factory=dict)  # family → backend → ms (inf: failed)
    error: str | None = None

    def __str__(self) -> str:
        if self.error:
            return f"kernel selection failed, graph left as it was: {self.error}"
        parts = [f"{op} {old}→{new} ×{n}" for (op, old, new), n in sorted(self.changed.items())]
        parts += [f"{op} kept ({why})" for op, why in sorted(self.kept.items())]
        parts += [f"{family} timed " + ", ".join(f"{b} {ms:.3g} ms" for b, ms in times.items())
                  for family, times in sorted(self.timed.items())]
        changed = sum(self.changed.values())
        return (f"kernel selection: {changed} of {self.nodes} op backends changed"
                + (": " + "; ".join(parts) if parts else ""))


def op_name(node: fx.Node) -> str | None:
    """"expert_ffn_backward" for a call of moecompile::expert_ffn_backward, None for any other node."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
            and node.target.namespace == "moecompile":
        return node.target.name().split("::")[1].split(".")[0]
    return None


class InductorKernels(CustomGraphPass):
    def __init__(self, kernels: str = "auto", autotune: bool = False):
        self.kernels, self.autotune = kernels, autotune
        self.outcomes: list[Outcome] = []  # one per call: Inductor calls it per graph and per subgraph

    def uuid(self) -> str | None:
        if self.autotune:
            return None  # measured times decide: Inductor must not cache (module docstring)
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        return get_hash_for_files((__file__, select_kernels.__file__),
                                  extra=f"kernels={self.kernels} interpret={interpret}").hex()

    def __call__(self, graph: fx.Graph) -> None:
        outcome = Outcome()
        self.outcomes.append(outcome)
        try:  # decide every node first, then apply: a failure leaves the graph whole, the compile going on
            chosen = [(node, name, self._choose(node, name, outcome)) for node in graph.nodes
                      if (name := op_name(node))]
        except Exception as e:  # a failure of ours must cost the selection, never the user's compile
            outcome.error = f"{type(e).__name__}: {e}"
            return
        for node, name, backend in chosen:
            outcome.nodes += 1
            current = _backend(node)
            if backend != current:
                outcome.changed[name, current, backend] += 1
                if "backend" in node.kwargs:
                    node.update_kwarg("backend", backend)
                else:
                    node.update_arg(len(node.args) - 1, backend)

    def _choose(self, node: fx.Node, name: str, outcome: Outcome) -> str:
        family, current = name.removesuffix("_backward"), _backend(node)
        device = _device(node)
        allowed = _allowed(node, name, family, current)
        try:
            want = select_kernels.kernels_for(self.kernels, device, "")[family]
        except ValueError as e:  # a named backend that cannot run here: said, not silently replaced
            outcome.kept[name] = str(e)
            return current
        candidates = [b for b in allowed if b != "triton" or not why_no_triton(device)]
        if self.autotune and self.kernels == "auto" and len(candidates) > 1 \
                and (signature := _signature(node, family)) is not None:
            times = {b: _timed(family, device, signature, b) for b in candidates}
            outcome.timed.setdefault(family, {}).update(times)
            if min(times.values()) < float("inf"):  # else none ran: the device's choice stands
                want = min(candidates, key=times.__getitem__)
        if want not in allowed:
            outcome.kept[name] = f"stays {current}: {want} would not match the block's other graph"
            return current
        return want


def _allowed(node: fx.Node, name: str, family: str, current: str) -> tuple[str, ...]:
    """The backends this node may take without changing what the other graph of its block reads."""
    if name != family:
        return ("native", "triton")  # a backward op: reference's backward is plain torch, never this node
    if family == "expert_ffn" and _arguments(node)["save"]:
        return ("reference",) if current == "reference" else ("native", "triton")  # saved g1, u, a, h
    return BACKENDS


def _arguments(node: fx.Node) -> dict:
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def _backend(node: fx.Node) -> str:
    return _arguments(node)["backend"]


def _device(node: fx.Node) -> str:
    """The device type of the node's tensor inputs, from their fake values."""
    for arg in node.all_input_nodes:
        if isinstance(val := arg.meta.get("val"), torch.Tensor):
            return val.device.type
    return "cpu"


def _signature(node: fx.Node, family: str) -> tuple | None:
    """The forward op's arguments as this node holds them, (name, TensorSpec or value) in schema order; None
    when the node lacks one (route's and dispatch's backward) or a size has no hint (a data-dependent size)."""
    held, out = {"save": True, **_arguments(node)}, []  # a backward node's forward saved
    for arg in getattr(torch.ops.moecompile, family).default._schema.arguments:
        if arg.name == "backend":
            continue  # timed under each candidate
        if arg.name not in held:
            return None
        try:
            out.append((arg.name, _spec(held[arg.name])))
        except LookupError:
            return None
    return tuple(out)


def _spec(value):
    """A hashable stand-in: a node's fake tensor as its sizes (hints) and dtype, lists element-wise."""
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    if isinstance(value, fx.Node):
        value = value.meta["val"]
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(_hint(s) for s in value.shape), value.dtype)
    return _hint(value) if isinstance(value, torch.SymInt) else value


def _hint(size) -> int:
    if free_unbacked_symbols(size):
        raise LookupError("a data-dependent size")
    return optimization_hint(size)


def _timed(family: str, device: str, signature: tuple, backend: str) -> float:
    key = (family, device, signature, backend)
    if key not in _TIMES:
        from torch._inductor.runtime.benchmarking import benchmarker
        op = getattr(torch.ops.moecompile, family).default
        try:
            with _disable_current_modes(), torch.no_grad():  # real tensors: the pass runs under fake mode
                args = _example_args(family, dict(signature), device, backend)
                _TIMES[key] = benchmarker.benchmark(op, args, device=device)
        except Exception:  # a candidate that cannot run (or inputs we cannot make) is not chosen
            _TIMES[key] = float("inf")
    return _TIMES[key]


def _example_args(family: str, signature: dict, device: str, backend: str) -> tuple:
    """Random arguments of the signature's sizes for the forward op `family`, valid for its contract."""
    generator = torch.Generator(device).manual_seed(0)  # not the user's RNG

    def make(name, spec):
        if isinstance(spec, tuple):
            return [make(name, s) for s in spec]
        if not isinstance(spec, TensorSpec):
            return spec
        if spec.dtype.is_floating_point:
            return torch.randn(spec.shape, dtype=spec.dtype, device=device, generator=generator)
        ints = dict(dtype=spec.dtype, device=device)
        if name == "indices":  # [T, k] expert ids
            return torch.randint(signature["num_experts"], spec.shape, generator=generator, **ints)
        if name == "counts":   # [E] rows per expert of x_perm
            rows = torch.randint(spec.shape[0], (signature["x_perm"].shape[0],), generator=generator,
                                 device=device)
            return torch.bincount(rows, minlength=spec.shape[0]).to(spec.dtype)
        if name == "order":    # [N] distinct slot ids t·k + j of weights [T, k]
            slots = torch.randperm(signature["weights"].shape[0] * signature["weights"].shape[1],
                                   generator=generator, device=device)
            return slots[:spec.shape[0]].to(spec.dtype)
        raise LookupError(f"no rule for integer argument {name} of {family}")

    op = getattr(torch.ops.moecompile, family).default
    return tuple(backend if a.name == "backend" else make(a.name, signature[a.name]) for a in op._schema.arguments)

