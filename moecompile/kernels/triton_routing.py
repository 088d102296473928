"""Routing, dispatch and combine in Triton: the token-movement side of the canonical MoE ops.

Shapes: T tokens, D hidden, E experts, k slots per token, slot id ``s = t·k + j``, N kept slots (T·k when
dropless). Every function has the signature and the results of its CPU counterpart in ``reference`` (the
definition) and ``native`` (the forward/backward split):

- ``route``: one kernel per block of token rows scores the logits (softmax or sigmoid, in fp32), adds the
  optional score bias for selection only, optionally keeps only the best expert groups (DeepSeek-V3),
  takes the top k by repeated argmax, renormalizes and scales, and adds the block's expert histogram
  into ``counts`` with one vector atomic.
- ``dispatch``: a counting sort, no argsort. Slots are cut into blocks that never cross a capacity group
  (``group_size`` tokens). Pass 1 writes a histogram per block ``[G·J, E]``; tiny torch ops turn it into
  each block's rank base within its group, the kept counts (at most ``capacity`` per group and expert)
  and each (group, expert)'s first output row; pass 2 ranks each slot within its block by a one-hot
  cumsum, drops ranks past the capacity and copies its token's row into place.
- ``dispatch_capacity``: the same two passes into the fixed GShard/Tutel layout ``[E, G·capacity, D]``,
  with no device→host sync.
- ``combine_forward`` and ``dispatch_backward`` share one gather-and-sum kernel over tokens through the
  inverse permutation (weights and fill are constexpr options); ``combine_backward`` walks the same
  gathers once for the gradients of y, the weights and the fill.

Activations are fp32, fp16 or bf16; sums accumulate in fp32 and come back in the input dtype. All
offsets ``row · stride`` are 64-bit and every input may have any strides. The wrappers take CPU tensors
under ``TRITON_INTERPRET=1`` (how the tests run) or CUDA tensors on a GPU; empty inputs return without a
launch.
"""
import torch
import triton
import triton.language as tl

from moecompile.kernels.triton_grouped_gemm import _INTERPRET

__all__ = ["combine_backward", "combine_forward", "dispatch", "dispatch_backward", "dispatch_capacity", "route"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int64, torch.int32)
_BLOCK_S = 32   # slots per program in the dispatch passes
_BLOCK_T = 16   # tokens per program in the gathers


# ---- route -------------------------------------------------------------------------------------------------
@triton.jit
def _limit_groups(select, cols, group_width,
                  N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):
    """Zero the selection scores outside each row's best TOPK_GROUP groups of experts (as DeepSeek does: 0,
    not -inf). A group scores its best expert, or its best two summed (GROUP_TOP2)."""
    group = cols // group_width                                                   # [BLOCK_E]
    gcols = tl.arange(0, BLOCK_G)
    gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
    for g in tl.static_range(N_GROUP):
        vals = tl.where((group == g)[None, :], select, float("-inf"))             # [BLOCK_T, BLOCK_E]
        best = tl.max(vals, 1)
        if GROUP_TOP2:
            first = tl.argmax(vals, 1)
            best += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), vals), 1)
        gscore = tl.where(gcols[None, :] == g, best[:, None], gscore)             # [BLOCK_T, BLOCK_G]
    keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        pick = tl.argmax(gscore, 1)
        keep |= group[None, :] == pick[:, None]
        gscore = tl.where(gcols[None, :] == pick[:, None], float("-inf"), gscore)
    return tl.where(keep, select, 0.0)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, indices_ptr, counts_ptr,
    T, E, group_width, scale,
    stride_lt, stride_le, stride_b,
    K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """One program routes BLOCK_T token rows, each a whole row of E scores (padded to BLOCK_E).

    Top-k is K rounds of argmax, each masking its winner with -inf: descending order, like torch.topk. The
    picks stay in registers ([BLOCK_T, BLOCK_K]), so renormalizing needs no second pass."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    mask_t = rows < T
    mask_e = cols < E
    # rows past T read zeros, not -inf, so their (never stored) softmax stays finite
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le,
                mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
    x = tl.where(mask_e[None, :], x, float("-inf"))                               # [BLOCK_T, BLOCK_E]
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        p = tl.exp(x - tl.max(x, 1)[:, None])
        scores = p / tl.sum(p, 1)[:, None]
    select = scores
    if HAS_BIAS:  # the bias steers the choice only; the weights come from the unbiased scores
        select += tl.load(bias_ptr + cols * stride_b, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    if N_GROUP > 1:
        select = _limit_groups(select, cols, group_width, N_GROUP, TOPK_GROUP, GROUP_TOP2,
                               BLOCK_T, BLOCK_E, BLOCK_G)
    select = tl.where(mask_e[None, :], select, float("-inf"))  # padding is never picked

    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), tl.int64)
    hist = tl.zeros((BLOCK_E,), tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(select, 1)                                               # [BLOCK_T]
        hit = cols[None, :] == best[:, None]                                      # [BLOCK_T, BLOCK_E]
        w = tl.sum(tl.where(hit, scores, 0.0), 1)
        top_w = tl.where(slots[None, :] == j, w[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, best.to(tl.int64)[:, None], top_i)
        hist += tl.sum((hit & mask_t[:, None]).to(tl.int32), 0)
        select = tl.where(hit, float("-inf"), select)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]  # slots past K hold 0
    top_w = top_w * scale
    out = rows.to(tl.int64)[:, None] * K + slots[None, :]  # the outputs are fresh contiguous [T, K]
    mask = mask_t[:, None] & (slots[None, :] < K)
    tl.store(weights_ptr + out, top_w, mask=mask)
    tl.store(indices_ptr + out, top_i, mask=mask)
    tl.atomic_add(counts_ptr + cols, hist, mask=mask_e)


# ---- dispatch: counting sort -------------------------------------------------------------------------------
@triton.jit
def _sort_kernel(
    indices_ptr, hist_ptr, x_ptr, rank_base_ptr, dest_base_ptr, out_ptr, order_ptr,
    E, k, D, slots_per_group, blocks_per_group, capacity,
    stride_it, stride_ik, stride_xt, stride_xd, stride_ot, stride_od,
    HISTOGRAM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Both passes over one block of BLOCK_S slots; blocks tile each group's slots, never spanning two.

    HISTOGRAM (pass 1): hist[block, e] = slots of the block routed to expert e. Otherwise (pass 2): a slot's
    rank within its (group, expert) = its block's base + its rank inside the block (an inclusive one-hot
    cumsum down the slots). Ranks below `capacity` are kept: the slot id goes to order[dest] and its
    token's row of x to out[dest], dest = dest_base[group, e] + rank."""
    pid = tl.program_id(0)
    group = pid // blocks_per_group
    local = (pid % blocks_per_group) * BLOCK_S + tl.arange(0, BLOCK_S)
    valid = local < slots_per_group
    s = group.to(tl.int64) * slots_per_group + local                              # [BLOCK_S] slot ids
    e = tl.load(indices_ptr + (s // k) * stride_it + (s % k) * stride_ik, mask=valid, other=-1)
    cols = tl.arange(0, BLOCK_E)
    # padding slots and expert ids outside [0, E) match no column
    onehot = ((e[:, None] == cols[None, :]) & valid[:, None] & (cols < E)[None, :]).to(tl.int32)
    if HISTOGRAM:
        tl.store(hist_ptr + pid * E + cols, tl.sum(onehot, 0), mask=cols < E)
        return
    routed = tl.sum(onehot, 1) > 0
    e = tl.where(routed, e, 0)
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1
    rank += tl.load(rank_base_ptr + pid * E + e, mask=routed, other=0)
    kept = routed & (rank < capacity)
    dest = tl.load(dest_base_ptr + group * E + e, mask=kept, other=0) + rank      # int64
    dest = tl.where(kept, dest, 0)
    tl.store(order_ptr + dest, s, mask=kept)
    src = x_ptr + (s // k)[:, None] * stride_xt
    dst = out_ptr + dest[:, None] * stride_ot
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = kept[:, None] & (d < D)[None, :]
        tl.store(dst + d[None, :] * stride_od, tl.load(src + d[None, :] * stride_xd, mask=mask), mask=mask)


# ---- gathers through the inverse permutation ---------------------------------------------------------------
@triton.jit
def _tile(ptr, rows, d, stride_r, stride_d, mask):
    """rows × d tile of a 2-D tensor in fp32, zero where masked (rows are int64: 64-bit offsets)."""
    return tl.load(ptr + rows[:, None] * stride_r + d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gather_sum_kernel(
    rows_ptr, inverse_ptr, weights_ptr, fill_ptr, out_ptr,
    T, D, k,
    stride_rn, stride_rd, stride_wt, stride_wk, stride_ft, stride_fd, stride_ot, stride_od,
    HAS_WEIGHTS: tl.constexpr, HAS_FILL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t] = Σ_j w[t, j] · (rows[inverse[t·k + j]] if the slot was kept, else fill[t] or 0) for a
    BLOCK_T × BLOCK_D tile; w = 1 without weights (dispatch's backward). Gathering per token, not
    scattering per slot, means no atomics: each output row belongs to one program."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = t < T
    mask = mask_t[:, None] & (d < D)[None, :]
    t = t.to(tl.int64)
    if HAS_FILL:
        fill = _tile(fill_ptr, t, d, stride_ft, stride_fd, mask)
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for j in range(k):
        pos = tl.load(inverse_ptr + t * k + j, mask=mask_t, other=-1)               # [BLOCK_T]
        kept = pos >= 0
        v = _tile(rows_ptr, tl.where(kept, pos, 0), d, stride_rn, stride_rd, mask & kept[:, None])
        if HAS_FILL:
            v = tl.where(kept[:, None], v, fill)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + t * stride_wt + j * stride_wk, mask=mask_t, other=0.0)
            v *= w.to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + t[:, None] * stride_ot + d[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _combine_backward_kernel(
    grad_out_ptr, y_ptr, inverse_ptr, weights_ptr, fill_ptr, grad_y_ptr, grad_w_ptr, grad_fill_ptr,
    T, D, k,
    stride_gt, stride_gd, stride_yn, stride_yd, stride_wt, stride_wk, stride_ft, stride_fd,
    stride_dyn, stride_dyd, stride_dft, stride_dfd,
    HAS_FILL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For BLOCK_T tokens and each slot j, one sweep over D: grad_y[row] = w · grad_out[t] and grad_w[t, j] =
    <grad_out[t], y row> (fill[t] for a dropped slot when there is a fill); then grad_fill[t] = grad_out[t]
    · (weight of t's dropped slots). Each kept slot owns one row of grad_y: no atomics."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = t < T
    t = t.to(tl.int64)
    dropped_w = tl.zeros((BLOCK_T,), tl.float32)
    for j in range(k):
        pos = tl.load(inverse_ptr + t * k + j, mask=mask_t, other=-1)
        kept = pos >= 0
        pos = tl.where(kept, pos, 0)
        w = tl.load(weights_ptr + t * stride_wt + j * stride_wk, mask=mask_t, other=0.0).to(tl.float32)
        dropped_w += tl.where(kept, 0.0, w)
        dot = tl.zeros((BLOCK_T,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_t[:, None] & (d < D)[None, :]
            g = _tile(grad_out_ptr, t, d, stride_gt, stride_gd, mask)
            row = mask & kept[:, None]
            v = _tile(y_ptr, pos, d, stride_yn, stride_yd, row)
            if HAS_FILL:
                v = tl.where(kept[:, None], v, _tile(fill_ptr, t, d, stride_ft, stride_fd, mask))
            dot += tl.sum(g * v, 1)
            tl.store(grad_y_ptr + pos[:, None] * stride_dyn + d[None, :] * stride_dyd,
                     (w[:, None] * g).to(grad_y_ptr.dtype.element_ty), mask=row)
        tl.store(grad_w_ptr + t * k + j, dot.to(grad_w_ptr.dtype.element_ty), mask=mask_t)
    if HAS_FILL:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_t[:, None] & (d < D)[None, :]
            g = _tile(grad_out_ptr, t, d, stride_gt, stride_gd, mask)
            tl.store(grad_fill_ptr + t[:, None] * stride_dft + d[None, :] * stride_dfd,
                     (g * dropped_w[:, None]).to(grad_fill_ptr.dtype.element_ty), mask=mask)


# ---- host side ---------------------------------------------------------------------------------------------
def _expect(t, name, ndim, dtypes, like=None):
    """Check a tensor's rank, dtype and device (`like`'s, or one the kernels can run on)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like.device} was expected")
    if like is None and not (t.is_cuda or _INTERPRET):
        raise ValueError(f"{name} is on {t.device}: Triton needs CUDA tensors (or TRITON_INTERPRET=1)")


def _block_d(D):
    return min(128, triton.next_power_of_2(max(D, 16)))


def route(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group, topk_group, group_score):
    """logits [T, E] (any float dtype and strides) → weights [T, k] fp32, indices [T, k] int64, counts [E]
    int64, as reference.route. Group-limited selection (n_group > 1) runs in the kernel too."""
    _expect(logits, "logits", 2, _FLOATS)
    T, E = logits.shape
    if E != num_experts or not 1 <= top_k <= E:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit num_experts={num_experts}, top_k={top_k}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown scoring {scoring!r}")
    if score_bias is not None:
        _expect(score_bias, "score_bias", 1, _FLOATS, like=logits)
        if score_bias.shape[0] != E:
            raise ValueError(f"score_bias has {score_bias.shape[0]} entries for {E} experts")
    if n_group > 1 and (E % n_group or not 1 <= topk_group <= n_group or group_score not in ("max", "top2sum")
                        or (group_score == "top2sum" and E // n_group < 2)):
        raise ValueError(f"bad expert groups: n_group={n_group}, topk_group={topk_group}, {group_score!r}")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device)
    if T:
        block_e = triton.next_power_of_2(E)
        block_t = max(1, min(64, 4096 // block_e))
        bias = logits if score_bias is None else score_bias
        groups = max(n_group, 1)
        _route_kernel[(triton.cdiv(T, block_t),)](
            logits, bias, weights, indices, counts, T, E, E // groups, float(scale),
            logits.stride(0), logits.stride(1), bias.stride(0),
            K=top_k, SIGMOID=scoring == "sigmoid", HAS_BIAS=score_bias is not None, RENORMALIZE=bool(renormalize),
            N_GROUP=groups, TOPK_GROUP=topk_group if groups > 1 else 1,
            GROUP_TOP2=groups > 1 and group_score != "max",
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_G=triton.next_power_of_2(groups))
    return weights, indices, counts.to(torch.int64)


def _check_dispatch(x, indices, num_experts, capacity, group_size):
    _expect(x, "x", 2, _FLOATS)
    _expect(indices, "indices", 2, _INTS, like=x)
    T = indices.shape[0]
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    if x.shape[0] != T:
        raise ValueError(f"x has {x.shape[0]} rows but indices has {T}")
    if capacity >= 0 and group_size > 0 and T % group_size:
        raise ValueError(f"{T} tokens do not split into groups of {group_size}")


def _rank(x, indices, E, capacity, group_size):
    """Pass 1 and its tables → (geometry (G, L, J), rank_base [G, J, E] int64: slots of the same group and
    expert in earlier blocks, kept [G, E] int64: slots each group keeps per expert)."""
    T, k = indices.shape
    tokens_per_group = group_size if capacity >= 0 and group_size > 0 else T
    G, L = T // tokens_per_group, tokens_per_group * k                    # groups, slots per group
    J = triton.cdiv(L, _BLOCK_S)                                          # blocks per group
    hist = torch.empty(G * J, E, dtype=torch.int32, device=x.device)
    _launch_sort((G, L, J), x, indices, E, capacity, hist, hist, hist, x, hist, histogram=True)
    hist = hist.view(G, J, E).to(torch.int64)
    kept = hist.sum(1)
    return (G, L, J), hist.cumsum(1) - hist, kept.clamp(max=capacity) if capacity >= 0 else kept


def _launch_sort(geometry, x, indices, E, capacity, hist, rank_base, dest_base, out, order, histogram):
    """One pass of _sort_kernel; pass 1 passes `hist` for the tensors it does not touch."""
    G, L, J = geometry
    _sort_kernel[(G * J,)](
        indices, hist, x, rank_base, dest_base, out, order, E, indices.shape[1], x.shape[1], L, J,
        capacity if capacity >= 0 else L,
        indices.stride(0), indices.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        HISTOGRAM=histogram, BLOCK_S=_BLOCK_S, BLOCK_E=triton.next_power_of_2(E), BLOCK_D=_block_d(x.shape[1]))


def dispatch(x, indices, num_experts, capacity, group_size, priority=None):
    """x [T, D] → x_perm [N, D] expert-major, order [N] int64 slot ids, counts [E] int64 kept slots, as
    reference.dispatch. Checks the expert ids on the host (one sync, like the reference's bincount); with
    a capacity, sizing x_perm reads N back too (dropless, N = T·k is known from the shapes). Batch-
    prioritized routing (a capacity and a `priority`) runs reference.dispatch: the counting sort ranks
    slots in slot order only."""
    if priority is not None and capacity >= 0:
        from moecompile.kernels import reference
        return reference.dispatch(x, indices, num_experts, capacity, group_size, priority)
    _check_dispatch(x, indices, num_experts, capacity, group_size)
    T, k = indices.shape
    E = num_experts
    lo, hi = torch.stack(torch.aminmax(indices)).tolist() if indices.numel() else (0, 0)
    if lo < 0 or hi >= E:
        raise ValueError(f"indices must lie in [0, {E})")
    if T * k == 0:
        empty = torch.empty(0, dtype=torch.int64, device=x.device)
        return x.new_empty(0, x.shape[1]), empty, torch.zeros(E, dtype=torch.int64, device=x.device)
    geometry, rank_base, kept = _rank(x, indices, E, capacity, group_size)
    counts = kept.sum(0)                                                  # [E]
    # expert e's rows start after all earlier experts' rows; group g's after earlier groups' of expert e
    dest_base = (counts.cumsum(0) - counts) + (kept.cumsum(0) - kept)     # [G, E]
    N = T * k if capacity < 0 else int(counts.sum())
    x_perm = x.new_empty(N, x.shape[1])
    order = torch.empty(N, dtype=torch.int64, device=x.device)
    if N:
        _launch_sort(geometry, x, indices, E, capacity, rank_base, rank_base, dest_base, x_perm, order, False)
    return x_perm, order, counts


def dispatch_capacity(x, indices, num_experts, capacity, group_size):
    """The fixed-size GShard/Tutel layout, with no device→host sync: x [T, D] → buffer [E, G·capacity, D]
    (expert e's kept slots of group g at rows [g·capacity, g·capacity + kept)), zero rows where empty;
    slot [E, G·capacity] int64 slot ids, -1 where empty; dropped, a 0-dim int64 tensor: the slots not kept.
    An expert id outside [0, E) is not checked here; its slot counts as dropped."""
    _check_dispatch(x, indices, num_experts, capacity, group_size)
    if capacity < 0:
        raise ValueError("dispatch_capacity needs a capacity >= 0")
    T, k = indices.shape
    E, D = num_experts, x.shape[1]
    G = T // group_size if group_size > 0 else min(T, 1)
    buffer = x.new_zeros(E * G * capacity, D)
    slot = torch.full((E * G * capacity,), -1, dtype=torch.int64, device=x.device)
    dropped = torch.tensor(T * k, dtype=torch.int64, device=x.device)
    if T * k and capacity:
        geometry, rank_base, kept = _rank(x, indices, E, capacity, group_size)
        groups = torch.arange(G, device=x.device)[:, None]
        dest_base = (torch.arange(E, device=x.device)[None, :] * G + groups) * capacity   # [G, E]
        _launch_sort(geometry, x, indices, E, capacity, rank_base, rank_base, dest_base, buffer, slot, False)
        dropped = dropped - kept.sum()
    return buffer.view(E, G * capacity, D), slot.view(E, G * capacity), dropped


def _inverse(order, num_slots):
    """inverse[s] = position of slot s in order, -1 where the slot was dropped."""
    inverse = torch.full((num_slots,), -1, dtype=torch.int64, device=order.device)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def _check_rows(rows, name, order):
    _expect(rows, name, 2, _FLOATS)
    _expect(order, "order", 1, _INTS, like=rows)
    if rows.shape[0] != order.shape[0]:
        raise ValueError(f"{name} has {rows.shape[0]} rows but order has {order.shape[0]} slots")


def _gather_sum(rows, order, weights, fill, k, T):
    """Shared launcher of dispatch_backward (no weights, no fill) and combine_forward."""
    D = rows.shape[1]
    out = rows.new_empty(T, D)
    if T == 0 or D == 0:
        return out
    w = rows if weights is None else weights
    f = rows if fill is None else fill
    block_d = _block_d(D)
    _gather_sum_kernel[(triton.cdiv(T, _BLOCK_T), triton.cdiv(D, block_d))](
        rows, _inverse(order, T * k), w, f, out, T, D, k, rows.stride(0), rows.stride(1),
        w.stride(0), w.stride(1), f.stride(0), f.stride(1), out.stride(0), out.stride(1),
        HAS_WEIGHTS=weights is not None, HAS_FILL=fill is not None, BLOCK_T=_BLOCK_T, BLOCK_D=block_d)
    return out


def dispatch_backward(grad_x_perm, order, k, num_tokens):
    """grad_x_perm [N, D] → grad_x [T, D]: each token sums the rows of its kept slots."""
    _check_rows(grad_x_perm, "grad_x_perm", order)
    return _gather_sum(grad_x_perm, order, None, None, k, num_tokens)


def _check_combine(y_perm, order, weights, fill):
    _check_rows(y_perm, "y_perm", order)
    _expect(weights, "weights", 2, _FLOATS, like=y_perm)
    if fill is not None:
        _expect(fill, "fill", 2, _FLOATS, like=y_perm)
        if fill.shape != (weights.shape[0], y_perm.shape[1]):
            raise ValueError(f"fill must be [T, D] = {[weights.shape[0], y_perm.shape[1]]}, got {list(fill.shape)}")


def combine_forward(y_perm, order, weights, fill):
    """y_perm [N, D], order [N], weights [T, k], fill [T, D] or None → out [T, D] in y's dtype:
    out[t] = Σ_j weights[t, j] · (y row of slot t·k+j if kept, else fill[t] when given, else 0)."""
    _check_combine(y_perm, order, weights, fill)
    T, k = weights.shape
    return _gather_sum(y_perm, order, weights, fill, k, T)


def combine_backward(grad_out, y_perm, order, weights, fill):
    """→ grad_y [N, D] in grad_out's dtype, grad_w [T, k] in weights' dtype, grad_fill [T, D] (None without fill),
    as native.combine_backward."""
    _check_combine(y_perm, order, weights, fill)
    _expect(grad_out, "grad_out", 2, _FLOATS, like=y_perm)
    T, k = weights.shape
    D = y_perm.shape[1]
    if grad_out.shape != (T, D):
        raise ValueError(f"grad_out must be [T, D] = {[T, D]}, got {list(grad_out.shape)}")
    grad_y = grad_out.new_empty(y_perm.shape)  # dtypes as native's: grad_out's, and the weights'
    grad_w = weights.new_zeros(T, k)
    grad_fill = None if fill is None else grad_out.new_empty(T, D)
    if T == 0:
        return grad_y, grad_w, grad_fill
    f = y_perm if fill is None else fill
    gf = grad_y if grad_fill is None else grad_fill
    _combine_backward_kernel[(triton.cdiv(T, _BLOCK_T),)](
        grad_out, y_perm, _inverse(order, T * k), weights, f, grad_y, grad_w, gf, T, D, k,
        grad_out.stride(0), grad_out.stride(1), y_perm.stride(0), y_perm.stride(1), weights.stride(0),
        weights.stride(1), f.stride(0), f.stride(1), grad_y.stride(0), grad_y.stride(1), gf.stride(0),
        gf.stride(1), HAS_FILL=fill is not None, BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(D))
    return grad_y, grad_w, grad_fill
