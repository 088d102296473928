"""shortcut: make each top-k MoE block shortcut-connected (ScMoE or DGMoE; Cai et al., ICML 2025), or upcycle a
dense model into ScMoE. This changes the architecture: the result is a different model, which explain()
says, with the parameter counts.

Contract:   with options.shortcut == "scmoe", every rewritten MoE block at `<container>.<i>.<path>` computes
                out = combine(top-1 routed experts of tap) + sigmoid(x · w_cg) · SE(x)
            x = the block's own input; tap = the input of the preceding sibling `<container>.<i-1>.<path>`
            when that is dense (Pos-2: the preceding block's post-attention residual after its own pre-MLP
            norm; MoE every other block, as in GPT-MoE and the paper), else, MoE in every block, the output
            of the first module the block runs when it is a normalization (Pos-1: its attention's input).
            Router and experts are kept; routing becomes top-1, weighted by the chosen expert's softmax
            probability (so the router trains). SE is the block's own shared expert when it has one, else a
            new dense expert of the experts' shape initialized to their mean; w_cg [1, D] is a new gate
            (CG-1), zero-initialized (coefficient 0.5) unless the shared expert already has a gate.
            With "dgmoe" there is no new shared expert: the same router and experts run top-1 twice,
                out = combine(top-1 of tap) + combine(top-1 of x, its second choice where it equals the tap's)
            (the paper's DoubleGating MoE, one gate used twice as in its Eq. 23; a shared expert is kept).
            With num_experts (a dense model): every second block's feed-forward module (read from its graph)
            becomes a ScMoE block with Pos-2 (`Upcycled`, `_upcycle`).
Invariants: runs after validate, so the top-k rewrite it starts from was checked against the original;
            new parameters live in the optimized copy only (`<block>.shortcut_shared.*`,
            `<block>.shortcut_gate`, the upcycled blocks), so the optimizer must be built from it; a block that
            does not fit stays the validated top-k block and explain() gives the reason. The routed branch
            starts at the tap (Tap.store → lowering.begin_routed), so under expert parallelism its exchange
            overlaps everything between the tap and the block.
Pseudo-code:
    order = call order of every numbered block's children (one forward)
    for lifted block B at c.i.p:
        tap = input of c.(i-1).p if it exists and routes nothing            # Pos-2
              else output of B's block's first module if it is a norm       # Pos-1
              else skip with a reason
        hook(tap: store it, begin route/dispatch/send); spec.route: top-1, no renormalization
        spec.shared = B's shared expert or new SharedExpert(mean of experts); spec.shared_gate = w_cg
    one forward records each tap's example value (for passes that run a block alone)
    report: blocks changed, parameters before → after
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
import time

import torch
from torch import nn

from moecompile.frontend.experts import read_dense_ffn
from moecompile.frontend.graph import Unsupported
from moecompile.ir.lowering import begin_routed, expert_ffn, expert_weights, run_experts_early
from moecompile.ir.spec import ExpertWeights, MoESpec, RouteSpec, WeightRef
from moecompile.passes.lift_moe import LiftedForward
from moecompile.passes.registry import CompileContext, Lifted, register_pass
from moecompile.passes.select_kernels import kernels_for
from moecompile.report import MoELayer
from moecompile.validation import max_relative_error


class Tap:
    """The shortcut for the current forward. A hook on the tapped module (on its input, or with
    `output=True` on its output) stores the value and `begin`s the routed branch right there (route,
    dispatch and, under expert parallelism, sending the rows), so that work overlaps whatever runs before
    the MoE block; the block then `take`s it, once. `example` is the value on the compile-time inputs, for
    passes that run the block alone (`prime()`); it is recorded while `recording` is set.

    Under expert parallelism the experts run in one of two slots (the schedule_overlap pass picks): "block",
    when the MoE block runs (the rows' trip overlaps everything in between, their return the shared
    expert), or "early", when `early_module` (the block's first module) starts: the return then overlaps
    the block's attention too. `timing`, when a dict, collects when the tap, the early point and the block
    ran, for that choice."""

    def __init__(self, kind: str, module_name: str, begin, output: bool = False):
        self.kind, self.module_name, self.begin, self.output = kind, module_name, begin, output
        self.value = self.example = None
        self.recording = False
        self.early_module, self.run_early, self.slot, self.timing = None, None, "block", None

    def attach(self, model: nn.Module) -> None:
        # bound methods, not lambdas: the optimized model pickles (torch.save) with its hooks
        module = model.get_submodule(self.module_name)
        if self.output:
            module.register_forward_hook(self._on_output)
        else:
            module.register_forward_pre_hook(self._on_input)
        if self.early_module is not None:
            model.get_submodule(self.early_module).register_forward_pre_hook(self._on_early)

    def _on_input(self, _module, args) -> None:
        self.store(args[0])

    def _on_output(self, _module, _args, out) -> None:
        self.store(out)

    def _on_early(self, _module, _args) -> None:
        self.early()

    def store(self, value: torch.Tensor) -> None:
        self._mark("tap")
        if self.recording:
            self.example = value.detach()
        self.value = self.begin(value)

    def early(self) -> None:
        self._mark("early")
        if self.slot == "early" and getattr(self.value, "flight", None) is not None:
            self.run_early(self.value)

    def prime(self) -> None:
        self.value = self.example

    def take(self, like: torch.Tensor):
        """The begun routed branch (lowering.Routed), or the raw input when primed."""
        self._mark("block")
        value, self.value = self.value, None
        tokens = getattr(value, "tokens", value)
        if tokens is None or tokens.numel() != like.numel():
            raise RuntimeError(f"moecompile: this shortcut block reads its routed input from {self.module_name}, "
                               f"which must run first in the same forward, with an input shaped like the block's")
        return value

    def _mark(self, point: str) -> None:
        if self.timing is not None:
            self.timing.setdefault(point, time.perf_counter())


class SharedExpert(nn.Module):
    """A dense expert with the routed experts' structure (activation, gate/up layout, biases), run through the
    same expert_ffn op as one expert that every token visits. Weights stacked [1, ...], nn.Linear layout."""

    def __init__(self, spec: MoESpec, weights: dict[str, list[torch.Tensor]]):
        super().__init__()
        self.expert, self.kernels = spec.expert, spec.kernels  # what expert_ffn reads of a spec
        self.roles = [role for role, ws in weights.items() if ws]
        for role in self.roles:
            ws = weights[role]
            init = ws[0].mean(0, keepdim=True) if len(ws) == 1 else torch.stack(ws).mean(0, keepdim=True)
            self.register_parameter(role, nn.Parameter(init.detach().clone()))

    def forward(self, x):                                                      # [T, D] → [T, D]
        w = {role: [getattr(self, role)] if role in self.roles else [] for role in ("w1", "w2", "w3", "b1", "b2", "b3")}
        save = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        counts = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        return expert_ffn(self, w, x, counts, save=save)


@register_pass("shortcut")
def shortcut(ctx: CompileContext) -> None:
    kind = ctx.options.shortcut
    if kind is None:
        return
    before = sum(p.numel() for p in ctx.model.parameters())
    routed = {lifted.layer.name for lifted in ctx.lifted}
    found = list(ctx.lifted)
    changed = _upcycle(ctx, kind) if ctx.options.num_experts else []
    order = _block_children(ctx)[0] if found else {}
    for lifted in found:
        layer, spec, block = lifted.layer, lifted.layer.spec, lifted.block
        if not layer.rewritten:
            continue
        tap_name, why = _preceding(ctx.model, layer.name, routed)
        position = "the input of " + str(tap_name) + " (Pos-2 shortcut)"
        if why:  # MoE in every block: the paper's Pos-1, the current block's attention input
            tap_name, why_not = _first_norm(ctx.model, layer.name, order)
            if why_not:
                spec.notes.append(f"not shortcut-connected: {why}; {why_not}")
                continue
            position = f"the output of {tap_name}, its attention's input (Pos-1 shortcut: MoE in every block)"
        tap = Tap(kind, tap_name, functools.partial(begin_routed, spec, block), output=position.startswith("the output"))
        if not tap.output:  # Pos-2: the experts may run early, when the MoE's own block starts
            tap.early_module, tap.run_early = _first_module(layer.name, order), functools.partial(
                run_experts_early, spec, block)
        tap.attach(ctx.model)
        _connect(spec, block, tap)
        layer.top_k = 1
        changed.append(layer.name)
        spec.notes.append(
            f"ScMoE: top-1 experts routed on {position}, plus a gated shared expert on the block's own input"
            if kind == "scmoe" else
            f"DGMoE: the experts applied top-1 twice, routed on {position} and on the block's own input, which "
            f"takes its second choice where the two agree")
    taps = [lifted.layer.spec.shortcut for lifted in ctx.lifted if lifted.layer.spec.shortcut is not None]
    if taps:  # one forward on the compile-time inputs records each tap's example value
        for t in taps:
            t.recording = True
        with torch.no_grad():
            ctx.model(*ctx.args, **ctx.kwargs)
        for t in taps:
            t.recording = False
    after = sum(p.numel() for p in ctx.model.parameters())
    ctx.report.notes.append(f"architecture changed (shortcut={kind!r}): {len(changed)} block(s) "
                            f"{', '.join(changed) or '-'}; parameters {before:,} → {after:,}")


def _preceding(model: nn.Module, name: str, routed: set[str]) -> tuple[str | None, str | None]:
    """(the preceding sibling's module name, None) or (None, why there is none)."""
    m = re.fullmatch(r"(.*?)\.?(\d+)\.(.+)", name)  # the first number: the block (Switch nests `layer.1`)
    if m is None:
        return None, f"{name} is not inside a numbered sequence of blocks"
    prev, path = _same_path_before(m), m.group(3)
    if prev is None:
        return None, "it is in the first block: there is no preceding block to tap"
    try:
        model.get_submodule(prev)
    except AttributeError:
        return None, f"the preceding block has no {path}"
    if prev in routed:
        return None, f"the preceding block's {path} is an MoE too"
    return prev, None


def _same_path_before(m: re.Match) -> str | None:
    """`<container>.<i-1>.<path>` from a match of `<container>.<i>.<path>` (groups 1-3); None when i is 0."""
    container, index, path = m.group(1), int(m.group(2)), m.group(3)
    if index == 0:
        return None
    return f"{container}.{index - 1}.{path}" if container else f"{index - 1}.{path}"


def _block_children(ctx: CompileContext) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """One forward on the compile-time inputs, watching the direct children of every numbered block
    (`<container>.<i>.<child>`): per block, its children in the order they first ran; per child, its first
    tensor input."""
    order: dict[str, list[str]] = {}
    inputs: dict[str, torch.Tensor] = {}

    def seen(name, block, args):
        if name not in inputs:
            order.setdefault(block, []).append(name)
            inputs[name] = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
    hooks = []
    for name, module in ctx.model.named_modules():
        m = re.fullmatch(r"((?:.*\.)?\d+)\.[^.]+", name)
        if m:
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=name, block=m.group(1): seen(name, block, args)))
    try:
        with torch.no_grad():
            ctx.model(*ctx.args, **ctx.kwargs)
    finally:
        for h in hooks:
            h.remove()
    return order, {name: x for name, x in inputs.items() if x is not None}


def _first_module(name: str, order: dict[str, list[str]]) -> str | None:
    """The first module the block holding `name` runs, unless that is `name` itself."""
    block = re.fullmatch(r"((?:.*\.)?\d+)\..+", name)
    children = order.get(block.group(1), []) if block else []
    return children[0] if children and not name.startswith(children[0]) else None


def _first_norm(model: nn.Module, name: str, order: dict[str, list[str]]) -> tuple[str | None, str | None]:
    """(the first module the MoE's own block runs, when it is a normalization: only 1-D parameters, its
    output feeding the attention, None) or (None, why not)."""
    first_name = _first_module(name, order)
    if first_name is None:
        return None, "no module runs before the MoE in its block"
    first = model.get_submodule(first_name)
    params = list(first.parameters())
    if not params or any(p.dim() != 1 for p in params):
        return None, f"the block's first module {first_name} is not a normalization"
    return first_name, None


def _connect(spec: MoESpec, block: nn.Module, tap: Tap) -> None:
    spec.route = dataclasses.replace(spec.route, top_k=1, renormalize=False)
    spec.shortcut = tap
    if tap.kind == "dgmoe":  # no shared expert of its own: the second top-1 pass takes its place
        return
    if spec.shared is None:
        block.add_module("shortcut_shared", SharedExpert(spec, expert_weights(spec, block)))
        spec.shared = "shortcut_shared"
    if spec.shared_gate is None:
        weight = spec.router.get(block)
        block.register_parameter("shortcut_gate", nn.Parameter(weight.new_zeros(1, spec.hidden)))
        spec.shared_gate = WeightRef("shortcut_gate")


# ---- dense → ScMoE by upcycling ----------------------------------------------------------------------------
def _upcycle(ctx: CompileContext, kind: str) -> list[str]:
    """Dense model (no MoE found): in every numbered block, the feed-forward child module is read from its
    graph (frontend.experts.read_dense_ffn); every second block's (1, 3, ...) becomes an `Upcycled` ScMoE
    block tapping the FFN of the block before. Returns the converted module names."""
    if kind != "scmoe":
        raise ValueError(f"moecompile: upcycling a dense model (num_experts=...) makes ScMoE blocks, not {kind!r}")
    if ctx.lifted:
        raise ValueError("moecompile: num_experts= upcycles a dense model; this one already has MoE blocks")
    ctx.report.notes = [n for n in ctx.report.notes if not n.startswith("no MoE blocks found")]
    order, inputs = _block_children(ctx)
    ffns = {}
    for name, x in inputs.items():
        try:
            ffns[name] = (x, *read_dense_ffn(ctx.model.get_submodule(name), x))
        except Unsupported:
            continue
    changed = []
    for name, (x, expert, weights) in ffns.items():
        m = re.fullmatch(r"(.*?)\.?(\d+)\.([^.]+)", name)  # a direct child of a numbered block
        prev = _same_path_before(m)
        if int(m.group(2)) % 2 == 0 or prev not in ffns:
            continue
        _install_upcycled(ctx, name, prev, x, ffns[prev][0], weights, ffns[prev][2], expert,
                          _first_module(name, order))
        changed.append(name)
    if not changed:
        ctx.report.notes.append("upcycling found no pair of blocks with feed-forward modules at the same path")
    return changed


class Upcycled(nn.Module):
    """A dense block's FFN turned into a ScMoE block (Upcycled.spec says how it runs): a router, E experts
    copied from the FFN of the block before (plus `noise` x each weight's std of Gaussian noise, so they
    can diverge), the block's own FFN as the shared expert, and the CG-1 gate (zero: coefficient 0.5, so
    the shared expert's output layer starts doubled and 0.5·SE is the dense FFN it replaces)."""

    def __init__(self, dense: nn.Module, dense_weights, prev: nn.Module, prev_weights, num_experts: int,
                 hidden: int, noise: float):
        super().__init__()
        self.shared = copy.deepcopy(dense)   # new Parameters: the user's model is left as it was
        with torch.no_grad():
            for refs in (dense_weights.w2, dense_weights.b2):
                for ref in refs or []:
                    ref.get(self.shared).mul_(2.0)
        weight = prev_weights.w1[0].get(prev)
        self.router = nn.Parameter(torch.randn(num_experts, hidden, dtype=weight.dtype) * 0.02)
        self.gate = nn.Parameter(weight.new_zeros(1, hidden))
        self.roles = []
        for role, refs in vars(prev_weights).items():
            if refs:
                w = refs[0].get(prev).detach()
                stacked = w.unsqueeze(0).repeat(num_experts, *([1] * w.dim()))
                stacked += noise * w.std() * torch.randn_like(stacked) if noise else 0.0
                self.register_parameter(role, nn.Parameter(stacked))
                self.roles.append(role)


def _install_upcycled(ctx, name, prev, x, x_prev, weights, prev_weights, expert, early_module) -> None:
    """Replace the FFN at `name` (input x) by an Upcycled ScMoE block tapping the FFN at `prev` (input
    x_prev), in the optimized copy; list it as a lifted block for the passes that follow."""
    E, D = ctx.options.num_experts, x.shape[-1]
    parent_name, _, child = name.rpartition(".")
    parent = ctx.model.get_submodule(parent_name)
    dense, prev_module = getattr(parent, child), ctx.model.get_submodule(prev)
    block = Upcycled(dense, weights, prev_module, prev_weights, E, D, ctx.options.upcycle_noise)
    spec = MoESpec(
        hidden=D, route=RouteSpec(E, 1), expert=expert, router=WeightRef("router"),
        weights=ExpertWeights(**{role: WeightRef(role, stacked=True) for role in block.roles}),
        shared="shared", shared_gate=WeightRef("gate"),
        kernels=kernels_for(ctx.options.kernels, x.device.type, name))
    tap = Tap("scmoe", prev, functools.partial(begin_routed, spec, block))
    tap.early_module, tap.run_early = early_module, functools.partial(run_experts_early, spec, block)
    tap.attach(ctx.model)
    spec.shortcut = tap
    block.forward = LiftedForward(spec, block)  # picklable, unlike a lambda (passes/registry.py)
    setattr(parent, child, block)
    tap.example = x_prev
    with torch.no_grad():  # how far the converted block starts from the dense FFN it replaces
        tap.prime()
        want = dense(x)
        drift = max_relative_error(block(x), want, want)
    layer = MoELayer(name, E, 1, "softmax", rewritten=True, spec=spec)
    ctx.report.notes.append(f"{name} upcycled: experts copied from {prev}, shared expert from its own FFN; "
                            f"its output starts {drift:.1%} (relative) from the dense FFN's")
    ctx.report.moe_layers.append(layer)
    ctx.lifted.append(Lifted(layer, block, block.forward, (x,), {}))
