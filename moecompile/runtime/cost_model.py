"""The cost model's measurements: how long a piece of work takes on this machine and across its link.

    node time     = measured once per machine, thread count and shape (`measured_s`), cached in
                    ~/.cache/moecompile (MOECOMPILE_CACHE overrides)
    transfer(b)   = link_latency + b / link_bandwidth      (one all-to-all sending b bytes, per rank)
    all_to_all_seconds(algorithm, ...)                      (a described cluster: flat "linear" or Tutel's
                                                             "2dh", nodes × ranks per node; moecompile.sim)

Node times are measured rather than derived from FLOPs and peak rates because, at the shapes of an MoE layer
on this CPU, a GEMM runs at 40-80% of the peak rate depending on its shape, and exact GELU or the row gathers
add a third again (measured here: expert FFN forward 20 ms for 13.7 ms of GEMMs). The link is measured at
start-up by timing all-to-alls of two sizes over the group; the slowest rank counts, since an all-to-all
finishes when its slowest peer does.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LinkRates:
    latency_s: float
    bandwidth_Bps: float     # bytes one rank sends to its peers per second, all peers together

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


_KNOWN: dict[tuple[str, str], float] = {}  # what this process already read or measured: no file read per key


def _cached(key: str, measure, refresh: bool = False):
    """cache[machine and threads][key], measured by `measure()` when absent. The file is replaced atomically,
    so ranks measuring at once never read half a file (the last writer wins, with equivalent values)."""
    machine = f"{platform.node()}-torch{torch.__version__}-threads{torch.get_num_threads()}"
    if (machine, key) in _KNOWN and not refresh:
        return _KNOWN[machine, key]
    path = Path(os.environ.get("MOECOMPILE_CACHE", Path.home() / ".cache" / "moecompile")) / "machine_rates.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    entry = cache.setdefault(machine, {})
    if key not in entry or refresh:
        entry[key] = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    _KNOWN[machine, key] = entry[key]
    return entry[key]


def measured_s(key: str, run, refresh: bool = False) -> float:
    """Best-of-5 seconds of `run()` (after one warm-up), cached under `key` for this machine."""
    return _cached(key, lambda: _best_of(run), refresh)


def _best_of(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_link(group, small: int = 1 << 10, large: int = 4 << 20) -> LinkRates:
    """Time all-to-alls sending `small` and `large` bytes to every peer; latency and bandwidth per rank
    from the two (max over ranks). Collective: every rank of `group` must call it."""
    size = dist.get_world_size(group)
    times = []
    for per_peer in (small, large):
        x = torch.empty(size * per_peer // 4)
        y = torch.empty_like(x)
        dist.barrier(group=group)
        times.append(_best_of(lambda: dist.all_to_all_single(y, x, group=group), repeat=3))
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    t_small, t_large = t.tolist()
    peers_bytes = (size - 1) * (large - small)
    return LinkRates(latency_s=t_small, bandwidth_Bps=peers_bytes / max(t_large - t_small, 1e-9))


ALL_TO_ALL_ALGORITHMS = ("linear", "2dh")


def all_to_all_seconds(algorithm: str, bytes_per_rank: float, nodes: int, per_node: int, intra: LinkRates,
                       inter: LinkRates, copy_Bps: float) -> float:
    """Predicted seconds of one all-to-all over `nodes` × `per_node` ranks, each holding `bytes_per_rank`
    bytes S split evenly over the W = nodes·per_node destinations (S/W each; the chunk to itself stays put).

    Link terms, per rank and per direction (what one rank can push while every rank pushes at once):
        intra    the link between ranks of one node (NVLink, PCIe)
        inter    the rank's share of its node's network (the node's NICs together / per_node): remote
                 messages of all ranks of a node share the node's NICs
        copy_Bps bytes a rank's memory copies per second (a stride copy of S bytes: S / copy_Bps)
    Each message of m bytes costs latency + m / bandwidth on its link, and the messages a rank sends over
    one link go one after another; intra- and inter-node traffic proceed at once. So many small messages
    pay latency many times over, which is what makes a flat all-to-all slow at large W (Tutel §C.4).

        "linear"  flat: W−1 messages of S/W.
                  max((per_node−1)·(α_i + S/W/β_i),  (W−per_node)·(α_e + S/W/β_e))
        "2dh"     Tutel's 2D-hierarchical: stride copy; intra-node all-to-all of S/per_node messages; stride
                  copy; inter-node all-to-all among the ranks with the same local index, per_node× larger
                  messages (S/nodes): the four phases run one after another.
                  2·S/copy + (per_node−1)·(α_i + S/per_node/β_i) + (nodes−1)·(α_e + S/nodes/β_e)
    So 2dh sends (W−1)/(nodes−1+per_node−1) times fewer messages but moves the intra-node bytes through an
    extra phase and two copies: it wins with many nodes and small S and loses on one node (no network
    phase to shrink), which is how a caller should choose between the two (`best_all_to_all`).
    """
    if algorithm not in ALL_TO_ALL_ALGORITHMS:
        raise ValueError(f"unknown all-to-all algorithm {algorithm!r}; expected one of {ALL_TO_ALL_ALGORITHMS}")
    if nodes < 1 or per_node < 1:
        raise ValueError(f"need at least one node and one rank per node, got {nodes} × {per_node}")
    world = nodes * per_node
    if algorithm == "linear":
        chunk = bytes_per_rank / world
        local = (per_node - 1) * intra.transfer_s(chunk) if per_node > 1 else 0.0
        remote = (world - per_node) * inter.transfer_s(chunk) if nodes > 1 else 0.0
        return max(local, remote)
    local = (per_node - 1) * intra.transfer_s(bytes_per_rank / per_node) if per_node > 1 else 0.0
    remote = (nodes - 1) * inter.transfer_s(bytes_per_rank / nodes) if nodes > 1 else 0.0
    return 2 * bytes_per_rank / copy_Bps + local + remote


def best_all_to_all(bytes_per_rank: float, nodes: int, per_node: int, intra: LinkRates, inter: LinkRates,
                    copy_Bps: float) -> tuple[str, float]:
    """(algorithm, seconds) of the faster all-to-all by `all_to_all_seconds`; "linear" on ties."""
    return min(((a, all_to_all_seconds(a, bytes_per_rank, nodes, per_node, intra, inter, copy_Bps))
                for a in ALL_TO_ALL_ALGORITHMS), key=lambda r: r[1])
