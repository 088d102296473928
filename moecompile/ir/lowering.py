"""Run one MoE block through the canonical ops, from its `MoESpec` and the block's own parameters."""
import dataclasses
import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moecompile.ir import ops
from moecompile.ir.choices import ChoiceRows, aux_loss, by_choice, renormalize_kept
from moecompile.ir.spec import CapacitySpec, MoESpec, attr_path
from moecompile.kernels import batched, native, onednn


def run_moe(spec: MoESpec, block: nn.Module, x: torch.Tensor):
    """x [..., D] → the block's outputs, in the order `spec.outputs` names them. A shortcut-connected block
    (ScMoE) routes another input, the shortcut's, usually begun earlier, where that input appeared."""
    if spec.fast_path and not torch.is_grad_enabled():
        results = fast_path.fast_call(spec, block, x)
        if results is not None:
            return results
    if spec.shortcut is None:
        return finish_routed(spec, block, [begin_routed(spec, block, x)], x)
    routed = spec.shortcut.take(x)
    branches = [routed if isinstance(routed, Routed) else begin_routed(spec, block, routed)]
    if spec.shortcut.kind == "dgmoe":  # the same experts, top-1 on the block's own input, avoiding the tap's pick
        branches.append(begin_routed(spec, block, x, avoid=branches[0].indices[:, 0]))
    return finish_routed(spec, block, branches, x)


def picked(spec: MoESpec, results: dict):
    """The block's outputs from `results` (name → tensor), in the order spec.outputs names them."""
    chosen = tuple(results[name] for name in spec.outputs)
    return chosen[0] if len(chosen) == 1 else chosen


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


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
    layout: ChoiceRows | None = None  # the [T, k] choices when the slots above are rows in GShard's order
    batched: str | None = None    # "decode" or "stacked": the experts run as batched matmuls (batched_path)


def begin_routed(spec: MoESpec, block: nn.Module, routed_in: torch.Tensor, avoid: torch.Tensor | None = None
                 ) -> Routed:
    """Router, route and dispatch of `routed_in` [..., D]; with a shortcut under expert parallelism the rows
    are sent at once, so the exchange overlaps whatever the model computes before the block. `avoid` [T]
    (DGMoE, top-1): each token's expert must differ from avoid[t]; where its first choice equals it, its
    second choice is taken."""
    r, kern = spec.route, spec.kernels
    tokens = flat_tokens(spec, block, routed_in)                                 # [T, D]
    if spec.router_module is not None:
        router = attr_path(block, spec.router_module)
        if has_hooks(router):
            # its hooks record what it returns (Hugging Face collects router logits for the aux loss
            # this way): call it so they see the same values; the routing below is still ours
            router(tokens if spec.router_module_flat else routed_in)
    logits = router_logits(spec, block, tokens)                                  # [T, E]
    score_bias = spec.score_bias.get(block) if spec.score_bias else None
    if score_bias is not None and r.n_group > 1 and r.group_fill == "exclude":
        # the route op sets the experts of groups not kept to 0; they are excluded (-inf) as in the block
        # when every kept score is ≥ 0: a constant shift of the bias makes it so, and changes no choice
        score_bias = score_bias - score_bias.detach().amin().clamp(max=0)
    if avoid is None:
        weights, indices, _ = ops.call(ops.route, logits, score_bias, r.num_experts, r.top_k, r.scoring,
                                       r.renormalize, r.scale, r.n_group, r.topk_group, r.group_score,
                                       kern["route"])                                # [T, k] ×2
    else:
        scores = logits.float().softmax(-1) if r.scoring == "softmax" else logits.float().sigmoid()  # [T, E]
        first, second = scores.topk(2, dim=-1).indices.unbind(-1)                       # [T] ×2
        indices = torch.where(first == avoid, second, first).unsqueeze(-1)              # [T, 1]
        weights = scores.gather(-1, indices) * r.scale
    for update in spec.buffer_updates:  # e.g. the per-expert counts of auxiliary-loss-free balancing
        update.apply(block, indices)
    cap = call_capacity(spec, indices, routed_in.shape)
    if cap is None:
        w1 = spec.weights.w1.get(block) if spec.stacked_path else None  # stacked: one [E, ...] weight
        form, counts = batched_path(spec, indices, tokens, w1)
        if form is not None:  # no rows to dispatch: finish_routed runs the batched form
            return Routed(tokens, logits, weights, indices, None, None, counts, batched=form)
    priority, layout = None, None
    if cap and cap.order == "choice":  # GShard: slots as rows in the order it takes capacity (ir/choices.py)
        layout, tokens, indices, weights, cap, priority = by_choice(tokens, indices, weights, cap, r.later_above)
    elif cap and spec.routing.batch_prioritized:  # each token's largest router score: its importance
        plain = logits.detach().float()
        priority = (plain.softmax(-1) if r.scoring == "softmax" else plain.sigmoid()).amax(-1)   # [T]
    x_perm, order, counts = ops.call(ops.dispatch, tokens, indices, r.num_experts, cap.capacity if cap else -1,
                                     cap.group_size if cap else 0, priority, kern["dispatch"])     # [N, D], [N], [E]
    if layout is not None and r.renormalize_kept:
        weights = renormalize_kept(layout, weights, order)
    if spec.expert_load is not None and torch.is_grad_enabled():
        spec.expert_load += counts
    if cap and not ops._tracing([x_perm]):  # eager: N is a host int already (no sync)
        spec.drops.record(indices.numel(), x_perm.shape[0], cap.capacity, torch.is_grad_enabled())
    routed = Routed(tokens, logits, weights, indices, order, x_perm, counts, cap, layout=layout)
    if spec.parallel is not None and spec.shortcut is not None:
        routed.flight = spec.parallel.start(x_perm, counts, capacity_rows(cap, tokens.shape[0]) if cap else None)
        routed.flight.send_all()
    return routed


def finish_routed(spec: MoESpec, block: nn.Module, branches: list[Routed], x: torch.Tensor):
    """Experts of each routed branch (through the exchange under expert parallelism, the shared expert
    meanwhile), combine, the shared expert's contribution; → the block's outputs (logits and weights of
    the first branch)."""
    kern = spec.kernels
    current = flat_tokens(spec, block, x)                                        # [T, D]
    shared = functools.partial(shared_expert, spec, block, current) if spec.shared is not None else None
    out, shared_out = None, None
    for b, routed in enumerate(branches):
        if routed.batched:  # begin_routed chose a batched form
            part = batched_experts(spec, block, routed)                           # [T, D]
            out = part if out is None else out + part
            continue
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
        part = combine(y_perm, routed, fill, kern["combine"], spec.combine_dtype, spec.combine_sums_once)  # [T, D]
        if routed.layout is not None:
            part = routed.layout.fold(part)
        out = part if out is None else out + part
    if spec.combine_sums_once and spec.combine_dtype is not None:  # a matmul combine rounds each sum, once
        out = out.to(spec.combine_dtype)
    if shared is not None:
        out = out + (shared() if shared_out is None else shared_out)
    first = branches[0]
    plain = first.layout or first  # the [T, k] choices and weights as the block sees them
    results = {"out": out.view(x.shape).to(x.dtype), "logits": first.logits, "weights": plain.weights}
    if "counts" in spec.outputs:  # tokens per first choice, before drops (a GShard-style gate's counts)
        results["counts"] = torch.bincount(plain.indices[:, 0], minlength=spec.num_experts)
    if spec.aux is not None:
        group = first.layout.group if first.layout else 0
        results["aux"] = aux_loss(spec.aux, first.logits, plain.indices[:, 0], group)
    return picked(spec, results)


def batched_path(spec: MoESpec, indices: torch.Tensor, tokens: torch.Tensor | None = None,
                 w1: torch.Tensor | None = None) -> tuple[str | None, torch.Tensor | None]:
    """Whether this call's routing `indices` [T, k] runs the experts as batched matmuls instead of dispatch,
    expert_ffn and combine (kernels/batched.py), as (form, counts); (None, None): the canonical ops.
      "decode"   decode_ffn (each slot gathers its expert's weights) for at most `spec.decode_slots`
                 slots; on CPU with two or more threads (`spec.stacked_path`) for twice that, up to a
                 quarter of the experts: the gather and the bmm use every thread, where the grouped
                 path's one-row GEMMs run on one (batched.decode_slots_on_threads);
      "stacked"  stacked_ffn, with the per-expert row counts [E], without autograd, on two or more
                 threads where `spec.stacked_path` allows it and batched.stacked_pays says it pays (with
                 autograd its padded backward lost to the grouped one: 40 vs 27 ms a Mixtral-like layer
                 at 64 tokens), and not where the grouped path's GEMMs of `tokens` [T, D] with the block's
                 stacked `w1` run on oneDNN (kernels/onednn.py): a Mixtral-like layer in turns, the grouped
                 path on oneDNN against the stacked form, at 8 to 64 tokens a tie, at 256 16.0 vs 17.9 ms.
    Only in eager (a traced graph keeps the canonical ops), and never with what the batched forms do not
    do: expert parallelism, a load counter, experts or a combine computed in a precision of their own (the
    batched forms combine in the experts' precision), autocast. A capacity is checked by the caller."""
    slots = indices.numel()
    if (not slots or spec.parallel is not None or spec.expert_load is not None or spec.expert.dtype is not None
            or spec.combine_dtype is not None or autocasting(indices) is not None or ops._tracing([indices])):
        return None, None
    threads = torch.get_num_threads() if spec.stacked_path else 1
    decode = spec.decode_slots if threads == 1 else batched.decode_slots_on_threads(spec.decode_slots,
                                                                                      spec.num_experts)
    if slots <= decode:
        return "decode", None
    if (threads > 1 and not torch.is_grad_enabled() and batched.stacked_may_pay(slots, spec.num_experts)
            and not (w1 is not None and onednn.takes(tokens, w1))):
        counts = torch.bincount(indices.flatten(), minlength=spec.num_experts)          # [E]
        if batched.stacked_pays(counts.tolist(), slots):
            return "stacked", counts
    return None, None


def batched_experts(spec: MoESpec, block: nn.Module, routed: Routed) -> torch.Tensor:
    """The routed experts' weighted sum for each token [T, D], by the batched form begin_routed chose
    (batched_path)."""
    w, ex = expert_weights(spec, block), spec.expert
    weights = [w[r] or None for r in ("w1", "w2", "w3", "b1", "b2", "b3")]
    ffn = (ex.activation, ex.fused, ex.alpha, ex.limit)
    if routed.batched == "decode":
        return batched.decode_ffn(routed.tokens, routed.weights, routed.indices, *weights, *ffn)
    return batched.stacked_ffn(routed.tokens, routed.weights, routed.indices, routed.counts, *weights, *ffn)


def router_logits(spec: MoESpec, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [T, D] → logits [T, E], in the precision the block computes them in (RouteSpec.dtype: input,
    weight and bias cast down and the result back up, as the block's own casts do)."""
    w, b, dtype = spec.router.get(block), spec.router_bias.get(block) if spec.router_bias else None, spec.route.dtype
    if dtype is None or tokens.dtype == dtype:
        return F.linear(tokens, w, b)
    return F.linear(tokens.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).to(tokens.dtype)


def flat_tokens(spec: MoESpec, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [..., D] → tokens [T, D]. The hidden size is checked first, as the original block's own matmuls
    would: a reshape alone regroups any input whose size D divides (e.g. [2, 3, 16] into [3, 32]) and the
    block would return a result of the wrong shape. A comparison of host ints (a guard on a symbolic size):
    no device work. The dtype needs no check here: the router's F.linear refuses one its weight does not
    take, as the original's does (an explicit check would also refuse what autocast makes valid)."""
    if x.dim() == 0 or x.shape[-1] != spec.hidden:
        raise ValueError(f"{type(block).__name__} expects hidden states of shape [..., {spec.hidden}] "
                         f"(its hidden size is {spec.hidden}), got {list(x.shape)}")
    if spec.input_dims is not None and x.dim() != spec.input_dims:  # e.g. `B, S, D = x.shape` in the original
        raise ValueError(f"{type(block).__name__} expects hidden states with {spec.input_dims} dims "
                         f"[..., {spec.hidden}], as the original block does; got {list(x.shape)}")
    return x.reshape(-1, spec.hidden)


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
    device = autocasting(rows)
    if device is not None:  # under torch.autocast: as the original's expert matmuls are
        rows, w = autocast_experts(spec, rows, w, device)
        with torch.autocast(device, enabled=False):
            return expert_ffn(spec, w, rows, rows_per_expert, save)
    if ex.dtype is not None and rows.dtype != ex.dtype:  # the block casts its experts down and back, as here
        cast = {k: [t.to(ex.dtype) for t in ts] for k, ts in w.items()}
        return expert_ffn(spec, cast, rows.to(ex.dtype), rows_per_expert, save).to(rows.dtype)
    return ops.call(ops.expert_ffn, rows, rows_per_expert, w["w1"], w["w2"], w["w3"], w["b1"], w["b2"], w["b3"],
                    ex.activation, ex.fused, ex.alpha, ex.limit, save, spec.kernels["expert_ffn"])[0]


def combine(y_perm: torch.Tensor, routed: "Routed", fill: torch.Tensor | None, backend: str,
            dtype: torch.dtype | None = None, sums_once: bool = False) -> torch.Tensor:
    """Σ_k weight · expert output per token (ops.combine). Under torch.autocast as the original's weighting and
    sum, which are elementwise ops and index_add (no autocast): in the promoted dtype of the expert outputs
    and the fp32 routing weights, not in autocast's lower precision (the kernels' bmm would be cast). A block
    that casts its combine to a precision of its own (`dtype`, MoESpec.combine_dtype) does so under autocast
    too; as a matmul (`sums_once`) the caller rounds the sums."""
    if dtype is not None and fill is None:  # (the frontend reads no block that passes dropped tokens through
        return weighted_sum(y_perm, routed, dtype, sums_once)  # and combines below its precision)
    device = autocasting(y_perm)
    if device is not None:
        y_perm = y_perm.to(torch.promote_types(y_perm.dtype, routed.weights.dtype))
        with torch.autocast(device, enabled=False):
            return ops.call(ops.combine, y_perm, routed.order, routed.weights, fill, backend)
    return ops.call(ops.combine, y_perm, routed.order, routed.weights, fill, backend)


def weighted_sum(y_perm: torch.Tensor, routed: "Routed", dtype: torch.dtype, sums_once: bool = False
                 ) -> torch.Tensor:
    """Σ_k weight · expert output per token [T, D] from operands in `dtype`, rounding as a block that weights
    and sums its experts' outputs in that precision does: each row times its weight, rounded, then added to
    its token's sum one row after another in expert order (index_add_ per expert), where the canonical
    combine rounds only the sum. `sums_once` (a matmul combine): the products and sums in y_perm's precision
    (a product of two bf16 or fp16 values is exact in fp32), left for the caller to round. Plain torch:
    autograd differentiates it."""
    k = routed.weights.shape[1]
    w = routed.weights.reshape(-1)[routed.order].to(dtype)                      # [N] each row's weight
    rows = y_perm.to(dtype)                                                      # [N, D]
    if sums_once:
        w, rows = w.to(y_perm.dtype), rows.to(y_perm.dtype)
    out = rows.new_zeros(routed.weights.shape[0], y_perm.shape[1])
    return out.index_add_(0, routed.order // k, rows * w.unsqueeze(-1))


# ---- torch.autocast ------------------------------------------------------------------------------------------
# The canonical ops run with autocast off: under autocast the rewrite casts where the original's ops would be
# cast, no more (the router's F.linear and the shared expert, plain model code, follow autocast themselves).
def autocasting(t: torch.Tensor) -> str | None:
    """The device type of `t` if autocast is on for it, else None."""
    device = t.device.type
    return device if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device) else None


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def autocast_experts(spec: MoESpec, rows: torch.Tensor, w: dict, device: str):
    """(rows, weights) cast to autocast's dtype if the original's expert matmuls are (mm, addmm, bmm: an
    nn.Linear or einsum expert), as they are (aten._grouped_mm: Hugging Face's stacked experts stay in their
    own precision). `spec.expert_autocast` (device type → bool) is what compilation read from the recorded
    block (api._note_autocast); without it, autocast's rule for matmuls: lower precision."""
    if not spec.expert_autocast.get(device, True):
        return rows, w
    dtype = torch.get_autocast_dtype(device)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return cast(rows), {role: [cast(t) for t in ts] for role, ts in w.items()}


def call_capacity(spec: MoESpec, indices: torch.Tensor, input_shape=None) -> CapacitySpec | None:
    """The capacity this call runs with, from the routing indices [T, k] of hidden states of `input_shape`
    [..., S, D]: the block's own, its groups resolved for this call (a per-sequence group is S tokens,
    CapacitySpec.for_input), or the one spec.routing's capacity factor x gives in those groups
    (RoutingOverride: Tutel's rule). x ≤ 0 reads the largest per-expert count of any group back to the
    host (one sync) and, under expert parallelism, takes the largest over the ep group (one tiny
    all-reduce), so every rank's [E, C, D] exchange buffer agrees. The result's groups are "fixed" or
    "call", what the dispatch kernels take."""
    own, x = spec.capacity, spec.routing.capacity_factor
    if own is not None and own.group == "sequence":
        if input_shape is None:
            raise ValueError("a capacity per sequence needs the hidden states' shape [..., S, D] to group tokens")
        own = own.for_input(input_shape)
    if own is not None and own.factor:  # the block's own rule for this call's tokens
        own = own.for_tokens(indices.shape[0], indices.shape[1], spec.num_experts)
    if x is None:
        return own
    T, k = indices.shape
    fixed = own is not None and own.group == "fixed"
    E, group_size = spec.num_experts, own.group_size if fixed else 0
    G = group_size if fixed else torch.sym_max(T, 1)                              # tokens per capacity group
    bound = math.ceil(round(k * abs(x) * G / E, 9))  # rounded first: 1.1·10 tokens is 11, not 12
    if x <= 0:
        groups = torch.arange(T * k, device=indices.device) // (G * k)          # [T·k] each slot's group
        per_group = torch.bincount(groups * E + indices.flatten(), minlength=-(-T // G) * E)  # [groups·E]
        needed = per_group.max() if per_group.numel() else per_group.new_zeros(())
        if spec.parallel is not None:
            dist.all_reduce(needed, op=dist.ReduceOp.MAX, group=spec.parallel.group)
        bound = needed.item() if x == 0 else torch.sym_min(needed.item(), bound)
        torch._check(bound >= 0)  # traced, bound is a data-dependent size: say it is one
    return CapacitySpec(bound, group_size, own.dropped if own else "zero", "fixed" if fixed else "call",
                        own.order if own else "token")


def capacity_rows(cap, tokens: int) -> int:
    """The most rows one expert can keep from `tokens` tokens: its capacity in each group of tokens. A
    call's capacity (call_capacity) has its groups resolved; a block's own per-sequence one does not know
    the sequence length (`cap.for_input(x.shape)` does): then the bound for any length, every token (an
    expert takes a token at most once)."""
    if cap.group == "sequence":
        return min(tokens, cap.capacity * tokens)
    groups = -(-tokens // cap.group_size) if cap.group_size else 1
    return cap.capacity * groups


def shared_expert(spec: MoESpec, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The dense expert every token passes, times its sigmoid gate when it has one: [T, D] → [T, D]."""
    out = attr_path(block, spec.shared)(tokens)
    if spec.shared_gate is not None:
        gate_b = spec.shared_gate_bias.get(block) if spec.shared_gate_bias else None
        out = torch.sigmoid(F.linear(tokens, spec.shared_gate.get(block), gate_b)) * out
    return out


from moecompile.ir import fast_path  # noqa: E402  (last: it calls this module's helpers)
