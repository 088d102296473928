"""Replay an MoE layer, or a Block-MLP + Block-MoE pair, on a described cluster: node times from FLOPs and
bytes, the DAG and its schedule from the compiler's own scheduler (`passes.schedule_overlap`).

Node times (forward; backward: GEMMs twice, memory-bound ops and all-to-alls once more each):
    GEMM nodes      FLOPs / (peak[dtype] · efficiency)           attention, mlp, shared, gate, experts
    memory nodes    bytes / (memory bandwidth · efficiency)      encode (rows into the send buffer), decode
    link nodes      all_to_all_seconds(algorithm, bytes / n)     send (dispatch), return (combine)
DAGs ("compute" and "link" lanes, one each, as in the overlap pass; computation never overlaps computation):
    layer   gate → encode → chunk_dag(n) → decode
    pair    attention₀ → mlp₀ → attention₁ → [layer]                             "top2", "top1"
            attention₀ → mlp₀ → attention₁ → {[layer] ∥ shared} → decode      "shared" (shared expert)
            attention₀ → {[layer] ∥ mlp₀ → attention₁ → shared} → decode       "scmoe" (Pos-2 shortcut)
    backward: the same DAG reversed, with backward node times.
Each is scheduled by `list_schedule`; the makespan is the replayed time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from moecompile._lazy import nx
from moecompile.passes.schedule_overlap import CANDIDATES, chunk_dag, list_schedule
from moecompile.runtime.cost_model import all_to_all_seconds
from moecompile.sim.cluster import Cluster
from moecompile.sim.model import MoEConfig

ARCHS = {"top2": (2, False), "top1": (1, False), "shared": (1, True), "scmoe": (1, True)}  # → (k, shared?)
BACKWARD_GEMM = 2.0     # a GEMM's backward computes two GEMMs of its size (input and weight gradients)


@dataclass(frozen=True)
class Replay:
    """Replayed seconds of forward and backward, and how much of the communication the schedule hides."""
    forward_s: float
    backward_s: float
    compute_s: float         # compute-lane busy time, forward + backward
    comm_s: float            # link busy time, forward + backward
    chunks: int
    algorithm: str

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def exposed_comm_s(self) -> float:
        """Time the compute lane waits: the makespan beyond its busy time."""
        return max(0.0, self.total_s - self.compute_s)

    @property
    def overlap(self) -> float:
        """Hidden / total communication (1 when there is none), clamped to [0, 1] against rounding."""
        return min(1.0, max(0.0, 1.0 - self.exposed_comm_s / self.comm_s)) if self.comm_s else 1.0


def op_seconds(cfg: MoEConfig, cluster: Cluster, top_k: int | None = None) -> dict[str, float]:
    """Forward seconds of each compute node of one block pair on one device of `cluster`."""
    dev, dt = cluster.device, cfg.dtype
    return {"attention": dev.gemm_s(cfg.attention_flops(), dt), "mlp": dev.gemm_s(cfg.mlp_flops(), dt),
            "shared": dev.gemm_s(cfg.mlp_flops(), dt), "gate": dev.gemm_s(cfg.gate_flops(), dt),
            "experts": dev.gemm_s(cfg.expert_flops(top_k), dt),
            "encode": dev.memory_s(cfg.encode_bytes(top_k)), "decode": dev.memory_s(cfg.encode_bytes(top_k))}


def a2a_seconds(cfg: MoEConfig, cluster: Cluster, chunks: int = 1, algorithm: str = "linear",
                top_k: int | None = None) -> float:
    """One all-to-all of one chunk (the layer's rows / chunks) over the whole cluster."""
    return all_to_all_seconds(algorithm, cfg.a2a_bytes(top_k) / chunks, cluster.nodes, cluster.per_node,
                              cluster.intra, cluster.inter, cluster.device.copy_Bps)


def layer_dag(n: int, send_s: float, ops: dict[str, float]) -> nx.DiGraph:
    """gate → encode → the overlap pass's chunk_dag(n) (send → experts → return per chunk) → decode."""
    dag = chunk_dag(n, send_s, ops["experts"] / n)
    for name in ("gate", "encode", "decode"):
        dag.add_node((name, 0), lane="compute", duration=ops[name])
    dag.add_edge(("gate", 0), ("encode", 0))
    for c in range(n):
        dag.add_edge(("encode", 0), ("send", c))
        dag.add_edge(("return", c), ("decode", 0))
    return dag


def pair_dag(arch: str, n: int, send_s: float, ops: dict[str, float]) -> nx.DiGraph:
    """A Block-MLP + Block-MoE pair of `arch` (module docstring, one of ARCHS), its MoE layer in n chunks."""
    dag = layer_dag(n, send_s, ops)
    backbone = [("attention", 0), ("mlp", 0), ("attention", 1)] + ([("shared", 0)] if ARCHS[arch][1] else [])
    for node in backbone:
        dag.add_node(node, lane="compute", duration=ops[node[0]])
    nx.add_path(dag, backbone)
    if arch == "scmoe":      # routed on the preceding block's post-attention representation
        dag.add_edge(("attention", 0), ("gate", 0))
    else:                    # routed on the current block's
        dag.add_edge(("attention", 1), ("gate", 0))
    if ARCHS[arch][1]:
        dag.add_edge(backbone[-1], ("decode", 0))
    return dag


def backward_dag(forward: nx.DiGraph) -> nx.DiGraph:
    """The forward DAG reversed (gradients flow back), GEMM nodes BACKWARD_GEMM times as long."""
    dag = forward.reverse(copy=True)
    for node, attrs in dag.nodes(data=True):
        if node[0] not in ("send", "return", "encode", "decode"):
            attrs["duration"] *= BACKWARD_GEMM
    return dag


def replay(dag: nx.DiGraph, chunks: int, algorithm: str) -> Replay:
    """Schedule the forward `dag` and its backward with the overlap pass's list scheduler."""
    fwd, bwd = list_schedule(dag), list_schedule(backward_dag(dag))
    busy = {lane: sum(s.end_s - s.start_s for s in fwd + bwd if s.lane == lane) for lane in ("compute", "link")}
    return Replay(max(s.end_s for s in fwd), max(s.end_s for s in bwd), busy["compute"], busy["link"],
                  chunks, algorithm)


def replay_layer(cfg: MoEConfig, cluster: Cluster, chunks: int = 1, algorithm: str = "linear") -> Replay:
    """One MoE layer (Tutel's single-layer setting) forward + backward on `cluster`."""
    ops = op_seconds(cfg, cluster)
    return replay(layer_dag(chunks, a2a_seconds(cfg, cluster, chunks, algorithm), ops), chunks, algorithm)


def replay_pair(cfg: MoEConfig, cluster: Cluster, arch: str, chunks: int | None = 1,
                algorithm: str = "linear") -> Replay:
    """A block pair of `arch`; chunks=None picks the fastest pipelining degree of the overlap pass's
    CANDIDATES (forward + backward), as the pass's "auto" does."""
    if chunks is None:
        return min((replay_pair(cfg, cluster, arch, n, algorithm) for n in CANDIDATES), key=lambda r: r.total_s)
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)}")
    k = ARCHS[arch][0]
    ops = op_seconds(cfg, cluster, top_k=k)
    send = a2a_seconds(cfg, cluster, chunks, algorithm, top_k=k)
    return replay(pair_dag(arch, chunks, send, ops), chunks, algorithm)


def a2a_share(cfg: MoEConfig, cluster: Cluster, algorithm: str = "linear") -> float:
    """All-to-all time / MoE layer time, one layer without overlap, forward + backward (the papers' metric)."""
    r = replay_layer(cfg, cluster, 1, algorithm)
    return r.comm_s / r.total_s


def with_link_scale(cluster: Cluster, factor: float) -> Cluster:
    """`cluster` with every link's bandwidth multiplied by `factor` (latencies kept)."""
    return replace(cluster, intra=replace(cluster.intra, bandwidth_Bps=cluster.intra.bandwidth_Bps * factor),
                   inter=replace(cluster.inter, bandwidth_Bps=cluster.inter.bandwidth_Bps * factor))


def match_a2a_share(cfg: MoEConfig, cluster: Cluster, share: float) -> tuple[Cluster, float]:
    """(cluster, factor): `cluster` with its link bandwidths scaled so that `a2a_share` is `share` (a paper's
    stated communication regime), found by bisection on log(factor); the share falls as bandwidth grows."""
    if not 0 < share < 1:
        raise ValueError(f"a share of the layer time is in (0, 1), got {share}")
    lo, hi = 1e-4, 1e4
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if a2a_share(cfg, with_link_scale(cluster, mid)) > share else (lo, mid)
    factor = (lo * hi) ** 0.5
    return with_link_scale(cluster, factor), factor
