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
