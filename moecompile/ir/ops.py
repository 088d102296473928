"""The canonical MoE ops, as `torch.library.custom_op`s: route → dispatch → expert_ffn → combine.

Each op has a fake (meta) implementation, so it traces under torch.export / Dynamo, and an autograd
formula, so it trains. The implementations live in `moecompile.kernels` (a pure-torch reference per op,
and the fast native CPU path used here). Shapes: T tokens, D hidden, E experts, k slots per token,
N kept (token, slot) pairs (T·k when dropless), F expert hidden size.
"""
from typing import Optional

import torch
from torch import Tensor

from moecompile.kernels import native

Tensors = list[Tensor]


# ---- route: logits [T, E] → weights [T, k] fp32, indices [T, k], counts [E] -------------------------------
@torch.library.custom_op("moecompile::route", mutates_args=())
def route(logits: Tensor, score_bias: Optional[Tensor], num_experts: int, top_k: int, scoring: str,
          renormalize: bool, scale: float, n_group: int, topk_group: int, group_score: str
          ) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        return native.route(logits, score_bias, num_experts, top_k, scoring, renormalize, scale,
                            n_group, topk_group, group_score)


@route.register_fake
def _(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group, topk_group, group_score):
    T = logits.shape[0]
    return (logits.new_empty(T, top_k, dtype=torch.float32),
            logits.new_empty(T, top_k, dtype=torch.int64),
            logits.new_empty(num_experts, dtype=torch.int64))


def _route_setup(ctx, inputs, output):
    logits, score_bias, _, _, ctx.scoring, ctx.renormalize, ctx.scale, *_ = inputs
    ctx.save_for_backward(logits, output[1])


def _route_backward(ctx, grad_weights, _grad_indices, _grad_counts):
    logits, indices = ctx.saved_tensors
    grad = native.route_backward(grad_weights, logits, indices, ctx.scoring, ctx.renormalize, ctx.scale)
    return (grad,) + (None,) * 9


route.register_autograd(_route_backward, setup_context=_route_setup)


# ---- dispatch: x [T, D] → x_perm [N, D] expert-major, order [N] (slot ids t·k+j), counts [E] -------------
@torch.library.custom_op("moecompile::dispatch", mutates_args=())
def dispatch(x: Tensor, indices: Tensor, num_experts: int, capacity: int, group_size: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    x_perm, order, counts = native.dispatch(x, indices, num_experts, capacity, group_size)
    return x_perm, order, counts


@dispatch.register_fake
def _(x, indices, num_experts, capacity, group_size):
    n = indices.numel() if capacity < 0 else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(n, x.shape[1]), indices.new_empty(n), indices.new_empty(num_experts)


def _dispatch_setup(ctx, inputs, output):
    x, indices, *_ = inputs
    ctx.set_materialize_grads(False)
    ctx.k, ctx.num_tokens = indices.shape[1], x.shape[0]
    ctx.save_for_backward(output[1])


def _dispatch_backward(ctx, grad_x_perm, _grad_order, _grad_counts):
    (order,) = ctx.saved_tensors
    if grad_x_perm is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    return native.dispatch_backward(grad_x_perm, order, ctx.k, ctx.num_tokens), None, None, None, None


dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


# ---- expert_ffn: grouped GEMMs over contiguous expert row blocks: x_perm [N, D] → y [N, D] ---------------
# Each weight argument is E per-expert tensors or one stacked [E, ...] tensor; an absent one (w3 when not
# gated or fused, biases) is [] (the schema has no optional lists). `fused` ("", "halves", "interleaved")
# says how a fused gate/up w1 [2F, D] splits. Besides y, returns the tensors the backward reuses:
# g1 (first-layer output), u (separate up projection), a = act(gate), h = a·up.
@torch.library.custom_op("moecompile::expert_ffn", mutates_args=())
def expert_ffn(x_perm: Tensor, counts: Tensor, w1: Tensors, w2: Tensors, w3: Tensors,
               b1: Tensors, b2: Tensors, b3: Tensors, activation: str, fused: str, alpha: float, limit: float
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return native.expert_ffn_forward(x_perm, counts, w1, w2, w3 or None, b1 or None, b2 or None, b3 or None,
                                     activation, fused, alpha, limit)


@expert_ffn.register_fake
def _(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit):
    N, F1, F_ = x_perm.shape[0], w1[0].shape[-2], w2[0].shape[-1]
    gated = bool(w3) or bool(fused)
    return (x_perm.new_empty(N, w2[0].shape[-2]), x_perm.new_empty(N, F1), x_perm.new_empty(N if w3 else 0, F_),
            x_perm.new_empty(N, F_), x_perm.new_empty(N if gated else 0, F_))


def _ffn_setup(ctx, inputs, output):
    x_perm, counts, w1, w2, w3, b1, b2, b3, ctx.activation, ctx.fused, ctx.alpha, ctx.limit = inputs
    ctx.set_materialize_grads(False)  # the saved outputs get no gradient: no [N, F] zero tensors
    ctx.sizes = [len(t) for t in (w1, w2, w3, b1, b2, b3)]
    ctx.save_for_backward(x_perm, counts, *output[1:], *w1, *w2, *w3, *b1, *b2, *b3)


def _ffn_backward(ctx, grad_y, *_grad_saved):
    x_perm, counts, *rest = ctx.saved_tensors
    saved, flat = rest[:4], rest[4:]
    lists = []
    for n in ctx.sizes:
        lists.append(list(flat[:n]) or None)
        flat = flat[n:]
    grad_x, grads = native.expert_ffn_backward(grad_y, x_perm, counts, saved, *lists,
                                               ctx.activation, ctx.fused, ctx.alpha, ctx.limit,
                                               need_x=ctx.needs_input_grad[0])
    ordered = [grads.get(name) or [] for name in ("w1", "w2", "w3", "b1", "b2", "b3")]
    return (grad_x, None, *ordered, None, None, None, None)


expert_ffn.register_autograd(_ffn_backward, setup_context=_ffn_setup)


# ---- combine: y_perm [N, D] → out [T, D] = Σ_k weight · y (dropped slots: 0, or fill [T, D]) -------------
@torch.library.custom_op("moecompile::combine", mutates_args=())
def combine(y_perm: Tensor, order: Tensor, weights: Tensor, fill: Optional[Tensor]) -> Tensor:
    return native.combine_forward(y_perm, order, weights, fill)


@combine.register_fake
def _(y_perm, order, weights, fill):
    return y_perm.new_empty(weights.shape[0], y_perm.shape[1])


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, grad_out):
    grad_y, grad_w, grad_fill = native.combine_backward(grad_out, *ctx.saved_tensors)
    return grad_y, None, grad_w, grad_fill


combine.register_autograd(_combine_backward, setup_context=_combine_setup)
