"""Translation validation: a rewritten block must match the original on random inputs, outputs and
gradients (of the input and of every parameter), before it is accepted."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


def max_relative_error(a: torch.Tensor | None, b: torch.Tensor | None, like: torch.Tensor) -> float:
    """max |a − b| / max |b|, with None read as zeros (an unused parameter has no gradient)."""
    a = torch.zeros_like(like) if a is None else a
    b = torch.zeros_like(like) if b is None else b
    scale = b.abs().max().clamp_min(1e-6)
    return ((a.float() - b.float()).abs().max() / scale).item()


def compare(block: nn.Module, original, rewritten, x: torch.Tensor, rest: tuple, kwargs: dict, seed: int) -> float:
    """Worst relative error between original(x, ...) and rewritten(x, ...), outputs and gradients."""
    params = [p for p in block.parameters() if p.requires_grad]
    results = []
    for fn in (original, rewritten):
        xi = x.detach().clone().requires_grad_(x.is_floating_point())
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            outs = [o for o in tree_flatten(fn(xi, *rest, **kwargs))[0] if isinstance(o, torch.Tensor)]
            diff = [o for o in outs if o.requires_grad]
            gen = torch.Generator().manual_seed(seed)
            cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in diff]
            grads = torch.autograd.grad(diff, [xi] + params, cot, allow_unused=True) if diff else []
        results.append((outs, grads))
    (o1, g1), (o2, g2) = results
    if len(o1) != len(o2) or any(a.shape != b.shape for a, b in zip(o1, o2)):
        return float("inf")
    errs = [max_relative_error(a, b, b) for a, b in zip(o2, o1)]
    errs += [max_relative_error(a, b, like) for a, b, like in zip(g2, g1, [x] + params)]
    return max(errs, default=0.0)
