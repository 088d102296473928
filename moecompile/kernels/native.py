"""Fast CPU path for the canonical ops: forward and hand-written backward.

Why hand-written:
- expert_ffn saves what the backward needs (pre-activation g, activation a, up projection u, product h),
  like autograd would, and differentiates the activation with the fused aten backward kernels, so a
  training step does three GEMM passes over contiguous per-expert row blocks and nothing is recomputed.
- combine and dispatch's backward move rows with gathers through the inverse permutation and reduce over
  k with a batched matmul: no scatter-add (serial on CPU), no [T, k, D] weighted temporary.
Routing is tiny ([T, E]) and reuses the reference.
"""
import torch

from moecompile.kernels import reference
from moecompile.kernels.activations import expert_activation

aten = torch.ops.aten
route = reference.route
dispatch = reference.dispatch


def route_backward(grad_weights, logits, indices, scoring, renormalize, scale):
    """d(weights)/d(logits) with the chosen experts held fixed (selection has no gradient)."""
    with torch.enable_grad():
        leaf = logits.detach().float().requires_grad_()
        scores = leaf.softmax(-1) if scoring == "softmax" else leaf.sigmoid()
        w = scores.gather(-1, indices)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        (grad,) = torch.autograd.grad(w * scale, leaf, grad_weights)
    return grad.to(logits.dtype)


def to_slots(rows, order, num_slots):
    """rows [N, D] in expert-major order → [num_slots, D] in slot order (t·k+j); dropped slots are zero."""
    N = rows.shape[0]
    inverse = torch.full((num_slots,), N, dtype=order.dtype, device=order.device)
    inverse[order] = torch.arange(N, device=order.device)
    if N < num_slots:  # some slots dropped: point them at an appended zero row
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return rows[inverse]


def dispatch_backward(grad_x_perm, order, k, num_tokens):
    slots = to_slots(grad_x_perm, order, num_tokens * k)                    # [T·k, D]
    return slots.view(num_tokens, k, -1).sum(1)


# ---- expert FFN ------------------------------------------------------------------------------------------
def expert_ffn_forward(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, alpha, limit):
    """→ y [N, D] and saved tensors g, a, u, h [N, F] (u, h empty [0, F] when not gated: h is a)."""
    N, F_ = x_perm.shape[0], w1[0].shape[0]
    gated = w3 is not None
    y = x_perm.new_empty(N, w2[0].shape[0])
    g, a = x_perm.new_empty(N, F_), x_perm.new_empty(N, F_)
    u, h = (x_perm.new_empty(N if gated else 0, F_) for _ in range(2))
    start = 0
    for e, n in enumerate(counts.tolist()):
        r = slice(start, start + n)
        _linear_into(g[r], x_perm[r], w1[e], b1, e)
        if gated:
            _linear_into(u[r], x_perm[r], w3[e], b3, e)
            if activation == "clamped_swiglu":
                h[r] = expert_activation(g[r], u[r], activation, alpha, limit)
            else:
                _act_into(a[r], g[r], activation)
                torch.mul(a[r], u[r], out=h[r])
        else:
            _act_into(a[r], g[r], activation)
        _linear_into(y[r], h[r] if gated else a[r], w2[e], b2, e)
        start += n
    return y, g, a, u, h


def _act_into(out, g, activation):
    """out = act(g) without a temporary (aten's out= kernels)."""
    base = {"swiglu": "silu", "geglu": "gelu"}.get(activation, activation)
    if base == "silu":
        return aten.silu.out(g, out=out)
    if base in ("gelu", "gelu_tanh"):
        return aten.gelu.out(g, approximate="tanh" if base == "gelu_tanh" else "none", out=out)
    if base == "relu":
        return torch.clamp_min(g, 0, out=out)
    raise ValueError(f"unknown expert activation {activation!r}")


def _act_backward(grad, g, activation):
    """d act(g) for the elementwise part, with aten's fused backward kernels."""
    base = {"swiglu": "silu", "geglu": "gelu"}.get(activation, activation)
    if base == "silu":
        return aten.silu_backward(grad, g)
    if base in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(grad, g, approximate="tanh" if base == "gelu_tanh" else "none")
    if base == "relu":
        return aten.threshold_backward(grad, g, 0)
    raise ValueError(f"no closed-form backward for {activation!r}")


def _linear_into(out, x, w, biases, e):
    """out = x wᵀ (+ biases[e]), written in place into a row block of a preallocated buffer."""
    if biases is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(biases[e], x, w.t(), out=out)


def expert_ffn_backward(grad_y, x_perm, counts, saved, w1, w2, w3, has_bias, activation, alpha, limit):
    """→ grad_x [N, D] and per-expert lists of grads for w1, w2, w3, b1, b2, b3 (None where absent)."""
    g_all, a_all, u_all, h_all = saved
    gated = w3 is not None
    grad_x = torch.empty_like(x_perm)
    grads = {k: [] for k in ("w1", "w2", "w3", "b1", "b2", "b3")}
    start = 0
    for e, n in enumerate(counts.tolist()):
        r = slice(start, start + n)
        xe, gy, g = x_perm[r], grad_y[r], g_all[r]
        h = h_all[r] if gated else a_all[r]
        grads["w2"].append(gy.t() @ h)                                    # [D, F]
        grad_h = gy @ w2[e]                                               # [n, F]
        if activation == "clamped_swiglu":
            grad_g, grad_u = _autograd_activation(grad_h, g, u_all[r], activation, alpha, limit)
        elif gated:
            grad_u = grad_h * a_all[r]
            grad_g = _act_backward(grad_h.mul_(u_all[r]), g, activation)
        else:
            grad_g, grad_u = _act_backward(grad_h, g, activation), None
        grads["w1"].append(grad_g.t() @ xe)                               # [F, D]
        torch.mm(grad_g, w1[e], out=grad_x[r])
        if gated:
            grads["w3"].append(grad_u.t() @ xe)
            grad_x[r].addmm_(grad_u, w3[e])
        if has_bias:
            grads["b1"].append(grad_g.sum(0))
            grads["b2"].append(gy.sum(0))
            if gated:
                grads["b3"].append(grad_u.sum(0))
        start += n
    return grad_x, {k: (v or None) for k, v in grads.items()}


def _autograd_activation(grad_h, g, u, activation, alpha, limit):
    with torch.enable_grad():
        g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
        h = expert_activation(g, u, activation, alpha, limit)
        return torch.autograd.grad(h, [g, u], grad_h)


# ---- combine ---------------------------------------------------------------------------------------------
def combine_forward(y_perm, order, weights, fill):
    """out[t] = Σ_j weights[t, j] · y(slot t·k+j), as one batched [1, k] × [k, D] matmul per token."""
    T, k = weights.shape
    slots = to_slots(y_perm, order, T * k).view(T, k, -1)                  # [T, k, D]
    out = torch.bmm(weights.to(y_perm.dtype).unsqueeze(1), slots).squeeze(1)  # [T, D]
    if fill is not None:
        out.addcmul_(_dropped_weight(weights, order).unsqueeze(-1).to(out.dtype), fill)
    return out


def combine_backward(grad_out, y_perm, order, weights, fill):
    T, k = weights.shape
    slots = to_slots(y_perm, order, T * k).view(T, k, -1)                  # [T, k, D]
    grad_w = torch.bmm(slots, grad_out.unsqueeze(-1)).squeeze(-1)        # [T, k]
    grad_slots = weights.to(grad_out.dtype).unsqueeze(-1) * grad_out.unsqueeze(1)  # [T, k, D]
    grad_y = grad_slots.view(T * k, -1)[order]                           # [N, D]
    grad_fill = None
    if fill is not None:
        dropped = torch.ones(T * k, dtype=torch.bool, device=order.device)
        dropped[order] = False
        grad_w = grad_w + dropped.view(T, k) * (grad_out * fill).sum(-1, keepdim=True)
        grad_fill = grad_out * _dropped_weight(weights, order).unsqueeze(-1).to(grad_out.dtype)
    return grad_y, grad_w.to(weights.dtype), grad_fill


def _dropped_weight(weights, order):
    """Per token, the summed routing weight of its dropped slots [T]."""
    dropped = torch.ones(weights.numel(), dtype=weights.dtype, device=weights.device)
    dropped[order] = 0
    return (weights.flatten() * dropped).view(weights.shape).sum(-1)
