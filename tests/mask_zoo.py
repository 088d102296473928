"""Hand-written MoE layers of the one-hot dispatch-mask family, written from the published formulations, with
names that give nothing away (no "expert", "gate", "router", "moe").

GShard (Lepikhin et al., 2020, Algorithm 1): top-2 gating; each expert has a capacity of C slots, filled
first come first served, all first choices before any second choice; the two gate values are normalized to
sum to one; a second choice can be kept always, above a threshold, or at random with probability 2·g2; the
auxiliary loss is E · Σ_e mean(gates_e) · (fraction of tokens whose first choice is e). Switch
(Fedus et al., 2021): the same with one choice, the gate value itself as the weight. ST-MoE (Zoph et al.,
2022): top-n choices, no renormalization, plus the router z-loss mean(logsumexp(logits)²).

The gate returns (aux, combine [T, E, C], dispatch [T, E, C] bool, counts [E]); the layer dispatches tokens
by an einsum (or matmul) of the mask with the tokens into [E, C, D], runs the workers batched [E, D, F] (or
as a ModuleList) and combines by an einsum with the combine weights. It returns (output, aux), or
(output, aux, counts).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Ledger(nn.Module):
    """The gate, over tokens [..., T, D]: each leading index is a group of T tokens, gated on its own (GShard's
    groups). `picks` choices per token; capacity C = max(`floor`, ⌈picks · `slack` · T / E⌉) per group.
    `renorm`: "before" (weights over the chosen normalized to sum to one, then drops: GShard), "after" (over
    the choices that survived capacity) or "none" (Switch, ST-MoE). `later`: what happens to choices after
    the first: "all" kept, "threshold" kept if their normalized weight exceeds `bar`, "random" kept with
    probability 2·weight in training mode. `noise`: "gumbel" adds Gumbel noise to the logits of later
    choices in training mode. `zeta` weighs the router z-loss added to the balancing loss. `spelling`
    "tensor" writes the same gate another way: the capacity computed with torch ops and compared as a
    tensor, choices by argmax of the probabilities, combine weights by einsum."""

    def __init__(self, d, e, picks=2, slack=1.25, floor=4, renorm="before", later="all", bar=0.2, noise=None,
                 zeta=0.0, spelling="python"):
        super().__init__()
        self.lens = nn.Linear(d, e, bias=False)
        self.picks, self.slack, self.floor, self.renorm = picks, slack, floor, renorm
        self.later, self.bar, self.noise, self.zeta, self.spelling = later, bar, noise, zeta, spelling

    def forward(self, t):
        logits = self.lens(t)                                                   # [..., T, E]
        T, E = logits.shape[-2:]
        if self.spelling == "tensor":
            C = torch.ceil(torch.tensor(T / E) * self.slack * self.picks).to(torch.int64)
            C = torch.clamp(C, min=self.floor)
        else:
            C = max(self.floor, math.ceil(self.picks * self.slack * T / E))
        probs = logits.softmax(-1)                                              # [T, E]
        masks, pool = [], probs if self.spelling == "tensor" else logits
        for j in range(self.picks):
            if j and self.noise == "gumbel" and self.training:
                u = torch.rand_like(pool)
                pool = pool - torch.log(-torch.log(u.clamp_min(1e-9)))
            onehot = F.one_hot(pool.argmax(-1), E).to(probs.dtype)              # [..., T, E]
            masks.append(onehot)
            pool = pool.masked_fill(onehot.bool(), float("-inf"))
        share = [(probs * m).sum(-1) for m in masks]                             # [..., T] per choice
        if self.renorm == "before":
            total = sum(share).clamp_min(torch.finfo(probs.dtype).eps)
            share = [g / total for g in share]
        for j in range(1, self.picks):
            if self.later == "threshold":
                masks[j] = masks[j] * (share[j] > self.bar).unsqueeze(-1)
            elif self.later == "random" and self.training:
                masks[j] = masks[j] * (torch.rand_like(share[j]) < 2 * share[j]).unsqueeze(-1)
        # balancing loss on the first choices, before any is dropped; per group, averaged over the groups
        aux = (E * (probs.mean(-2) * masks[0].mean(-2)).sum(-1)).mean()
        if self.zeta:
            aux = aux + self.zeta * torch.logsumexp(logits, -1).pow(2).mean()
        counts = masks[0].sum(-2).long()                                        # [..., E]
        # positions: a choice's slots come after every earlier choice's, then in token order
        before = torch.zeros_like(probs[..., :1, :])                             # [..., 1, E]
        slots = []
        for j, m in enumerate(masks):
            pos = torch.cumsum(m, -2) - 1 + before                              # [..., T, E]
            before = before + m.sum(-2, keepdim=True)
            masks[j] = m * torch.lt(pos, C)
            slots.append((pos * masks[j]).sum(-1).long())                      # [..., T]
        if self.renorm == "after":
            kept = [(probs * m).sum(-1) for m in masks]
            total = sum(kept).clamp_min(torch.finfo(probs.dtype).eps)
            share = [g / total for g in kept]
        C = int(C)
        if self.spelling == "tensor":
            combine = sum(torch.einsum("...te,...tc->...tec", g.unsqueeze(-1) * m, F.one_hot(s, C).to(probs.dtype))
                          for g, m, s in zip(share, masks, slots))             # [..., T, E, C]
        else:
            combine = sum((g.unsqueeze(-1) * m).unsqueeze(-1) * F.one_hot(s, C).to(probs.dtype).unsqueeze(-2)
                          for g, m, s in zip(share, masks, slots))             # [..., T, E, C]
        return aux, combine, combine.bool(), counts


def _act(kind, h, v=None):
    return {"relu": F.relu, "gelu": F.gelu}[kind](h) if v is None else F.silu(h) * v


class LedgerLayer(nn.Module):
    """Workers batched as [E, D, F] weights (`bias`: [E, F] and [E, D] biases), computed by einsum;
    `kind` relu, gelu or swiglu (a second [E, D, F] projection multiplies the SiLU). `grouped`: each
    sequence of x [B, S, D] is a gating group (GShard), else all of a call's tokens are one. `tally`: the
    gate's per-worker counts are returned too (output, aux, counts). `narrow`: the combine einsum runs in that
    dtype (operands cast down, the result cast back)."""

    def __init__(self, d=32, f=64, e=4, kind="relu", bias=True, grouped=False, tally=False, narrow=None, **gate):
        super().__init__()
        self.kind, self.grouped, self.tally, self.narrow = kind, grouped, tally, narrow
        self.ledger = Ledger(d, e, **gate)
        self.inward = nn.Parameter(torch.randn(e, d, f) * d**-0.5)             # [E, D, F]
        self.side = nn.Parameter(torch.randn(e, d, f) * d**-0.5) if kind == "swiglu" else None
        self.outward = nn.Parameter(torch.randn(e, f, d) * f**-0.5)            # [E, F, D]
        self.lift = nn.Parameter(torch.randn(e, f) * 0.1) if bias else None    # [E, F]
        self.drop = nn.Parameter(torch.randn(e, d) * 0.1) if bias else None    # [E, D]

    def forward(self, x):
        t = x if self.grouped else x.reshape(-1, x.shape[-1])                  # [..., T, D]
        aux, combine, dispatch, counts = self.ledger(t)
        rows = torch.einsum("...tec,...td->...ecd", dispatch.to(t.dtype), t)    # [..., E, C, D]
        h = torch.einsum("...ecd,edf->...ecf", rows, self.inward)               # [..., E, C, F]
        if self.lift is not None:
            h = h + self.lift[:, None]
        v = torch.einsum("...ecd,edf->...ecf", rows, self.side) if self.side is not None else None
        y = torch.einsum("...ecf,efd->...ecd", _act(self.kind, h, v), self.outward)   # [..., E, C, D]
        if self.drop is not None:
            y = y + self.drop[:, None]
        if self.narrow is not None:
            combine, y = combine.to(self.narrow), y.to(self.narrow)
        out = torch.einsum("...tec,...ecd->...td", combine, y).to(x.dtype).view(x.shape)
        return (out, aux, counts) if self.tally else (out, aux)


class LedgerRoster(nn.Module):
    """Workers as a ModuleList of two-layer MLPs; dispatch and combine as matrix products with the mask
    flattened to [E·C, T]."""

    def __init__(self, d=32, f=64, e=4, kind="gelu", **gate):
        super().__init__()
        self.ledger = Ledger(d, e, **gate)
        self.crew = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.GELU() if kind == "gelu" else nn.ReLU(),
                                                nn.Linear(f, d)) for _ in range(e))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])                                          # [T, D]
        aux, combine, dispatch, _ = self.ledger(t)
        T, E, C = combine.shape
        rows = (dispatch.to(t.dtype).reshape(T, E * C).t() @ t).view(E, C, -1)  # [E, C, D]
        y = torch.stack([w(r) for w, r in zip(self.crew, rows)])               # [E, C, D]
        return (combine.reshape(T, E * C) @ y.reshape(E * C, -1)).view(x.shape), aux
