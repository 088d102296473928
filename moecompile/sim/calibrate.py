"""Calibrate the simulator's compute, memory and link terms on this machine, and say how wrong they are.

Two gloo ranks are spawned on this machine, one thread each (as the expert-parallel benchmarks run), and
measure at the same time, in turns (one call of every step per round), best of R rounds: as robust to other
load on a shared machine as a best-of can be:
    GEMM rate        a 512² fp32 matmul                                → the device's peak FLOP/s
    expert FFN       bmm → GELU → bmm, forward + backward, 3 shapes   → GEMM efficiency fitted on the first,
                                                                         the others predicted (held out)
    copy             a large tensor copy                               → memory bandwidth; an encode-like
                                                                         row gather predicted (held out)
    all-to-all       all_to_all_single at 5 sizes                      → latency and bandwidth by least squares
                                                                         (relative) on 3, the other 2 predicted
                                                                         by all_to_all_seconds (held out)
    MoE layer        gate → top-k → gather → a2a → experts → a2a → index_add, forward: predicted by
                     replay.layer_dag with the calibrated cluster (the end-to-end check)
Each row reports measured and predicted seconds; error = predicted / measured − 1 (0 on the fitted rows).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecompile.passes.schedule_overlap import list_schedule
from moecompile.runtime.cost_model import LinkRates, all_to_all_seconds
from moecompile.runtime.spawn import run_ranks
from moecompile.sim.cluster import Cluster, Device
from moecompile.sim.model import MoEConfig
from moecompile.sim.replay import a2a_seconds, layer_dag, op_seconds

WORLD = 2
# (experts, rows per expert, D, H): the first fits the efficiency
FFN_SHAPES = ((2, 512, 256, 1024), (2, 1024, 128, 512), (4, 256, 256, 512))
A2A_BYTES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20)   # per rank
A2A_FITTED = (0, 2, 4)                                          # indices into A2A_BYTES
LAYER = dict(tokens=1024, hidden=256, ffn=1024, experts=4, top_k=2)


@dataclass(frozen=True)
class Row:
    term: str
    what: str
    measured_s: float
    predicted_s: float
    fitted: bool

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


@dataclass(frozen=True)
class Calibration:
    cluster: Cluster          # this machine: 1 node × WORLD CPU ranks
    rows: list[Row]
    rounds: int


def _best_in_turns(steps: dict, rounds: int) -> dict[str, float]:
    """Best seconds of each step over `rounds` rounds of one call of every step (after a warm-up round),
    each call starting at a barrier: both ranks run the same step at once (a collective's time then holds no
    waiting for the other rank to arrive), and load from elsewhere that comes and goes reaches all alike."""
    best = {name: float("inf") for name in steps}
    for i in range(rounds + 1):
        for name, fn in steps.items():
            dist.barrier()
            t = time.perf_counter()
            fn()
            if i:
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def _ffn(experts, rows, d, h, grad: bool):
    x = torch.randn(experts, rows, d)
    w1, w2 = torch.randn(experts, d, h) / d ** 0.5, torch.randn(experts, h, d) / h ** 0.5
    return tuple(t.requires_grad_(grad) for t in (x, w1, w2))


def _measure(scale: float, rounds: int) -> dict:
    """This rank's measurements (seconds), taken in turns while the other rank takes the same ones."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    steps = {"gemm": lambda: a @ b}
    shapes = [(e, int(rows * scale), d, h) for e, rows, d, h in FFN_SHAPES]
    for i, shape in enumerate(shapes):
        x, w1, w2 = _ffn(*shape, grad=True)
        steps[f"ffn{i}"] = lambda x=x, w1=w1, w2=w2: torch.bmm(                  # [E, rows, D] → [E, rows, H] → D
            torch.nn.functional.gelu(torch.bmm(x, w1)), w2).sum().backward()
    big = torch.randn(int((8 << 20) * scale))
    dst = torch.empty_like(big)
    steps["copy"] = lambda: dst.copy_(big)
    t, d = int(LAYER["tokens"] * 4 * scale), LAYER["hidden"]
    src, idx = torch.randn(t, d), torch.randint(0, t, (2 * t,))
    steps["gather"] = lambda: src.index_select(0, idx)                             # [T, D] → [2T, D]
    for nbytes in A2A_BYTES:
        x = torch.empty(nbytes // 4)
        steps[f"a2a{nbytes}"] = lambda x=x, y=torch.empty_like(x): dist.all_to_all_single(y, x)
    steps["layer"] = _moe_layer(scale)
    best = _best_in_turns(steps, rounds)
    return {"gemm": (2 * n ** 3, best["gemm"]),
            "ffn": [(shape, best[f"ffn{i}"]) for i, shape in enumerate(shapes)],
            "copy": (2 * big.numel() * 4, best["copy"]), "gather": ((t, 2 * t, d), best["gather"]),
            "a2a": [(nbytes, best[f"a2a{nbytes}"]) for nbytes in A2A_BYTES], "layer": best["layer"]}


def _moe_layer(scale: float):
    """One expert-parallel MoE layer's forward on LAYER's sizes, the sim's nodes in its order."""
    t, d, h, e, k = (int(LAYER["tokens"] * scale), LAYER["hidden"], LAYER["ffn"], LAYER["experts"],
                     LAYER["top_k"])
    x, gate = torch.randn(t, d), torch.randn(d, e)
    local = e // WORLD
    _, w1, w2 = _ffn(local, 1, d, h, grad=False)
    rows = k * t                    # dropless; the experts take rows // local each, as in the even-load model

    def step():
        chosen = (x @ gate).topk(k, dim=-1).indices.reshape(-1)          # gate: [T, E] → top-k → [k·T]
        source = chosen.argsort() // k                                    # [k·T] token of each row, by expert
        send = x.index_select(0, source)                                  # encode: [k·T, D]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)                                # send: half the rows to the peer
        y = torch.bmm(torch.nn.functional.gelu(torch.bmm(recv.view(local, rows // local, d), w1)), w2)
        back = torch.empty_like(send)                                     # experts: [local, k·T/local, D]
        dist.all_to_all_single(back, y.reshape(rows, d))                  # return
        return torch.zeros_like(x).index_add_(0, source, back)            # decode: [T, D]
    return step


def _rank_main(rank: int, world: int, scale: float, rounds: int) -> dict:
    return _measure(scale, rounds)


def measure(scale: float = 1.0, rounds: int = 15) -> list[dict]:
    """Every rank's raw measurements (spawns WORLD processes; `scale` shrinks the sizes for a quick run)."""
    return run_ranks(_rank_main, WORLD, scale, rounds, timeout_s=120.0)


def fit(ranks: list[dict], scale: float = 1.0) -> tuple[Cluster, list[Row]]:
    """The calibrated cluster from the measurements, and every row of predicted against measured. Compute
    terms take the mean over ranks (they measured at once), link terms the slowest rank."""
    def mean(get):
        return sum(get(r) for r in ranks) / len(ranks)
    flops, _ = ranks[0]["gemm"]
    rate = flops / mean(lambda r: r["gemm"][1])
    ffn = [(tuple(shape), mean(lambda r, i=i: r["ffn"][i][1])) for i, (shape, _) in enumerate(ranks[0]["ffn"])]
    flops_of = [3 * e * rows * 4 * d * h for (e, rows, d, h), _ in ffn]   # forward + backward (2×)
    efficiency = flops_of[0] / (rate * ffn[0][1])
    moved, _ = ranks[0]["copy"]
    device = Device(f"this CPU ({torch.get_num_threads()} cores, 1 thread per rank)", {"fp32": rate}, efficiency,
                    moved / mean(lambda r: r["copy"][1]))
    a2a = [(nbytes, max(r["a2a"][i][1] for r in ranks)) for i, (nbytes, _) in enumerate(ranks[0]["a2a"])]
    link = fit_link([a2a[i] for i in A2A_FITTED])
    cluster = Cluster("this machine", device, nodes=1, per_node=WORLD, intra=link, inter=link,
                      source="measured by moecompile.sim.calibrate")

    rows = [Row("compute", "512² GEMM rate (fits peak)", mean(lambda r: r["gemm"][1]), flops / rate, True)]
    for ((e, r, d, h), seconds), f in zip(ffn, flops_of):
        rows.append(Row("compute", f"expert FFN fwd+bwd E{e}×{r} rows, D{d} H{h}", seconds,
                        device.gemm_s(f, "fp32"), f is flops_of[0]))
    rows.append(Row("memory", "copy (fits bandwidth)", mean(lambda r: r["copy"][1]), device.memory_s(moved), True))
    t, out_rows, d = ranks[0]["gather"][0]
    rows.append(Row("memory", f"row gather {t}→{out_rows} rows, D{d}", mean(lambda r: r["gather"][1]),
                    device.memory_s((t + out_rows) * d * 4), False))
    for i, (nbytes, seconds) in enumerate(a2a):
        rows.append(Row("link", f"gloo all-to-all, {nbytes / 1024:.0f} KiB per rank", seconds,
                        all_to_all_seconds("linear", nbytes, 1, WORLD, link, link, device.copy_Bps),
                        i in A2A_FITTED))
    layer = layer_config(scale)
    dag = layer_dag(1, a2a_seconds(layer, cluster), op_seconds(layer, cluster))
    predicted = max(s.end_s for s in list_schedule(dag))
    rows.append(Row("end to end", f"EP MoE layer forward, 2 ranks, {layer.tokens} tokens/rank",
                    max(r["layer"] for r in ranks), predicted, False))
    return cluster, rows


def fit_link(samples: list[tuple[float, float]]) -> LinkRates:
    """Latency α and bandwidth β of a 2-rank all-to-all, t = α + (S/2)/β (one message of half the bytes each
    way), from (S, t) samples by least squares on the relative error: Σ ((α + S/2·γ) / t − 1)², γ = 1/β."""
    a = torch.tensor([[1 / t, nbytes / WORLD / t] for nbytes, t in samples], dtype=torch.float64)
    alpha, gamma = torch.linalg.lstsq(a, torch.ones(len(samples), 1, dtype=torch.float64)).solution.flatten().tolist()
    if gamma <= 0:
        raise RuntimeError(f"all-to-all times do not grow with size ({samples}): no bandwidth to fit")
    return LinkRates(max(alpha, 0.0), 1 / gamma)


def layer_config(scale: float = 1.0) -> MoEConfig:
    """The end-to-end check's layer as a simulator config (dropless top-2, fp32)."""
    return MoEConfig("calibration layer", tokens=int(LAYER["tokens"] * scale), hidden=LAYER["hidden"],
                     ffn=LAYER["ffn"], experts=LAYER["experts"], top_k=LAYER["top_k"], capacity_factor=None,
                     blocks=1, moe_every=1, dtype="fp32")


def calibrate(quick: bool = False) -> Calibration:
    """Measure (two spawned ranks) and fit. quick: half sizes and best of 3 rounds, for a smoke run."""
    scale, rounds = (0.5, 3) if quick else (1.0, 15)
    cluster, rows = fit(measure(scale, rounds), scale)
    return Calibration(cluster, rows, rounds)


if __name__ == "__main__":  # python -m moecompile.sim.calibrate
    for row in calibrate(quick=os.environ.get("QUICK") == "1").rows:
        print(f"{row.term:10} {row.what:48} {row.measured_s * 1e3:9.3f} ms {row.predicted_s * 1e3:9.3f} ms "
              f"{row.error:+7.1%}{' (fit)' if row.fitted else ''}")
