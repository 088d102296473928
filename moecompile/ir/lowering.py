"""Run one MoE block through the canonical ops, from its `MoESpec` and the block's own parameters."""
import dataclasses
import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moecompile.ir import ops
from moecompile.ir.spec import CapacitySpec, MoESpec


def run_moe(spec: MoESpec, block: nn.Module, x: torch.Tensor):
    """x [..., D] → the block's outputs, in the order `spec.outputs` names them. A shortcut-connected block
    (ScMoE) routes another input, the shortcut's, usually begun earlier, where that input appeared."""
    if spec.shortcut is None:
        return finish_routed(spec, block, [begin_routed(spec, block, x)], x)
    routed = spec.shortcut.take(x)
    branches = [routed if isinstance(routed, Routed) else begin_routed(spec, block, routed)]
    if spec.shortcut.kind == "dgmoe":  # the same experts, top-1 on the block's own input, avoiding the tap's pick
        branches.append(begin_routed(spec, block, x, avoid=branches[0].indices[:, 0]))
    return finish_routed(spec, block, branches, x)


@dataclasses.dataclass
class Routed:
    """The routed branch after route and dispatch: what finish_routed needs."""
    tokens: torch.Tensor          # [T, D] the routed input
    logits: torch.Tensor          # [T, E]
    weights: torch.Tensor         # [T, k]
    indices: torch.Tensor         # [T, k]
    order: torch.Tensor           # [N]
    x_perm: torch.Tensor          # [N, D]
    counts: torch.Tensor          # [E]
    capacity: CapacitySpec | None = None  # the capacity this call ran with (call_capacity)
    flight: object = None         # runtime.expert_parallel.Flight, rows already sent (shortcut + expert parallel)


def begin_routed(spec: MoESpec, block: nn.Module, routed_in: torch.Tensor, avoid: torch.Tensor | None = None
                 ) -> Routed:
    """Router, route and dispatch of `routed_in` [..., D]; with a shortcut under expert parallelism the rows
    are sent at once, so the exchange overlaps whatever the model computes before the block. `avoid` [T]
    (DGMoE, top-1): each token's expert must differ from avoid[t]; where its first choice equals it, its
    second choice is taken."""
    r, kern = spec.route, spec.kernels
    tokens = routed_in.reshape(-1, spec.hidden)                                  # [T, D]
    if spec.router_module is not None:
        router = block.get_submodule(spec.router_module)
        if router._forward_hooks or router._forward_pre_hooks:
            # its hooks record what it returns (Hugging Face collects router logits for the aux loss
            # this way): call it so they see the same values; the routing below is still ours
            router(tokens if spec.router_module_flat else routed_in)
    router_b = spec.router_bias.get(block) if spec.router_bias else None
    logits = F.linear(tokens, spec.router.get(block), router_b)                  # [T, E]
    score_bias = spec.score_bias.get(block) if spec.score_bias else None
    if avoid is None:
        weights, indices, _ = ops.call(ops.route, logits, score_bias, r.num_experts, r.top_k, r.scoring,
                                       r.renormalize, r.scale, r.n_group, r.topk_group, r.group_score,
                                       kern["route"])                                # [T, k] ×2
    else:
        scores = logits.float().softmax(-1) if r.scoring == "softmax" else logits.float().sigmoid()  # [T, E]
        first, second = scores.topk(2, dim=-1).indices.unbind(-1)                       # [T] ×2
        indices = torch.where(first == avoid, second, first).unsqueeze(-1)              # [T, 1]
        weights = scores.gather(-1, indices) * r.scale
    cap = call_capacity(spec, indices)
    priority = None
    if cap and spec.routing.batch_prioritized:  # each token's largest router score: its importance
        plain = logits.detach().float()
        priority = (plain.softmax(-1) if r.scoring == "softmax" else plain.sigmoid()).amax(-1)   # [T]
    x_perm, order, counts = ops.call(ops.dispatch, tokens, indices, r.num_experts, cap.capacity if cap else -1,
                                     cap.group_size if cap else 0, priority, kern["dispatch"])     # [N, D], [N], [E]
    if spec.expert_load is not None and torch.is_grad_enabled():
        spec.expert_load += counts
    if cap and not ops._tracing([x_perm]):  # eager: N is a host int already (no sync)
        spec.drops.record(indices.numel(), x_perm.shape[0], cap.capacity, torch.is_grad_enabled())
    routed = Routed(tokens, logits, weights, indices, order, x_perm, counts, cap)
    if spec.parallel is not None and spec.shortcut is not None:
        routed.flight = spec.parallel.start(x_perm, counts, capacity_rows(cap, tokens.shape[0]) if cap else None)
        routed.flight.send_all()
    return routed


def finish_routed(spec: MoESpec, block: nn.Module, branches: list[Routed], x: torch.Tensor):
    """Experts of each routed branch (through the exchange under expert parallelism, the shared expert
    meanwhile), combine, the shared expert's contribution; → the block's outputs (logits and weights of
    the first branch)."""
    kern = spec.kernels
    current = x.reshape(-1, spec.hidden)                                         # [T, D]
    shared = functools.partial(shared_expert, spec, block, current) if spec.shared is not None else None
    out, shared_out = None, None
    for b, routed in enumerate(branches):
        tokens, x_perm, counts, cap = routed.tokens, routed.x_perm, routed.counts, routed.capacity
        ffn = experts_of(spec, block, x_perm)
        side = shared if b == len(branches) - 1 else None
        # expert parallel: the rows travel to the ranks holding their experts and back
        # (runtime/expert_parallel.py), and the shared expert runs while they do
        if routed.flight is not None:
            y_perm, shared_out = routed.flight.finish(ffn, side=side)
        elif spec.parallel is not None:
            y_perm, shared_out = spec.parallel.run(x_perm, counts, ffn,
                                                   capacity_rows(cap, tokens.shape[0]) if cap else None, side=side)
        else:
            y_perm = ffn(x_perm, counts)                                          # [N, D]
        fill = tokens if cap and cap.dropped == "identity" else None
        part = ops.call(ops.combine, y_perm, routed.order, routed.weights, fill, kern["combine"])  # [T, D]
        out = part if out is None else out + part
    if shared is not None:
        out = out + (shared() if shared_out is None else shared_out)
    first = branches[0]
    results = {"out": out.view(x.shape).to(x.dtype), "logits": first.logits, "weights": first.weights}
    picked = tuple(results[name] for name in spec.outputs)
    return picked[0] if len(picked) == 1 else picked


@dataclasses.dataclass
class ExpertsFFN:
    """ffn(rows, rows_per_expert) through the experts in `weights` (expert_ffn's form). A runtime that
    regroups the experts' weights (runtime/adaptive.py) calls a copy with other weights."""
    spec: MoESpec
    weights: dict
    save: bool

    def __call__(self, rows: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
        return expert_ffn(self.spec, self.weights, rows, rows_per_expert, self.save)


def experts_of(spec: MoESpec, block: nn.Module, x_perm: torch.Tensor) -> ExpertsFFN:
    """The block's experts as an ffn; it saves what a backward needs only if there will be one (the forward
    is leaner without)."""
    w = expert_weights(spec, block)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in [x_perm, *(t for ws in w.values() for t in ws)])
    return ExpertsFFN(spec, w, save)


def run_experts_early(spec: MoESpec, block: nn.Module, routed: Routed) -> None:
    """A shortcut block's expert computation before the block itself runs (the schedule's "early" slot):
    its results then travel back while the rest of the window computes."""
    routed.flight.run_experts(experts_of(spec, block, routed.x_perm))


def expert_weights(spec: MoESpec, block: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The block's expert weights as expert_ffn takes them (absent roles: [])."""
    return {k: v or [] for k, v in spec.weights.fetch(block).items()}


def expert_ffn(spec: MoESpec, w: dict, rows: torch.Tensor, rows_per_expert: torch.Tensor, save: bool):
    """rows [n, D] grouped by expert (rows_per_expert [E']) → [n, D] through the experts in `w`."""
    ex = spec.expert
    return ops.call(ops.expert_ffn, rows, rows_per_expert, w["w1"], w["w2"], w["w3"], w["b1"], w["b2"], w["b3"],
                    ex.activation, ex.fused, ex.alpha, ex.limit, save, spec.kernels["expert_ffn"])[0]


def call_capacity(spec: MoESpec, indices: torch.Tensor) -> CapacitySpec | None:
    """The capacity this call runs with, from the routing indices [T, k]: the block's own, or the one
    spec.routing's capacity factor x gives (RoutingOverride: Tutel's rule). x ≤ 0 reads the largest
    per-expert count of any group back to the host (one sync) and, under expert parallelism, takes the
    largest over the ep group (one tiny all-reduce), so every rank's [E, C, D] exchange buffer agrees."""
    own, x = spec.capacity, spec.routing.capacity_factor
    if x is None:
        return own
    T, k = indices.shape
    E, group_size = spec.num_experts, own.group_size if own else 0
    G = group_size or max(T, 1)                                                  # tokens per capacity group
    bound = math.ceil(round(k * abs(x) * G / E, 9))  # rounded first: 1.1·10 tokens is 11, not 12
    if x <= 0:
        groups = torch.arange(T * k, device=indices.device) // (G * k)          # [T·k] each slot's group
        per_group = torch.bincount(groups * E + indices.flatten(), minlength=-(-T // G) * E)  # [groups·E]
        needed = per_group.max() if per_group.numel() else per_group.new_zeros(())
        if spec.parallel is not None:
            dist.all_reduce(needed, op=dist.ReduceOp.MAX, group=spec.parallel.group)
        bound = needed.item() if x == 0 else torch.sym_min(needed.item(), bound)
        torch._check(bound >= 0)  # traced, bound is a data-dependent size: say it is one
    return CapacitySpec(bound, group_size, own.dropped if own else "zero")


def capacity_rows(cap, tokens: int) -> int:
    """The most rows one expert can keep from `tokens` tokens: its capacity in each group of tokens."""
    groups = -(-tokens // cap.group_size) if cap.group_size else 1
    return cap.capacity * groups


def shared_expert(spec: MoESpec, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The dense expert every token passes, times its sigmoid gate when it has one: [T, D] → [T, D]."""
    out = block.get_submodule(spec.shared)(tokens)
    if spec.shared_gate is not None:
        gate_b = spec.shared_gate_bias.get(block) if spec.shared_gate_bias else None
        out = torch.sigmoid(F.linear(tokens, spec.shared_gate.get(block), gate_b)) * out
    return out
