"""Fast CPU path for the canonical ops: forward and hand-written backward.

Why hand-written:
- expert_ffn saves what the backward needs (pre-activation g, activation a, up projection u, product h),
  like autograd would, and differentiates the activation with the fused aten backward kernels, so a
  training step does three GEMM passes over contiguous per-expert row blocks and nothing is recomputed.
- combine moves rows with a gather through the inverse permutation and reduces over k with a batched
  matmul (no [T, k, D] weighted temporary); its backward is one gather of grad_out by token.
- dispatch's backward is the reference's index_add_ (measured here 2x faster than the gather through the
  inverse permutation and a sum over k: 0.81 vs 1.78 ms at 4096 tokens, E = 8, top-2).
Only the experts that received rows cost a visit (see the expert FFN section). Routing is small
([T, E]): it skips the reference's redundant passes, works around aten's slow short-row softmax and top-k,
and has a closed-form backward for traced graphs. Dispatch with a capacity sorts instead of the reference's
one-hot cumsum.
"""
import torch
import torch.nn.functional as F

from moecompile.kernels import onednn, reference
from moecompile.kernels.activations import (expert_activation, gate_activation, grad_buffer, is_stacked, per_expert,
                                           split_gate_up)
from moecompile.kernels.padded import Padded

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
    weights, indices = choose(logits, top_k, scoring, renormalize, scale)                    # [T, k] ×2
    return weights, indices, torch.bincount(indices.flatten(), minlength=num_experts)


def choose(logits, top_k, scoring, renormalize, scale):
    """route's weights and indices [T, k] without a score bias or groups, and without its histogram (the
    eager fast path, ir/fast_path.fast_call, needs none)."""
    weights, indices = _small_topk(_scores(logits, scoring), top_k)                          # [T, k] ×2
    if renormalize:
        weights /= weights.sum(-1, keepdim=True)
    if scale != 1.0:
        weights *= scale
    return weights, indices


def _scores(logits, scoring):
    """fp32 softmax or sigmoid over the experts. aten's CPU softmax over a short last dim is slow (4096 rows:
    330 µs at E = 8, 66 µs at E = 32, measured here); for E <= 16 the same softmax taken down dim 0 of the
    transposed view vectorizes across tokens instead (87 µs at E = 8; 211 µs at E = 32, hence the cut).
    Its backward likewise: 144 µs over the last dim, 10 µs down dim 0, at E = 8. Not for few rows (64 rows,
    forward and backward through route: 93 µs vs 81 µs over the last dim)."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    if scoring != "softmax":
        return logits.sigmoid()
    if logits.shape[0] >= 1024 and logits.shape[-1] <= 16 and logits.device.type == "cpu":
        return logits.t().softmax(0).t()
    return logits.softmax(-1)


def _small_topk(scores, k):
    """(values, indices) of the k largest per row, descending. For k <= 4 of E <= 16 over many rows on
    CPU, k rounds of max with the winner masked out (measured here for 4096 rows, E = 8, k = 2: 188 µs vs
    topk's 321). Not for E = 32, k = 4 (778 vs 904 µs forward, but autograd through four rounds costs more
    than topk's one scatter), nor for few rows (64 rows: 21 µs vs 4)."""
    if k > 4 or scores.shape[0] < 1024 or scores.shape[-1] > 16 or scores.device.type != "cpu":
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
    if N < num_slots if isinstance(N, int) else _guard_or_true(N < num_slots):
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return rows.index_select(0, inverse)


dispatch_backward = reference.dispatch_backward


# ---- expert FFN ------------------------------------------------------------------------------------------
# Weights arrive as E per-expert tensors or one stacked [E, ...] tensor (per_expert); the first layer may
# be a fused gate/up projection (`fused`: "halves" or "interleaved"), run as one [n, 2F] GEMM per expert.
# Only experts that received rows are visited: at decode sizes most of a fine-grained layer's experts get
# none (1 token, 64 experts, top-8: 8 of 64), and each visit costs Python dispatch whatever its rows. A
# visit issues only GEMMs into row blocks of whole-call buffers; the elementwise work (activation, gating,
# its backward) runs once over all rows, not once per expert.
SMALL_ROWS = 1 << 20  # N·F1 elements (4 MiB fp32) up to which a forward without `save` also runs whole-call


def expert_ffn_forward(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, save=True):
    """→ y [N, D] and saved g1 (first-layer output [N, F1], F1 = 2F when fused), u (separate up
    projection, else [0, F]), a = act(gate) [N, F], h = a·up (gated, else [0, F]: h is a).

    Without `save` (nothing will be differentiated) the saved tensors have 0 rows, and above SMALL_ROWS it
    is the reference's loop: per-expert temporaries stay in cache, where writing [N, F] buffers that
    outlive the call made the elementwise ops up to 3x slower, and allocating GEMMs measured ~2.5% faster
    than `mm(out=)`. Below it the whole-call form wins: per visit two GEMM calls instead of six ops."""
    # stacked [E, F1, D] or expert 0's [F1, D]: the sizes from the last dims (indexing an expert is an op)
    N, F1, F_ = x_perm.shape[0], w1[0].shape[-2], w2[0].shape[-1]
    empty = (x_perm.new_empty(0, F1), *(x_perm.new_empty(0, F_) for _ in range(3)))
    if not save and N * F1 > SMALL_ROWS:
        linear = onednn.linear if onednn.takes(x_perm, w1[0]) else F.linear
        y = reference.expert_ffn(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, linear)
        return y, *empty
    live = row_blocks(counts)
    offs = _offsets(counts, live, x_perm if save else None, w1[0])
    y, g1, u, a, h = whole_call_ffn(x_perm, live, offs, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit)
    if not save:
        return (y, *empty)
    return y, g1, empty[1] if u is None else u, a, empty[3] if h is None else h


def whole_call_ffn(x_perm, live, offs, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit):
    """expert_ffn_forward's whole-call form → y [N, D], g1 [N, F1], u [N, F] (None without a separate up
    projection), a [N, F], h [N, F] (None when not gated: h is a). `live` may be None where `offs` is
    given and _grouped_mm takes every operand (grouped_mm_takes_all)."""
    N, F1, F_ = x_perm.shape[0], w1[0].shape[-2], w2[0].shape[-1]
    gated = w3 is not None or bool(fused)
    W1, W2, W3 = (_transposed(w) for w in (w1, w2, w3))     # [D, F1], [F, D], [D, F] per expert
    B1, B2, B3 = (per_expert(b, 2) for b in (b1, b2, b3))
    g1 = _grouped_linear(x_perm, live, offs, W1, B1, F1)                                   # [N, F1]
    u = _grouped_linear(x_perm, live, offs, W3, B3, F_) if w3 is not None else None        # [N, F]
    gate, up = split_gate_up(g1, u, fused)
    if activation == "clamped_swiglu":  # its backward recomputes from g1, u: a is not read
        a, h = x_perm.new_empty(N, F_), expert_activation(gate, up, activation, alpha, limit)
    else:
        a = expert_activation(gate, None, gate_activation(activation), alpha, limit)
        h = a * up if gated else None
    y = _grouped_linear(h if gated else a, live, offs, W2, B2, x_perm.shape[1])           # [N, D]
    return y, g1, u, a, h


def grouped_mm_takes_all(x_perm, w1, w2, w3) -> bool:
    """Whether whole_call_ffn runs on _grouped_mm alone for rows x_perm [N, D] (and [N, F] activations):
    stacked weights (no biases: the caller's part) that it takes."""
    if not all(w is None or is_stacked(w, 3) for w in (w1, w2, w3)) or w2[0].shape[-1] * x_perm.element_size() % 16:
        return False
    return all(w is None or _grouped_mm_takes(x_perm, _transposed(w)) for w in (w1, w2, w3))


def row_blocks(counts):
    """(expert, first row, rows) of each expert with rows, from the per-expert row counts [E]: a host read
    (no device sync on CPU), and views are then taken of these blocks only (a split into all E blocks
    costs a view per expert, ~1 µs each, most of them empty at decode sizes)."""
    return _blocks(counts.tolist())


def _blocks_at(offs):
    """row_blocks from _grouped_mm's offsets (the int32 end row of each expert's block)."""
    ends = offs.tolist()
    return _blocks([end - start for start, end in zip([0] + ends, ends)])


def _blocks(sizes: list[int]):
    blocks, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            blocks.append((e, start, n))
            start += n
    return blocks


def _transposed(ws):
    """The weights transposed to [in, out] per expert (a view of a stacked weight, indexable by expert;
    None stays None)."""
    w = per_expert(ws, 3)
    if w is None:
        return None
    return w.transpose(-2, -1) if torch.is_tensor(w) else [t.t() for t in w]


def _offsets(counts, live, rows=None, w1=None):
    """int32 end row of each expert's block, for torch._grouped_mm, when at least a quarter of the experts
    have rows (None otherwise). aten's CPU _grouped_mm loops over all E groups in C++, empty ones
    included: cheaper than a Python visit per expert from there on (64 experts, top-8: from 4 tokens;
    8 experts, top-2: from 1 token, 1.97 vs 2.06 ms a Mixtral-like layer, 1 thread), dearer at decode
    sizes of many experts (1 token: 8 of 64). Given the `rows` of a call with autograd, a Padded where it
    pays, unless oneDNN takes the GEMMs with the experts' first-layer weights `w1`: layer forward and backward
    in turns, HF / ours, padded against oneDNN's grouped GEMMs: 32 experts of 512 × 1024, top-4, at 128 and
    256 tokens 0.95 and 0.93 against 1.14 and 1.11; 64 of 1024 × 512, top-8, at 128 tokens 1.23 against 1.37."""
    if rows is not None and Padded.pays(live, counts, rows) and not (w1 is not None and onednn.takes(rows, w1)):
        return Padded(live, counts)
    return counts.cumsum(0, dtype=torch.int32) if len(live) * 4 >= counts.shape[0] else None


def _grouped_mm_takes(a, b) -> bool:
    """Whether aten's CPU _grouped_mm (torch 2.13) accepts a [N, K] @ b [E, K, M]: fp32, bf16 or fp16, one
    dtype, and every stride and base address a multiple of 16 bytes (else it raises). Other devices keep
    the loop (CUDA's _grouped_mm has limits of its own; the Triton backend is the grouped path there)."""
    if a.device.type != "cpu" or a.dtype not in _GROUPED_MM_DTYPES or b.dtype != a.dtype:
        return False
    size = a.element_size()
    for t in (a, b):  # plain loops: twice per eager call
        if t.data_ptr() % 16:
            return False
        for s in t.stride():
            if s != 1 and s * size % 16:
                return False
    return True


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_linear(rows, live, offs, W, B, width):
    """rows [N, in] in expert row blocks `live` (row_blocks) → [N, width]: block e times W[e] (+ B[e]);
    one _grouped_mm call where `offs` is given (_offsets) and it takes the operands (checked by the caller
    when `live` is None: grouped_mm_takes_all), one bmm over padded blocks where `offs` is a Padded."""
    if isinstance(offs, Padded) and B is None and torch.is_tensor(W):
        return offs.linear(rows, W)
    if B is None and torch.is_tensor(W) and rows.shape[0] and onednn.takes(rows, W):  # before _grouped_mm
        return onednn.grouped_linear(rows, live if live is not None else _blocks_at(offs), W)
    if torch.is_tensor(offs) and B is None and torch.is_tensor(W) and (live is None or _grouped_mm_takes(rows, W)):
        return torch._grouped_mm(rows, W, offs=offs)
    out = rows.new_empty(rows.shape[0], width)
    for e, s, n in live:
        if B is None:
            torch.mm(rows[s:s + n], W[e], out=out[s:s + n])
        else:
            torch.addmm(B[e], rows[s:s + n], W[e], out=out[s:s + n])
    return out


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


def _mm_into(out, a, b):
    """out = a @ b into a possibly transposed view (a stacked weight stored [in, out])."""
    if out.is_contiguous():
        return torch.mm(a, b, out=out)
    return torch.mm(b.t(), a.t(), out=out.t())


def expert_ffn_backward(grad_y, x_perm, counts, saved, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit,
                        need_x=True):
    """→ grad_x [N, D] (None unless `need_x`: e.g. the block's input needs no gradient) and, per role w1,
    w2, w3, b1, b2, b3, one stacked gradient (activations.grad_buffer), None where absent; experts that
    had no rows get zeros. The input-side GEMMs run as the forward's (_grouped_linear), the weight
    gradients as one grouped GEMM each (or per live expert, with biases or weights not stacked), around one
    elementwise pass over all rows."""
    live = row_blocks(counts)
    offs = _offsets(counts, live, x_perm, w1[0])
    W1, W2, W3 = (per_expert(w, 3) for w in (w1, w2, w3))
    g1, u, a, h = saved
    gated, has_u, has_bias = w3 is not None or bool(fused), w3 is not None, b1 is not None
    hidden = h if gated else a
    # one _grouped_mm per weight gradient (groups along the rows: [out, N] @ [N, in] → [E, out, in], zeros
    # for experts without rows) where it takes them, else an mm per live expert: 64 Python visits a layer
    # cost ~4 ms a Qwen3-MoE-like training step
    grouped = (offs is not None and not has_bias
               and all(w is None or (is_stacked(w, 3) and w[0].is_contiguous()) for w in (w1, w2, w3))
               and (isinstance(offs, Padded) or _grouped_mm_takes(grad_y.t(), hidden)
                    and _grouped_mm_takes(g1.t(), x_perm) and (not has_u or _grouped_mm_takes(u.t(), x_perm))))
    if grouped:
        grads = {"w2": _weight_grad(grad_y, hidden, offs)}                                   # [E, D, F]
    else:
        grads = {"w1": grad_buffer(w1, 3), "w2": grad_buffer(w2, 3), "w3": grad_buffer(w3, 3)}
        if has_bias:
            grads.update(b1=grad_buffer(b1, 2), b2=grad_buffer(b2, 2), b3=grad_buffer(b3, 2))
        if len(live) < counts.shape[0]:  # experts without rows get no GEMM below: their gradient is zero
            idle = torch.ones(counts.shape[0], dtype=torch.bool)
            idle[[e for e, _, _ in live]] = False
            idle = idle.nonzero().squeeze(1).to(x_perm.device)
            for g in grads.values():
                if g is not None:
                    g.index_fill_(0, idle, 0)
        for e, s, n in live:
            _mm_into(grads["w2"][e], grad_y[s:s + n].t(), hidden[s:s + n])                # [D, F]
    grad_h = _grouped_linear(grad_y, live, offs, W2, None, a.shape[1])                   # [N, F]
    grad_g1, grad_u = torch.empty_like(g1), torch.empty_like(u) if has_u else None        # [N, F1], [N, F]
    grad_gate, grad_up = split_gate_up(grad_g1, grad_u, fused)
    gate, up = split_gate_up(g1, u if has_u else None, fused)
    if activation == "clamped_swiglu":
        _clamped_swiglu_backward_into(grad_gate, grad_up, grad_h, gate, up, alpha, limit)
    elif gated:
        torch.mul(grad_h, a, out=grad_up)
        _act_backward_into(grad_gate, grad_h.mul_(up), gate, activation)
    else:
        _act_backward_into(grad_gate, grad_h, gate, activation)
    grad_x = None
    if need_x:
        grad_x = _grouped_linear(grad_g1, live, offs, W1, None, x_perm.shape[1])          # [N, D]
        if has_u:
            grad_x += _grouped_linear(grad_u, live, offs, W3, None, x_perm.shape[1])
    if grouped:  # grad_g1 and grad_u: empty_like g1 and u, their strides
        grads["w1"] = _weight_grad(grad_g1, x_perm, offs)                                  # [E, F1, D]
        grads["w3"] = _weight_grad(grad_u, x_perm, offs) if has_u else None                # [E, F, D]
        return grad_x, grads
    for e, s, n in live:
        xe, gg1, gu = x_perm[s:s + n], grad_g1[s:s + n], grad_u[s:s + n] if has_u else None
        _mm_into(grads["w1"][e], gg1.t(), xe)                                             # [F1, D]
        if has_u:
            _mm_into(grads["w3"][e], gu.t(), xe)
        if has_bias:
            torch.sum(gg1, 0, out=grads["b1"][e])
            torch.sum(grad_y[s:s + n], 0, out=grads["b2"][e])
            if has_u:
                torch.sum(gu, 0, out=grads["b3"][e])
    return grad_x, grads


def _weight_grad(grad, rows, offs):
    """[E, out, in]: Σ over each expert's rows of grad[r]ᵀ rows[r] (grad [N, out], rows [N, in]); zeros for
    experts without rows."""
    if isinstance(offs, Padded):
        return offs.weight_grad(grad, rows)
    return torch._grouped_mm(grad.t(), rows, offs=offs)


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


def _guard_or_true(condition) -> bool:
    """A condition on a symbolic size (tracing only: symbolic_shapes imports sympy, slow at `import moecompile`)."""
    from torch.fx.experimental.symbolic_shapes import guard_or_true
    return guard_or_true(condition)
