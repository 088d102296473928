"""The cost model's measurements: how long a piece of work takes on this machine and across its link.

    node time     = measured once per machine, thread count and shape (`measured_s`), cached in
                    ~/.cache/moecompile (MOECOMPILE_CACHE overrides)
    transfer(b)   = link_latency + b / link_bandwidth      (one all-to-all sending b bytes, per rank)

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
