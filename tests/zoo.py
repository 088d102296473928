"""Hand-written MoE blocks for detection tests, deliberately named so no name gives them away.

Each block maps x [B, S, D] → [B, S, D] and takes (d, f, e, k) = (model width, hidden width, experts,
experts per token). A detector must find them from the graph alone: no attribute or class name here
contains "expert", "gate", "router" or "moe". Shapes: T = B·S tokens, E = e, K = k.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """c(silu(a(x)) * b(x)), no biases."""

    def __init__(self, d, f):
        super().__init__()
        self.a = nn.Linear(d, f, bias=False)
        self.b = nn.Linear(d, f, bias=False)
        self.c = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.c(F.silu(self.a(x)) * self.b(x))


class ReluMLP(nn.Module):
    """q(relu(p(x))), with biases."""

    def __init__(self, d, f):
        super().__init__()
        self.p = nn.Linear(d, f)
        self.q = nn.Linear(f, d)

    def forward(self, x):
        return self.q(F.relu(self.p(x)))


def _loop_dispatch(x, workers, weights, idx):
    """Sum of workers[idx[t, j]](x[t]) · weights[t, j] over slots j; x [T, D], weights/idx [T, K]."""
    out = torch.zeros_like(x)
    for i, worker in enumerate(workers):
        token, slot = torch.where(idx == i)                                   # [n], [n]
        out.index_add_(0, token, worker(x[token]) * weights[token, slot, None])
    return out


class LoopBank(nn.Module):
    """Softmax top-k renormalised over SwiGLU workers, dispatched by a Python loop."""

    def __init__(self, d=32, f=64, e=4, k=2):
        super().__init__()
        self.k = k
        self.scorer = nn.Linear(d, e, bias=False)
        self.workers = nn.ModuleList(SwiGLU(d, f) for _ in range(e))

    def forward(self, x):
        B, S, D = x.shape
        x = x.reshape(-1, D)                                                  # [T, D]
        w, idx = self.scorer(x).softmax(-1).topk(self.k, dim=-1)             # [T, K]
        w = w / w.sum(-1, keepdim=True)
        return _loop_dispatch(x, self.workers, w, idx).view(B, S, D)


class EinsumBank(nn.Module):
    """Sigmoid top-k renormalised over stacked GELU weights, computed by gathering each slot's weights."""

    def __init__(self, d=32, f=64, e=4, k=2):
        super().__init__()
        self.k = k
        self.w_pick = nn.Parameter(torch.randn(e, d) * d**-0.5)               # [E, D]
        self.up = nn.Parameter(torch.randn(e, d, f) * d**-0.5)                # [E, D, F]  (in, out)
        self.down = nn.Parameter(torch.randn(e, f, d) * f**-0.5)              # [E, F, D]

    def forward(self, x):
        B, S, D = x.shape
        x = x.reshape(-1, D)                                                  # [T, D]
        w, idx = (x @ self.w_pick.t()).sigmoid().topk(self.k, dim=-1)         # [T, K]
        w = w / w.sum(-1, keepdim=True)
        h = F.gelu(torch.einsum("td,tkdf->tkf", x, self.up[idx]))             # [T, K, F]
        y = torch.einsum("tkf,tkfd->tkd", h, self.down[idx])                  # [T, K, D]
        return (y * w.unsqueeze(-1)).sum(1).view(B, S, D)


class BiasedBank(nn.Module):
    """Top-1 over biased ReLU workers weighted by the softmax probability, plus an always-on SwiGLU path
    scaled by sigmoid(mix(x)): a shared expert with its own gate."""

    def __init__(self, d=32, f=64, e=4, k=1):
        super().__init__()
        self.k = k
        self.scorer = nn.Linear(d, e, bias=False)
        self.workers = nn.ModuleList(ReluMLP(d, f) for _ in range(e))
        self.common = SwiGLU(d, f)
        self.mix = nn.Linear(d, 1)

    def forward(self, x):
        B, S, D = x.shape
        x = x.reshape(-1, D)                                                  # [T, D]
        # no renormalisation: the chosen probability itself is the weight, so the scorer gets gradient
        w, idx = self.scorer(x).softmax(-1).topk(self.k, dim=-1)             # [T, K]
        routed = _loop_dispatch(x, self.workers, w, idx)                      # [T, D]
        return (routed + torch.sigmoid(self.mix(x)) * self.common(x)).view(B, S, D)


class SortedBank(nn.Module):
    """Softmax top-2 renormalised over stacked SwiGLU weights (fused halves), tokens sorted by worker and run
    as one grouped GEMM. `narrow` runs the `stages` named in that dtype inside the block (inputs and weights
    cast down, results cast back): "experts" the grouped GEMMs, "router" the scorer's matmul, "combine" the
    weighting and summing of the workers' outputs. `tally` adds each call's per-worker slot counts to a
    buffer in training mode, as auxiliary-loss-free balancing does."""

    def __init__(self, d=32, f=64, e=4, k=2, narrow: torch.dtype | None = None, stages=("experts",), tally=False):
        super().__init__()
        self.k, self.e, self.narrow, self.stages, self.tally = k, e, narrow, stages, tally
        self.scorer = nn.Linear(d, e, bias=False)
        self.up = nn.Parameter(torch.randn(e, d, 2 * f) * d**-0.5)           # [E, D, 2F]
        self.down = nn.Parameter(torch.randn(e, f, d) * f**-0.5)             # [E, F, D]
        if tally:
            self.register_buffer("seen", torch.zeros(e))

    def forward(self, x):
        B, S, D = x.shape
        x = x.reshape(-1, D)                                                  # [T, D]
        dt = {stage: self.narrow if self.narrow and stage in self.stages else x.dtype
              for stage in ("router", "experts", "combine")}
        if dt["router"] == x.dtype:
            logits = self.scorer(x)                                           # [T, E]
        else:
            logits = F.linear(x.to(dt["router"]), self.scorer.weight.to(dt["router"])).float()
        w, idx = logits.softmax(-1).topk(self.k, dim=-1)                     # [T, K]
        w = w / w.sum(-1, keepdim=True)
        order = idx.reshape(-1).argsort(stable=True)                         # [T·K]
        counts = torch.bincount(idx.reshape(-1), minlength=self.e)           # [E]
        if self.tally and self.training:
            self.seen.add_(counts.float())
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x[order // self.k].to(dt["experts"]), self.up.to(dt["experts"]), offs=offs)  # [T·K, 2F]
        a, b = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(a) * b, self.down.to(dt["experts"]), offs=offs).to(x.dtype)  # [T·K, D]
        y = y.to(dt["combine"]) * w.reshape(-1)[order, None].to(dt["combine"])
        out = torch.zeros_like(x, dtype=dt["combine"]).index_add_(0, order // self.k, y)
        return out.to(x.dtype).view(B, S, D)


class TieredBank(nn.Module):
    """Group-limited ("node-limited") routing written as a mask, after DeepSeek-V3: the e workers form
    `tiers` equal tiers; a tier scores by its best worker ("max" by amax, "best" by max) or the sum of its two
    best ("pair", by sorting); only the `keep` best tiers stay eligible: the others are masked out (`fill`
    -inf or 0 by masked_fill, "where": -inf by torch.where, "mul": multiplied by a 0/1 mask) before the top-k.
    Weights are the unbiased scores of the chosen workers, renormalised when `scoring` is sigmoid (V3), times
    `boost`. `drift` is a score offset used for choosing only (V3's balancing bias). Stacked SwiGLU workers
    [E, D, F] run per slot by gathering."""

    def __init__(self, d=32, f=48, e=8, k=2, tiers=4, keep=2, tier_score="pair", fill="-inf",
                 scoring="sigmoid", boost=2.5, drift=0.0):
        super().__init__()
        self.k, self.tiers, self.keep, self.tier_score, self.fill = k, tiers, keep, tier_score, fill
        self.scoring, self.boost = scoring, boost
        self.lens = nn.Linear(d, e, bias=False)
        # a trained balancing offset can be well below zero: then masking with 0 and with -inf differ
        self.register_buffer("drift", torch.randn(e) * drift - drift if drift else None)
        self.wa = nn.Parameter(torch.randn(e, d, f) * d**-0.5)               # [E, D, F]
        self.wb = nn.Parameter(torch.randn(e, d, f) * d**-0.5)               # [E, D, F]
        self.wc = nn.Parameter(torch.randn(e, f, d) * f**-0.5)               # [E, F, D]

    def forward(self, x):
        # routing on the [B, S, ...] layout itself (no flattening): the tiers are a 4-D view
        logits = self.lens(x)                                                 # [B, S, E]
        s = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)
        biased = s if self.drift is None else s + self.drift                  # [B, S, E]
        per_tier = biased.unflatten(-1, (self.tiers, -1))                     # [B, S, G, E/G]
        if self.tier_score == "pair":   # the sum of each tier's two best, by sorting
            tier = per_tier.sort(-1, descending=True).values[..., :2].sum(-1)  # [B, S, G]
        elif self.tier_score == "max":
            tier = per_tier.amax(-1)                                          # [B, S, G]
        else:   # "best": the same by max's values
            tier = per_tier.max(-1).values                                    # [B, S, G]
        best = tier.topk(self.keep, dim=-1).indices                           # [B, S, keep]
        allowed = torch.zeros_like(tier).scatter(-1, best, 1.0)               # [B, S, G]
        allowed = allowed.repeat_interleave(biased.shape[-1] // self.tiers, dim=-1)   # [B, S, E]
        if self.fill == "mul":
            masked = biased * allowed
        elif self.fill == "where":
            masked = torch.where(allowed.bool(), biased, float("-inf"))
        else:
            masked = biased.masked_fill(allowed == 0, float(self.fill))
        idx = masked.topk(self.k, dim=-1).indices                             # [B, S, K]
        w = s.gather(-1, idx)                                                 # [B, S, K]
        if self.scoring == "sigmoid":
            w = w / w.sum(-1, keepdim=True)
        w = w * self.boost
        up = torch.einsum("bsd,bskdf->bskf", x, self.wa[idx])                  # [B, S, K, F]
        h = F.silu(up) * torch.einsum("bsd,bskdf->bskf", x, self.wb[idx])
        y = torch.einsum("bskf,bskfd->bskd", h, self.wc[idx])                 # [B, S, K, D]
        return (y * w.unsqueeze(-1)).sum(-2)


class NotMoE(nn.Module):
    """Negative case: top-k used to sparsify causal attention (each query keeps its k best keys), then a
    dense MLP. e is the head count; nothing is routed."""

    def __init__(self, d=32, f=64, e=4, k=2):
        super().__init__()
        self.k, self.heads = k, e
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)   # [B, H, S, Dh]
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                       # [B, H, S, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        kth = scores.topk(min(self.k, S), dim=-1).values[..., -1:]                   # [B, H, S, 1]
        # early queries have fewer than k keys: kth is -inf there and every visible key is kept
        scores = scores.masked_fill(scores < kth, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D)
        x = x + self.out(y)
        return x + self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    """Embedding-free wrapper: Linear → block → LayerNorm → Linear to 8 logits, to find a block in context."""

    def __init__(self, block, d=32):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.block = block
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        return self.head(self.norm(self.block(self.inp(x))))                  # [B, S, 8]
