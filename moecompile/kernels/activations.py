"""Shared by every kernel path: expert activations (h = act(g) or, for gated ones, act(g, u)) and the
helpers that read the ops' weight arguments (E per-expert tensors or one stacked [E, ...] tensor)."""
import torch
import torch.nn.functional as F


def expert_activation(g: torch.Tensor, u: torch.Tensor | None, kind: str, alpha: float, limit: float) -> torch.Tensor:
    if kind == "swiglu":
        return F.silu(g) * u
    if kind == "geglu":
        return F.gelu(g) * u
    if kind == "clamped_swiglu":  # gpt-oss: clamp, g·σ(αg), (u + 1)
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    if kind == "gelu":
        return F.gelu(g)
    if kind == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if kind == "relu":
        return F.relu(g)
    if kind == "silu":
        return F.silu(g)
    raise ValueError(f"unknown expert activation {kind!r}")


def is_stacked(ws, stacked_dim: int) -> bool:
    """Whether a weight list as the ops receive it is one stacked [E, ...] tensor of `stacked_dim` dims
    rather than E per-expert tensors."""
    return len(ws) == 1 and ws[0].dim() == stacked_dim


def per_expert(ws, stacked_dim: int):
    """A weight list as the ops receive it as something indexable by expert (None stays None)."""
    if ws is None:
        return None
    return ws[0] if is_stacked(ws, stacked_dim) else ws


def grad_buffer(ws, stacked_dim: int):
    """The one [E, ...] gradient every backend returns for a weight list (None or empty: None): with the
    weight's own strides when it was passed stacked (autograd then accumulates it without a copy),
    contiguous when it came as E per-expert tensors."""
    if not ws:
        return None
    return torch.empty_like(ws[0]) if is_stacked(ws, stacked_dim) else ws[0].new_empty(len(ws), *ws[0].shape)


def gate_activation(activation: str) -> str:
    """The elementwise function applied to the gate: a gated activation's base (swiglu → silu)."""
    return {"swiglu": "silu", "geglu": "gelu"}.get(activation, activation)


def split_gate_up(first: torch.Tensor, up: torch.Tensor | None, fused: str, dim: int = -1):
    """(gate, up) of the first layer, along `dim` (features of an output, or rows of a [E, F1, D] weight):
    one fused projection read as halves ([gate; up]) or interleaved (gate even, up odd), else `first`
    and the separate up projection `up`. Views, never copies."""
    if fused == "halves":
        F_ = first.shape[dim] // 2
        return first.narrow(dim, 0, F_), first.narrow(dim, F_, F_)
    if fused == "interleaved":
        lead = (slice(None),) * (dim % first.dim())
        return first[lead + (slice(0, None, 2),)], first[lead + (slice(1, None, 2),)]
    return first, up
