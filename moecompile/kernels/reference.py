"""Pure-torch reference for each canonical op: the definition every other kernel path is tested against.

Written for clarity, differentiated by plain autograd. Shapes: T tokens, D hidden, E experts, k slots per
token, N = number of kept (token, slot) pairs (T·k when dropless), F expert hidden size. The end of the
file gives the ops' forward/backward interface (see moecompile/kernels/__init__.py) by autograd over these
definitions, so `kernels="reference"` runs them as the canonical ops.
"""
import torch
import torch.nn.functional as F

from moecompile.kernels.activations import expert_activation, is_stacked, per_expert, split_gate_up

DIFFERENTIABLE = frozenset({"route", "dispatch", "expert_ffn", "combine"})  # all of it is plain torch


def route(logits, score_bias, num_experts, top_k, scoring, renormalize, scale, n_group, topk_group, group_score):
    """logits [T, E] → weights [T, k] fp32, indices [T, k] int64, counts [E] int64."""
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()  # [T, E]
    select = scores if score_bias is None else scores + score_bias.float()
    if n_group > 1:
        T = select.shape[0]  # sizes below spelled out, no -1: with 0 tokens view cannot infer it
        grouped = select.view(T, n_group, num_experts // n_group)                       # [T, G, E/G]
        if group_score == "max":
            group_scores = grouped.max(-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)                      # [T, G]
        best = group_scores.topk(topk_group, dim=-1).indices                            # [T, g]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(T, num_experts)            # [T, E]
        select = select.masked_fill(~keep, 0.0)  # as DeepSeek does: 0, not -inf
    indices = select.topk(top_k, dim=-1).indices                                        # [T, k]
    weights = scores.gather(-1, indices)                                                # [T, k]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * scale
    counts = torch.bincount(indices.flatten(), minlength=num_experts)
    return weights, indices, counts


def slot_order(indices, num_experts, capacity, group_size, priority=None):
    """Kept (token, slot) ids t·k+j sorted expert-major, token order within an expert; and kept counts [E].

    With a capacity, an expert keeps at most `capacity` slots per group of `group_size` tokens, in
    token-major slot order, or with `priority` [T] (batch-prioritized routing) in order of the tokens'
    priority, descending (ties in token order; a token's slots in slot order); the rest are dropped."""
    T, k = indices.shape
    flat = indices.flatten()                                                            # [T·k]
    if capacity >= 0:
        tokens_per_group = group_size if group_size > 0 else torch.sym_max(T, 1)  # 0 tokens: one empty group
        taken = (torch.arange(T * k, device=flat.device) if priority is None else
                 priority_slots(priority, k, tokens_per_group))                        # [T·k] in taking order
        onehot = F.one_hot(flat[taken], num_experts).view(-1, tokens_per_group * k, num_experts)  # [G, Sg·k, E]
        rank = torch.empty_like(flat).index_copy_(0, taken, (onehot.cumsum(1) * onehot).sum(-1).flatten() - 1)
        kept = rank < capacity                                                          # [T·k]
    else:
        kept = torch.ones_like(flat, dtype=torch.bool)
    key = torch.where(kept, flat, num_experts)  # dropped slots sort last
    order = key.argsort(stable=True)[: int(kept.sum())]                                 # [N]
    counts = torch.bincount(flat[order], minlength=num_experts)
    return order, counts


def priority_slots(priority, k, tokens_per_group):
    """Slot ids t·k+j in the order batch-prioritized routing takes them: group by group, tokens by priority
    [T] descending (ties in token order), a token's k slots in slot order → [T·k]."""
    by_priority = (-priority).argsort(stable=True)                                      # [T]
    tokens = by_priority[(by_priority // tokens_per_group).argsort(stable=True)]        # [T] within groups
    return (tokens.unsqueeze(1) * k + torch.arange(k, device=tokens.device)).flatten()


def dispatch(x, indices, num_experts, capacity, group_size, priority=None):
    """x [T, D] → x_perm [N, D] (tokens in expert-major order), order [N], counts [E]."""
    order, counts = slot_order(indices, num_experts, capacity, group_size, priority)
    return x[order // indices.shape[1]], order, counts


def expert_ffn(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, linear=F.linear):
    """Each expert's FFN on its contiguous rows of x_perm [N, D] → [N, D]. `linear` is F.linear's equal
    (native.py passes oneDNN's where it takes the GEMMs)."""
    w1, w2, w3 = (per_expert(w, 3) for w in (w1, w2, w3))
    b1, b2, b3 = (per_expert(b, 2) for b in (b1, b2, b3))
    outs = []
    for e, xe in enumerate(x_perm.split(counts.tolist())):
        g1 = linear(xe, w1[e], None if b1 is None else b1[e])
        u = None if w3 is None else linear(xe, w3[e], None if b3 is None else b3[e])
        h = expert_activation(*split_gate_up(g1, u, fused), activation, alpha, limit)
        outs.append(linear(h, w2[e], None if b2 is None else b2[e]))
    return torch.cat(outs)


def combine(y_perm, order, weights, fill):
    """Scatter y_perm [N, D] back to slots, weight, sum over k → [T, D]. A dropped slot holds zero, or its
    token's row of `fill` [T, D] when given."""
    T, k = weights.shape
    D = y_perm.shape[-1]
    slots = y_perm.new_zeros(T * k, D) if fill is None else fill.repeat_interleave(k, 0)
    slots = slots.index_copy(0, order, y_perm).view(T, k, D)
    return (weights.to(y_perm.dtype).unsqueeze(-1) * slots).sum(1)


# ---- the ops' forward/backward interface, by autograd over the definitions above ----------------------------
def _grads(fn, inputs, grad_outputs):
    """Gradients of fn(*inputs) for each input tensor (None for non-tensors and non-float inputs)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in inputs]
        wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        got = iter(torch.autograd.grad(fn(*leaves), wanted, grad_outputs, allow_unused=True))
        return [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]


def route_backward(grad_weights, logits, indices, scoring, renormalize, scale):
    """d(weights)/d(logits) with the chosen experts held fixed (selection has no gradient)."""
    def weights_of(leaf):
        scores = leaf.float().softmax(-1) if scoring == "softmax" else leaf.float().sigmoid()
        w = scores.gather(-1, indices)
        return (w / w.sum(-1, keepdim=True) if renormalize else w) * scale
    return _grads(weights_of, [logits], grad_weights)[0]


def dispatch_backward(grad_x_perm, order, k, num_tokens):
    return grad_x_perm.new_zeros(num_tokens, grad_x_perm.shape[1]).index_add_(0, order // k, grad_x_perm)


def expert_ffn_forward(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit, save=True):
    """→ y and no saved tensors (zero rows: the backward recomputes)."""
    y = expert_ffn(x_perm, counts, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit)
    F1, F_ = per_expert(w1, 3)[0].shape[-2], per_expert(w2, 3)[0].shape[-1]
    return (y, x_perm.new_empty(0, F1), *(x_perm.new_empty(0, F_) for _ in range(3)))


def expert_ffn_backward(grad_y, x_perm, counts, saved, w1, w2, w3, b1, b2, b3, activation, fused, alpha, limit,
                        need_x=True):
    lists = [w1, w2, w3, b1, b2, b3]
    sizes = [len(ws) if ws else 0 for ws in lists]

    def ffn(x, *flat):
        parts, at = [], 0
        for n in sizes:
            parts.append(list(flat[at:at + n]) or None)
            at += n
        return expert_ffn(x, counts, *parts, activation, fused, alpha, limit)

    grad_x, *flat = _grads(ffn, [x_perm] + [t for ws in lists for t in ws or []], grad_y)
    grads, at = {}, 0
    for name, ws, n, dim in zip(("w1", "w2", "w3", "b1", "b2", "b3"), lists, sizes, (3, 3, 3, 2, 2, 2)):
        # one stacked gradient per role, as every backend returns it
        grads[name] = None if not n else flat[at] if is_stacked(ws, dim) else torch.stack(flat[at:at + n])
        at += n
    return (grad_x if need_x else None), grads


combine_forward = combine


def combine_backward(grad_out, y_perm, order, weights, fill):
    grad_y, _, grad_w, grad_fill = _grads(combine, [y_perm, order, weights, fill], grad_out)
    return grad_y, grad_w, grad_fill
