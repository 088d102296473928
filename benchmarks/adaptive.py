"""Adaptive parallelism over a slow link while the routed load shifts: the adaptive table (r and pipelining
degree chosen per step by capacity bucket) against every static choice, in the same run.

Setup. Two ranks behind a rate-limited veth link (benchmarks/emulated_link.py; loopback without root). Model:
moecompile.models.MoEStack, LAYERS top-2 MoE layers (8 experts, GELU with biases) with residuals, optimized
with `parallelism="adaptive"`, so every variant runs on the same expert layout: DP (r=0: the
weights are all-gathered, nothing of the tokens travels), EP (r=1: the rows travel), EP pipelined in 2
chunks, and "adaptive" (the table: cost-model candidates, measured trials per new bucket, then the choice).
The data mix shifts in phases: short sequences with every expert equally likely, then long sequences of
which HOT of the tokens carry the direction the router sends to experts 0 and 1 (both on rank 0: under EP that
rank computes nearly all the rows while the other waits; under DP each rank computes its own), then short
balanced ones again (the table's entry for that bucket is reused: no new trials). A step is forward +
backward of the output's mean (no optimizer); the variants run in turns, step by step.

Links: one run per rate in DP_SHARES, each set so that one step's weight all-gather + reduce-scatter (what DP
sends) takes that share of a long balanced EP step on the unlimited link, measured first. At 100% DP's
transfer alone costs a whole step and EP should win every phase; the lower the share, the more a skewed
phase favours DP.

Reported per link, phase and variant: median step time (the slowest rank's); over the run, the total time, and
the adaptive one's ratio to the best and to the worst static choice (targets: >= 1.0 and >= 1.2). --quick: the
smaller model, the 40% link only.
Run: python benchmarks/adaptive.py [--quick]   (as root for the rate-limited link)
Results: a table on stdout and benchmarks/results/adaptive.json (adaptive_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulated_link  # noqa: E402
from common import RESULTS_DIR, machine_info, progress, stable_malloc, table, write_json  # noqa: E402
from emulated_link import net_rate, netns_available, two_namespaces  # noqa: E402

CONFIG = dict(d_model=256, d_ff=512, num_experts=8, top_k=2)
LAYERS, HOT = 2, 0.9
PHASES = (("short, balanced", 512, 0.0), ("long, skewed", 2048, HOT), ("short, balanced", 512, 0.0))
VARIANTS = {"DP r=0": (0, 1), "EP r=1": (1, 1), "EP r=1 d=2": (1, 2), "adaptive": None}  # (r, degree)
DP_SHARES = (1.0, 0.4, 0.2)
STEPS, QUICK_STEPS = 32, 8
QUICK = dict(CONFIG, d_model=128, d_ff=256)
PORT = 29617


def worker(args):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import moecompile
    from moecompile.models import MoEStack

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    model = MoEStack(LAYERS, **(QUICK if args.quick else CONFIG))
    variants = args.variants.split(",")
    example = model.batch(PHASES[0][1], 0.0, seed=rank)
    models = {}
    for v in variants:
        models[v] = moecompile.optimize(model, (example,), mesh=mesh, parallelism="adaptive", overlap="auto")
        if VARIANTS[v] is not None:
            moecompile.set_parallelism(models[v], *VARIANTS[v])

    def step(m, x):
        for p in m.parameters():
            p.grad = None
        m(x).mean().backward()

    phases = (("long, balanced", PHASES[1][1], 0.0),) if args.calibrate else PHASES
    times = {v: [[] for _ in phases] for v in variants}
    for i, (_, tokens, hot_fraction) in enumerate(phases):
        x = model.batch(tokens, hot_fraction, seed=100 * i + rank)
        for _ in range(args.steps):
            for v in variants:
                dist.barrier()
                t = time.perf_counter()
                step(models[v], x)
                times[v][i].append(time.perf_counter() - t)
    result = {}
    for v in variants:  # the slowest rank's time per step
        local = torch.tensor(times[v], dtype=torch.float64)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        layers = [m.spec.parallel for m in moecompile.explain(models[v]).moe_layers]
        result[v] = {"step_ms": (local * 1e3).tolist(),
                     "table": [p.table.summary() for p in layers] if VARIANTS[v] is None else None}
    if rank == 0:
        slice_bytes = sum(p.numel() * p.element_size() for n, p in models[variants[0]].named_parameters()
                          if n in {n for m in moecompile.explain(models[variants[0]]).moe_layers
                                   for n in m.spec.parallel.expert_params})
        result["weight_bytes_per_step"] = 2 * slice_bytes  # all-gather + reduce-scatter, one direction
        import json
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(variants, steps, quick, namespaces, calibrate=False) -> dict:
    return emulated_link.launch(__file__, ["--steps", str(steps), "--variants", ",".join(variants)]
                                + (["--quick"] if quick else []) + (["--calibrate"] if calibrate else []),
                                PORT, namespaces)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a smaller model, {QUICK_STEPS} steps per phase")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per phase and variant")
    parser.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    emulated_link.worker_args(parser, VARIANTS)
    args = parser.parse_args()
    stable_malloc()
    if args.worker:
        return worker(args)
    steps = QUICK_STEPS if args.quick else args.steps
    shares = DP_SHARES[1:2] if args.quick else DP_SHARES
    why_not = netns_available()
    runs = []
    with two_namespaces(why_not is None), progress() as bar:
        task = bar.add_task("calibrate, then one run per link", total=1 + (len(shares) if why_not is None else 1))
        base = launch(["EP r=1"], 4, args.quick, why_not is None, calibrate=True)
        long_ep_s = median(base["EP r=1"]["step_ms"][0]) / 1e3
        bar.advance(task)
        for share in shares if why_not is None else (None,):
            rate = base["weight_bytes_per_step"] / (share * long_ep_s) if share else None
            if rate is not None:
                net_rate(rate)
            runs.append(_summary(share, rate, launch(list(VARIANTS), steps, args.quick, why_not is None), why_not))
            bar.advance(task)
    from rich.console import Console
    rows = [[run["link"], v, *(f"{median(p):.1f}" for p in run["variants"][v]["step_ms"]),
             f"{run['totals_ms'][v]:.0f}", f"{run['totals_ms'][run['best_static']] / run['totals_ms'][v]:.2f}x"]
            for run in runs for v in VARIANTS]
    Console(width=170).print(table(
        f"adaptive parallelism while the load shifts: 2 ranks, {LAYERS} MoE layers",
        ["link (DP's weight traffic / long EP step)", "variant",
         *(f"{name} ({tokens} tok) ms" for name, tokens, _ in PHASES), "total ms", "vs best static"],
        rows, caption=f"median step (fwd+bwd, slowest rank) per phase, {steps} steps each; total: every step, "
                      "trials included. Adaptive tables: " + " || ".join(
                          f"{run['link']}: " + " | ".join(run["variants"]["adaptive"]["table"]) for run in runs)))
    for run in runs:
        print(run["link"], {k: round(run[k], 3) if isinstance(run[k], float) else run[k] for k in
                            ("adaptive_vs_best_static", "best_static", "worst_over_adaptive", "worst_static")})
    path = write_json(RESULTS_DIR / ("adaptive_quick.json" if args.quick else "adaptive.json"),
                      {"machine": machine_info(), "config": QUICK if args.quick else CONFIG, "layers": LAYERS,
                       "phases": PHASES, "steps_per_phase": steps, "netns": why_not or "yes", "runs": runs})
    print(f"wrote {path}")


def _summary(share, rate, result, why_not) -> dict:
    totals = {v: sum(map(sum, result[v]["step_ms"])) for v in VARIANTS}
    static = {v: t for v, t in totals.items() if VARIANTS[v] is not None}
    best, worst = min(static, key=static.get), max(static, key=static.get)
    link = f"{rate * 8 / 1e6:.0f} Mbit/s ({share:.0%})" if rate else f"loopback ({why_not})"
    return {"link": link, "link_Bps": rate, "dp_share": share, "variants": {v: result[v] for v in VARIANTS},
            "totals_ms": totals, "best_static": best, "worst_static": worst,
            "adaptive_vs_best_static": static[best] / totals["adaptive"],
            "worst_over_adaptive": static[worst] / totals["adaptive"]}


if __name__ == "__main__":
    main()
