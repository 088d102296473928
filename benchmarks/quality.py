"""Model quality of the shortcut rewrites: byte-level language models trained on the CPython standard library
for a fixed token budget, validation loss per variant and seed.

Corpus: every `.py` file of this interpreter's standard library (site-packages excluded), sorted by path;
every 20th file is held out for validation, the rest is the training stream. Training samples random
windows of SEQ+1 bytes; validation is the mean loss over fixed windows of the held-out files.

Variants (GPT, 4 blocks, d_model 128, d_ff 512, 4 heads, MoE every other block, 8 experts):
  dense      gpt_dense: one MLP per token (half the FLOPs of the others in its MoE blocks)
  top2       gpt_moe: top-2 MoE, renormalized
  scmoe      gpt_moe converted by optimize(shortcut="scmoe"): top-1 on the shortcut + gated shared expert
  dgmoe      gpt_moe converted by optimize(shortcut="dgmoe"): the experts top-1 twice
  upcycled   gpt_dense trained for half the budget, then optimize(shortcut="scmoe", num_experts=8) and the
             other half (the upcycling use case: a trained dense model turned into ScMoE)
top2, scmoe, dgmoe and upcycled run two expert-sized MLPs per token in their MoE blocks, as the paper
compares them. AdamW (lr 1e-3, weight decay 0.1, 20 warm-up steps), batch 16 x 128 bytes, fp32, 2 threads.

Run: python benchmarks/quality.py [--quick] [--tokens N] [--seeds 0 1]
Results: a table (mean and spread over seeds per variant) and benchmarks/results/quality.json
(quality_quick.json with --quick): {"runs": [{"variant", "seed", "tokens", "val_loss", ...}]}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, machine_info, progress, stable_malloc, table, write_json  # noqa: E402

import moecompile  # noqa: E402
from moecompile.models import gpt_dense, gpt_moe  # noqa: E402

MODEL = dict(n_layer=4, d_model=128, d_ff=512, n_head=4, max_seq=128, num_experts=8)
SEQ, BATCH, LR, WARMUP, VAL_WINDOWS = 128, 16, 1e-3, 20, 256
VARIANTS = ("dense", "top2", "scmoe", "dgmoe", "upcycled")


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, validation bytes) of the standard library's .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        (val if i % 20 == 0 else train).extend(path.read_bytes())
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).long()  # noqa: E731  (bytearray: writable)
    return as_tensor(train), as_tensor(val)


def batch(data: torch.Tensor, gen: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - SEQ - 1, (n,), generator=gen)
    windows = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])          # [n, SEQ+1]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def val_loss(model, val: torch.Tensor) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same windows for every run
    losses = []
    for _ in range(VAL_WINDOWS // BATCH):
        x, y = batch(val, gen)
        losses.append(model(x, y)[1].item())
    return statistics.fmean(losses)


def build(variant: str, example: tuple):
    if variant in ("dense", "upcycled"):
        return moecompile.optimize(gpt_dense(**MODEL), example)
    top2 = gpt_moe(**MODEL)
    shortcut = variant if variant in ("scmoe", "dgmoe") else None
    return moecompile.optimize(top2, example, shortcut=shortcut)


def train(variant: str, seed: int, train_data, val_data, tokens: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    example = batch(train_data, torch.Generator().manual_seed(99), 2)
    model = build(variant, example)
    steps = max(1, tokens // (BATCH * SEQ))
    switch = steps // 2 if variant == "upcycled" else None
    opt = _optimizer(model)
    began = time.perf_counter()
    for step in range(steps):
        if step == switch:  # the dense model, half trained, becomes ScMoE; a fresh optimizer for its parameters
            model = moecompile.optimize(model, example, shortcut="scmoe", num_experts=MODEL["num_experts"])
            opt = _optimizer(model)
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        x, y = batch(train_data, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - began
    return {"variant": variant, "seed": seed, "tokens": steps * BATCH * SEQ, "val_loss": val_loss(model, val_data),
            "train_loss_last": loss.item(), "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": seconds}


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50k tokens, one seed")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    stable_malloc()
    torch.set_num_threads(2)
    tokens, seeds = (50_000, [0]) if args.quick else (args.tokens, args.seeds)
    train_data, val_data = corpus()
    runs = []
    with progress() as bar:
        task = bar.add_task("training", total=len(VARIANTS) * len(seeds))
        for seed in seeds:
            for variant in VARIANTS:
                runs.append(train(variant, seed, train_data, val_data, tokens))
                bar.advance(task)
    rows = []
    for variant in VARIANTS:
        losses = [r["val_loss"] for r in runs if r["variant"] == variant]
        mine = [r for r in runs if r["variant"] == variant]
        rows.append([variant, f"{statistics.fmean(losses):.4f}", f"{max(losses) - min(losses):.4f}",
                     " ".join(f"{v:.4f}" for v in losses), f"{mine[0]['params']:,}",
                     f"{statistics.fmean(r['train_seconds'] for r in mine):.0f}"])
    from rich.console import Console
    Console(width=140).print(table(
        f"validation loss (nats/byte), byte-level LM on the CPython stdlib, {runs[0]['tokens']:,} training tokens",
        ["variant", "mean", "spread (max-min)", "per seed", "parameters", "train s"], rows,
        caption=f"{len(train_data) / 1e6:.1f} MB training bytes, {len(val_data) / 1e6:.1f} MB held out; "
                f"seeds {seeds}"))
    path = write_json(RESULTS_DIR / ("quality_quick.json" if args.quick else "quality.json"),
                      {"machine": machine_info(), "model": MODEL, "seq": SEQ, "batch": BATCH, "lr": LR,
                       "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
