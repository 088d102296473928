"""Translation validation: a rewritten block must match the original on random inputs, outputs and
gradients (of the input and of every parameter), before it is accepted.

fp32 results are compared tensor by tensor, relative to the original's magnitude. A tensor that differs
gets a second hearing against the truth, the original block evaluated in float64: it passes if the
rewrite is within a few times the original's own distance from the truth, or of one fp32 rounding step of
the largest value in the block. This accepts a gradient that is zero in exact arithmetic (the router of a
renormalized top-1 MoE, whose weight is always 1) and holds only rounding noise, while a small gradient
that is real is still held to the fp32 tolerance.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ROUNDING_SLACK = 4.0  # the rewrite may round up to this many times worse than the original


def max_relative_error(a: torch.Tensor | None, b: torch.Tensor | None, like: torch.Tensor,
                       floor: float = 0.0) -> float:
    """max |a − b| / max(max |b|, floor), with None read as zeros (an unused parameter has no gradient).
    `floor` keeps a tensor that nearly cancels (tiny against its neighbours) from turning summation-order
    noise into a large relative error."""
    a = torch.zeros_like(like) if a is None else a
    b = torch.zeros_like(like) if b is None else b
    if a.numel() == 0:
        return 0.0
    return _distance(a, b) / max(b.abs().max().item(), floor, 1e-12)


def _run(fn, block: nn.Module, x, rest, kwargs, seed):
    """Outputs and gradients (input, then every trainable parameter) of fn(x, ...) for a fixed cotangent."""
    params = [p for p in block.parameters() if p.requires_grad]
    xi = x.detach().clone().requires_grad_(x.is_floating_point())
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)
        outs = [o for o in tree_flatten(fn(xi, *rest, **kwargs))[0] if isinstance(o, torch.Tensor)]
        diff = [o for o in outs if o.requires_grad]
        gen = torch.Generator().manual_seed(seed)
        cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in diff]
        grads = torch.autograd.grad(diff, [xi] + params, cot, allow_unused=True) if diff else []
    zeros = [torch.zeros_like(t) for t in [xi] + params]
    return outs + [z if g is None else g for g, z in zip(grads, zeros)]


def compare(block: nn.Module, original, rewritten, x: torch.Tensor, rest: tuple, kwargs: dict,
            seed: int) -> tuple[float, int]:
    """(worst relative error of rewritten(x, ...) against original(x, ...) over outputs and gradients,
    number of tensors accepted because they are as close to a float64 evaluation as the original is)."""
    got = _run(rewritten, block, x, rest, kwargs, seed)
    want = _run(original, block, x, rest, kwargs, seed)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf"), 0
    errors = [max_relative_error(a, b, b) for a, b in zip(got, want)]
    if max(errors, default=0.0) <= 1e-6:
        return max(errors, default=0.0), 0
    truth = _run_in_float64(block, x, rest, kwargs, seed)
    # one fp32 rounding step of the largest value in play: nothing computed in fp32 is resolved below it
    ulp = torch.finfo(torch.float32).eps * max((t.abs().max().item() for t in truth if t.numel()), default=0.0)
    rejudged = 0
    for i, (a, b, t) in enumerate(zip(got, want, truth)):
        if errors[i] > 1e-6 and _distance(a, t) <= ROUNDING_SLACK * max(_distance(b, t), ulp):
            errors[i], rejudged = 0.0, rejudged + 1
    return max(errors, default=0.0), rejudged


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _run_in_float64(block, x, rest, kwargs, seed):
    ref = copy.deepcopy(block).double()
    to64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    with _Float64Fallbacks():
        return _run(type(block).forward.__get__(ref), ref, to64(x), tree_map(to64, rest), tree_map(to64, kwargs),
                    seed)


class _Float64Fallbacks(TorchDispatchMode):
    """Keeps a float64 evaluation in float64: explicit casts to lower float precision (a router's
    `.float()`) stay float64, and ops without a float64 CPU kernel (aten._grouped_mm) run as one matmul
    per group."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default and args[0].dtype == torch.float64:
            return _grouped_mm(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float64 and \
                kwargs.get("dtype") in (torch.float32, torch.float16, torch.bfloat16):
            kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)


def _grouped_mm(a, b, offs=None, bias=None, out_dtype=None):
    """Groups end at `offs` along the dimension a and b share when one is 2-D and the other 3-D (rows of
    a), or along the contracted dimension when both are 2-D (output [G, M, N])."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if a.dim() == 2 and b.dim() == 3:                                  # [S, K] × [G, K, N] → [S, N]
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = a[s:e] @ b[g]
        return out
    if a.dim() == 2 and b.dim() == 2:                                  # [M, S] × [S, N] → [G, M, N]
        return torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ends)])
    raise NotImplementedError(f"float64 _grouped_mm for shapes {tuple(a.shape)} × {tuple(b.shape)}")
