"""The expert FFN (moecompile::expert_ffn) on the Triton grouped GEMMs, forward and backward.

Per call, for expert-major rows x_perm [N, D] and per-expert counts [E]:

    forward   g, u, a, h = grouped_mm_act(x, w_gate, w_up)        # first layer + activation, one pass
              y = grouped_mm(h or a, w2, bias=b2)                   # [N, D]
    backward  dg, du = grouped_mm_act_grad(dy, w2ᵀ, g, u)           # second layer's input grad + act'
              dW2 = dyᵀ·h,  dW_gate = dgᵀ·x,  dW_up = duᵀ·x           # grouped_mm_weight_grad, into the
              db = per-expert column sums (a weight grad against ones)  # weights' own layouts
              dx = dg @ w_gate (+ du @ w_up)                          # grouped_mm, accumulating

A fused gate/up weight ([2F, D], "halves" or "interleaved") is read through two strided views, so gate and
up come from the same x tiles without splitting or copying the parameter, and its gradient is written
through the same two views. The saved tensors (g1, u, a, h of the op's schema) use this backend's own
layout, read only by its backward: g1 is [gate | up] halves when fused, whatever the weight's layout.
Weights passed as E per-expert tensors are viewed as one [E, ...] tensor when they are evenly spaced slices
of one storage (an unbound stacked parameter), else stacked (one copy per call); their gradients are
returned stacked, like every backend's.
"""
import torch

from moecompile.kernels.activations import gate_activation, grad_buffer, is_stacked, split_gate_up
from moecompile.kernels.triton_grouped_gemm import (RowBlocks, grouped_mm, grouped_mm_act, grouped_mm_act_grad,
                                                    grouped_mm_weight_grad)

# Under the interpreter (CPU) autotuning would time numpy, not a GPU: use one small fixed tiling there.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


def _config(x):
    return None if x.is_cuda else INTERPRETER_CONFIG


def stacked(ws, dim: int):
    """The op's weight list (E tensors, or one stacked [E, ...]) as one [E, ...] tensor; None stays None."""
    if not ws:
        return None
    if is_stacked(ws, dim):
        return ws[0]
    first = ws[0]
    step = ws[1].storage_offset() - first.storage_offset() if len(ws) > 1 else first.numel()
    evenly_spaced = all(
        t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and t.shape == first.shape
        and t.stride() == first.stride() and t.storage_offset() == first.storage_offset() + e * step
        for e, t in enumerate(ws))
    if evenly_spaced and step > 0:
        return first.as_strided((len(ws), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(ws)


def _gate_up(w, w3, fused):
    """(gate, up) views of a first-layer weight [E, F1, D] or bias [E, F1] (w3/b3: the separate up one)."""
    return split_gate_up(w, w3, fused, dim=1)


def _saved_gate_up(g1, u, fused):
    """(gate, up) of this backend's saved first-layer output (or its gradient): [gate | up] halves whenever
    the weight is fused, whatever the weight's own layout; else g1 and the separate up projection `u`."""
    return split_gate_up(g1, u, "halves" if fused else "")


def expert_ffn_forward(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, save=True):
    """→ (y, g1, u, a, h) as native.expert_ffn_forward; without `save` the saved tensors have 0 rows."""
    W1, W2, W3 = stacked(w1, 3), stacked(w2, 3), stacked(w3, 3)          # [E, F1, D], [E, D, F], [E, F, D]
    B1, B2, B3 = stacked(b1, 2), stacked(b2, 2), stacked(b3, 2)          # [E, F1], [E, D], [E, F]
    N, F_ = x_perm.shape[0], W2.shape[2]
    gated = W3 is not None or bool(fused)
    rows = RowBlocks(counts, N)
    g1 = x_perm.new_empty(N, W1.shape[1])
    u = x_perm.new_empty(N if W3 is not None else 0, F_)
    a, h = x_perm.new_empty(N, F_), x_perm.new_empty(N if gated else 0, F_)
    w_gate, w_up = _gate_up(W1, W3, fused)
    b_gate, b_up = _gate_up(B1, B3, fused) if B1 is not None else (None, None)
    g_out, u_out = _saved_gate_up(g1, u if W3 is not None else None, fused)
    grouped_mm_act(x_perm, w_gate, w_up, rows, activation=gate_activation(activation), alpha=alpha,
                   limit=limit, bias_gate=b_gate, bias_up=b_up, out=(g_out, u_out, a, h if gated else None),
                   config=_config(x_perm))
    y = grouped_mm(h if gated else a, W2, rows, bias=B2, config=_config(x_perm))
    return (y, g1, u, a, h) if save else (y, *(t[:0] for t in (g1, u, a, h)))


def expert_ffn_backward(grad_y, x_perm, counts, saved, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit,
                        need_x=True):
    """Same contract as native.expert_ffn_backward: (grad_x or None, {name: grads in the structure the
    weights came in, or None})."""
    W1, W2, W3 = stacked(w1, 3), stacked(w2, 3), stacked(w3, 3)
    g1, u, a, h = saved
    N = x_perm.shape[0]
    gated, cfg = W3 is not None or bool(fused), _config(x_perm)
    rows = RowBlocks(counts, N)
    grad_y = grad_y.contiguous()
    g, up = _saved_gate_up(g1, u if W3 is not None else None, fused)
    grad_g1 = torch.empty_like(g1)
    grad_u = torch.empty_like(u)
    dg, du = _saved_gate_up(grad_g1, grad_u if W3 is not None else None, fused)
    grouped_mm_act_grad(grad_y, W2.transpose(1, 2), rows, g, up, activation=gate_activation(activation),
                        alpha=alpha, limit=limit, out=(dg, du), config=cfg)

    grads = {name: grad_buffer(ws, dim) for name, ws, dim in
             (("w1", w1, 3), ("w2", w2, 3), ("w3", w3, 3), ("b1", b1, 2), ("b2", b2, 2), ("b3", b3, 2))}
    grouped_mm_weight_grad(grad_y, h if gated else a, rows, out=grads["w2"], config=cfg)
    dw_gate, dw_up = _gate_up(grads["w1"], grads["w3"], fused)
    grouped_mm_weight_grad(dg, x_perm, rows, out=dw_gate, config=cfg)
    if gated:
        grouped_mm_weight_grad(du, x_perm, rows, out=dw_up, config=cfg)
    if grads["b1"] is not None:
        ones = x_perm.new_ones(1, 1).expand(N, 1)  # a column sum per expert is a weight grad against ones
        db_gate, db_up = _gate_up(grads["b1"], grads["b3"], fused)
        for grad, db in ((dg, db_gate), (du, db_up), (grad_y, grads["b2"])):
            if db is not None:
                grouped_mm_weight_grad(grad, ones, rows, out=db.unsqueeze(-1), config=cfg)
    grad_x = None
    if need_x:
        w_gate, w_up = _gate_up(W1, W3, fused)
        grad_x = grouped_mm(dg, w_gate.transpose(1, 2), rows, config=cfg)
        if gated:
            grouped_mm(du, w_up.transpose(1, 2), rows, out=grad_x, accumulate=True, config=cfg)
    return grad_x, grads

