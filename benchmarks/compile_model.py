"""Whole-model training step under torch.compile: backend="moecompile" against Inductor on the same model.

What is measured: one step = forward of the whole model on a fixed batch, its own loss, `.backward()`
(gradients cleared between steps, outside the timed region); the median of `--iters` steps after warm-up,
the implementations timed in turns (common.time_round_robin) with the glibc malloc tunables of
common.STABLE_MALLOC. fp32, 2 threads.

Models (random weights):
  gpt-moe    the 8-expert GPT-MoE of benchmarks/quality.py (4 blocks, MoE every other one, top-2, d_model
             128, d_ff 512), batch 16 x 128 bytes
  mixtral    transformers' MixtralForCausalLM, 2 layers, hidden 512, ffn 1024, 8 experts top-2, vocab 256,
             batch 4 x 256 tokens (the MoE layers carry most of the step)
  qwen3-moe  transformers' Qwen3MoeForCausalLM with fine-grained experts (as in Qwen3-MoE, OLMoE, DeepSeek):
             2 layers, hidden 256, 64 experts of ffn 128, top-8, vocab 256, batch 4 x 256 tokens
Transformers 5 runs its experts with `torch._grouped_mm` by default ("grouped_mm"), so the Hugging Face
rows here are grouped GEMMs already, not a loop over experts.
Implementations: eager; inductor = torch.compile(model); moecompile_backend = torch.compile(model,
backend="moecompile"); optimize = moecompile.optimize(model) (no torch.compile). Dynamo's
capture_scalar_outputs and capture_dynamic_output_shape_ops are on for every row (the backend turns them on;
Inductor gets the same graphs). Every row's loss and
gradients are checked against eager (max |a-b| / max |ref| over every tensor, the scale at least 1e-3 of the
largest gradient's, <= 1e-4). compile s: building it
and its first call (forward and backward), when every one of them compiles.

Run: python benchmarks/compile_model.py [--quick]   (--quick: gpt-moe only, 2 iterations)
Results: a table on stdout, benchmarks/results/compile_model.json (compile_model_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS_DIR, fmt_ms, fmt_ratio, machine_info, progress, rel_err, stable_malloc,  # noqa: E402
                    table, time_round_robin, write_json, zero_grads)
from quality import BATCH, MODEL, SEQ  # noqa: E402

import moecompile  # noqa: E402
from moecompile.models import gpt_moe  # noqa: E402

IMPLS = ("eager", "inductor", "moecompile_backend", "optimize")
TOLERANCE = 1e-4


def gpt_case():
    ids = torch.randint(0, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return gpt_moe(**MODEL), (ids[:, :-1], ids[:, 1:]), {}, lambda out: out[1]


def mixtral_case():
    from transformers import MixtralConfig, MixtralForCausalLM
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
        use_cache=False))
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    return model, (ids,), {"labels": ids}, lambda out: out.loss


def qwen3_moe_case():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=256, use_cache=False))
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    return model, (ids,), {"labels": ids}, lambda out: out.loss


CASES = {"gpt-moe": gpt_case, "mixtral": mixtral_case, "qwen3-moe": qwen3_moe_case}


def build(impl: str, model, args, kwargs):
    if impl == "eager":
        return model
    if impl == "inductor":
        return torch.compile(model)
    if impl == "moecompile_backend":
        return torch.compile(model, backend="moecompile")
    return moecompile.optimize(model, args, kwargs)


# what backend="moecompile" turns on when it is looked up, set here for every row: with it Inductor too gets
# GPT-MoE's expert loop (`nonzero`) in one graph instead of a graph break per expert
torch._dynamo.config.capture_scalar_outputs = True
torch._dynamo.config.capture_dynamic_output_shape_ops = True


def run_case(name: str, iters: int, warmup: int, tick) -> list[dict]:
    torch.manual_seed(0)
    model, args, kwargs, loss_of = CASES[name]()
    params = dict(model.named_parameters())
    rows, steps, ref = [], {}, None
    for impl in IMPLS:
        row = {"model": name, "impl": impl}
        rows.append(row)
        for p in params.values():
            p.grad = None
        t0 = time.perf_counter()
        fn = build(impl, model, args, kwargs)
        loss = loss_of(fn(*args, **kwargs))
        loss.backward()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        grads = [loss.detach()] + [p.grad for p in params.values()]
        if ref is None:
            ref = grads
            # a gradient is compared at >= 1e-3 of the largest one's scale: one that nearly cancels measures
            # summation order, not the implementation
            floor = 1e-3 * max(g.abs().max().item() for g in ref[1:] if g is not None)
        else:
            row["max_rel_err"] = max(rel_err(a, b, floor) for a, b in zip(grads, ref) if b is not None)
        if impl == "moecompile_backend":
            layers = moecompile.explain(fn).moe_layers
            row["lifted"] = f"{sum(m.rewritten for m in layers)}/{len(layers)}"
        steps[impl] = ((lambda fn=fn: loss_of(fn(*args, **kwargs)).backward()), zero_grads(params.values()))
        tick()
    times = time_round_robin(steps, warmup=warmup, iters=iters)
    for row in rows:
        row["step_ms"] = round(times[row["impl"]], 2)
        row["ratio_vs_inductor"] = round(times["inductor"] / times[row["impl"]], 3)
        row["ratio_vs_eager"] = round(times["eager"] / times[row["impl"]], 3)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="gpt-moe only, 2 iterations")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per row (median; default 7)")
    args = ap.parse_args()
    stable_malloc()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    cases = ["gpt-moe"] if args.quick else list(CASES)
    iters = args.iters or (2 if args.quick else 7)
    console = Console(width=150)
    rows, began = [], time.perf_counter()
    with progress(console) as bar:
        task = bar.add_task("building and compiling", total=len(cases) * len(IMPLS))
        for name in cases:
            rows += run_case(name, iters, 1 if args.quick else 3, lambda: bar.advance(task))
            torch._dynamo.reset()
    cells = [[r["model"], r["impl"], fmt_ms(r["step_ms"]), fmt_ratio(r["ratio_vs_inductor"]),
              fmt_ratio(r["ratio_vs_eager"]), f"{r['compile_s']:.1f}", r.get("lifted", "-"),
              "reference" if "max_rel_err" not in r else
              (f"ok {r['max_rel_err']:.0e}" if r["max_rel_err"] <= TOLERANCE else f"MISMATCH {r['max_rel_err']:.1e}")]
             for r in rows]
    console.print(table("whole-model training step", ["model", "impl", "step ms", "vs inductor", "vs eager",
                                                      "compile s", "MoE blocks lifted", "check vs eager"], cells,
                        caption=f"fp32, {torch.get_num_threads()} threads, median of {iters}; ratios = other_ms / "
                                "impl_ms (>1: impl faster)"))
    path = write_json(RESULTS_DIR / ("compile_model_quick.json" if args.quick else "compile_model.json"),
                      {"machine": machine_info(), "iters": iters, "seconds": round(time.perf_counter() - began, 1),
                       "rows": rows})
    console.print(f"wrote {path}")
    bad = [r for r in rows if r.get("max_rel_err", 0) > TOLERANCE]
    if bad:
        console.print(f"[bold red]{len(bad)} row(s) differ from eager by more than {TOLERANCE:g}[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
