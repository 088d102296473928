"""Checkpoint cost on a described cluster: full vs Partial Experts Checkpointing (PEC), and whether the
asynchronous snapshot hides behind an iteration (the PEC paper's Eq. 10 and its Fig. 13 question).

    bytes(K)      = (P_ne + K/E · P_e) · (weight + optimizer bytes per parameter)      K = E: a full checkpoint
    per rank      = bytes(K) / W              fully sharded: every byte written once, evenly over W ranks
                                              (the paper's §4 equal + adaptive sharding; runtime/pec.py)
    snapshot      = per rank / snapshot_Bps   device → host memory; may run during the next forward and
                                              backward but must end before the optimizer step
    stall         = max(0, snapshot − F&B)    (the paper's O_save, Eq. 10)
    persist       = per rank / persist_Bps    host → storage in the background: bounds the interval from below
F&B is replayed, not assumed: every block's attention and dense MLP or MoE layer forward + backward on the
cluster (`replay.replay_layer`, all-to-alls included), with tokens per GPU fixed as GPUs are added.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from moecompile.sim.cluster import Cluster
from moecompile.sim.model import MoEConfig
from moecompile.sim.replay import BACKWARD_GEMM, op_seconds, replay_layer

MIXED_PRECISION_ADAM = (2, 12)   # bytes per parameter: fp16 weights; fp32 master copy, Adam's m and v
FP32_ADAM = (4, 8)               # fp32 weights; Adam's m and v (this project's checkpoint benchmark)


def checkpoint_bytes(cfg: MoEConfig, experts_per_ckpt: int | None = None,
                     bytes_per_param: tuple[int, int] = MIXED_PRECISION_ADAM) -> float:
    """Bytes of one checkpoint over all ranks: all non-expert state and K experts per MoE layer (None: all)."""
    k = cfg.experts if experts_per_ckpt is None else experts_per_ckpt
    if not 1 <= k <= cfg.experts:
        raise ValueError(f"experts per checkpoint must be in 1..{cfg.experts}, got {k}")
    return (cfg.non_expert_params() + k / cfg.experts * cfg.expert_params()) * sum(bytes_per_param)


def iteration_seconds(cfg: MoEConfig, cluster: Cluster) -> float:
    """Forward + backward of every block on one GPU of `cluster` (its MoE layers replayed, a2a included)."""
    ops = op_seconds(cfg, cluster)
    per_block = (1 + BACKWARD_GEMM) * ops["attention"]
    dense = (1 + BACKWARD_GEMM) * ops["mlp"]
    moe = replay_layer(cfg, cluster).total_s
    return cfg.blocks * per_block + (cfg.blocks - cfg.moe_layers) * dense + cfg.moe_layers * moe


@dataclass(frozen=True)
class CheckpointCost:
    gpus: int
    experts_per_ckpt: int
    per_rank_bytes: float
    iteration_s: float
    snapshot_s: float
    persist_s: float

    @property
    def stall_s(self) -> float:
        return max(0.0, self.snapshot_s - self.iteration_s)

    @property
    def hidden(self) -> float:
        """Share of the snapshot that runs behind the forward and backward."""
        return min(1.0, self.iteration_s / self.snapshot_s) if self.snapshot_s else 1.0

    @property
    def overlaps(self) -> bool:
        return self.stall_s == 0.0

    @property
    def min_interval(self) -> int:
        """Fewest iterations between checkpoints: a persist must end before the next one starts."""
        return max(1, math.ceil((self.snapshot_s + self.persist_s) / self.iteration_s))


def checkpoint_cost(cfg: MoEConfig, cluster: Cluster, gpus: int, experts_per_ckpt: int | None = None,
                    bytes_per_param: tuple[int, int] = MIXED_PRECISION_ADAM) -> CheckpointCost:
    """One checkpoint's cost at `gpus` GPUs of `cluster`, expert parallel over min(E, gpus) ranks and data
    parallel beyond (E = cfg.experts, which does not grow with the cluster)."""
    if not cluster.snapshot_Bps or not cluster.persist_Bps:
        raise ValueError(f"{cluster.name} describes no snapshot or persist bandwidth")
    ep = min(cfg.experts, gpus)
    iteration = iteration_seconds(cfg, cluster.with_world(ep))
    per_rank = checkpoint_bytes(cfg, experts_per_ckpt, bytes_per_param) / gpus
    return CheckpointCost(gpus, experts_per_ckpt or cfg.experts, per_rank, iteration,
                          per_rank / cluster.snapshot_Bps, per_rank / cluster.persist_Bps)


# The PEC paper's simulated model (§6, Fig. 13): LLaMA-like, hidden 2048, 16 heads, 24 layers, expert FFN
# 4 × hidden. Not given in papers.md, ours: MoE in every layer, 16 experts (as its GPT-350M-16E) so that
# "1/8 of the experts per checkpoint" is K = 2, top-2, one 2K sequence per GPU, a 32K vocabulary.
PEC_SIM_MODEL = MoEConfig("LLaMA-like MoE (PEC simulation)", tokens=2048, hidden=2048, ffn=4 * 2048, experts=16,
                          top_k=2, capacity_factor=1.0, blocks=24, moe_every=1, window=2048, dtype="bf16",
                          embeddings=2 * 32000 * 2048, source="MoC-System §6 Fig. 13 setting")
PEC_SIM_K = 2

