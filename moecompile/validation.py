"""Translation validation: a rewritten block must match the original on random inputs, outputs and
gradients (of the input and of every parameter), before it is accepted.

fp32 results are compared tensor by tensor, relative to the original's magnitude. A tensor that differs
gets a second hearing against the truth, the original block evaluated in float64: it passes if the
rewrite is within a few times the original's own distance from the truth, or of one fp32 rounding step of
the largest value in the block. This accepts a gradient that is zero in exact arithmetic (the router of a
renormalized top-1 MoE, whose weight is always 1) and holds only rounding noise, while a small gradient
that is real is still held to the fp32 tolerance.

Two things the original does are kept in the float64 evaluation, so that a rewrite cannot hide behind them:
explicit casts to a precision below the block's input (bf16 experts in an fp32 model) stay real casts, so
that region computes in its own precision as in the original and a rewrite that drops the casts is as far
from the truth as it is from the original; and every buffer the block mutates is compared after the call
(a rewrite that drops a load counter's update fails). A block that draws random numbers (noisy routing,
dropout) gets no second hearing: its float64 evaluation draws another sample. Each compared tensor has a label ("output 0",
"gradient of experts.w1", "buffer load") so a rejection says what differs.

A kept cast that rounds a computed value (the gradient of a bf16 router's logits on its way back, a bf16 combine
of fp32 expert outputs) leaves the truth undecided wherever the working precision's noise in that value decides a
rounding of the low-precision region: products of bf16 numbers are short, so a bf16 matmul's exact result often
lies exactly between two bf16 values, and the sign of the fp32 noise in a gradient that is zero in exact
arithmetic picks the neighbour (one bf16 step of that element, depending on the thread count's summation order).
So the float64 evaluation is also run with those values nudged up and down by that noise (_Float64Fallbacks), and
each element of a tensor may additionally be as far from the truth as the nudges move it. The allowance is per
element: a rewrite that drops the cast rounds nowhere, so it is off at nearly every element, not only at the few
whose rounding the noise decides, and it still fails.
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


def _run(fn, block: nn.Module, x, rest, kwargs, seed, grads=True, draws: list | None = None
         ) -> list[tuple[str, torch.Tensor]]:
    """Labelled outputs, gradients (input, then every trainable parameter) for a fixed cotangent unless
    `grads` is False, and the buffers after the call, of fn(x, ...); the block's buffers are then put back
    as they were. `draws`, when a list, gets whether the call drew random numbers."""
    params = [(name, p) for name, p in block.named_parameters() if p.requires_grad]
    saved = _save_buffers(block)
    xi = x.detach().clone().requires_grad_(x.is_floating_point())
    try:
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            before = _rng_state(x.device)
            outs = [o for o in tree_flatten(fn(xi, *rest, **kwargs))[0] if isinstance(o, torch.Tensor)]
            if draws is not None:
                draws.append(not torch.equal(before, _rng_state(x.device)))
            diff = [o for o in outs if o.requires_grad]
            gen = torch.Generator().manual_seed(seed)
            cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in diff]
            wrt = [xi] + [p for _, p in params]
            grad = torch.autograd.grad(diff, wrt, cot, allow_unused=True) if diff and grads else [None] * len(wrt)
        buffers = [(f"buffer {name}", b.detach().clone()) for name, b in block.named_buffers()]
    finally:
        _restore_buffers(block, saved)
    names = ["input gradient"] + [f"gradient of {name}" for name, _ in params]
    return ([(f"output {i}", o.detach()) for i, o in enumerate(outs)] + buffers +
            [(n, torch.zeros_like(t) if g is None else g) for n, t, g in zip(names, wrt, grad) if grads])


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _save_buffers(block: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (b, b.detach().clone()) for name, b in block.named_buffers()}


def _restore_buffers(block: nn.Module, saved: dict) -> None:
    """The same buffer objects with their old values, also where the call assigned a new tensor."""
    with torch.no_grad():
        for name, (b, value) in saved.items():
            owner, _, attr = name.rpartition(".")
            block.get_submodule(owner)._buffers[attr] = b
            b.copy_(value)


def compare(block: nn.Module, original, rewritten, x: torch.Tensor, rest: tuple, kwargs: dict,
            seed: int, grads: bool = True) -> tuple[float, str, int]:
    """(worst relative error of rewritten(x, ...) against original(x, ...) over outputs, gradients and
    buffers after the call; the label of that tensor; the number of tensors accepted because they are as
    close to a float64 evaluation as the original is)."""
    random: list[bool] = []
    got = _run(rewritten, block, x, rest, kwargs, seed, grads)
    want = _run(original, block, x, rest, kwargs, seed, grads, draws=random)
    if [n for n, _ in got] != [n for n, _ in want] or any(a.shape != b.shape for (_, a), (_, b) in zip(got, want)):
        return float("inf"), "the structure of the outputs", 0
    errors = [max_relative_error(a, b, b) for (_, a), (_, b) in zip(got, want)]
    # a block that draws random numbers has no float64 truth: its float64 draws are another sample
    if max(errors, default=0.0) > 1e-6 and not random[0]:
        noisy: list[bool] = []
        truth = [t for _, t in _run_in_float64(block, x, rest, kwargs, seed, grads, noisy=noisy)]
        # one fp32 rounding step of the largest value in play: nothing computed in fp32 is resolved below it
        ulp = torch.finfo(torch.float32).eps * max((t.abs().max().item() for t in truth if t.numel()), default=0.0)
        undecided = _undecided(block, x, rest, kwargs, seed, grads, truth) if noisy[0] else [0.0] * len(truth)
        rejudged = 0
        for i, ((_, a), (_, b), t) in enumerate(zip(got, want, truth)):
            allowed = ROUNDING_SLACK * max(_distance(b, t), ulp) + undecided[i]
            if errors[i] > 1e-6 and bool(((a.double() - t.double()).abs() <= allowed).all()):
                errors[i], rejudged = 0.0, rejudged + 1
    else:
        rejudged = 0
    worst = max(range(len(errors)), key=errors.__getitem__, default=None)
    return (0.0, "", rejudged) if worst is None else (errors[worst], got[worst][0], rejudged)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _undecided(block, x, rest, kwargs, seed, grads, truth: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per tensor, elementwise: how far the float64 evaluation moves when the computed values its kept casts
    round down are nudged up, and down, by the working precision's noise (module docstring): what the truth
    leaves to that noise."""
    nudged = [[t for _, t in _run_in_float64(block, x, rest, kwargs, seed, grads, nudge=sign)] for sign in (1.0, -1.0)]
    return [torch.maximum((up.double() - t.double()).abs(), (down.double() - t.double()).abs())
            for t, up, down in zip(truth, *nudged)]


_PRECISION = {torch.float64: 3, torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}


def _run_in_float64(block, x, rest, kwargs, seed, grads=True, nudge: float = 0.0, noisy: list | None = None):
    """The block on a float64 copy, its working precision (that of its input x) and above raised to
    float64; state kept in a lower precision than x stays as it is, as do casts down to it (below), whose
    computed values are moved by `nudge` times the working precision's noise. `noisy`, when a list, gets
    whether such a cast rounded a computed value."""
    working = x.dtype
    raise_ = lambda t: t.double() if isinstance(t, torch.Tensor) and _raised(t.dtype, working) else t  # noqa: E731
    ref = copy.deepcopy(block)._apply(raise_)
    mode = _Float64Fallbacks(working, nudge)
    with mode:
        out = _run(type(block).forward.__get__(ref), ref, raise_(x), tree_map(raise_, rest), tree_map(raise_, kwargs),
                   seed, grads)
    if noisy is not None:
        noisy.append(mode.rounded_computed)
    return out


def _raised(dtype: torch.dtype, working: torch.dtype) -> bool:
    """Whether a float64 evaluation computes `dtype` in float64: the working precision and anything above
    it; a lower precision (bf16 experts in an fp32 model), or another 16-bit format, is the original's own."""
    p = _PRECISION.get(dtype)
    return p is not None and (p > _PRECISION.get(working, 2) or dtype == working)


class _Float64Fallbacks(TorchDispatchMode):
    """Keeps a float64 evaluation in float64 where the original computes in its working precision:
    explicit casts to that precision or above (a router's `.float()` in a bf16 model, or back up from a
    bf16 stage of an fp32 model) give float64, while casts below it (to bf16 in an fp32 model) stay real
    casts; ops without a float64 CPU kernel (aten._grouped_mm) run as one matmul per group.
    A real cast of a computed value, one the working precision does not hold exactly (a gradient, not an input
    or a parameter, which the original rounds from the same value), sets `rounded_computed`; with `nudge`
    (±1) that value is first moved by ROUNDING_SLACK rounding steps of the working precision at its largest
    element, the noise the original's value carries there (compare's `ulp`, per cast)."""

    def __init__(self, working: torch.dtype, nudge: float = 0.0):
        super().__init__()
        self.working, self.nudge, self.rounded_computed = working, nudge, False
        self.resolution = working if working.is_floating_point else torch.float32

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default and args[0].dtype == torch.float64:
            return _grouped_mm(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and args[0].is_floating_point() and \
                kwargs.get("dtype") in _PRECISION:
            if _raised(kwargs["dtype"], self.working):
                kwargs = {**kwargs, "dtype": torch.float64}
            elif args[0].dtype == torch.float64:  # a cast down, kept
                args = (self._nudged(args[0]), *args[1:])
        return func(*args, **kwargs)

    def _nudged(self, value: torch.Tensor) -> torch.Tensor:
        computed = value.to(self.resolution).double() != value
        if not computed.any():
            return value
        self.rounded_computed = True
        step = ROUNDING_SLACK * torch.finfo(self.resolution).eps * value.abs().max()
        return value + self.nudge * step * computed if self.nudge else value


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
