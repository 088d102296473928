"""Fast CPU path for the canonical ops: forward and hand-written backward.

Why hand-written: the expert FFN backward reuses the pre-activations saved by the forward, so one
training step does exactly three GEMM passes (one forward, two backward) over contiguous per-expert row
blocks, like the "floor" in benchmarks/moe_layer.py. Routing is tiny ([T, E]) and reuses the reference.
"""
import torch
import torch.nn.functional as F

from moecompile.kernels import reference
from moecompile.kernels.activations import expert_activation

route = reference.route
dispatch = reference.dispatch


def route_backward(grad_weights, logits, score_bias, indices, scoring, renormalize, scale):
    """d(weights)/d(logits) with the chosen experts held fixed (selection has no gradient)."""
    with torch.enable_grad():
        leaf = logits.detach().float().requires_grad_()
        scores = leaf.softmax(-1) if scoring == "softmax" else leaf.sigmoid()
        w = scores.gather(-1, indices)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        (grad,) = torch.autograd.grad(w * scale, leaf, grad_weights)
    return grad.to(logits.dtype)


def dispatch_backward(grad_x_perm, order, k, num_tokens):
    grad_x = grad_x_perm.new_zeros(num_tokens, grad_x_perm.shape[-1])
    return grad_x.index_add_(0, order // k, grad_x_perm)


def expert_ffn_forward(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, alpha, limit):
    """→ y [N, D], and the pre-activations g, u [N, F] (u empty when not gated) that the backward reuses."""
    N, F_ = x_perm.shape[0], w1[0].shape[0]
    y = x_perm.new_empty(N, w2[0].shape[0])
    g_all = x_perm.new_empty(N, F_)
    u_all = x_perm.new_empty(N if w3 is not None else 0, F_)
    start = 0
    for e, n in enumerate(counts.tolist()):
        rows = slice(start, start + n)
        _linear_into(g_all[rows], x_perm[rows], w1[e], b1, e)
        u = None
        if w3 is not None:
            u = _linear_into(u_all[rows], x_perm[rows], w3[e], b3, e)
        h = expert_activation(g_all[rows], u, activation, alpha, limit)
        _linear_into(y[rows], h, w2[e], b2, e)
        start += n
    return y, g_all, u_all


def _linear_into(out, x, w, biases, e):
    """out = x wᵀ (+ biases[e]), written in place into a row block of a preallocated buffer."""
    if biases is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(biases[e], x, w.t(), out=out)


def expert_ffn_backward(grad_y, x_perm, counts, g_all, u_all, w1, w2, w3, has_bias, activation, alpha, limit):
    """→ grad_x [N, D] and per-expert lists of grads for w1, w2, w3, b1, b2, b3 (None where absent)."""
    grad_x = torch.empty_like(x_perm)
    grads = {k: [] for k in ("w1", "w2", "w3", "b1", "b2", "b3")}
    start = 0
    for e, n in enumerate(counts.tolist()):
        rows = slice(start, start + n)
        xe, gy = x_perm[rows], grad_y[rows]
        with torch.enable_grad():  # elementwise only: let autograd differentiate the activation
            g = g_all[rows].detach().requires_grad_()
            u = u_all[rows].detach().requires_grad_() if w3 is not None else None
            h = expert_activation(g, u, activation, alpha, limit)
        gh = gy @ w2[e]                                                   # [n, F]
        grad_g, *grad_u = torch.autograd.grad(h, [g] if u is None else [g, u], gh)
        grads["w2"].append(gy.t() @ h.detach())                          # [D, F]
        grads["w1"].append(grad_g.t() @ xe)                               # [F, D]
        torch.mm(grad_g, w1[e], out=grad_x[rows])
        if u is not None:
            grads["w3"].append(grad_u[0].t() @ xe)
            grad_x[rows].addmm_(grad_u[0], w3[e])
        if has_bias:
            grads["b1"].append(grad_g.sum(0))
            grads["b2"].append(gy.sum(0))
            if u is not None:
                grads["b3"].append(grad_u[0].sum(0))
        start += n
    return grad_x, {k: (v or None) for k, v in grads.items()}


def combine_forward(y_perm, order, weights, fill):
    """Weighted scatter-add of expert rows into token rows, without materializing [T, k, D]."""
    T, k = weights.shape
    w_rows = weights.flatten()[order].to(y_perm.dtype)                   # [N]
    out = y_perm.new_zeros(T, y_perm.shape[-1])
    out.index_add_(0, order // k, y_perm * w_rows.unsqueeze(-1))
    if fill is not None:
        out.addcmul_(_dropped_weight(weights, order).unsqueeze(-1), fill)
    return out


def combine_backward(grad_out, y_perm, order, weights, fill):
    T, k = weights.shape
    tok = order // k
    g_rows = grad_out[tok]                                                # [N, D]
    grad_y = g_rows * weights.flatten()[order].to(g_rows.dtype).unsqueeze(-1)
    grad_w = weights.new_zeros(T * k)
    grad_w[order] = (g_rows * y_perm).sum(-1).to(weights.dtype)
    grad_fill = None
    if fill is not None:
        dropped = torch.ones(T * k, dtype=torch.bool, device=order.device)
        dropped[order] = False
        grad_w = grad_w + dropped * (grad_out * fill).sum(-1).to(weights.dtype).repeat_interleave(k)
        grad_fill = grad_out * _dropped_weight(weights, order).unsqueeze(-1).to(grad_out.dtype)
    return grad_y, grad_w.view(T, k), grad_fill


def _dropped_weight(weights, order):
    """Per token, the summed routing weight of its dropped slots [T]."""
    dropped = torch.ones(weights.numel(), dtype=weights.dtype, device=weights.device)
    dropped[order] = 0
    return (weights.flatten() * dropped).view(weights.shape).sum(-1)
