"""Small sizes: one MoE layer from 1 to 1024 tokens, whole-model generate() and a small training step, fp32 on
CPU (2 threads): Hugging Face eager against moecompile.optimize() (and, with --compiled, torch.compile).

Where a deployed or evaluated model spends its calls (decoding, short prompts, small steps) per-call
overheads matter as much as GEMMs; this measures them. Everything runs in one process, the
implementations in turns (common.time_round_robin: one call of each per round), with common.STABLE_MALLOC.

Shapes (transformers models, random init, 2 layers, vocab 256):
  mixtral  coarse experts: hidden 512, 8 experts of ffn 1024, top-2 (MixtralForCausalLM)
  qwen3    fine-grained experts: hidden 256, 64 experts of ffn 128, top-8 (Qwen3MoeForCausalLM)
Rows:
  layer no_grad T   the first layer's MoE block, forward under no_grad on [1, T, hidden], T in 1..256; each
                    call takes the next of 8 random inputs, and the caches are evicted before it (a read of
                    twice the last-level cache, untimed): in a model the other layers' weights pass through
                    the caches between two calls of a layer, and in turns the second implementation would
                    otherwise find the experts the first just read
  layer fwd+bwd T   forward and backward of (out · g).sum(), T in 256, 1024 (gradients cleared, untimed)
  generate B        model.generate: greedy, KV cache, prompt 32, exactly 64 new tokens, batch B; tokens/s
  train 2x64        model(ids, labels=ids).loss.backward() on 2 sequences of 64 tokens
Implementations: hf_eager (transformers' default experts path, grouped_mm), optimize (moecompile.optimize of
the block or model), and with --compiled inductor (torch.compile) and backend (torch.compile(backend=
"moecompile")) for the layer and training rows (compiling takes minutes here; generate is not compiled).
Each layer row also gives a floor, max(bytes / copy bandwidth, FLOPs / GEMM rate) with both rates measured
at start-up (kernel_ops.machine_floors): bytes = the expert weights of the experts that received tokens (mean
over the inputs) + router weight + input and output activations (x3 for fwd+bwd: weights read twice,
gradients written); FLOPs = router + 2·T·k·3·D·F (x3 for fwd+bwd). "overhead" is each implementation's
1-token time minus the 1-token floor: its fixed cost per call.
Correctness: every optimize/compiled row's outputs are checked against hf_eager (rel. error <= 1e-4; for
generate, the generated tokens must be equal).

Run: python benchmarks/small.py [--quick] [--compiled] [--repeats R]
  --quick     layer at 1 and 64 tokens and generate at batch 1 (make demo); writes small_quick.json
  --repeats   time every row R times (rounds in turns each time) and report the median ratio and its band
Results: rich tables on stdout and benchmarks/results/small.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS_DIR, fmt_ratio, machine_info, rel_err, stable_malloc, table,  # noqa: E402
                    time_round_robin, write_json, zero_grads)
from kernel_ops import machine_floors  # noqa: E402

import moecompile  # noqa: E402

TOLERANCE = 1e-4
NO_GRAD_TOKENS, TRAIN_TOKENS, BATCHES = (1, 4, 16, 64, 256), (256, 1024), (1, 8)
PROMPT, NEW_TOKENS, POOL = 32, 64, 8


def make_model(shape: str):
    """(model, hidden, ffn, experts, top_k) for a shape of the module docstring, random init, seed 0."""
    torch.manual_seed(0)
    if shape == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        cfg = MixtralConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                            num_experts_per_tok=2, max_position_embeddings=256)
        return MixtralForCausalLM(cfg).eval(), 512, 1024, 8, 2
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=64,
                         num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=256)
    return Qwen3MoeForCausalLM(cfg).eval(), 256, 128, 64, 8


def compiled(impl: str, fn, args: tuple):
    """fn as implementation `impl`: itself, optimize()d (compiled now on `args`), or torch.compile()d."""
    if impl == "hf_eager":
        return fn
    if impl == "optimize":
        return moecompile.optimize(fn, example_inputs=args)
    return torch.compile(fn, backend="inductor" if impl == "inductor" else "moecompile")


def timed(steps: dict, repeats: int, warmup: int, iters: int) -> dict[str, list[float]]:
    """Each step's median ms per repeat (every repeat times all steps in turns)."""
    runs = [time_round_robin(steps, warmup=warmup if r == 0 else 1, iters=iters) for r in range(repeats)]
    return {name: [run[name] for run in runs] for name in steps}


def ratios(ms: dict[str, list[float]], base: str = "hf_eager", higher_is_better: bool = False) -> dict:
    """Per implementation: median ms (or value) and the ratio to `base` (>1: faster), median and band."""
    out = {}
    for name, values in ms.items():
        per = [(v / b if higher_is_better else b / v) for v, b in zip(values, ms[base])]
        out[name] = {"value": statistics.median(values), "ratio": statistics.median(per),
                     "ratio_band": [min(per), max(per)]}
    return out


def expert_bytes_read(block, xs, E: int, k: int) -> float:
    """Mean bytes of expert weights a call reads over the inputs `xs`: the experts that got tokens."""
    per_expert = sum(p.numel() * p.element_size() for p in block.experts.parameters()) / E
    used = []
    with torch.no_grad():
        for x in xs:
            logits = x.reshape(-1, x.shape[-1]) @ block.gate.weight.t()                      # [T, E]
            used.append(logits.topk(k, dim=-1).indices.unique().numel())
    return statistics.mean(used) * per_expert


def layer_floor(block, xs, T, D, F_, E, k, rates, train: bool) -> float:
    """ms: max(bytes / bandwidth, FLOPs / GEMM rate), as the module docstring says."""
    weights = expert_bytes_read(block, xs, E, k) + E * D * 4
    bytes_, flops = weights + 2 * T * D * 4, 2 * T * D * E + 2 * T * k * 3 * D * F_
    if train:
        bytes_, flops = 3 * bytes_, 3 * flops
    return 1e3 * max(bytes_ / rates["bandwidth_Bps"], flops / rates["gemm_flops"])


EVICT = torch.ones(16 << 20)  # 64 MiB of fp32, twice this machine's 32 MiB last-level cache: written, so its
# pages are real (an untouched torch.empty maps every page to the one zero page, and reading it evicts nothing)


def evict_caches() -> None:
    """Read EVICT (clean lines: nothing to write back during the timed call that follows)."""
    EVICT.sum()


def cycling(fn, xs):
    """A step calling fn on the next input of `xs` each time."""
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(xs)
        return fn(xs[state["i"]])
    return step


def layer_rows(shape, model, dims, impls, args, rates, console) -> list[dict]:
    D, F_, E, k = dims
    block = model.model.layers[0].mlp
    fns = {impl: compiled(impl, block, (torch.randn(1, 16, D),)) for impl in impls}
    rows = []
    for T in args.no_grad_tokens:
        xs = [torch.randn(1, T, D) for _ in range(POOL)]
        _modes(block, fns, training=False)
        with torch.no_grad():
            ref = [block(x) for x in xs]
            errs = {impl: max(rel_err(fns[impl](x), r) for x, r in zip(xs, ref)) for impl in impls}
            ms = timed({impl: (cycling(fns[impl], xs), evict_caches) for impl in impls}, args.repeats, 3, args.iters)
        rows.append(dict(shape=shape, row=f"layer no_grad {T}", tokens=T, unit="ms", errors=errs,
                         floor_ms=layer_floor(block, xs, T, D, F_, E, k, rates, False), impls=ratios(ms)))
        console.log(f"{shape} layer no_grad {T}: " + _summary(rows[-1]))
    for T in args.train_tokens:
        xs = [torch.randn(1, T, D, requires_grad=True) for _ in range(2)]
        cot = torch.randn(1, T, D)
        _modes(block, fns, training=True)
        params = list(block.parameters())
        steps, errs, ref = {}, {}, None
        for impl in impls:
            fn = fns[impl]
            outs = _fwd_bwd(fn, xs[0], cot, params)
            ref = ref or outs
            errs[impl] = max(rel_err(a, b) for a, b in zip(outs, ref))
            steps[impl] = (cycling(lambda x, fn=fn: (fn(x) * cot).sum().backward(), xs), zero_grads(params + xs))
        ms = timed(steps, args.repeats, 2, max(args.iters // 3, 3))
        rows.append(dict(shape=shape, row=f"layer fwd+bwd {T}", tokens=T, unit="ms", errors=errs,
                         floor_ms=layer_floor(block, xs, T, D, F_, E, k, rates, True), impls=ratios(ms)))
        console.log(f"{shape} layer fwd+bwd {T}: " + _summary(rows[-1]))
    _modes(block, fns, training=False)
    return rows


def _modes(block, fns, training: bool) -> None:
    """train()/eval() on the block and on every implementation of it (optimize() returns a copy)."""
    for m in [block, *fns.values()]:
        m.train(training)


def _fwd_bwd(fn, x, cot, params):
    for t in params + [x]:
        t.grad = None
    out = fn(x)
    (out * cot).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in params]


def generate_rows(shape, model, impls, args, console) -> list[dict]:
    rows = []
    opt = moecompile.optimize(model)  # compiles at its first call: the first (untimed) generate's prefill
    fns = {"hf_eager": model, "optimize": opt}
    for B in args.batches:
        ids = torch.randint(0, 256, (B, PROMPT), generator=torch.Generator().manual_seed(B))
        kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                  pad_token_id=0)
        with torch.no_grad():
            outs = {impl: fns[impl].generate(ids, **kw) for impl in fns}
            same = {impl: bool(torch.equal(outs[impl], outs["hf_eager"])) for impl in fns}
            ms = timed({impl: (lambda f=fns[impl]: f.generate(ids, **kw), None) for impl in fns},
                       args.repeats, 1, args.gen_iters)
        tok_s = {impl: [B * NEW_TOKENS / (v / 1e3) for v in values] for impl, values in ms.items()}
        rows.append(dict(shape=shape, row=f"generate batch {B}", tokens=B * NEW_TOKENS, unit="tokens/s",
                         tokens_equal=same, impls=ratios(tok_s, higher_is_better=True)))
        console.log(f"{shape} generate batch {B}: " + _summary(rows[-1]))
    return rows


def train_row(shape, model, impls, args, console) -> dict:
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    model.train()
    params = list(model.parameters())
    fns = {impl: compiled(impl, model, (ids,)) if impl != "optimize" else
           moecompile.optimize(model, example_inputs=(ids,), example_kwargs={"labels": ids}) for impl in impls}
    steps, errs, ref = {}, {}, None
    for impl, fn in fns.items():
        zero_grads(params)()
        loss = fn(ids, labels=ids).loss
        loss.backward()
        outs = [loss.detach()] + [p.grad for p in params if p.grad is not None]
        ref = ref or outs
        errs[impl] = max(rel_err(a, b, floor=1e-3 * max(g.abs().max().item() for g in ref[1:]))
                         for a, b in zip(outs, ref))
        steps[impl] = (lambda fn=fn: fn(ids, labels=ids).loss.backward(), zero_grads(params))
    ms = timed(steps, args.repeats, 2, max(args.iters // 3, 3))
    model.eval()
    row = dict(shape=shape, row="train 2x64", tokens=128, unit="ms", errors=errs, impls=ratios(ms))
    console.log(f"{shape} train 2x64: " + _summary(row))
    return row


def _summary(row) -> str:
    return ", ".join(f"{impl} {v['value']:.2f} {row['unit']} ({v['ratio']:.2f}x)" for impl, v in row["impls"].items())


def _band(values: dict, impl: str) -> str:
    """ratio [band] of `impl` in a row, "-" where it did not run (generate is not compiled)."""
    if impl not in values:
        return "-"
    return "{} [{:.2f}-{:.2f}]".format(fmt_ratio(values[impl]["ratio"]), *values[impl]["ratio_band"])


def render(rows, impls, console) -> None:
    cols = ["shape", "row"] + [f"{i} ratio" for i in impls if i != "hf_eager"] + ["hf_eager", "optimize", "unit",
                                                                                   "floor ms", "max err"]
    body = []
    for r in rows:
        v = r["impls"]
        err = max((e for i, e in r.get("errors", {}).items()), default=0.0)
        body.append([r["shape"], r["row"]] + [_band(v, i) for i in impls if i != "hf_eager"] +
                    [f"{v['hf_eager']['value']:.2f}", f"{v['optimize']['value']:.2f}", r["unit"],
                     f"{r['floor_ms']:.3f}" if "floor_ms" in r else "-",
                     "tokens equal" if r.get("tokens_equal", {}).get("optimize") else
                     "TOKENS DIFFER" if "tokens_equal" in r else f"{err:.1e}"])
    console.print(table("Small sizes: ratio = HF eager time / implementation time (>1: faster) [band over repeats]",
                        cols, body))
    over = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        one = next((r for r in rows if r["shape"] == shape and r["row"] == "layer no_grad 1"), None)
        if one:
            o = {i: one["impls"][i]["value"] - one["floor_ms"] for i in impls}
            over.append([shape, "layer, 1 token"] + [f"{1e3 * o[i]:.0f} µs" for i in impls] +
                        [f"{o['optimize'] / o['hf_eager']:.0%}"])
    console.print(table("Fixed per-call overhead: 1-token time minus its floor", ["shape", "call"] + impls +
                        ["optimize / hf_eager"], over))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compiled", action="store_true", help="add torch.compile rows (inductor, backend)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--gen-iters", type=int, default=3)
    ap.add_argument("--shapes", default="mixtral,qwen3")
    args = ap.parse_args()
    stable_malloc()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    warnings.filterwarnings("ignore")
    args.no_grad_tokens = (1, 64) if args.quick else NO_GRAD_TOKENS
    args.train_tokens = () if args.quick else TRAIN_TOKENS
    args.batches = (1,) if args.quick else BATCHES
    if args.quick:
        args.iters, args.gen_iters = min(args.iters, 15), min(args.gen_iters, 2)
    impls = ["hf_eager", "optimize"] + (["inductor", "backend"] if args.compiled else [])
    console = Console()
    rates = machine_floors(torch.device("cpu"))
    rows, t0 = [], time.perf_counter()
    for shape in args.shapes.split(","):
        model, D, F_, E, k = make_model(shape)
        rows += layer_rows(shape, model, (D, F_, E, k), impls, args, rates, console)
        rows += generate_rows(shape, model, impls, args, console)
        if not args.quick:
            rows.append(train_row(shape, model, impls, args, console))
    render(rows, impls, console)
    path = write_json(RESULTS_DIR / ("small_quick.json" if args.quick else "small.json"), {
        "machine": machine_info(), "rates": rates, "repeats": args.repeats, "iters": args.iters,
        "seconds": round(time.perf_counter() - t0, 1), "rows": rows})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
