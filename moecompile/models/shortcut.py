"""Shortcut-connected GPT-MoE references, hand-written: ScMoE and DGMoE (Cai et al., ICML 2025; notes in
shared/research/papers.md). The shortcut passes are tested against these modules, weight for weight.

Blocks alternate as in GPT-MoE (moe_every = 2): a dense block l, then a shortcut MoE block l+1. With Pos-2,
the routed experts of block l+1 see block l's post-attention residual, so their all-to-alls can run while
block l's MLP, block l+1's attention and its dense MLP compute:

    dense block l:        h_l   = x + attn_l(ln1_l(x));    tap = ln2_l(h_l);    x' = h_l + mlp_l(tap)
    ScMoE block l+1:      h     = x' + attn(ln1(x'));      c = ln2(h)
                          out   = h + sigmoid(w_cg · c) · SE(c) + Σ_i G(tap)_i E_i(tap)          (top-1, CG-1)
    DGMoE block l+1:      out   = h + G(c)_i E_i(c) + G(tap)_j E_j(tap),  j = top-1 of G(tap),
                                  i = top-1 of G(c), or its second choice when it equals j

Choices where the paper is silent (it omits LayerNorms from its equations):
- the routed branch sees `tap = ln2_l(h_l)`, the preceding block's own pre-MLP normalization of the tapped
  residual: the input its MLP already sees, no extra parameters (Megatron-Core adds a separate LayerNorm);
- the CG-1 coefficient gate reads the current representation `c`, which its shared expert consumes, and
  has no bias (Eq. 14: sigmoid(W_CG · x), W_CG of shape [1, D]);
- a top-1 weight is the softmax probability of the chosen expert, not 1, so the router trains (as Tutel).
Same FLOPs per token as top-2: two expert-sized MLPs (SE + one routed, or two routed).
Shapes: B batch, S sequence, D model width, T = B·S tokens, E experts.
"""
import torch
import torch.nn as nn

from moecompile.models.gpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig, MoE, _init_weights


def double_gate_select(p_cur: torch.Tensor, p_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DGMoE's expert choice: (i [T], j [T]): j is the preceding representation's top-1; i the current one's
    top-1, or its second choice where that equals j, so a token never gets the same expert twice."""
    j = p_prev.argmax(-1)                                                     # [T]
    first, second = p_cur.topk(2, dim=-1).indices.unbind(-1)                  # [T] ×2
    return torch.where(first == j, second, first), j


def _apply_top1(x, experts, probs, choice):
    """Σ over tokens of probs[t, choice[t]] · experts[choice[t]](x[t]): x [T, D], probs [T, E], choice [T]."""
    weight = probs.gather(-1, choice.unsqueeze(-1)).to(x.dtype)               # [T, 1]
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token = torch.where(choice == e)[0]                                   # [n]
        out.index_add_(0, token, expert(x[token]) * weight[token])
    return out


class ScMoEBlock(nn.Module):
    """Block l+1 of a ScMoE pair: attention, then a gated shared expert on the current representation plus a
    top-1 MoE on the shortcut from block l (see the module docstring)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.shared = MLP(cfg.d_model, cfg.d_ff)
        self.coef = nn.Linear(cfg.d_model, 1, bias=False)                     # CG-1
        self.moe = MoE(GPTConfig(**{**vars(cfg), "top_k": 1}))

    def forward(self, x, tap):
        h = x + self.attn(self.ln1(x))                                        # [B, S, D]
        c = self.ln2(h)
        return h + torch.sigmoid(self.coef(c)) * self.shared(c) + self.moe(tap)


class DGMoEBlock(nn.Module):
    """Block l+1 of a DGMoE pair: one gate and one set of experts, applied top-1 to the current and to the
    preceding representation, never choosing the same expert for both."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_experts))

    def forward(self, x, tap):
        B, S, D = x.shape
        h = x + self.attn(self.ln1(x))
        cur, prev = self.ln2(h).reshape(-1, D), tap.reshape(-1, D)            # [T, D] ×2
        p_cur, p_prev = self.router(cur).float().softmax(-1), self.router(prev).float().softmax(-1)  # [T, E]
        i, j = double_gate_select(p_cur, p_prev)
        routed = _apply_top1(cur, self.experts, p_cur, i) + _apply_top1(prev, self.experts, p_prev, j)
        return h + routed.view(B, S, D)


class ShortcutGPT(GPT):
    """GPT whose MoE blocks are ScMoE or DGMoE blocks fed by a shortcut from the block before."""

    def __init__(self, cfg: GPTConfig, shortcut: str):
        if shortcut not in ("scmoe", "dgmoe"):
            raise ValueError(f"shortcut={shortcut!r}: expected 'scmoe' or 'dgmoe'")
        if cfg.moe_every < 2:
            raise ValueError("a shortcut MoE block needs a dense block before it: moe_every >= 2")
        super().__init__(cfg)
        kind = ScMoEBlock if shortcut == "scmoe" else DGMoEBlock
        self.blocks = nn.ModuleList(kind(cfg) if cfg.is_moe(i) else Block(cfg, i) for i in range(cfg.n_layer))
        self.apply(_init_weights)

    def forward(self, idx, targets=None):
        S = idx.shape[1]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(S, device=idx.device)))
        tap = None
        for block in self.blocks:
            x, tap = (block(x, tap), None) if isinstance(block, (ScMoEBlock, DGMoEBlock)) else block.forward_tapped(x)
        return self._head(x, targets)


def gpt_scmoe(**overrides) -> ShortcutGPT:
    """ScMoE GPT: every other block is a ScMoE block (Pos-2 shortcut, CG-1), 8 experts."""
    return ShortcutGPT(GPTConfig(**{"moe_every": 2, "num_experts": 8, "top_k": 1, **overrides}), "scmoe")


def gpt_dgmoe(**overrides) -> ShortcutGPT:
    """DGMoE GPT: every other block is a DGMoE block (one gate used top-1 twice), 8 experts."""
    return ShortcutGPT(GPTConfig(**{"moe_every": 2, "num_experts": 8, "top_k": 1, **overrides}), "dgmoe")
