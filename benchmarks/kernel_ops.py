"""Per-op kernel benchmark: each canonical MoE op on each kernel backend, against the pure-torch reference
and against this machine's floor for the op.

What is measured, per case and op (route, dispatch, expert_ffn, combine), for the forward alone and for
forward + backward (`.backward()` of `(out * g).sum()`, fixed random cotangent g, grads cleared outside the
timed region):
  reference  the definitions in moecompile/kernels/reference.py, called directly and differentiated by plain
             autograd: what an eager PyTorch MoE does
  native     the canonical op (moecompile::*) with backend="native", called as optimize()'s models call it
             (ops.call: in eager, the op's body under an autograd.Function)
  triton     the same with backend="triton", only when a CUDA device is present (Triton on CPU is an
             interpreter for tests; timing it would measure numpy)
Median of --iters samples after warm-up, implementations in turns (benchmarks/common.py); a sample repeats an
op that takes less than 20 ms enough times to last about 20 ms (reported: time per call). fp32, glibc malloc
tunables as in moe_layer.py. Inputs: tokens [T, D] ~ N(0, 1), router logits ~ N(0, 1), weights ~ N(0, 0.02).

Floors. At start-up the script measures this machine's copy bandwidth (a 256 MiB tensor copy) and fp32
GEMM rate (1024³ matmul, the faster of aten's and oneDNN's) once; each op's floor is
max(bytes it must move / bandwidth, FLOPs / GEMM rate):
  route      reads logits [T, E], writes weights and indices [T, k]
  dispatch   reads x [T, D] once and the indices, writes x_perm [N, D] and order [N]
  expert_ffn 2·N·D·(F1 + F) FLOPs forward (F1 = 2F when gated), 2x that again backward
  combine    reads y [N, D], weights, order, writes out [T, D]
(backward: the same accounting for the gradients read and written). "of floor" = floor / time: 100% is the
best this machine can do, so it also says how much room is left.

Correctness: every implementation's forward output is checked against the reference before timing
(max |a-b| / max |ref| <= 1e-4).

Run: python benchmarks/kernel_ops.py [--quick] [--iters N]
Results: a rich table on stdout and benchmarks/results/kernel_ops.json (kernel_ops_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS_DIR, fmt_ms, fmt_ratio, fwd_bwd_step, machine_info, progress, rel_err,  # noqa: E402
                    stable_malloc, table, time_round_robin, write_json, zero_grads)

from moecompile.ir import ops  # noqa: E402
from moecompile.kernels import onednn, reference  # noqa: E402

# name, T, D, F, E, k, capacity factor (None: dropless)
CASES = [("E8-top2 (main)", 4096, 512, 1024, 8, 2, None),
         ("E32-top4", 4096, 512, 512, 32, 4, None),
         ("E8-top1 capacity 1.0", 4096, 512, 1024, 8, 1, 1.0),
         ("decode T=64", 64, 512, 1024, 8, 2, None)]
QUICK_CASES = [("E8-top2 (quick)", 512, 256, 512, 8, 2, None)]
OPS = ("route", "dispatch", "expert_ffn", "combine")
TOLERANCE = 1e-4


def machine_floors(device) -> dict:
    """Copy bandwidth (bytes/s: read + write) and fp32 GEMM rate (FLOP/s), best of a few runs; on CPU the
    GEMM rate is the faster library's, aten's (MKL) or oneDNN's (kernels/onednn.py, where torch has it:
    moecompile's expert GEMMs may run on it, and a floor must be the fastest the machine does)."""
    src = torch.empty(64 << 20, device=device).normal_()
    dst = torch.empty_like(src)
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    gemms = [lambda: a @ b] + ([lambda: onednn.linear(a, b)] if device.type == "cpu" and onednn.available() else [])
    copy_s, mm_s = [], []
    for _ in range(20):  # best of many: a floor must not be lowered by one slow run on a shared machine
        copy_s.append(_timed(lambda: dst.copy_(src), device))
        mm_s += [_timed(gemm, device) for gemm in gemms]
    return {"bandwidth_Bps": 2 * src.numel() * 4 / min(copy_s), "gemm_flops": 2 * 1024 ** 3 / min(mm_s)}


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_case(T, D, F, E, k, cap_factor, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    w = {"w1": torch.randn(E, F, D, generator=g) * 0.02, "w2": torch.randn(E, D, F, generator=g) * 0.02,
         "w3": torch.randn(E, F, D, generator=g) * 0.02}
    capacity = -1 if cap_factor is None else int(cap_factor * T * k / E)
    to = lambda t: t.to(device).requires_grad_(t.is_floating_point())  # noqa: E731
    return to(x), to(logits), {n: to(t) for n, t in w.items()}, capacity


def op_inputs(x, logits, E, k, capacity):
    """Each op's inputs as the ops before it would produce them (computed once, untimed, shared by every
    backend)."""
    with torch.no_grad():
        weights, idx, _ = reference.route(logits, None, E, k, "softmax", k > 1, 1.0, 1, 1, "max")
        x_perm, order, counts = reference.dispatch(x, idx, E, capacity, 0)
    g = torch.Generator().manual_seed(1)
    y_perm = torch.randn(x_perm.shape, generator=g).to(x.device)
    return {"idx": idx, "order": order, "counts": counts, "x_perm": x_perm.detach().requires_grad_(),
            "y_perm": y_perm.requires_grad_(), "weights": weights.detach().requires_grad_()}


def op_runners(backend, x, logits, w, E, k, capacity, inp):
    """For each op: (a function of nothing → its output, through `backend`, the leaves it differentiates);
    "reference" calls the plain functions under autograd."""
    impl = reference if backend == "reference" else None
    route = impl.route if impl else lambda *a: ops.call(ops.route, *a, backend)
    dispatch = impl.dispatch if impl else lambda *a: ops.call(ops.dispatch, *a, None, backend)
    ffn = impl.expert_ffn if impl else lambda *a: ops.call(ops.expert_ffn, *a, torch.is_grad_enabled(), backend)[0]
    combine = impl.combine if impl else lambda *a: ops.call(ops.combine, *a, backend)
    # the same stacked [E, ...] parameters, each passed the way that implementation takes them best: the
    # reference loops over unbound per-expert views (one stack of the gradients); the ops take the stacked
    # tensor whole, as optimize() passes it
    lists = {n: list(t.unbind(0)) if impl else [t] for n, t in w.items()}
    absent = None if impl else []
    return {
        "route": (lambda: route(logits, None, E, k, "softmax", k > 1, 1.0, 1, 1, "max")[0], [logits]),
        "dispatch": (lambda: dispatch(x, inp["idx"], E, capacity, 0)[0], [x]),
        "expert_ffn": (lambda: ffn(inp["x_perm"], inp["counts"], lists["w1"], lists["w2"], lists["w3"], absent,
                                   absent, absent, "swiglu", "", 1.702, 7.0), [inp["x_perm"], *w.values()]),
        "combine": (lambda: combine(inp["y_perm"], inp["order"], inp["weights"], None),
                    [inp["y_perm"], inp["weights"]]),
    }


def floor_seconds(op, passes, T, D, F, E, k, N, floors):
    """max(bytes / bandwidth, FLOPs / GEMM rate) for one op (see the module docstring)."""
    f32, i64 = 4, 8
    fwd_bytes = {"route": T * E * f32 + T * k * (f32 + i64),
                 "dispatch": T * k * i64 + T * D * f32 + N * (D * f32 + i64),
                 "expert_ffn": 2 * N * D * f32 + 3 * E * F * D * f32,
                 "combine": N * (D * f32 + i64) + T * k * f32 + T * D * f32}[op]
    bwd_bytes = {"route": 2 * T * E * f32 + T * k * (f32 + i64),
                 "dispatch": N * (D * f32 + i64) + T * D * f32,
                 "expert_ffn": 3 * N * D * f32 + 6 * E * F * D * f32,
                 "combine": T * D * f32 + 2 * N * D * f32 + 2 * T * k * f32 + N * i64}[op]
    flops = 2 * N * D * 3 * F if op == "expert_ffn" else 0   # gate, up and down projections
    total_bytes = fwd_bytes + (bwd_bytes if passes == "fwd+bwd" else 0)
    total_flops = flops * (3 if passes == "fwd+bwd" else 1)
    return max(total_bytes / floors["bandwidth_Bps"], total_flops / floors["gemm_flops"]), total_bytes, total_flops


def bench_case(case, backends, floors, device, iters):
    name, T, D, F, E, k, cap = case
    x, logits, w, capacity = make_case(T, D, F, E, k, cap, device)
    inp = op_inputs(x, logits, E, k, capacity)
    runners = {b: op_runners(b, x, logits, w, E, k, capacity, inp) for b in backends}
    N = inp["order"].numel()
    leaves = [x, logits, *w.values()]
    rows = []
    for op in OPS:
        want = runners["reference"][op][0]()
        for b in backends:
            err = rel_err(runners[b][op][0](), want)
            if err > TOLERANCE:
                raise SystemExit(f"{name}/{op}: backend {b} differs from the reference (rel err {err:.1e})")
        for passes in ("fwd", "fwd+bwd"):
            ctx = torch.no_grad() if passes == "fwd" else torch.enable_grad()
            steps, reps = {}, {}
            with ctx:
                for b in backends:
                    fn, inputs = runners[b][op]
                    step = fn if passes == "fwd" else fwd_bwd_step(fn, torch.randn_like(want))
                    steps[b], reps[b] = _repeated(step, zero_grads(leaves + inputs), device)
                times = time_round_robin({b: (s, None) for b, s in steps.items()}, warmup=2, iters=iters)
            times = {b: t / reps[b] for b, t in times.items()}
            floor_s, nbytes, nflops = floor_seconds(op, passes, T, D, F, E, k, N, floors)
            rows.append({"case": name, "op": op, "pass": passes, "T": T, "D": D, "F": F, "E": E, "k": k, "N": N,
                         "ms": times, "bytes": nbytes, "flops": nflops, "floor_ms": floor_s * 1e3,
                         "speedup_vs_reference": {b: times["reference"] / times[b] for b in backends}})
    return rows


def _repeated(step, reset, device, min_s=0.02):
    """(a step that runs `reset(); step()` n times, then syncs; n). n makes one timed sample last about
    `min_s`: a single call of a microsecond-scale op (route at 64 tokens) is below this machine's noise.
    The resets (dropping .grad) are inside the timed region, the same few µs for every implementation."""
    reset()
    step()
    _sync(device)
    reset()
    once = _timed(step, device)
    n = max(1, min(1000, round(min_s / max(once, 1e-7))))

    def run():
        for _ in range(n):
            reset()
            step()
        _sync(device)
    return run, n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case, 2 iterations")
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args()
    stable_malloc()
    console = Console(width=160)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["reference", "native"] + (["triton"] if device.type == "cuda" else [])
    cases = QUICK_CASES if args.quick else CASES
    iters = 2 if args.quick else args.iters
    floors = machine_floors(device)
    console.print(f"machine floors on {device.type}: copy {floors['bandwidth_Bps'] / 1e9:.1f} GB/s, "
                  f"fp32 GEMM {floors['gemm_flops'] / 1e9:.0f} GFLOP/s")
    rows = []
    with progress(console) as bar:
        task = bar.add_task("cases", total=len(cases))
        for case in cases:
            rows += bench_case(case, backends, floors, device, iters)
            bar.advance(task)
    fast = backends[-1]
    cols = ["case", "op", "pass"] + [f"{b} ms" for b in backends] + [f"{b} speedup" for b in backends[1:]] + [
        f"{fast} rate", "floor ms", f"{fast} of floor"]
    out = []
    for r in rows:
        t = r["ms"][fast] / 1e3
        rate = f"{r['flops'] / t / 1e9:.0f} GFLOP/s" if r["flops"] else f"{r['bytes'] / t / 1e9:.1f} GB/s"
        out.append([r["case"], r["op"], r["pass"]] + [fmt_ms(r["ms"][b]) for b in backends]
                   + [fmt_ratio(r["speedup_vs_reference"][b]) for b in backends[1:]]
                   + [rate, f"{r['floor_ms']:.2f}", f"{100 * r['floor_ms'] / r['ms'][fast]:.0f}%"])
    slowest = min(rows, key=lambda r: r["speedup_vs_reference"][fast])
    caption = (f"speedup = reference ms / backend ms. Lowest {fast} speedup: "
               f"{slowest['speedup_vs_reference'][fast]:.2f}x ({slowest['case']}, {slowest['op']}, {slowest['pass']})")
    console.print(table(f"moecompile kernels on {device.type}, fp32, median of {iters}", cols, out, caption))
    path = write_json(RESULTS_DIR / ("kernel_ops_quick.json" if args.quick else "kernel_ops.json"),
                      {"machine": machine_info(), "device": device.type, "floors": floors, "iters": iters,
                       "backends": backends, "rows": rows})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
