"""What a lifted block does to its buffers besides computing: in-place additions the original block makes
in its forward, which the rewrite must keep making (frontend/buffer_updates.py reads them off the recorded
block). The one kind of update MoE code makes in practice is a per-expert count of the tokens routed to
each expert, the input of auxiliary-loss-free load balancing (DeepSeek-V3) or of load statistics, usually
only in training mode; a constant added per call (a call counter) is the other.

Invariants: applied once per block call, in the train/eval modes the original made it in, on the top-k
choices before any capacity drop, without a host synchronisation (index_add_, not bincount: bincount sizes
its output from the data on the device)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BufferUpdate:
    name: str                           # the buffer, relative to the block
    modes: frozenset[bool]              # the values of block.training in which the original updates it
    scale: float = 1.0                  # buffer += scale · per-expert counts of the top-k choices ...
    constant: torch.Tensor | None = None  # ... or, when set, buffer += constant

    def apply(self, block: nn.Module, indices: torch.Tensor) -> None:
        """indices [T, k]: the experts each token chose."""
        if block.training not in self.modes:
            return
        buffer = block.get_buffer(self.name)
        if self.constant is not None:
            buffer.add_(self.constant)
            return
        flat = indices.reshape(-1)                                                     # [T·k]
        counts = torch.zeros(buffer.shape[-1], dtype=buffer.dtype, device=buffer.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=buffer.dtype))         # [E]
        buffer.add_(counts if self.scale == 1.0 else counts * self.scale)

    def describe(self) -> str:
        when = {frozenset({True}): " in training mode", frozenset({False}): " in eval mode"}.get(self.modes, "")
        what = "a constant" if self.constant is not None else \
            "its per-expert token counts" + ("" if self.scale == 1.0 else f" × {self.scale:g}")
        return f"buffer '{self.name}' += {what} at each call{when}"
