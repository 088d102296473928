"""`torch.compile(model, backend="moecompile")` on a Hugging Face Mixtral, next to Inductor.

    make demo            # or: .venv/bin/python examples/compile_backend.py

1. A tiny random-weight Mixtral (2 layers, hidden 256, 8 experts, top-2) is compiled with fullgraph=True by
   the moecompile backend, which lifts each MoE block inside Dynamo's graph and hands the rest to Inductor.
2. explain() shows the blocks and the canonical ops in the compiled forward and backward graphs.
3. One training step's loss and every gradient are checked against eager; then training steps of eager,
   Inductor and the moecompile backend are timed in turns (median of 6), with the compile times.
"""
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import moecompile

STEPS = 6


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        use_cache=False))


def main():
    torch.set_num_threads(2)
    console = Console(width=130)
    model = mixtral()
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))

    def step(m):
        for p in model.parameters():
            p.grad = None
        began = time.perf_counter()
        loss = m(ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - began, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    impls = {"eager": model, "torch.compile (Inductor)": torch.compile(model),
             'torch.compile(backend="moecompile")': torch.compile(model, backend="moecompile", fullgraph=True)}
    first = {name: step(m) for name, m in impls.items()}  # compiles
    _, want_loss, want = first["eager"]
    _, loss, grads = first['torch.compile(backend="moecompile")']
    worst = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in want.items())
    console.print(moecompile.explain(impls['torch.compile(backend="moecompile")']))
    console.print(f"moecompile backend vs eager: loss {loss.item():.6f} vs {want_loss.item():.6f}, largest relative "
                  f"gradient difference {worst:.1e}")
    times = {name: [] for name in impls}
    for _ in range(STEPS):
        for name, m in impls.items():
            times[name].append(step(m)[0])
    table = Table(title="Mixtral (tiny) training step, 1024 tokens, fp32, 2 threads")
    for col in ("implementation", "first call s (compiles)", "step ms (median)", "vs Inductor"):
        table.add_column(col)
    inductor = statistics.median(times["torch.compile (Inductor)"])
    for name, t in times.items():
        table.add_row(name, f"{first[name][0]:.1f}", f"{statistics.median(t) * 1e3:.1f}",
                      f"{inductor / statistics.median(t):.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
