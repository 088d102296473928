"""Fast CPU path for the canonical ops: forward and hand-written backward.

Why hand-written:
- expert_ffn saves what the backward needs (pre-activation g, activation a, up projection u, product h),
  like autograd would, and differentiates the activation with the fused aten backward kernels, so a
  training step does three GEMM passes over contiguous per-expert row blocks and nothing is recomputed.
- combine moves rows with a gather through the inverse permutation and reduces over k with a batched
  matmul (no [T, k, D] weighted temporary); its backward is one gather of grad_out by token.
- dispatch's backward is the reference's index_add_ (measured here 2x faster than the gather through the
  inverse permutation and a sum over k: 0.81 vs 1.78 ms at 4096 tokens, E = 8, top-2).
Without a backward to follow, expert_ffn runs the reference's loop (measured faster then). Routing is small
([T, E]): it skips the reference's redundant passes, works around aten's slow short-row softmax and top-k,
and has a closed-form backward for traced graphs. Dispatch with a capacity sorts instead of the reference's one-hot cumsum.
"""
import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from moecompile.kernels import reference
from moecompile.kernels.activations import expert_activation, gate_activation, grad_buffer, per_expert, split_gate_up

aten = torch.ops.aten
# these forwards are plain torch: in eager, autograd through them costs no more than the closed-form backward
# at large sizes and saves the autograd.Function's ~30 µs per call at decode sizes (64 tokens: combine
# fwd+bwd 188 vs 248 µs, measured here); the closed forms remain for traced graphs
DIFFERENTIABLE = frozenset({"route", "dispatch", "combine"})


# ---- routing ---------------------------------------------------------------------------------------------
def route(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group, topk_group, group_score):
    """reference.route, minus the passes it does not need: without a score bias the top-k values are the
    weights (no gather), and the histogram is one bincount. Group-limited selection is the reference's."""
    if n_group > 1 or score_bias is not None:
        return reference.route(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group,
                               topk_group, group_score)
    weights, indices = _small_topk(_scores(logits, scoring), top_k)                          # [T, k] ×2
    if renormalize:
        weights /= weights.sum(-1, keepdim=True)
    if scale != 1.0:
        weights *= scale
    return weights, indices, torch.bincount(indices.flatten(), minlength=num_experts)


def _scores(logits, scoring):
    """fp32 softmax or sigmoid over the experts. aten's CPU softmax over a short last dim is slow (4096 rows:
    330 µs at E = 8, 66 µs at E = 32, measured here); for E <= 16 the same softmax taken down dim 0 of the
    transposed view vectorizes across tokens instead (87 µs at E = 8; 211 µs at E = 32, hence the cut).
    Its backward likewise: 144 µs over the last dim, 10 µs down dim 0, at E = 8. Not for few rows (64 rows,
    forward and backward through route: 93 µs vs 81 µs over the last dim)."""
    logits = logits.float()
    if scoring != "softmax":
        return logits.sigmoid()
    if logits.device.type == "cpu" and logits.shape[-1] <= 16 and logits.shape[0] >= 1024:
        return logits.t().softmax(0).t()
    return logits.softmax(-1)


def _small_topk(scores, k):
    """(values, indices) of the k largest per row, descending. For k <= 4 of E <= 16 over many rows on
    CPU, k rounds of max with the winner masked out (measured here for 4096 rows, E = 8, k = 2: 188 µs vs
    topk's 321). Not for E = 32, k = 4 (778 vs 904 µs forward, but autograd through four rounds costs more
    than topk's one scatter), nor for few rows (64 rows: 21 µs vs 4)."""
    if k > 4 or scores.shape[-1] > 16 or scores.shape[0] < 1024 or scores.device.type != "cpu":
        return scores.topk(k, dim=-1)
    values, indices, work = [], [], scores
    for j in range(k):
        v, i = work.max(-1, keepdim=True)                                                    # [T, 1] ×2
        values.append(v)
        indices.append(i)
        if j + 1 < k:
            work = (work if j else work.clone()).scatter_(-1, i, float("-inf"))
    return torch.cat(values, -1), torch.cat(indices, -1)


def route_backward(grad_weights, logits, indices, scoring, renormalize, scale):
    """Closed form of d(weights)/d(logits) with the chosen experts fixed; recomputes the [T, E] scores.

    w = scores[indices] (·/Σw when renormalized), · scale. Renormalization: dL/dw_j = (g_j − Σ_m g_m·r_m)/Σw
    with r = w/Σw. Then dL/dw is scattered to [T, E] and taken through the softmax's own fused backward, or
    for sigmoid multiplied by w(1 − w). Few ops: at decode sizes each costs more than its arithmetic."""
    scores = _scores(logits, scoring)                                                        # [T, E]
    w = scores.gather(-1, indices)                                                           # [T, k]
    g = grad_weights if scale == 1.0 else grad_weights * scale
    if renormalize:
        total = w.sum(-1, keepdim=True)
        g = (g - (g * w).sum(-1, keepdim=True) / total) / total
    if scoring == "softmax":
        grad_scores = torch.zeros_like(scores).scatter_(-1, indices, g)                      # scores' layout
        if scores.stride(-1) != 1:  # the transposed softmax of _scores: its backward runs down dim 0 too
            grad = torch._softmax_backward_data(grad_scores.t(), scores.t(), 0, torch.float32).t()
        else:
            grad = torch._softmax_backward_data(grad_scores, scores, -1, torch.float32)
    else:
        grad = torch.zeros_like(scores).scatter_(-1, indices, g * w * (1 - w))
    return grad.to(logits.dtype)


def dispatch(x, indices, num_experts, capacity, group_size, priority=None):
    """reference.dispatch by sorting instead of a one-hot cumsum over [T·k, E].

    Dropless, the kept set is everything: one stable argsort by expert. With a capacity, a stable argsort
    by (group, expert) lines each group's slots for an expert up in slot order, so a slot's rank there is
    its position minus where its (group, expert) run starts; ranks below the capacity are kept, and a
    second stable argsort by expert alone makes them expert-major (groups are contiguous in slot order,
    so within an expert the kept slots stay in slot order). With `priority` (batch-prioritized routing) the
    slots are lined up in reference.priority_slots' order instead, and the kept ones put back in slot order
    before the second argsort."""
    T, k = indices.shape
    flat = indices.flatten()                                                                # [T·k]
    if capacity < 0:
        order = flat.argsort(stable=True)                                                   # [N]
        return x.index_select(0, order // k), order, torch.bincount(flat, minlength=num_experts)
    if T * k < 1024:  # measured here: below ~1k slots the reference's fewer, tiny ops win (48 vs 59 µs)
        return reference.dispatch(x, indices, num_experts, capacity, group_size, priority)
    slots_per_group = (group_size if group_size > 0 else T) * k
    taken = None if priority is None else reference.priority_slots(priority, k, slots_per_group // k)  # [T·k]
    lined = flat if taken is None else flat.index_select(0, taken)
    key = lined + torch.arange(T * k, device=flat.device) // slots_per_group * num_experts    # group·E + e
    by_key = key.argsort(stable=True)                                                       # [T·k]
    run_sizes = torch.bincount(key, minlength=key.numel() // slots_per_group * num_experts)
    run_starts = run_sizes.cumsum(0) - run_sizes
    rank = torch.arange(T * k, device=flat.device) - run_starts[key[by_key]]
    kept = by_key[rank < capacity]                                                          # [N]
    if taken is not None:
        kept = taken.index_select(0, kept).sort().values
    order = kept[flat[kept].argsort(stable=True)]
    counts = run_sizes.clamp(max=capacity).view(-1, num_experts).sum(0)
    return x.index_select(0, order // k), order, counts


def to_slots(rows, order, num_slots):
    """rows [N, D] in expert-major order → [num_slots, D] in slot order (t·k+j); dropped slots are zero."""
    N = rows.shape[0]
    inverse = torch.full((num_slots,), N, dtype=order.dtype, device=order.device)
    inverse.scatter_(0, order, torch.arange(N, device=order.device))  # explicit ops: indexing syntax costs µs
    # some slots dropped: point them at an appended zero row (when tracing with a data-dependent N, assume so)
    if guard_or_true(N < num_slots):
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return rows.index_select(0, inverse)


dispatch_backward = reference.dispatch_backward


# ---- expert FFN ------------------------------------------------------------------------------------------
# Weights arrive as E per-expert tensors or one stacked [E, ...] tensor (per_expert); the first layer may
# be a fused gate/up projection (`fused`: "halves" or "interleaved"), run as one [n, 2F] GEMM per expert.
def expert_ffn_forward(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, save=True):
    """→ y [N, D] and saved g1 (first-layer output [N, F1], F1 = 2F when fused), u (separate up
    projection, else [0, F]), a = act(gate) [N, F], h = a·up (gated, else [0, F]: h is a).

    Without `save` (nothing will be differentiated) it is the reference's loop, and the saved tensors have
    0 rows: per-expert temporaries stay in cache, where writing [N, F] buffers that outlive the call made
    the elementwise ops up to 3x slower, and allocating GEMMs measured ~2.5% faster than `mm(out=)`."""
    W1, W2, W3 = (per_expert(w, 3) for w in (w1, w2, w3))
    N, F1, F_ = x_perm.shape[0], W1[0].shape[0], W2[0].shape[1]
    gated = W3 is not None or bool(fused)
    saved = (x_perm.new_empty(N if save else 0, F1), x_perm.new_empty(N if save and W3 is not None else 0, F_),
             x_perm.new_empty(N if save else 0, F_), x_perm.new_empty(N if save and gated else 0, F_))
    if not save:
        return (reference.expert_ffn(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit),
                *saved)
    B1, B2, B3 = (per_expert(b, 2) for b in (b1, b2, b3))
    y = x_perm.new_empty(N, W2[0].shape[0])
    start = 0
    for e, n in enumerate(counts.tolist()):
        r = slice(start, start + n)
        g1, u, a, h = (t[r] for t in saved)
        _linear_into(g1, x_perm[r], W1[e], B1, e)
        if W3 is not None:
            _linear_into(u, x_perm[r], W3[e], B3, e)
        gate, up = split_gate_up(g1, u if W3 is not None else None, fused)
        if activation == "clamped_swiglu":
            h.copy_(expert_activation(gate, up, activation, alpha, limit))
        else:
            _act_into(a, gate, activation)
            if gated:
                torch.mul(a, up, out=h)
        _linear_into(y[r], h if gated else a, W2[e], B2, e)
        start += n
    return (y, *saved)


def _act_into(out, g, activation):
    """out = act(g) without a temporary (aten's out= kernels)."""
    base = gate_activation(activation)
    if base == "silu":
        return aten.silu.out(g, out=out)
    if base in ("gelu", "gelu_tanh"):
        return aten.gelu.out(g, approximate="tanh" if base == "gelu_tanh" else "none", out=out)
    if base == "relu":
        return torch.clamp_min(g, 0, out=out)
    raise ValueError(f"unknown expert activation {activation!r}")


def _act_backward_into(out, grad, g, activation):
    """out = grad · act'(g), with aten's fused backward kernels."""
    base = gate_activation(activation)
    if base == "silu":
        return aten.silu_backward.grad_input(grad, g, grad_input=out)
    if base in ("gelu", "gelu_tanh"):
        approximate = "tanh" if base == "gelu_tanh" else "none"
        return aten.gelu_backward.grad_input(grad, g, approximate=approximate, grad_input=out)
    if base == "relu":
        return aten.threshold_backward.grad_input(grad, g, 0, grad_input=out)
    raise ValueError(f"no closed-form backward for {activation!r}")


def _linear_into(out, x, w, biases, e):
    """out = x wᵀ (+ biases[e]), written in place into a row block of a preallocated buffer."""
    if biases is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(biases[e], x, w.t(), out=out)


def _mm_into(out, a, b):
    """out = a @ b into a possibly transposed view (a stacked weight stored [in, out])."""
    if out.is_contiguous():
        return torch.mm(a, b, out=out)
    return torch.mm(b.t(), a.t(), out=out.t())


def expert_ffn_backward(grad_y, x_perm, counts, saved, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit,
                        need_x=True):
    """→ grad_x [N, D] (None unless `need_x`: e.g. the block's input needs no gradient) and, per role w1,
    w2, w3, b1, b2, b3, one stacked gradient (activations.grad_buffer), None where absent."""
    W1, W2, W3 = (per_expert(w, 3) for w in (w1, w2, w3))
    g1_all, u_all, a_all, h_all = saved
    gated, has_bias = W3 is not None or bool(fused), b1 is not None
    grads = {"w1": grad_buffer(w1, 3), "w2": grad_buffer(w2, 3), "w3": grad_buffer(w3, 3)}
    if has_bias:
        grads.update(b1=grad_buffer(b1, 2), b2=grad_buffer(b2, 2), b3=grad_buffer(b3, 2))
    grad_x = torch.empty_like(x_perm) if need_x else None
    start = 0
    for e, n in enumerate(counts.tolist()):
        r = slice(start, start + n)
        xe, gy = x_perm[r], grad_y[r]
        _mm_into(grads["w2"][e], gy.t(), h_all[r] if gated else a_all[r])   # [D, F]
        grad_h = gy @ W2[e]                                                 # [n, F]
        grad_g1 = torch.empty_like(g1_all[r])
        grad_u = torch.empty_like(u_all[r]) if W3 is not None else None
        grad_gate, grad_up = split_gate_up(grad_g1, grad_u, fused)
        gate, up = split_gate_up(g1_all[r], u_all[r] if W3 is not None else None, fused)
        if activation == "clamped_swiglu":
            _clamped_swiglu_backward_into(grad_gate, grad_up, grad_h, gate, up, alpha, limit)
        elif gated:
            torch.mul(grad_h, a_all[r], out=grad_up)
            _act_backward_into(grad_gate, grad_h.mul_(up), gate, activation)
        else:
            _act_backward_into(grad_gate, grad_h, gate, activation)
        _mm_into(grads["w1"][e], grad_g1.t(), xe)                             # [F1, D]
        if need_x:
            torch.mm(grad_g1, W1[e], out=grad_x[r])
        if W3 is not None:
            _mm_into(grads["w3"][e], grad_u.t(), xe)
            if need_x:
                grad_x[r].addmm_(grad_u, W3[e])
        if has_bias:
            torch.sum(grad_g1, 0, out=grads["b1"][e])
            torch.sum(gy, 0, out=grads["b2"][e])
            if W3 is not None:
                torch.sum(grad_u, 0, out=grads["b3"][e])
        start += n
    return grad_x, grads


def _clamped_swiglu_backward_into(grad_g, grad_u, grad_h, g, u, alpha, limit):
    """gpt-oss: h = (clamp(u, ±limit) + 1) · gc·σ(α·gc), gc = min(g, limit); a clamp passes the gradient at
    its bounds, as torch's does."""
    gc = g.clamp(max=limit)
    s = torch.sigmoid(alpha * gc)
    torch.mul(grad_h, gc * s * ((u >= -limit) & (u <= limit)), out=grad_u)
    d_glu = s * (1 + alpha * gc * (1 - s)) * (g <= limit)
    torch.mul(grad_h * (u.clamp(-limit, limit) + 1), d_glu, out=grad_g)


# ---- combine ---------------------------------------------------------------------------------------------
def combine_forward(y_perm, order, weights, fill):
    """out[t] = Σ_j weights[t, j] · y(slot t·k+j), as one batched [1, k] × [k, D] matmul per token."""
    T, k = weights.shape
    # D spelled out: with 0 tokens a -1 could be any size and view refuses it
    slots = to_slots(y_perm, order, T * k).view(T, k, y_perm.shape[1])     # [T, k, D]
    out = torch.bmm(weights.to(y_perm.dtype).unsqueeze(1), slots).squeeze(1)  # [T, D]
    if fill is not None:
        dropped_weight = (weights * _dropped(weights, order)).sum(-1)                  # [T]
        out.addcmul_(dropped_weight.unsqueeze(-1).to(out.dtype), fill)
    return out


def combine_backward(grad_out, y_perm, order, weights, fill):
    """One gather of grad_out by token serves both gradients: the routing weights' (a row-wise dot with
    y) and y's (a row-wise scale)."""
    T, k = weights.shape
    g_rows = grad_out.index_select(0, order // k)                          # [N, D]
    grad_w = weights.new_zeros(T * k)
    grad_w.scatter_(0, order, (g_rows * y_perm).sum(-1).to(weights.dtype))
    grad_y = g_rows.mul_(weights.flatten().index_select(0, order).to(g_rows.dtype).unsqueeze(-1))
    grad_w = grad_w.view(T, k)
    grad_fill = None
    if fill is not None:
        dropped = _dropped(weights, order)                                             # [T, k]
        grad_w = grad_w + dropped * (grad_out * fill).sum(-1, keepdim=True).to(weights.dtype)
        grad_fill = grad_out * (weights * dropped).sum(-1, keepdim=True).to(grad_out.dtype)
    return grad_y, grad_w, grad_fill


def _dropped(weights, order):
    """1 where a (token, slot) was dropped by the capacity, else 0: [T, k] in the weights' dtype."""
    dropped = torch.ones(weights.numel(), dtype=weights.dtype, device=weights.device)
    dropped.index_fill_(0, order, 0)
    return dropped.view(weights.shape)
