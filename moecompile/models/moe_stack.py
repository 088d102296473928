"""A stack of top-k MoE layers with residuals whose routed load is set by the data mix: the workload of the
adaptive-parallelism benchmark and demo.

A fixed unit direction `hot` is added, scaled, to the router rows of experts 0 and 1 of every layer; a batch
in which a fraction of the tokens carries that direction sends those tokens to experts 0 and 1, the rest
spread over all experts. Under expert parallelism that fraction decides how unequal the ranks' work is.
"""
import torch
from torch import nn

from moecompile.models.gpt import GPTConfig, MoE

ROUTER_PULL, TOKEN_PULL = 3.0, 2.0  # hot tokens' extra logit for experts 0 and 1: their product (6)


class MoEStack(nn.Module):
    def __init__(self, layers: int = 2, seed: int = 0, **cfg):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(MoE(GPTConfig(**cfg)) for _ in range(layers))
        self.register_buffer("hot", nn.functional.normalize(torch.randn(self.blocks[0].router.in_features), dim=0))
        with torch.no_grad():
            for block in self.blocks:
                block.router.weight[:2] += ROUTER_PULL * self.hot

    def forward(self, x):                                                   # [B, T, D]
        for block in self.blocks:
            x = x + block(x)
        return x

    def batch(self, tokens: int, hot_fraction: float, seed: int) -> torch.Tensor:
        """[1, tokens, D] random inputs, the first `hot_fraction` of them pulled toward experts 0 and 1."""
        x = torch.randn(1, tokens, self.hot.numel(), generator=torch.Generator().manual_seed(seed))
        x[0, :int(hot_fraction * tokens)] += TOKEN_PULL * self.hot
        return x
