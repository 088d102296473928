"""Expert-parallel training steps over a slow link: no overlap vs the overlap pass, with the overlap ratio and
the cost model's prediction next to each measurement.

Setup. Two ranks, each in its own network namespace (`ip netns`), joined by a veth pair whose both ends are
rate-limited with `tc ... tbf` (netem is not in this kernel), so every all-to-all crosses a link that is as slow, relative to this CPU, as
PCIe (or NVLink) is to a GPU. The rate is calibrated per setting: a first run on the unlimited link measures
each MoE layer's expert time and bytes per all-to-all, and the rate is set so that communication is the
target fraction of the baseline MoE layer time (60%: the ScMoE paper's 8xA30-PCIe regime; 15%: 8xA800-NVLink).
Without root or `ip netns` the ranks run over loopback (no limit) and the output says so.

Model: the reference top-2 GPT-MoE (moecompile.models.gpt_moe, 4 blocks, MoE every other one, 8 experts,
4 per rank), d_model 256, d_ff 1024, 8 x 256 tokens per rank, fp32, one thread per rank. A step is forward +
backward of the mean logit (no optimizer), timed with a barrier before it; variants run in turns.

Per setting and variant:
  step_ms         median over steps of the slowest rank's step time
  comm_fraction   (baseline) exposed all-to-all time / MoE exchange-region time, fwd + bwd: what the link
                  costs the MoE layers when nothing overlaps
  overlap_ratio   hidden / total communication = 1 - exposed(variant) / exposed(baseline), where exposed =
                  time blocked waiting for all-to-alls (forward and backward), summed over MoE layers
  predicted       the cost model's expert-parallel region time (per-layer schedule makespans, fwd + bwd), vs
                  the measured region time; predicted step = measured time outside those regions + predicted
Variants: "off" (no pipelining), "auto" (the degree the cost model picks per layer, re-tuned from measured
times), fixed degrees, and "scmoe": the same model converted by `optimize(shortcut="scmoe")` (a different
architecture with the same FLOPs per token: top-1 routed on the preceding block's MLP input plus a gated
shared expert), whose rows leave before the preceding block's MLP and attention run; and "dgmoe", the
paper's DoubleGating variant (the experts top-1 twice, on the shortcut and on the block's input), where only
the shortcut half leaves early. "off+compile" and "4+compile": those models under torch.compile(backend=
"moecompile", fullgraph=True), one graph whose all-to-alls are functional collectives (Inductor sinks each
wait to its first use); compiled calls record no exchange statistics, so their exposed time, overlap ratio
and region columns are empty.

Run: python benchmarks/ep_overlap.py [--quick] [--steps N]   (as root for the rate-limited link)
Results: a table on stdout and benchmarks/results/ep_overlap.json (ep_overlap_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulated_link  # noqa: E402
from common import RESULTS_DIR, machine_info, progress, stable_malloc, table, write_json  # noqa: E402
from emulated_link import net_rate, netns_available, two_namespaces  # noqa: E402

CONFIG = dict(n_layer=4, d_model=256, d_ff=1024, n_head=4, num_experts=8, top_k=2, max_seq=256)
BATCH, SEQ = 8, 256
QUICK = dict(config=dict(CONFIG, d_model=128, d_ff=512, max_seq=128), batch=4, seq=128)
SETTINGS = (("PCIe-like", 0.60), ("NVLink-like", 0.15))
VARIANTS = ("off", "auto", "2", "4", "scmoe", "dgmoe", "off+compile", "4+compile")
COMPILED = "+compile"  # the variant under torch.compile(backend="moecompile", fullgraph=True)
PORT = 29613
CALIBRATION_PROBES = 3


def launch(variants, steps, quick, namespaces: bool) -> dict:
    return emulated_link.launch(__file__, ["--steps", str(steps), "--variants", ",".join(variants)]
                                + (["--quick"] if quick else []), PORT, namespaces)


# ---- one rank ------------------------------------------------------------------------------------------------
def worker(args):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import moecompile
    from moecompile.models import gpt_moe

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    cfg, batch, seq = (QUICK["config"], QUICK["batch"], QUICK["seq"]) if args.quick else (CONFIG, BATCH, SEQ)
    torch.manual_seed(0)
    model = gpt_moe(**cfg)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(rank))
    variants = args.variants.split(",")
    def build(v):
        if v in ("scmoe", "dgmoe"):  # same FLOPs per token; (some of) the rows leave before the preceding MLP
            return moecompile.optimize(model, (ids,), mesh=mesh, shortcut=v)
        return moecompile.optimize(model, (ids,), mesh=mesh, overlap=v if v in ("off", "auto") else int(v))
    optimized = {v: build(v.removesuffix(COMPILED)) for v in variants}
    models = {v: torch.compile(m, backend="moecompile", fullgraph=True) if v.endswith(COMPILED) else m
              for v, m in optimized.items()}

    def step(m):
        for p in m.parameters():
            p.grad = None
        logits, _ = m(ids)
        logits.float().mean().backward()

    def layers(v):
        return [layer.spec.parallel for layer in moecompile.explain(optimized[v]).moe_layers]

    # warm-up: two steps, and for "auto" until its measured re-tuning has settled in every layer
    for i in range(40):
        settled = all(ep.tuner is None or ep.tuner.chosen is not None for v in variants for ep in layers(v))
        if i >= 2 and settled:
            break
        for v in variants:
            step(models[v])
    for v in variants:
        for ep in layers(v):
            ep.stats.clear()
    times = {v: [] for v in variants}
    for i in range(args.steps):
        for v in variants:
            dist.barrier()
            t = time.perf_counter()
            step(models[v])
            times[v].append(time.perf_counter() - t)
    for v in variants:
        for ep in layers(v):
            ep.fold_backward()
    result = {}
    for v in variants:
        eps = layers(v)
        n = args.steps
        per = lambda key: sum(ep.stats[key] for ep in eps) / n  # noqa: E731  (per step, summed over layers)
        local = torch.tensor([median(times[v]), per("forward") + per("backward"),
                              per("region") + per("backward_region")], dtype=torch.float64)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        step_s, exposed_s, region_s = local.tolist()
        result[v] = {"step_ms": step_s * 1e3, "tuning": [ep.tuner.summary() for ep in eps if ep.tuner],
                     "shortcut_slots": [ep.schedule.note for ep in eps if ep.schedule.note],
                     "exposed_ms": None if v.endswith(COMPILED) else exposed_s * 1e3,
                     "region_ms": None if v.endswith(COMPILED) else region_s * 1e3,
                     "chunks": [ep.chunks for ep in eps],
                     "predicted_region_ms": sum(ep.schedule.predicted_total_s for ep in eps) * 1e3,
                     "predicted_comm_ms": sum(ep.schedule.comm_s for ep in eps) * 1e3,
                     "expert_ms": sum(ep.schedule.compute_s for ep in eps) * 1e3,
                     "a2a_bytes": _a2a_bytes(cfg, batch * seq)}
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()  # no rank tears down its connections while a peer still uses them
    dist.destroy_process_group()


def _a2a_bytes(cfg, tokens) -> float:
    """Bytes one rank sends over the link per all-to-all of one MoE layer (half its rows are remote)."""
    return tokens * cfg["top_k"] * cfg["d_model"] * 4 / 2


# ---- the driver ----------------------------------------------------------------------------------------------
def calibrate(fraction: float, base: dict, quick: bool) -> float:
    """Set and return the link rate (bytes/s) at which the link adds `fraction` of the no-overlap EP region
    time: (R - R0) / R = fraction, R0 the unlimited run's. A first guess from the bytes sent per step, then one
    correction per probe run, up to CALIBRATION_PROBES, until within 10% (TCP and gloo overheads make the
    effective rate lower than the set one)."""
    off = base["off"]
    want_s = fraction / (1 - fraction) * off["region_ms"] / 1e3
    step_bytes = 4 * off["a2a_bytes"] * len(off["chunks"])  # four all-to-alls per MoE layer and step
    rate = step_bytes / want_s
    for _ in range(CALIBRATION_PROBES):  # correct the rate from probe runs (the link time scales as 1/rate)
        net_rate(rate)
        added_s = (launch(["off"], 3, quick, True)["off"]["region_ms"] - off["region_ms"]) / 1e3
        if abs(added_s - want_s) < 0.1 * want_s:
            break
        rate *= max(added_s, 0.1 * want_s) / want_s
    net_rate(rate)
    return rate



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, 3 steps")
    parser.add_argument("--steps", type=int, default=6)
    emulated_link.worker_args(parser, VARIANTS)
    args = parser.parse_args()
    stable_malloc()
    if args.worker:
        return worker(args)
    steps = 3 if args.quick else args.steps
    why_not = netns_available()
    rows, settings = [], []
    with two_namespaces(why_not is None):
        with progress() as bar:
            task = bar.add_task("link settings", total=1 + (len(SETTINGS) if why_not is None else 0))
            base = launch(["off"], steps, args.quick, namespaces=why_not is None)
            bar.advance(task)
            links = [("unlimited" + ("" if why_not is None else f" loopback ({why_not})"), None, base)]
            if why_not is None:
                for name, fraction in SETTINGS:
                    rate = calibrate(fraction, base, args.quick)
                    links.append((f"{name} ({rate * 8 / 1e6:.0f} Mbit/s)", fraction,
                                  launch(VARIANTS, steps, args.quick, True)))
                    bar.advance(task)
    unlimited_region = base["off"]["region_ms"]
    for link, target, result in links:
        off = result["off"]
        added = None if target is None else (off["region_ms"] - unlimited_region) / off["region_ms"]
        for v, r in result.items():
            # a shortcut block's exchange spans the blocks before it: no region time, no per-layer prediction;
            # a compiled one records no exchange statistics
            staged, compiled = v in ("scmoe", "dgmoe"), v.endswith(COMPILED)
            overlap = None if v == "off" or compiled or not off["exposed_ms"] else \
                1 - r["exposed_ms"] / off["exposed_ms"]
            predicted_step = None if staged or compiled else r["step_ms"] - r["region_ms"] + r["predicted_region_ms"]
            entry = {"link": link, "target_comm_fraction": target, "comm_fraction": added, "variant": v,
                     "chunks": r["chunks"], "tuning": r["tuning"], "shortcut_slots": r["shortcut_slots"],
                     "step_ms": r["step_ms"],
                     "speedup_vs_off": off["step_ms"] / r["step_ms"], "overlap_ratio": overlap,
                     "exposed_comm_ms": r["exposed_ms"], "region_ms": None if staged else r["region_ms"],
                     "predicted_region_ms": None if staged or compiled else r["predicted_region_ms"],
                     "predicted_step_ms": predicted_step}
            settings.append(entry)
            rows.append([link, v, str(r["chunks"]), f"{r['step_ms']:.0f}", f"{entry['speedup_vs_off']:.2f}x",
                         "-" if added is None else f"{added:.0%}",
                         "-" if compiled else f"{r['exposed_ms']:.0f}", "-" if overlap is None else f"{overlap:.0%}",
                         *(["-"] * 3 if staged or compiled else [f"{r['region_ms']:.0f}", f"{r['predicted_region_ms']:.0f}",
                                                     f"{predicted_step:.0f}"])])
    from rich.console import Console
    Console(width=170).print(table(
        "expert parallel over a rate-limited link: 2 ranks, GPT-MoE top-2, per step (fwd+bwd)",
        ["link", "overlap", "degree per layer", "step ms", "vs off", "comm share", "exposed a2a ms",
         "overlap ratio", "EP region ms", "predicted region ms", "predicted step ms"], rows,
        caption="comm share: the part of the no-overlap EP region time the link adds over the unlimited run; "
                "exposed a2a: time blocked in all-to-all waits (incl. waiting for the slower rank); overlap ratio: "
                "1 - exposed / exposed without overlap; predicted: the cost model's schedule makespans, and the "
                "step with that in place of the measured EP regions"))
    path = write_json(RESULTS_DIR / ("ep_overlap_quick.json" if args.quick else "ep_overlap.json"),
                      {"machine": machine_info(), "config": QUICK if args.quick else
                       {"config": CONFIG, "batch": BATCH, "seq": SEQ}, "netns": why_not or "yes",
                       "settings": settings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
