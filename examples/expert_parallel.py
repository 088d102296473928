"""Expert parallelism with moecompile: the reference GPT-MoE on two ranks of this machine (gloo).

    torchrun --nproc-per-node 2 examples/expert_parallel.py        # `make demo` runs it after quickstart

1. Equality: each rank holds 4 of the 8 experts of every MoE layer and trains on its half of a batch; its
   logits and every gradient (after `reduce_gradients`) equal one process running the whole batch.
2. `explain()`: placement, the pipelining degree each layer got from the cost model, the measured re-tuning,
   and what the runtime measured (exposed communication = time blocked waiting for all-to-alls).
3. Training-step time with overlap "off" vs "auto", and of the model converted to ScMoE
   (`shortcut="scmoe"`: a different architecture with the same FLOPs per token, whose all-to-all leaves
   before the preceding block's MLP), alternating in the same run. Here the ranks talk over loopback, where
   an all-to-all is cheap, so there is little to hide; benchmarks/ep_overlap.py puts them behind a
   rate-limited link (docs/benchmarks.md has its table).
4. The "auto" model under `torch.compile(backend="moecompile", fullgraph=True)`: the all-to-alls are
   functional collectives whose data-dependent split sizes stay in the graph, so the whole model is one
   graph (Inductor's code around moecompile's ops); its logits and gradients equal the uncompiled model's.
"""
import statistics
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.models import gpt_moe
from moecompile.runtime.expert_parallel import reduce_gradients
from moecompile.validation import max_relative_error

CONFIG = dict(n_layer=4, d_model=256, d_ff=1024, n_head=4, num_experts=8, top_k=2, max_seq=256)
BATCH, SEQ, STEPS = 8, 256, 6


def build():
    torch.manual_seed(0)  # the same weights on every rank
    return gpt_moe(**CONFIG)


def train_step(model, ids):
    for p in model.parameters():
        p.grad = None
    logits, _ = model(ids)
    logits.float().mean().backward()  # a mean over this rank's tokens
    return logits


def equality(mesh, rank, world) -> float:
    """Worst relative difference, logits and gradients, expert parallel vs one process on the whole batch."""
    whole = torch.randint(0, 256, (BATCH * world, SEQ), generator=torch.Generator().manual_seed(1))
    mine = whole.chunk(world)[rank]
    single = build()
    want_logits = train_step(single, whole).chunk(world)[rank]
    fast = moecompile.optimize(build(), (mine,), mesh=mesh)
    logits = train_step(fast, mine)
    reduce_gradients(fast, mesh)
    worst = max_relative_error(logits.detach(), want_logits.detach(), logits)
    want = dict(single.named_parameters())
    local = {name: layer.spec.parallel.local_experts for layer in moecompile.explain(fast).moe_layers
             for name in layer.spec.parallel.expert_params}
    for name, p in fast.named_parameters():
        g = want[name].grad
        if name in local and g.shape != p.shape:  # a stacked expert weight: this rank's rows of it
            g = g[local[name].start:local[name].stop]
        worst = max(worst, max_relative_error(p.grad, g, p))
    return worst


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    console = Console(width=130, quiet=rank != 0)
    console.print(f"[bold]Expert parallelism: GPT-MoE ({CONFIG['n_layer']} blocks, MoE every other, "
                  f"{CONFIG['num_experts']} experts, top-2), {world} ranks over gloo, {BATCH}x{SEQ} tokens per rank[/]")
    worst = equality(mesh, rank, world)
    console.print(f"expert parallel vs one process on the whole batch: max relative difference {worst:.1e} "
                  "(logits and every gradient)")

    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(2 + rank))
    models = {v: moecompile.optimize(build(), (ids,), mesh=mesh, overlap=v) for v in ("off", "auto")}
    # the ScMoE conversion: a different architecture, same FLOPs per token, all-to-all off the critical path
    models["scmoe"] = moecompile.optimize(build(), (ids,), mesh=mesh, shortcut="scmoe")
    layers = {v: [layer.spec.parallel for layer in moecompile.explain(m).moe_layers] for v, m in models.items()}
    while any(ep.tuner.chosen is None for ep in layers["auto"]):  # "auto" tries degrees while training
        for m in models.values():
            train_step(m, ids)
    # compiled once the degrees are chosen (a compiled graph keeps the degree it was traced with)
    compiled = torch.compile(models["auto"], backend="moecompile", fullgraph=True)
    want = train_step(models["auto"], ids).detach(), [p.grad.clone() for p in models["auto"].parameters()]
    began = time.perf_counter()
    got = train_step(compiled, ids).detach(), [p.grad.clone() for p in models["auto"].parameters()]
    compile_s = time.perf_counter() - began
    worst = max(max_relative_error(a, b, b) for a, b in zip([got[0], *got[1]], [want[0], *want[1]]))
    console.print(f'torch.compile(backend="moecompile", fullgraph=True) of the "auto" model: one graph, compiled '
                  f"in {compile_s:.0f} s; max relative difference to the uncompiled model {worst:.1e} (logits and "
                  "every gradient)")
    models["compiled"], layers["compiled"] = compiled, layers["auto"]
    times = {v: [] for v in models}
    for ep in (ep for eps in layers.values() for ep in eps):
        ep.stats.clear()
    for _ in range(STEPS):
        for v, m in models.items():
            dist.barrier()
            t = time.perf_counter()
            train_step(m, ids)
            times[v].append(time.perf_counter() - t)
    console.print(moecompile.explain(models["auto"]))
    table = Table(title=f"training step (forward+backward), 2 ranks over loopback, median of {STEPS}, same run")
    for col in ("model", "degree per MoE layer", "step ms (rank 0)", "vs off", "exposed all-to-all ms/step"):
        table.add_column(col)
    off = statistics.median(times["off"])
    names = {"off": "top-2, overlap off", "auto": 'top-2, overlap "auto"', "scmoe": 'shortcut="scmoe"',
             "compiled": 'top-2, overlap "auto", torch.compile'}
    for v in models:
        t = statistics.median(times[v])
        exposed = sum(ep.stats["forward"] + ep.stats["backward"] for ep in layers[v]) / STEPS * 1e3
        table.add_row(names[v], str([ep.chunks for ep in layers[v]]), f"{t * 1e3:.0f}", f"{off / t:.2f}x",
                      "- (not timed when compiled)" if v == "compiled" else f"{exposed:.0f}")
    console.print(table)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
