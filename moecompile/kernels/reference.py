"""Pure-torch reference for each canonical op: the definition every other kernel path is tested against.

Written for clarity, differentiated by plain autograd. Shapes: T tokens, D hidden, E experts, k slots per
token, N = number of kept (token, slot) pairs (T·k when dropless), F expert hidden size.
"""
import torch
import torch.nn.functional as F

from moecompile.kernels.activations import expert_activation, per_expert, split_gate_up


def route(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group, topk_group, group_score):
    """logits [T, E] → weights [T, k] fp32, indices [T, k] int64, counts [E] int64."""
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()  # [T, E]
    select = scores if score_bias is None else scores + score_bias.float()
    if n_group > 1:
        T = select.shape[0]
        grouped = select.view(T, n_group, -1)                                           # [T, G, E/G]
        if group_score == "max":
            group_scores = grouped.max(-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)                      # [T, G]
        best = group_scores.topk(topk_group, dim=-1).indices                            # [T, g]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(T, -1)                     # [T, E]
        select = select.masked_fill(~keep, 0.0)  # as DeepSeek does: 0, not -inf
    indices = select.topk(top_k, dim=-1).indices                                        # [T, k]
    weights = scores.gather(-1, indices)                                                # [T, k]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * scale
    counts = torch.bincount(indices.flatten(), minlength=num_experts)
    return weights, indices, counts


def slot_order(indices, num_experts, capacity, group_size):
    """Kept (token, slot) ids t·k+j sorted expert-major, token order within an expert; and kept counts [E].

    With a capacity, an expert keeps at most `capacity` slots per group of `group_size` tokens, in
    token-major slot order; the rest are dropped."""
    T, k = indices.shape
    flat = indices.flatten()                                                            # [T·k]
    if capacity >= 0:
        tokens_per_group = group_size if group_size > 0 else T
        onehot = F.one_hot(flat, num_experts).view(-1, tokens_per_group * k, num_experts)  # [G, Sg·k, E]
        rank = (onehot.cumsum(1) * onehot).sum(-1).flatten() - 1                       # [T·k]
        kept = rank < capacity
    else:
        kept = torch.ones_like(flat, dtype=torch.bool)
    key = torch.where(kept, flat, num_experts)  # dropped slots sort last
    order = key.argsort(stable=True)[: int(kept.sum())]                                 # [N]
    counts = torch.bincount(flat[order], minlength=num_experts)
    return order, counts


def dispatch(x, indices, num_experts, capacity, group_size):
    """x [T, D] → x_perm [N, D] (tokens in expert-major order), order [N], counts [E]."""
    order, counts = slot_order(indices, num_experts, capacity, group_size)
    return x[order // indices.shape[1]], order, counts


def expert_ffn(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit):
    """Each expert's FFN on its contiguous rows of x_perm [N, D] → [N, D]."""
    w1, w2, w3 = (per_expert(w, 3) for w in (w1, w2, w3))
    b1, b2, b3 = (per_expert(b, 2) for b in (b1, b2, b3))
    outs = []
    for e, xe in enumerate(x_perm.split(counts.tolist())):
        g1 = F.linear(xe, w1[e], None if b1 is None else b1[e])
        u = None if w3 is None else F.linear(xe, w3[e], None if b3 is None else b3[e])
        h = expert_activation(*split_gate_up(g1, u, fused), activation, alpha, limit)
        outs.append(F.linear(h, w2[e], None if b2 is None else b2[e]))
    return torch.cat(outs)


def combine(y_perm, order, weights, fill):
    """Scatter y_perm [N, D] back to slots, weight, sum over k → [T, D]. A dropped slot holds zero, or its
    token's row of `fill` [T, D] when given."""
    T, k = weights.shape
    D = y_perm.shape[-1]
    slots = y_perm.new_zeros(T * k, D) if fill is None else fill.repeat_interleave(k, 0)
    slots = slots.index_copy(0, order, y_perm).view(T, k, D)
    return (weights.to(y_perm.dtype).unsqueeze(-1) * slots).sum(1)
