"""GPT-2 style byte-level decoder with optional MoE layers: the seed papers' GPT-MoE baseline.

Written the way MoE layers are commonly written by hand (router Linear, softmax, top-k, a Python loop over
an nn.ModuleList of experts), so it doubles as the plainest input the compiler must recognise.
Shapes: B batch, S sequence, D model width, T = B·S tokens, E experts, k experts per token, V vocab.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256     # byte-level
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    max_seq: int = 256
    moe_every: int = 2        # block i is MoE iff i % moe_every == moe_every - 1; 0 = dense everywhere
    num_experts: int = 8
    top_k: int = 2
    dropout: float = 0.0

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and layer % self.moe_every == self.moe_every - 1


class MLP(nn.Module):
    """Dense feed-forward: Linear → exact GELU → Linear, with biases. Also the expert of MoE."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class MoE(nn.Module):
    """Token-choice top-k MoE: softmax router over E experts, each token summed over its k experts."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_experts))

    def forward(self, x):
        B, S, D = x.shape
        x = x.reshape(B * S, D)                                           # [T, D]
        scores = self.router(x).float().softmax(-1)                       # [T, E]
        weights, topk_idx = scores.topk(self.top_k, dim=-1)               # [T, k]
        if self.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        # top-1 keeps the raw probability (Switch/Tutel): renormalised it would be 1 and the router untrained
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)                                         # [T, D]
        for e, expert in enumerate(self.experts):
            # no `if token_idx.numel()` skip: an empty index is harmless and keeps the graph value-free
            token_idx, slot = torch.where(topk_idx == e)                  # [n], [n]
            y = expert(x[token_idx]) * weights[token_idx, slot, None]     # [n, D]
            out.index_add_(0, token_idx, y)
        return out.view(B, S, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # [B, H, S, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer block; `ffn` is an MLP or, in MoE layers, a MoE."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg.d_model, cfg.d_ff)

    def forward(self, x):
        return self.forward_tapped(x)[0]

    def forward_tapped(self, x):
        """(block output, ln2 of the post-attention residual): the second is what a shortcut MoE block taps
        (moecompile/models/shortcut.py)."""
        h = x + self.attn(self.ln1(x))
        tap = self.ln2(h)
        return h + self.ffn(tap), tap


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, idx, targets=None):
        """idx [B, S] int64 → (logits [B, S, V], mean cross-entropy over all positions or None)."""
        S = idx.shape[1]
        pos = torch.arange(S, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))                # [B, S, D]
        for block in self.blocks:
            x = block(x)
        return self._head(x, targets)

    def _head(self, x, targets):
        logits = self.lm_head(self.ln_f(x))                                 # [B, S, V]
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def gpt_dense(**overrides) -> GPT:
    """Dense GPT: an MLP in every block."""
    return GPT(GPTConfig(**{"moe_every": 0, **overrides}))


def gpt_moe(**overrides) -> GPT:
    """GPT-MoE: 8 experts, top-2 renormalised, MoE in every other block."""
    return GPT(GPTConfig(**{"moe_every": 2, "num_experts": 8, "top_k": 2, **overrides}))


def gpt_moe_top1(**overrides) -> GPT:
    """Switch-style GPT-MoE: 8 experts, top-1 weighted by its softmax probability, every other block."""
    return GPT(GPTConfig(**{"moe_every": 2, "num_experts": 8, "top_k": 1, **overrides}))
