"""The canonical MoE ops, as `torch.library.custom_op`s: route → dispatch → expert_ffn → combine.

Each op has a fake (meta) implementation, so it traces under torch.export / Dynamo, and an autograd
formula, so it trains. The formulas call backward ops that are custom ops too (`*_backward`), so a traced
backward graph holds one opaque node per op whatever runs inside it (a Triton kernel cannot be traced
through). The last argument, `backend`, names the kernels that run an op ("native", "triton" or
"reference", see moecompile/kernels/__init__.py): the kernel-selection pass's choice is part of the graph.
Shapes: T tokens, D hidden, E experts, k slots per token, N kept (token, slot) pairs (T·k when dropless),
F expert hidden size.
"""
from typing import Optional

import torch
from torch import Tensor

from moecompile.kernels import backend as kernels
from moecompile.kernels.activations import grad_buffer, is_stacked

Tensors = list[Tensor]
Parameter = torch.nn.Parameter
op = torch.library.custom_op


_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY,
          torch._C._TorchDispatchModeKey.FUNCTIONAL)


def _tracing(tensors) -> bool:
    """Whether these op arguments are being traced (Dynamo, export, AOTAutograd) rather than run. Plain loops
    and the cheapest test first: called for every op of every eager call (a decode step's worth of µs)."""
    for t in tensors:
        if t is not None and type(t) is not Tensor and type(t) is not Parameter:
            return True
    if torch.compiler.is_compiling():
        return True
    for key in _MODES:
        if torch._C._get_dispatch_mode(key) is not None:
            return True
    return False


def _backward_op(custom, backend: str, *tensors: Tensor):
    """The backward op an autograd formula calls. While tracing it is the custom op, one opaque node whatever
    runs inside. In eager it is the op's Python body: the same code without a trip through the dispatcher.
    The reference backend always runs the body: it differentiates by autograd, which a custom op's body
    cannot (it runs below autograd), and it is plain torch, so a traced graph keeps it as it is."""
    if backend != "reference" and _tracing(tensors):
        return custom
    return custom._init_fn


# ---- eager calls -------------------------------------------------------------------------------------------
# torch.library's Python path costs ~150 µs per op call with autograd here (argument binding that is
# quadratic in the argument count, pytree checks), more than route's or combine's kernels at decode sizes.
# So `call` runs an op through it only while tracing, where the op must appear as one node. In eager it runs
# the op's body: alone, or under plain autograd, or under an autograd.Function with the same setup and
# formula as the custom op (the ones registered below), whichever is the cheapest correct one.
_FORMULAS = {}


def _register_autograd(custom, backward, setup):
    custom.register_autograd(backward, setup_context=setup)
    _FORMULAS[custom] = (setup, backward)


def call(custom, *args):
    """Run canonical op `custom` (e.g. ops.route) on `args`, traced or eager as above. In eager the body
    runs alone when there is nothing to differentiate, or when the backend's forward is plain
    differentiable torch (its DIFFERENTIABLE set): autograd then records it as it would any model code."""
    tensors = []  # a plain loop: the nested comprehension cost 4.5 µs of a 30 µs decode-size route
    for a in args:
        if type(a) is list:
            tensors += a
        elif isinstance(a, Tensor):
            tensors.append(a)
    if _tracing(tensors):
        return custom(*args)
    if custom._name in kernels(args[-1]).DIFFERENTIABLE or \
            not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return custom._init_fn(*args)
    flat, sizes = _flatten(args)
    return _EagerOp.apply(*flat, custom, sizes)


def _flatten(args):
    """Tensor-list arguments spread out (autograd.Function sees only top-level tensors); sizes[i] is the
    length of list argument i, or -1 for any other argument."""
    flat, sizes = [], []
    for a in args:
        flat.extend(a) if isinstance(a, list) else flat.append(a)
        sizes.append(len(a) if isinstance(a, list) else -1)
    return flat, sizes


def _unflatten(flat, sizes):
    args, at = [], 0
    for n in sizes:
        args.append(list(flat[at:at + n]) if n >= 0 else flat[at])
        at += n if n >= 0 else 1
    return args


class _EagerOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        *flat, custom, sizes = args
        inputs = _unflatten(flat, sizes)
        output = custom._init_fn(*inputs)
        setup, ctx.formula = _FORMULAS[custom]
        setup(ctx, tuple(inputs), output)
        ctx.arg_sizes = sizes  # not `sizes`: the formulas keep their own state on ctx
        return output

    @staticmethod
    def backward(ctx, *grads):
        per_arg = ctx.formula(ctx, *grads)
        flat = []
        for n, g in zip(ctx.arg_sizes, per_arg):
            flat.extend(g or [None] * n) if n >= 0 else flat.append(g)
        return (*flat, None, None)


# ---- route: logits [T, E] → weights [T, k] fp32, indices [T, k], counts [E] -------------------------------
@op("moecompile::route", mutates_args=())
def route(logits: Tensor, score_bias: Optional[Tensor], num_experts: int, top_k: int, scoring: str,
          renormalize: bool, scale: float, n_group: int, topk_group: int, group_score: str,
          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).route(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group,
                                  topk_group, group_score)


@route.register_fake
def _(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group, topk_group, group_score,
      backend):
    T = logits.shape[0]
    return (logits.new_empty(T, top_k, dtype=torch.float32),
            logits.new_empty(T, top_k, dtype=torch.int64),
            logits.new_empty(num_experts, dtype=torch.int64))


@op("moecompile::route_backward", mutates_args=())
def route_backward(grad_weights: Tensor, logits: Tensor, indices: Tensor, scoring: str, renormalize: bool,
                   scale: float, backend: str) -> Tensor:
    # contiguous, as the fake says (native's transposed softmax gives a column-major gradient from 1024 rows;
    # Inductor checks the strides of what a custom op returns)
    return kernels(backend).route_backward(grad_weights, logits, indices, scoring, renormalize, scale).contiguous()


@route_backward.register_fake
def _(grad_weights, logits, indices, scoring, renormalize, scale, backend):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, score_bias, _, _, ctx.scoring, ctx.renormalize, ctx.scale, *_, ctx.backend = inputs
    ctx.save_for_backward(logits, output[1])


def _route_backward(ctx, grad_weights, _grad_indices, _grad_counts):
    logits, indices = ctx.saved_tensors
    grad = _backward_op(route_backward, ctx.backend, logits)(grad_weights, logits, indices, ctx.scoring,
                                                             ctx.renormalize, ctx.scale, ctx.backend)
    return (grad,) + (None,) * 10


_register_autograd(route, _route_backward, _route_setup)


# ---- dispatch: x [T, D] → x_perm [N, D] expert-major, order [N] (slot ids t·k+j), counts [E] -------------
# `priority` [T] or None, with a capacity: batch-prioritized routing, slots kept in order of their token's
# priority (kernels/reference.py slot_order); no gradient.
@op("moecompile::dispatch", mutates_args=())
def dispatch(x: Tensor, indices: Tensor, num_experts: int, capacity: int, group_size: int,
             priority: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = kernels(backend)
    if priority is None:
        return impl.dispatch(x, indices, num_experts, capacity, group_size)
    return impl.dispatch(x, indices, num_experts, capacity, group_size, priority)


@dispatch.register_fake
def _(x, indices, num_experts, capacity, group_size, priority, backend):
    n = indices.numel() if capacity < 0 else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(n, x.shape[1]), indices.new_empty(n), indices.new_empty(num_experts)


@op("moecompile::dispatch_backward", mutates_args=())
def dispatch_backward(grad_x_perm: Tensor, order: Tensor, k: int, num_tokens: int, backend: str) -> Tensor:
    return kernels(backend).dispatch_backward(grad_x_perm, order, k, num_tokens)


@dispatch_backward.register_fake
def _(grad_x_perm, order, k, num_tokens, backend):
    return grad_x_perm.new_empty(num_tokens, grad_x_perm.shape[1])


def _dispatch_setup(ctx, inputs, output):
    x, indices, *_, ctx.backend = inputs
    ctx.set_materialize_grads(False)
    ctx.k, ctx.num_tokens = indices.shape[1], x.shape[0]
    ctx.save_for_backward(output[1])


def _dispatch_backward(ctx, grad_x_perm, _grad_order, _grad_counts):
    (order,) = ctx.saved_tensors
    if grad_x_perm is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    grad_x = _backward_op(dispatch_backward, ctx.backend, order)(grad_x_perm, order, ctx.k, ctx.num_tokens,
                                                                 ctx.backend)
    return (grad_x,) + (None,) * 6


_register_autograd(dispatch, _dispatch_backward, _dispatch_setup)


# ---- expert_ffn: grouped GEMMs over contiguous expert row blocks: x_perm [N, D] → y [N, D] ---------------
# Each weight argument is E per-expert tensors or one stacked [E, ...] tensor; an absent one (w3 when not
# gated or fused, biases) is [] (the schema has no optional lists). `fused` ("", "halves", "interleaved")
# says how a fused gate/up w1 [2F, D] splits. Besides y, returns the tensors the backward reuses:
# g1 (first-layer output), u (separate up projection), a = act(gate), h = a·up. What they hold is the
# backend's own business (its backward reads them); they have zero rows when `save` is false (nothing will
# be differentiated) and always for the reference backend, which recomputes.
@op("moecompile::expert_ffn", mutates_args=())
def expert_ffn(x_perm: Tensor, counts: Tensor, w1: Tensors, w2: Tensors, w3: Tensors,
               b1: Tensors, b2: Tensors, b3: Tensors, activation: str, fused: str, alpha: float, limit: float,
               save: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend).expert_ffn_forward(x_perm, counts, w1, w2, w3 or None, b1 or None, b2 or None,
                                               b3 or None, activation, fused, alpha, limit, save=save)


@expert_ffn.register_fake
def _(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, save, backend):
    N, F1, F_ = x_perm.shape[0], w1[0].shape[-2], w2[0].shape[-1]
    y = x_perm.new_empty(N, w2[0].shape[-2])
    if backend == "reference" or not save:
        return y, x_perm.new_empty(0, F1), *(x_perm.new_empty(0, F_) for _ in range(3))
    gated = bool(w3) or bool(fused)
    return (y, x_perm.new_empty(N, F1), x_perm.new_empty(N if w3 else 0, F_), x_perm.new_empty(N, F_),
            x_perm.new_empty(N if gated else 0, F_))


@op("moecompile::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_y: Tensor, x_perm: Tensor, counts: Tensor, g1: Tensor, u: Tensor, a: Tensor,
                        h: Tensor, w1: Tensors, w2: Tensors, w3: Tensors, b1: Tensors, b2: Tensors, b3: Tensors,
                        activation: str, fused: str, alpha: float, limit: float, need_x: bool, backend: str
                        ) -> list[Tensor]:
    """→ [grad_x ([0, D] unless need_x), then one stacked gradient per weight role present (w1, w2, w3,
    b1, b2, b3 order): laid out like the weight when it was passed stacked, [E, ...] for E tensors]."""
    grad_x, grads = kernels(backend).expert_ffn_backward(
        grad_y, x_perm, counts, (g1, u, a, h), w1, w2, w3 or None, b1 or None, b2 or None, b3 or None,
        activation, fused, alpha, limit, need_x=need_x)
    grad_x = x_perm.new_empty(0, x_perm.shape[1]) if grad_x is None else grad_x
    return [grad_x] + [grads[name] for name in ("w1", "w2", "w3", "b1", "b2", "b3") if grads.get(name) is not None]


@expert_ffn_backward.register_fake
def _(grad_y, x_perm, counts, g1, u, a, h, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, need_x,
      backend):
    grad_x = x_perm.new_empty(x_perm.shape[0] if need_x else 0, x_perm.shape[1])
    return [grad_x] + [grad_buffer(ws, dim) for ws, dim in zip((w1, w2, w3, b1, b2, b3), _ROLE_DIMS) if ws]


_ROLE_DIMS = (3, 3, 3, 2, 2, 2)  # dims of a stacked w1, w2, w3, b1, b2, b3


def _ffn_setup(ctx, inputs, output):
    x_perm, counts, w1, w2, w3, b1, b2, b3, ctx.activation, ctx.fused, ctx.alpha, ctx.limit, ctx.save, \
        ctx.backend = inputs
    ctx.set_materialize_grads(False)  # the saved outputs get no gradient: no [N, F] zero tensors
    ctx.sizes = [len(t) for t in (w1, w2, w3, b1, b2, b3)]
    ctx.stacked = [is_stacked(ws, dim) for ws, dim in zip((w1, w2, w3, b1, b2, b3), _ROLE_DIMS)]
    ctx.save_for_backward(x_perm, counts, *output[1:], *w1, *w2, *w3, *b1, *b2, *b3)


def _ffn_backward(ctx, grad_y, *_grad_saved):
    if not ctx.save and ctx.backend != "reference":
        raise RuntimeError("moecompile::expert_ffn ran with save=False, so it cannot be differentiated")
    x_perm, counts, *rest = ctx.saved_tensors
    saved, flat = rest[:4], rest[4:]
    lists = []
    for n in ctx.sizes:
        lists.append(list(flat[:n]))
        flat = flat[n:]
    need_x = ctx.needs_input_grad[0]
    grad_x, *grads = _backward_op(expert_ffn_backward, ctx.backend, x_perm)(
        grad_y, x_perm, counts, *saved, *lists, ctx.activation, ctx.fused, ctx.alpha, ctx.limit, need_x, ctx.backend)
    grads = iter(grads)
    ordered = [[] if not n else [next(grads)] if stacked else list(next(grads).unbind(0))
               for n, stacked in zip(ctx.sizes, ctx.stacked)]
    return (grad_x if need_x else None, None, *ordered) + (None,) * 6


_register_autograd(expert_ffn, _ffn_backward, _ffn_setup)


# ---- combine: y_perm [N, D] → out [T, D] = Σ_k weight · y (dropped slots: 0, or fill [T, D]) -------------
@op("moecompile::combine", mutates_args=())
def combine(y_perm: Tensor, order: Tensor, weights: Tensor, fill: Optional[Tensor], backend: str) -> Tensor:
    return kernels(backend).combine_forward(y_perm, order, weights, fill)


@combine.register_fake
def _(y_perm, order, weights, fill, backend):
    return y_perm.new_empty(weights.shape[0], y_perm.shape[1])


@op("moecompile::combine_backward", mutates_args=())
def combine_backward(grad_out: Tensor, y_perm: Tensor, order: Tensor, weights: Tensor, fill: Optional[Tensor],
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """→ (grad_y, grad_weights, grad_fill: [0, D] when there is no fill)."""
    grad_y, grad_w, grad_fill = kernels(backend).combine_backward(grad_out, y_perm, order, weights, fill)
    return grad_y, grad_w, grad_out.new_empty(0, grad_out.shape[1]) if grad_fill is None else grad_fill


@combine_backward.register_fake
def _(grad_out, y_perm, order, weights, fill, backend):
    return (torch.empty_like(y_perm), torch.empty_like(weights),
            grad_out.new_empty(0 if fill is None else fill.shape[0], grad_out.shape[1]))


def _combine_setup(ctx, inputs, output):
    *tensors, ctx.backend = inputs
    ctx.save_for_backward(*tensors)


def _combine_backward(ctx, grad_out):
    y_perm, order, weights, fill = ctx.saved_tensors
    grad_y, grad_w, grad_fill = _backward_op(combine_backward, ctx.backend, y_perm)(grad_out, y_perm, order,
                                                                                    weights, fill, ctx.backend)
    return grad_y, None, grad_w, grad_fill if fill is not None else None, None


_register_autograd(combine, _combine_backward, _combine_setup)
