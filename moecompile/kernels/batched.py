"""Batched forms of a MoE layer's experts for calls with few rows per expert (CPU eager; see
ir/lowering.batched_path for when each runs): dispatch + expert_ffn + combine in one, as batched matmuls
over groups of rows, plain torch (autograd differentiates them).

Why: at decode sizes aten's CPU _grouped_mm runs its groups one after another, each a one-row GEMM on one
thread, and visits empty experts too; a bmm spreads its groups over the threads.
"""
import torch

from moecompile.kernels.activations import expert_activation, split_gate_up
from moecompile.kernels.padded import padded_rows


# Both run the FFN as bmm over G groups of m rows each ([G, m, D] against [G, out, in] weights). Stacked
# [E, ...] weights only.
def decode_ffn(x, weights, indices, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit):
    """dispatch + expert_ffn + combine in one, for calls with few slots: x [T, D], routing weights and
    indices [T, k] → out [T, D] = Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]).

    Each slot is a group of one row with its expert's weights gathered: no sort, no per-expert visits, no
    host read of the routing (static shapes, no sync: what a CUDA graph needs). It copies T·k experts'
    weights, so it pays only where that is small against a visit per expert (passes/select_kernels.py
    decides). A weight's gradient comes back through index_select's backward, an index_add into a zero
    [E, ...] buffer."""
    T, k = indices.shape
    flat = indices.flatten()                                                              # [N] N = T·k
    rows = x.unsqueeze(1).expand(T, k, x.shape[1]).reshape(T * k, 1, x.shape[1])          # [N, 1, D]
    picked = [None if w is None else w[0].index_select(0, flat) for w in (w1, w2, w3, b1, b2, b3)]
    y = _batched_ffn(rows, *picked, activation, fused, alpha, limit).view(T, k, x.shape[1])   # [T, k, D]
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)                      # [T, D]


def stacked_ffn(x, weights, indices, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit):
    """decode_ffn's result with every expert a group, its rows padded with zeros to the most any expert
    got (m = max(counts), a host read: CPU only), against the weights as they are stored: no copy of
    weights, and all E experts' read, so it pays where most experts got rows and the padding is small
    (stacked_pays). counts [E]: rows per expert of `indices` [T, k]."""
    T, k = indices.shape
    E, D, N = counts.shape[0], x.shape[1], indices.numel()
    flat = indices.flatten()                                                              # [N]
    m = int(counts.max())
    order = flat.argsort(stable=True)                                                     # [N] by expert
    row = torch.empty_like(order).scatter_(0, order, padded_rows(counts, m, N))           # [N] slot → padded row
    rows = x.new_zeros(E * m, D).index_copy_(0, row, x.repeat_interleave(k, 0))           # [E·m, D]
    w = [None if t is None else t[0] for t in (w1, w2, w3, b1, b2, b3)]
    y = _batched_ffn(rows.view(E, m, D), *w, activation, fused, alpha, limit).view(E * m, D)
    y = y.index_select(0, row).view(T, k, D)                                              # [T, k, D]
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)                      # [T, D]


def decode_slots_on_threads(one_thread: int, num_experts: int) -> int:
    """The most slots decode_ffn takes on two or more CPU threads, given the most it takes on one
    (passes/select_kernels.decode_slots, bounded by the bytes its gather copies): twice that, the copy
    and the bmm then using every thread, up to a quarter of the experts. Measured here (2 threads, no_grad,
    a layer's time, caches evicted before each call): Qwen3-MoE-like experts (64 of 0.4 MB, top-8) at 1
    token 0.88 vs 1.17 ms through the grouped path, at 2 tokens (16 slots) 1.39 vs 1.66 ms; for
    Mixtral-like ones (8 of 6 MB, top-2) the copy lost even at 1 token (1.5 vs 1.0 ms, caches warm), and
    one-thread's bound already excludes them."""
    return min(num_experts // 4, 2 * one_thread)


def stacked_pays(counts_list: list[int], slots: int) -> bool:
    """Whether stacked_ffn beats the grouped path (expert_ffn_forward) for a call whose experts got
    `counts_list` rows of `slots` in all, on two or more threads (on one, the grouped path is as fast or
    faster at every size measured). It reads every expert's weights, so it pays where nearly all of them
    (≥ 85%) got rows, and its padding makes at most 3.5x the rows. Measured here (2 threads, no_grad, a
    layer's time, grouped vs stacked), caches warm: Qwen3-MoE-like experts (64 of 0.4 MB, top-8) at 16
    tokens (56 experts, padding 2.5-3.5x) 3.9-4.1 vs 2.9-3.6 ms, 32 tokens 4.3-5.4 vs 3.1-3.6, a tie or a
    loss at 8 tokens (39-46 experts); Mixtral-like ones (8 of 6 MB, top-2) at 8 tokens (7-8 experts)
    6.0-7.0 vs 5.2-5.6 ms, a loss at 4 tokens (6 experts, 2x padding: 3.9 vs 4.3-4.6 ms). With the caches
    evicted before each call the lead shrinks, the stacked form reading more bytes: Qwen3-like at 16
    tokens 4.6 vs 4.3 ms, and forced at 8 tokens a loss (3.4 vs 3.8)."""
    E = len(counts_list)
    live = sum(1 for n in counts_list if n)
    return _most(live, E) and 2 * E * max(counts_list) <= 7 * slots


def stacked_may_pay(slots: int, num_experts: int) -> bool:
    """Whether a call with `slots` token-slots could pass stacked_pays at all (it needs that many experts
    with rows): else its per-expert counts need not be read."""
    return _most(slots, num_experts)


def _most(live: int, num_experts: int) -> bool:
    return live * 20 >= 17 * num_experts  # at least 85% of the experts


def _batched_ffn(rows, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit):
    """rows [G, m, D] through group g's expert (weights [G, out, in], biases [G, out]) → [G, m, D]."""
    g1 = _batched_linear(rows, w1, b1)                                                    # [G, m, F1]
    u = _batched_linear(rows, w3, b3) if w3 is not None else None                         # [G, m, F]
    h = expert_activation(*split_gate_up(g1, u, fused), activation, alpha, limit)         # [G, m, F]
    return _batched_linear(h, w2, b2)


def _batched_linear(rows, w, b):
    """rows [G, m, in] @ w[g]ᵀ (w [G, out, in]) + b[g] → [G, m, out]."""
    if b is None:
        return torch.bmm(rows, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), rows, w.transpose(1, 2))
