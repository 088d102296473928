"""Described clusters: what one device computes and moves per second, and the links between devices.

A `Cluster` is nodes × per_node devices with
    device   peak FLOP/s per math dtype × a GEMM efficiency, memory bandwidth × an efficiency
    intra    LinkRates between devices of one node, per device and direction
    inter    LinkRates of a device's share of its node's network, per direction
    snapshot device → host-memory bytes/s per device (the PEC paper's "snapshot"), persist host → storage
The presets take their peak rates from the vendors' public spec sheets (cited beside each value); the
efficiencies and latencies are assumptions, stated once below and not fitted to any paper's results. The
machine this runs on is a cluster too, built from measurements (`calibrate.calibrate().cluster`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from moecompile.runtime.cost_model import LinkRates

TERA, GIGA = 1e12, 1e9
# Assumptions (not spec-sheet values): the share of peak a large GEMM sustains on these GPUs, and of peak
# memory bandwidth a copy-like kernel sustains; per-message latency of each link kind as NCCL sees it.
GPU_GEMM_EFFICIENCY = 0.5
GPU_MEM_EFFICIENCY = 0.8
NVLINK_LATENCY_S = 3e-6
PCIE_LATENCY_S = 5e-6
IB_LATENCY_S = 10e-6


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: dict[str, float]     # math dtype ("fp32", "tf32", "fp16", "bf16") → FLOP/s
    gemm_efficiency: float           # sustained / peak, for the GEMMs of an MoE layer
    mem_Bps: float                   # bytes read + written per second, peak
    mem_efficiency: float = 1.0

    def gemm_s(self, flops: float, dtype: str) -> float:
        """Seconds of `flops` of GEMM work in `dtype` math."""
        if dtype not in self.peak_flops:
            raise ValueError(f"{self.name} has no {dtype} rate; it has {sorted(self.peak_flops)}")
        return flops / (self.peak_flops[dtype] * self.gemm_efficiency)

    def memory_s(self, nbytes: float) -> float:
        """Seconds of a memory-bound op that reads and writes `nbytes` in all."""
        return nbytes / (self.mem_Bps * self.mem_efficiency)

    @property
    def copy_Bps(self) -> float:
        """Bytes a copy moves per second (each byte read once and written once)."""
        return self.mem_Bps * self.mem_efficiency / 2


@dataclass(frozen=True)
class Cluster:
    name: str
    device: Device
    nodes: int
    per_node: int
    intra: LinkRates
    inter: LinkRates
    snapshot_Bps: float = 0.0        # device → host memory, per device (0: not described)
    persist_Bps: float = 0.0         # host memory → storage, per device
    source: str = field(default="", compare=False)

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    def with_world(self, gpus: int) -> "Cluster":
        """The same cluster with `gpus` devices: whole nodes, or part of one node when gpus < per_node."""
        if gpus <= self.per_node:
            return replace(self, nodes=1, per_node=gpus)
        if gpus % self.per_node:
            raise ValueError(f"{gpus} devices is not a whole number of {self.per_node}-device nodes")
        return replace(self, nodes=gpus // self.per_node)


# NVIDIA A100 80GB SXM datasheet: FP32 19.5 TFLOPS, TF32 156, FP16/BF16 312 (dense); HBM2e 2,039 GB/s;
# NVLink 3 600 GB/s per GPU (both directions: 300 per direction).
A100_SXM = Device("A100-SXM-80GB", {"fp32": 19.5 * TERA, "tf32": 156 * TERA, "fp16": 312 * TERA,
                                    "bf16": 312 * TERA}, GPU_GEMM_EFFICIENCY, 2039 * GIGA, GPU_MEM_EFFICIENCY)
# NVIDIA A30 datasheet: FP32 10.3 TFLOPS, TF32 82, FP16/BF16 165 (dense); HBM2 933 GB/s; PCIe Gen4 64 GB/s
# (both directions: 32 per direction).
A30_PCIE_GPU = Device("A30-PCIe-24GB", {"fp32": 10.3 * TERA, "tf32": 82 * TERA, "fp16": 165 * TERA,
                                        "bf16": 165 * TERA}, GPU_GEMM_EFFICIENCY, 933 * GIGA, GPU_MEM_EFFICIENCY)
# NVIDIA A800 80GB SXM datasheet: the A100's compute and memory; NVLink 400 GB/s (200 per direction).
A800_SXM = replace(A100_SXM, name="A800-SXM-80GB")

# Tutel's testbed, Azure NDm A100 v4: 8 × A100 80GB SXM per VM on NVLink 3 / NVSwitch, 8 × 200 Gb/s HDR
# InfiniBand per VM, one per GPU (25 GB/s per GPU per direction).
NDM_A100_V4 = Cluster("Azure NDm A100 v4", A100_SXM, nodes=2, per_node=8,
                      intra=LinkRates(NVLINK_LATENCY_S, 300 * GIGA), inter=LinkRates(IB_LATENCY_S, 25 * GIGA),
                      source="Tutel (Hwang et al., MLSys 2023) §5 testbed; A100 datasheet")
# ScMoE's 8 × A30 over PCIe Gen4 x16 (one node, no network phase).
A30_PCIE = Cluster("8 x A30 PCIe", A30_PCIE_GPU, nodes=1, per_node=8,
                   intra=LinkRates(PCIE_LATENCY_S, 32 * GIGA), inter=LinkRates(IB_LATENCY_S, 25 * GIGA),
                   source="ScMoE (Cai et al., ICML 2025) §4.1; A30 datasheet")
# ScMoE's 8 × A800 on NVLink (one node).
A800_NVLINK = Cluster("8 x A800 NVLink", A800_SXM, nodes=1, per_node=8,
                      intra=LinkRates(NVLINK_LATENCY_S, 200 * GIGA), inter=LinkRates(IB_LATENCY_S, 25 * GIGA),
                      source="ScMoE (Cai et al., ICML 2025) §4.1; A800 datasheet")


def pec_sim_cluster(gpu: str) -> Cluster:
    """The PEC paper's simulated clusters (MoC-System §6, Fig. 13, ASTRA-sim): A800 at 312 TFLOPS and H100
    at 989 TFLOPS, both at 20% utilization, snapshots at 1 GB/s (A800) and 2 GB/s (H100) per GPU, 8 GPUs
    per node. The paper gives no persist rate; 0.25 GB/s per GPU (2 GB/s of storage writes per node) is
    ours, used only for the minimum checkpoint interval."""
    if gpu == "A800":
        device, snapshot = replace(A800_SXM, gemm_efficiency=0.2), 1 * GIGA
    elif gpu == "H100":  # H100 SXM datasheet: HBM3 3.35 TB/s, NVLink 4 900 GB/s (450 per direction)
        device = Device("H100-SXM-80GB", {"fp16": 989 * TERA, "bf16": 989 * TERA}, 0.2, 3350 * GIGA,
                        GPU_MEM_EFFICIENCY)
        snapshot = 2 * GIGA
    else:
        raise ValueError(f"the PEC paper simulates A800 and H100 clusters, not {gpu!r}")
    nvlink = 450 * GIGA if gpu == "H100" else 200 * GIGA
    return Cluster(f"{gpu} (PEC simulation)", device, nodes=16, per_node=8,
                   intra=LinkRates(NVLINK_LATENCY_S, nvlink), inter=LinkRates(IB_LATENCY_S, 25 * GIGA),
                   snapshot_Bps=snapshot, persist_Bps=0.25 * GIGA,
                   source="MoC-System (Cai et al., ASPLOS 2025) §6 simulation settings")


PRESETS = {"ndm-a100-v4": NDM_A100_V4, "a30-pcie": A30_PCIE, "a800-nvlink": A800_NVLINK}
