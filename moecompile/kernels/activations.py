"""Expert activations, shared by every kernel path: h = act(g) or, for gated ones, act(g, u)."""
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


def per_expert(ws, stacked_dim: int):
    """A weight list as the ops receive it — E per-expert tensors, or one stacked [E, ...] tensor of
    `stacked_dim` dims — as something indexable by expert (None stays None)."""
    if ws is None:
        return None
    return ws[0] if len(ws) == 1 and ws[0].dim() == stacked_dim else ws


def split_gate_up(g1: torch.Tensor, u: torch.Tensor | None, fused: str):
    """(gate, up) from the first layer's output: one fused projection read as halves ([gate; up]) or
    interleaved (gate even, up odd features), or a separate up projection `u`."""
    if fused == "halves":
        F_ = g1.shape[-1] // 2
        return g1[..., :F_], g1[..., F_:]
    if fused == "interleaved":
        return g1[..., 0::2], g1[..., 1::2]
    return g1, u
