"""The eager fast path of a rewritten block: calls without autograd of plain blocks (select_kernels.fast_path)
run the kernels directly, without the canonical ops' wrappers; lowering.run_moe tries it first."""
import torch
from torch import nn

from moecompile.ir import lowering
from moecompile.ir.spec import MoESpec, attr_path
from moecompile.kernels import bagged, native


_PYTHON_KEY = torch._C.DispatchKey.Python  # in the thread's dispatch keys while any dispatch mode is on


def fast_call(spec: MoESpec, block: nn.Module, x: torch.Tensor):
    """An eager call without autograd of a block select_kernels.fast_path admits: the kernels begin_routed
    and finish_routed would run, called directly, the grouped experts on _grouped_mm alone, without the
    canonical ops' wrappers (ops.call's checks, the route's histogram and expert_ffn's placeholder outputs
    their schemas return) or what this call cannot need (capacity, expert parallelism, a load counter).
    Why: with the caches cold, where a decode step finds them, each op and layer of Python costs 5-20 µs
    (a Mixtral-like layer at 1 token, in turns with Hugging Face's: 1.71 against 1.63 ms before, 1.69
    against 1.70 this way; docs/benchmarks.md, "Small sizes"). Calls of at most spec.bag_slots token-slots
    run the experts as kernels/bagged.py's weighted sums of rows. None: the call needs the general path
    (decided before any work); the batched forms and calls the grouped form does not cover finish there.
    The tests run cheapest first, each a single call into torch: a plain tensor, not being compiled (Dynamo
    folds that to True before the next), no dispatch mode (a tracer's or a user's: the canonical ops show
    themselves to it), no autocast on any device."""
    if (type(x) is not torch.Tensor or spec.shortcut is not None or spec.parallel is not None
            or spec.expert_load is not None or spec.capacity is not None or spec.routing.capacity_factor is not None
            or torch.compiler.is_compiling() or torch._C._dispatch_tls_is_dispatch_key_included(_PYTHON_KEY)
            or torch._C._is_any_autocast_enabled()):
        return None
    if spec.router_module is not None and lowering.has_hooks(attr_path(block, spec.router_module)):
        return None
    r, ex = spec.route, spec.expert
    tokens = lowering.flat_tokens(spec, block, x)                                        # [T, D]
    logits = lowering.router_logits(spec, block, tokens)                                 # [T, E]
    weights, indices = native.choose(logits, r.top_k, r.scoring, r.renormalize, r.scale)  # [T, k] ×2
    ws = spec.weights  # stacked refs (fast_path): one [E, ...] tensor each, as the ops take them
    w1, w2, w3 = ws.w1.get(block), ws.w2.get(block), None if ws.w3 is None else ws.w3.get(block)
    threads = torch.get_num_threads()
    if (0 < indices.numel() <= bagged.slots_on_threads(spec.bag_slots, threads)
            and tokens.dtype == torch.float32 and tokens.is_cpu):
        kept = bagged.kept_tables(block, w1, w2, w3)  # current: the weights still suit the form
        if kept is None and bagged.takes(w1, w2, w3):
            kept = bagged.renewed(block, w1, w2, w3)
            if kept is None:
                spec.bag_slots = 0
                spec.notes.append(f"bagged decode form turned off: the expert weights changed between every two "
                                  f"calls ({bagged.RENEWALS} copies in a row were stale at their next call)")
        if kept is not None:
            out = bagged.bag_ffn(tokens, weights, indices, kept, ex.activation, ex.fused, ex.alpha, ex.limit, threads)
            return _outputs(spec, block, x, tokens, out, logits, weights)                  # out [T, D]
    form, counts = lowering.batched_path(spec, indices, tokens, w1)
    if form is not None:
        routed = lowering.Routed(tokens, logits, weights, indices, None, None, counts, batched=form)
        return lowering.finish_routed(spec, block, [routed], x)
    x_perm, order, counts = native.dispatch(tokens, indices, r.num_experts, -1, 0)        # [N, D], [N], [E]
    w1, w2, w3 = [w1], [w2], None if w3 is None else [w3]
    # the grouped form's range in expert_ffn_forward (_offsets, SMALL_ROWS), with the slots for the live experts
    if (indices.numel() * 4 < r.num_experts or x_perm.shape[0] * w1[0].shape[-2] > native.SMALL_ROWS
            or not native.grouped_mm_takes_all(x_perm, w1, w2, w3)):
        routed = lowering.Routed(tokens, logits, weights, indices, order, x_perm, counts)
        return lowering.finish_routed(spec, block, [routed], x)
    y = native.whole_call_ffn(x_perm, None, counts.cumsum(0, dtype=torch.int32), w1, w2, w3, None, None, None,
                              ex.activation, ex.fused, ex.alpha, ex.limit)[0]              # [N, D]
    return _outputs(spec, block, x, tokens, native.combine_forward(y, order, weights, None), logits, weights)


def _outputs(spec, block, x, tokens, out, logits, weights):
    """The block's outputs from the routed experts' sum `out` [T, D]: the shared expert added."""
    if spec.shared is not None:
        out = out + lowering.shared_expert(spec, block, tokens)
    out = out.view(x.shape)
    if out.dtype != x.dtype:  # fp32 routing weights over bf16 rows
        out = out.to(x.dtype)
    if spec.outputs == ("out",):
        return out
    return lowering.picked(spec, {"out": out, "logits": logits, "weights": weights})
