"""A described MoE model: the sizes the simulator turns into FLOPs, bytes moved and bytes checkpointed.

Per rank and iteration (T tokens, hidden D, expert FFN width H, E experts, top-k, capacity factor f):
    rows          k·f·T with a capacity (Tutel's [E, C, D] buffer, C = k·f·T/E, padding computed and sent),
                  k·T dropless
    a2a bytes     rows · D · element size            (each of dispatch and combine, each direction)
    expert FLOPs  rows · 4·D·H forward               (two GEMMs); backward twice that
    gate FLOPs    T · 2·D·E;  encode/decode bytes (T + rows)·D·element size each
    attention     T · (8·D² + 4·window·D) forward;  dense MLP / shared expert  T · 4·D·H
Parameters (for checkpoints): experts 2·D·H each, non-expert 4·D² per block + 2·D·H per dense MLP +
D·E per gate + `embeddings` (biases and norms left out).
"""
from __future__ import annotations

from dataclasses import dataclass

ELEMENT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}  # tf32: fp32 storage, TF32 tensor-core math


@dataclass(frozen=True)
class MoEConfig:
    name: str
    tokens: int                    # per rank per iteration
    hidden: int                    # D
    ffn: int                       # H, each expert's (and the dense MLP's) inner width
    experts: int                   # E, over all ranks
    top_k: int = 2
    capacity_factor: float | None = 1.0   # None: dropless
    blocks: int = 2                # transformer blocks
    moe_every: int = 2             # an MoE layer in every moe_every-th block
    window: int = 1024             # attention context of a token
    dtype: str = "fp16"
    embeddings: int = 0            # parameters outside the blocks
    source: str = ""

    def __post_init__(self):
        if self.dtype not in ELEMENT_BYTES:
            raise ValueError(f"dtype must be one of {sorted(ELEMENT_BYTES)}, got {self.dtype!r}")

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def moe_layers(self) -> int:
        return self.blocks // self.moe_every

    def rows(self, top_k: int | None = None) -> float:
        k = self.top_k if top_k is None else top_k
        return k * self.tokens * (self.capacity_factor or 1.0)

    def a2a_bytes(self, top_k: int | None = None) -> float:
        return self.rows(top_k) * self.hidden * self.element_bytes

    def expert_flops(self, top_k: int | None = None) -> float:
        return self.rows(top_k) * 4 * self.hidden * self.ffn

    def gate_flops(self) -> float:
        return self.tokens * 2 * self.hidden * self.experts

    def encode_bytes(self, top_k: int | None = None) -> float:
        return (self.tokens + self.rows(top_k)) * self.hidden * self.element_bytes

    def attention_flops(self) -> float:
        return self.tokens * (8 * self.hidden ** 2 + 4 * self.window * self.hidden)

    def mlp_flops(self) -> float:
        return self.tokens * 4 * self.hidden * self.ffn

    def expert_params(self) -> int:
        """All experts of all MoE layers."""
        return self.moe_layers * self.experts * 2 * self.hidden * self.ffn

    def non_expert_params(self) -> int:
        dense = self.blocks - self.moe_layers
        return (self.blocks * 4 * self.hidden ** 2 + dense * 2 * self.hidden * self.ffn
                + self.moe_layers * self.hidden * self.experts + self.embeddings)


# Tutel Table 2 (§2.1): channel 4K, FFN hidden 4K, 2 experts per GPU, 64K tokens per GPU per iteration.
# Not given there, ours: top-2, f = 1.0 (as in its Fig. 14), fp32 tensors under TF32 math (PyTorch 1.8's
# default on A100, Tutel's software), forward + backward of one layer.
def tutel_table2(gpus: int) -> MoEConfig:
    return MoEConfig("Tutel Table 2 layer", tokens=64 * 1024, hidden=4096, ffn=4096, experts=2 * gpus,
                     top_k=2, capacity_factor=1.0, blocks=1, moe_every=1, dtype="tf32",
                     source="Tutel §2.1 Table 2 setting")


# ScMoE §4.1, Tables 8-9. Per-GPU batch not given in papers.md, ours: SwinV2 batch 1024 over 8 GPUs = 128
# images of 12×12 stage-3 tokens (image 192, patch 4, three 2× merges); GPT-2 8 sequences of 1K. fp16.
SWINV2_MOE_S_STAGE3 = MoEConfig("SwinV2-MoE-S, stage 3", tokens=128 * 144, hidden=384, ffn=4 * 384, experts=8,
                                top_k=2, capacity_factor=1.25, blocks=18, window=144,
                                source="ScMoE Table 9 (8×A30-PCIe, Table 1)")
GPT2_MOE_SMALL = MoEConfig("GPT2-MoE-Small", tokens=8 * 1024, hidden=768, ffn=4 * 768, experts=8, top_k=2,
                           capacity_factor=2.0, blocks=12, window=1024,
                           source="ScMoE Table 8 (8×A800-NVLink, Table 2)")
