"""Adaptive parallelism while the routed load shifts, on 2 ranks:

    torchrun --nproc-per-node 2 examples/adaptive_parallel.py

One expert layout (each rank owns a unique slice of the experts, Tutel's), three ways to run it, all in turns
on the same steps: data parallel (r=0: the weights are gathered, the tokens stay), expert parallel (r=1: the
tokens travel to their experts), and the adaptive table, which picks r and the pipelining degree per step
from the step's capacity bucket (cost model first, then a few measured trials). The data mix shifts from
balanced routing to 90% of the tokens on experts 0 and 1, both on rank 0, and back. Every variant computes
the same function, so their outputs agree; what differs is the time. Over loopback the link is nearly free;
benchmarks/adaptive.py repeats this behind a rate-limited link.
"""
import time
from statistics import median

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.models import MoEStack

PHASES = (("balanced", 256, 0.0), ("skewed", 1024, 0.9), ("balanced", 256, 0.0))  # (mix, tokens per rank, hot)
VARIANTS = {"DP (r=0)": (0, 1), "EP (r=1)": (1, 1), "adaptive": None}
STEPS = 24


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("ep",))
    model = MoEStack(layers=2, d_model=256, d_ff=512, num_experts=8, top_k=2)
    example = model.batch(PHASES[0][1], 0.0, seed=rank)
    models = {}
    for name, pinned in VARIANTS.items():
        models[name] = moecompile.optimize(model, (example,), mesh=mesh, parallelism="adaptive", overlap="auto")
        if pinned is not None:
            moecompile.set_parallelism(models[name], *pinned)
    table = Table(title="adaptive parallelism on 2 ranks (loopback): median step ms (fwd+bwd, slowest rank)")
    for col in ("phase", "tokens/rank", "hot", *VARIANTS, "adaptive chose (per layer)", "max |Δ output|"):
        table.add_column(col)
    for i, (mix, tokens, hot) in enumerate(PHASES):
        x = model.batch(tokens, hot, seed=100 * i + rank)
        times, outs = {name: [] for name in models}, {}
        for _ in range(STEPS):
            for name, m in models.items():
                dist.barrier()
                began = time.perf_counter()
                out = m(x)
                out.mean().backward()
                times[name].append(time.perf_counter() - began)
                outs[name] = out.detach()
        slowest = torch.tensor([median(times[name]) for name in models], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        chosen = [f"r={p.r} d={p.ep.chunks}" for p in (m.spec.parallel for m in
                                                     moecompile.explain(models["adaptive"]).moe_layers)]
        spread = max(float((o - outs["EP (r=1)"]).abs().max()) for o in outs.values())
        table.add_row(mix, str(tokens), f"{hot:.0%}", *(f"{s * 1e3:.1f}" for s in slowest.tolist()),
                      ", ".join(chosen), f"{spread:.1e}")
    if rank == 0:
        console = Console(width=140)
        console.print(table)
        console.print(moecompile.explain(models["adaptive"]))
    dist.barrier()  # no rank tears its connections down while a peer still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
