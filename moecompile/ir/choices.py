"""Capacity taken choice by choice (GShard's order), and the auxiliary loss blocks of that family return.

The dispatch op takes a token's slots together: slot t·k + j, token by token. GShard's gate fills each
expert's capacity with every first choice of a capacity group before any second choice. Laid out as rows,
one per (choice, token) — [groups, k, G] flattened, one slot per row, k·G rows per group — the same op
takes the slots in GShard's order. A choice after the first that the block does not dispatch (its weight
not above `RouteSpec.later_above`) gets priority 0, behind every other row of its group, so it takes no
capacity another slot would, and weight 0. Combined rows fold back to tokens by a sum over the choices.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from moecompile.ir.spec import AuxLossSpec, CapacitySpec


@dataclasses.dataclass
class ChoiceRows:
    """How a call's [T, k] slots were laid out as rows (`by_choice`), to fold results back."""
    indices: torch.Tensor   # [T, k] the choices, as the block sees them
    weights: torch.Tensor   # [T, k] their weights, as the route op gave them
    groups: int             # capacity groups n
    group: int              # tokens per group G (n·G = T)

    def fold(self, rows: torch.Tensor) -> torch.Tensor:
        """[n·k·G, D] per-row results → [T, D], summed over each token's choices."""
        k = self.indices.shape[1]
        return rows.view(self.groups, k, self.group, -1).sum(1).reshape(self.groups * self.group, -1)

    def per_token(self, row_values: torch.Tensor) -> torch.Tensor:
        """[n·k·G] one value per row → [n, k, G]."""
        return row_values.view(self.groups, self.indices.shape[1], self.group)


def by_choice(tokens: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, cap: CapacitySpec,
              later_above: float | None):
    """tokens [T, D], indices and weights [T, k], a call's capacity (groups resolved) → (ChoiceRows, rows
    [n·k·G, D], row indices [n·k·G, 1], row weights [n·k·G, 1], the rows' capacity, row priority or None)."""
    T, k = indices.shape
    G = cap.group_size if cap.group_size > 0 else max(T, 1)
    n = T // G
    layout = ChoiceRows(indices, weights, n, G)

    def rows_of(t):  # [T, k] → [n·k·G, 1]: group-major, then choice, then token
        return t.view(n, G, k).transpose(1, 2).reshape(-1, 1)
    rows = tokens.view(n, 1, G, -1).expand(n, k, G, tokens.shape[-1]).reshape(n * k * G, -1)   # [n·k·G, D]
    row_indices, row_weights = rows_of(indices), rows_of(weights)
    priority = None
    if later_above is not None:
        first = torch.arange(k, device=indices.device).view(1, k, 1) == 0                          # [1, k, 1]
        sent = (first | (layout.per_token(row_weights) > later_above)).reshape(-1, 1)             # [n·k·G, 1]
        row_weights = row_weights * sent
        priority = sent.flatten().to(weights.dtype)
    row_cap = dataclasses.replace(cap, group_size=k * G if cap.group_size > 0 else 0, order="token")
    return layout, rows, row_indices, row_weights, row_cap, priority


def renormalize_kept(layout: ChoiceRows, row_weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Row weights [n·k·G, 1] renormalized over each token's kept rows (`order`: the rows dispatch kept;
    a zero weight counts as not kept), as a gate that normalizes after capacity drops does; a token with
    none kept gets zeros (the denominator clamped at eps, as such gates do)."""
    kept = torch.zeros_like(row_weights).index_fill_(0, order, 1.0)
    w = layout.per_token(row_weights * kept)                                                      # [n, k, G]
    total = w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).eps)
    return (w / total).reshape(-1, 1)


def aux_loss(aux: AuxLossSpec, logits: torch.Tensor, first: torch.Tensor, group: int = 0) -> torch.Tensor:
    """AuxLossSpec's loss from router logits [T, E] and each token's first choice [T] (capacity groups of
    `group` consecutive tokens; 0: one group): a scalar."""
    E = logits.shape[-1]
    G = group if aux.grouped and group else max(logits.shape[0], 1)
    p = logits.softmax(-1).view(-1, G, E)                                                        # [n, G, E]
    share = F.one_hot(first, E).to(p.dtype).view(-1, G, E).mean(1)                               # [n, E]
    loss = aux.balance * (E * (p.mean(1) * share).sum(-1)).mean()
    if aux.z:
        loss = loss + aux.z * torch.logsumexp(logits, -1).pow(2).mean()
    return loss
