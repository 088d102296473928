"""Cluster-scale simulator: the cost model and overlap scheduler replayed on described GPU clusters, beside the papers.

Every number printed as "ours" comes out of moecompile.sim: node times from FLOPs and bytes over the
presets' spec-sheet rates, all-to-alls from runtime.cost_model.all_to_all_seconds, schedules from the
overlap pass's list scheduler. They are model predictions, not measurements, except in the calibration
table, which measures this machine (two spawned gloo ranks, one thread each, best-of timings) and reports
how far the model's terms are from it. The papers' numbers are the constants in PAPER below, cited.

Tables: calibration; Tutel Table 2 (a2a share at 16/64/256 A100s); ScMoE vs top-2 at the A30-PCIe and
A800-NVLink regimes (spec-sheet clusters, and links rescaled to the paper's stated communication share);
PEC: does an asynchronous full / partial checkpoint's snapshot hide behind the iteration at 128-2048 GPUs.

Run: python benchmarks/sim.py [--quick]  (moecompile bench sim);  results: benchmarks/results/sim.json
(not with --quick)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, machine_info, progress, table, write_json  # noqa: E402

from moecompile.sim.calibrate import calibrate  # noqa: E402
from moecompile.sim.checkpoint import (FP32_ADAM, PEC_SIM_K, PEC_SIM_MODEL, checkpoint_bytes,  # noqa: E402
                                       checkpoint_cost)
from moecompile.sim.cluster import A30_PCIE, A800_NVLINK, NDM_A100_V4, pec_sim_cluster  # noqa: E402
from moecompile.sim.model import GPT2_MOE_SMALL, SWINV2_MOE_S_STAGE3, MoEConfig, tutel_table2  # noqa: E402
from moecompile.sim.replay import a2a_share, match_a2a_share, replay_layer, replay_pair  # noqa: E402

# ---- the papers' numbers (research/papers.md, checked against the papers' full texts) --------------------------
PAPER = {
    "tutel_table2": {  # Tutel (MLSys 2023) §2.1 Table 2: ms per iteration of one MoE layer, A100s
        16: {"moe_ms": 560.9, "compute_ms": 371.8, "a2a_ms": 189.1, "share": 0.337, "overlap_speedup": 1.51},
        64: {"moe_ms": 698.9, "compute_ms": 375.1, "a2a_ms": 323.8, "share": 0.463, "overlap_speedup": 1.86},
        256: {"moe_ms": 866.4, "compute_ms": 386.3, "a2a_ms": 491.3, "share": 0.567, "overlap_speedup": 1.76},
    },
    "scmoe": {  # ScMoE (ICML 2025): speed-ups per iteration over standard top-2, and overlap (Fig. 8)
        "A30-PCIe": {"share": 0.60, "source": "Table 1, SwinV2-MoE-S, 8×A30-PCIe; overlap, vs pipelined: Fig. 8",
                     "top1": (1.27, 1.39), "shared": (1.24, 1.35), "scmoe": (1.43, 1.66), "overlap": 0.70,
                     "scmoe_v1_train": 1.30, "vs_pipelined_top2": 1.42},
        "A800-NVLink": {"share": 0.15, "source": "Table 2, GPT2-MoE, 8×A800-NVLink; overlap Fig. 8",
                        "top1": None, "shared": (1.04, 1.06), "scmoe": (1.12, 1.17), "overlap": 1.00,
                        "scmoe_v1_train": 1.11, "vs_pipelined_top2": None},
    },
    "pec": {  # MoC-System (ASPLOS 2025) §6 Fig. 13 (ASTRA-sim, 128-2048 GPUs): smallest GPU count at which
        # the asynchronous snapshot fully overlaps the iteration
        "A800": {"full": "1024 (not below)", "pec": "128 (all counts)"},
        "H100": {"full": "above 1024 (not even at 1024)", "pec": "128 (all counts)"},
    },
}
SCMOE_REGIMES = (("A30-PCIe", SWINV2_MOE_S_STAGE3, A30_PCIE), ("A800-NVLink", GPT2_MOE_SMALL, A800_NVLINK))
PEC_GPUS = (128, 256, 512, 1024, 2048)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def calibration_section(quick: bool) -> tuple[list[list[str]], dict]:
    cal = calibrate(quick=quick)
    rows = [[r.term, r.what, f"{r.measured_s * 1e3:.3f}", f"{r.predicted_s * 1e3:.3f}",
             (("fit " + pct(r.error)) if abs(r.error) > 1e-9 else "fit") if r.fitted else pct(r.error)]
            for r in cal.rows]
    held_out = [abs(r.error) for r in cal.rows if not r.fitted]
    dev, link = cal.cluster.device, cal.cluster.intra
    result = {"rows": [dict(term=r.term, what=r.what, measured_s=r.measured_s, predicted_s=r.predicted_s,
                            fitted=r.fitted, error=r.error) for r in cal.rows],
              "rounds": cal.rounds, "median_abs_held_out_error": sorted(held_out)[len(held_out) // 2],
              "device": {"peak_fp32_flops": dev.peak_flops["fp32"], "gemm_efficiency": dev.gemm_efficiency,
                         "mem_Bps": dev.mem_Bps},
              "link": {"latency_s": link.latency_s, "bandwidth_Bps": link.bandwidth_Bps}}
    rows += checkpoint_bytes_rows(result)
    rows += overlap_pass_rows(result)
    return rows, result


def checkpoint_bytes_rows(result: dict) -> list[list[str]]:
    """The checkpoint model's bytes against the PEC benchmark's measured checkpoint (checkpoint.json)."""
    path = RESULTS_DIR / "checkpoint.json"
    if not path.exists():
        return []
    measured = json.loads(path.read_text())
    m = measured["model"]
    cfg = MoEConfig("checkpoint benchmark GPT-MoE", tokens=1, hidden=m["d_model"], ffn=m["d_ff"],
                    experts=m["num_experts"], blocks=m["n_layer"], moe_every=2, dtype="fp32",
                    embeddings=(2 * 256 + m["max_seq"]) * m["d_model"])  # byte vocab in and out, positions
    predicted = checkpoint_bytes(cfg, 1, FP32_ADAM) / checkpoint_bytes(cfg, None, FP32_ADAM)
    disk = measured["bytes"]["1"]["disk"] / measured["bytes"][str(m["num_experts"])]["disk"]
    result["checkpoint_k1_fraction"] = {"predicted": predicted, "measured_on_disk": disk,
                                        "error": predicted / disk - 1, "source": "checkpoint.json"}
    return [["checkpoint", "PEC K=1 bytes / full (checkpoint.json, on disk)", f"{disk:.1%}", f"{predicted:.1%}",
             pct(predicted / disk - 1)]]


def overlap_pass_rows(result: dict) -> list[list[str]]:
    """The overlap pass's own cost model against its measured EP regions (ep_overlap.json, another machine)."""
    path = RESULTS_DIR / "ep_overlap.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    errors = [(s["link"], s["variant"], s["region_ms"], s["predicted_region_ms"]) for s in data["settings"]
              if s["predicted_region_ms"] is not None]
    result["overlap_pass_regions"] = [dict(link=lk, variant=v, measured_ms=m, predicted_ms=p, error=p / m - 1)
                                      for lk, v, m, p in errors]
    cpu = data["machine"]["cpu_model"]
    return [["ep_overlap.json", f"{lk.split(' (')[0]} {v}: EP region ({cpu})", f"{m:.0f} ms", f"{p:.0f} ms",
             pct(p / m - 1)] for lk, v, m, p in errors]


def tutel_section() -> tuple[list[list[str]], list[dict]]:
    rows, out = [], []
    for gpus, paper in PAPER["tutel_table2"].items():
        cfg, cluster = tutel_table2(gpus), NDM_A100_V4.with_world(gpus)
        lin, hier = replay_layer(cfg, cluster, 1, "linear"), replay_layer(cfg, cluster, 1, "2dh")
        share = lin.comm_s / lin.total_s
        out.append({"gpus": gpus, "moe_ms": lin.total_s * 1e3, "compute_ms": lin.compute_s * 1e3,
                    "a2a_ms": lin.comm_s * 1e3, "share": share, "overlap_speedup": lin.total_s / lin.compute_s,
                    "a2a_2dh_ms": hier.comm_s * 1e3, "paper": paper})
        rows.append([str(gpus), f"{cluster.nodes}×{cluster.per_node}",
                     f"{lin.total_s * 1e3:.0f} / {paper['moe_ms']:.0f}",
                     f"{lin.compute_s * 1e3:.0f} / {paper['compute_ms']:.0f}",
                     f"{lin.comm_s * 1e3:.0f} / {paper['a2a_ms']:.0f} ({pct(lin.comm_s * 1e3 / paper['a2a_ms'] - 1)})",
                     f"{share:.1%} / {paper['share']:.1%}",
                     f"{lin.total_s / lin.compute_s:.2f}x / {paper['overlap_speedup']:.2f}x",
                     f"{hier.comm_s * 1e3:.0f}"])
    return rows, out


def scmoe_section() -> tuple[list[list[str]], list[dict]]:
    rows, out = [], []
    for regime, cfg, spec_cluster in SCMOE_REGIMES:
        paper = PAPER["scmoe"][regime]
        matched, factor = match_a2a_share(cfg, spec_cluster, paper["share"])
        for label, cluster in (("spec sheet", spec_cluster), (f"links ×{factor:.2f}: paper's share", matched)):
            share = a2a_share(cfg, cluster)
            base, piped = replay_pair(cfg, cluster, "top2", 1), replay_pair(cfg, cluster, "top2", None)
            for arch in ("top1", "shared", "scmoe"):
                r = replay_pair(cfg, cluster, arch, None if arch == "scmoe" else 1)
                train, infer = base.total_s / r.total_s, base.forward_s / r.forward_s
                ref = paper[arch]
                out.append({"regime": regime, "cluster": label, "model": cfg.name, "a2a_share": share,
                            "paper_share": paper["share"], "arch": arch, "chunks": r.chunks,
                            "train_speedup": train, "infer_speedup": infer, "overlap": r.overlap,
                            "vs_pipelined_top2": piped.total_s / r.total_s,
                            "paper": {"train": ref and ref[0], "infer": ref and ref[1],
                                      "overlap": paper["overlap"] if arch == "scmoe" else None,
                                      "vs_pipelined_top2": paper["vs_pipelined_top2"] if arch == "scmoe" else None,
                                      "source": paper["source"]}})
                rows.append([regime, label, f"{share:.0%} / {paper['share']:.0%}", f"{arch} (n={r.chunks})",
                             f"{train:.2f}x / {'-' if ref is None else f'{ref[0]:.2f}x'}",
                             f"{infer:.2f}x / {'-' if ref is None else f'{ref[1]:.2f}x'}",
                             f"{r.overlap:.0%}" + (f" / {paper['overlap']:.0%}" if arch == "scmoe" else ""),
                             f"{piped.total_s / r.total_s:.2f}x (top-2 n={piped.chunks})"
                             + (f" / {paper['vs_pipelined_top2']:.2f}x" if arch == "scmoe" and
                                paper["vs_pipelined_top2"] else "")])
    return rows, out


def pec_section() -> tuple[list[list[str]], list[dict], dict]:
    rows, out, first = [], [], {}
    for gpu in ("A800", "H100"):
        cluster = pec_sim_cluster(gpu)
        for gpus in PEC_GPUS:
            full, pec = (checkpoint_cost(PEC_SIM_MODEL, cluster, gpus, k) for k in (None, PEC_SIM_K))
            for name, c in (("full", full), ("pec", pec)):
                if c.overlaps:
                    first.setdefault(gpu, {}).setdefault(name, gpus)
            out.append({"gpu": gpu, "gpus": gpus, "iteration_ms": full.iteration_s * 1e3,
                        **{name: {"per_rank_MB": c.per_rank_bytes / 1e6, "snapshot_ms": c.snapshot_s * 1e3,
                                  "hidden": c.hidden, "stall_ms": c.stall_s * 1e3, "min_interval": c.min_interval}
                           for name, c in (("full", full), ("pec", pec))}})
            rows.append([gpu, str(gpus), f"{full.iteration_s * 1e3:.0f}",
                         *[f"{c.per_rank_bytes / 1e6:.0f} MB, {c.snapshot_s * 1e3:.0f} ms: {c.hidden:.0%} hidden"
                           f"{'' if c.overlaps else f', stall {c.stall_s * 1e3:.0f} ms'}; every ≥ {c.min_interval}"
                           for c in (full, pec)]])
    summary = {gpu: {name: first.get(gpu, {}).get(name) for name in ("full", "pec")} for gpu in ("A800", "H100")}
    return rows, out, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a quick calibration (half sizes, best of 3); writes no results file")
    args = ap.parse_args()
    console = Console(width=190)
    with progress(console) as bar:
        task = bar.add_task("calibration, Tutel, ScMoE, PEC", total=4)
        cal_rows, cal = calibration_section(args.quick)
        bar.advance(task)
        tutel_rows, tutel = tutel_section()
        bar.advance(task)
        scmoe_rows, scmoe = scmoe_section()
        bar.advance(task)
        pec_rows, pec, pec_first = pec_section()
        bar.advance(task)
    console.print(table(
        f"calibration on this machine: 2 gloo ranks × 1 thread, best of {cal['rounds']} rounds in turns "
        "(measured, and the model's prediction)",
        ["term", "what", "measured ms", "predicted ms", "error"], cal_rows,
        caption=f"error = predicted / measured − 1 (fit: a row the term was fitted on; the link's 3 by least "
                f"squares); median |error| of the held-out rows measured here "
                f"{cal['median_abs_held_out_error']:.0%}. The machine is shared (2 cores): run-to-run noise is "
                "large. ep_overlap.json rows: the overlap pass's own cost model (measured node times), read from "
                "that file, measured on another machine."))
    console.print(table(
        "Tutel Table 2, one MoE layer fwd+bwd on Azure NDm A100 v4 (ours, model / paper)",
        ["GPUs", "nodes", "MoE ms", "compute ms", "a2a ms (ours vs paper)", "a2a share", "full-overlap bound",
         "a2a ms, 2DH"], tutel_rows,
        caption="Ours: D = H = 4096, 2 experts per GPU, 64K tokens per GPU; assumed top-2, f = 1, fp32 under TF32 "
                "math, 50% GEMM efficiency, linear all-to-all over 25 GB/s per GPU of HDR InfiniBand. Why the "
                "a2a is low at 256 GPUs: the model's network has no congestion, so its a2a grows only with the "
                "remote share (7/8 → 31/32) and per-message latency; the paper's a2a at 256 GPUs ran at ~2/3 of "
                "the per-GPU rate it reached at 16. 2DH does not pay at these message sizes (≥ 8 MiB)."))
    console.print(table(
        "ScMoE vs standard top-2, one Block-MLP + Block-MoE pair (ours, model / paper, per iteration)",
        ["regime", "cluster", "a2a share", "variant", "train", "inference", "overlap", "vs pipelined top-2"],
        scmoe_rows,
        caption="Ours replays only the block pair; the paper's speed-ups are whole iterations (SwinV2: stages 1, 2, "
                "4 and the optimizer unchanged) and its node times include norms, softmax and element-wise ops "
                "the model leaves out, so ours are upper bounds. Top-2 with a capacity factor computes and sends "
                "k·f·T rows (f = 1.25 SwinV2, 2.0 GPT-2): 2f MLPs' worth against ScMoE's f + 1, so ScMoE's FLOPs "
                "are lower than top-2's here, not equal. ScMoE n: the best pipelining degree (the paper adds "
                "pipelining when communication exceeds its window); baselines unpipelined."))
    console.print(table(
        "PEC: does the asynchronous snapshot hide behind forward + backward? (ours, model)",
        ["GPU", "GPUs", "F&B ms", "full checkpoint per rank", f"PEC K={PEC_SIM_K} of {PEC_SIM_MODEL.experts}"],
        pec_rows,
        caption="Smallest GPU count where the snapshot hides, ours / paper (Fig. 13): "
                + "; ".join(f"{g}: full {pec_first[g]['full'] or '> 2048'} / {PAPER['pec'][g]['full']}, PEC "
                            f"{pec_first[g]['pec'] or '> 2048'} / {PAPER['pec'][g]['pec']}" for g in pec_first)
                + ". Weak scaling (tokens per GPU fixed), every byte written once over all GPUs: per-rank bytes "
                "fall as 1/W while the iteration stays, so full checkpoints hide only at large counts. "
                "'every ≥ n': fewest iterations between checkpoints (snapshot + persist at 0.25 GB/s per GPU)."))
    if args.quick:  # a smoke run: its noisy calibration is not a result
        return
    path = write_json(RESULTS_DIR / "sim.json", {
        "note": "model predictions except 'calibration', which is measured on this machine",
        "machine": machine_info(), "calibration": cal, "tutel_table2": tutel, "scmoe": scmoe,
        "pec": {"model": PEC_SIM_MODEL.name, "experts_per_ckpt": PEC_SIM_K, "sweep": pec,
                "first_overlapping_gpus": pec_first}, "paper": PAPER})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
