"""moecompile quickstart: optimize two MoE models, see what was found, and time a training step.

    make demo            # or: .venv/bin/python examples/quickstart.py

1. The project's reference GPT-MoE (top-2 MoE every other block, 8 experts) and a tiny random-weight
   Hugging Face Mixtral go through `moecompile.optimize`.
2. `moecompile.explain` prints what was found and rewritten.
3. A forward+backward step of eager vs optimized is timed in the same run (median of 8 alternating
   steps), and the gradients are checked equal.
The models here are small, so the MoE layers are a minority of the step; benchmarks/moe_layer.py
measures one MoE layer at a realistic size.
"""
import statistics
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import moecompile
from moecompile.models import gpt_moe

console = Console()
STEPS = 8


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, router_jitter_noise=0.0, max_position_embeddings=512)
    return MixtralForCausalLM(cfg)


def loss_of(model, ids):
    out = model(ids, labels=ids) if hasattr(model, "config") else model(ids, ids)
    return out.loss if hasattr(out, "loss") else out[1]


def step_ms(eager, fast, ids) -> tuple[float, float]:
    """Median training-step time of each model, alternating steps so both see the same machine state."""
    times = {eager: [], fast: []}
    for i in range(STEPS + 2):
        for model in (eager, fast):
            t = time.perf_counter()
            loss_of(model, ids).backward()
            if i >= 2:  # two warm-up steps
                times[model].append((time.perf_counter() - t) * 1e3)
            model.zero_grad(set_to_none=True)
    return statistics.median(times[eager]), statistics.median(times[fast])


def max_grad_diff(eager, fast, ids) -> float:
    grads = []
    for m in (eager, fast):
        m.zero_grad(set_to_none=True)
        loss_of(m, ids).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    eager.zero_grad(set_to_none=True)
    return max((a - b).abs().max().item() / b.abs().max().clamp_min(1e-12).item() for a, b in zip(*grads))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    models = {"GPT-MoE (reference, 8 experts, top-2)": gpt_moe(n_layer=4, d_model=256, d_ff=1024),
              "Hugging Face Mixtral (tiny, random weights)": tiny_mixtral()}
    ids = torch.randint(0, 256, (4, 256))
    speed = Table(title=f"training step (forward+backward), {ids.numel()} tokens, {torch.get_num_threads()} threads")
    for col in ("model", "eager ms", "moecompile ms", "speed-up", "max grad rel. diff"):
        speed.add_column(col)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("optimizing and timing", total=len(models) * 2)
        for name, eager in models.items():
            fast = moecompile.optimize(eager, (ids,), {"labels": ids} if hasattr(eager, "config") else None)
            bar.advance(task)
            console.print(f"[bold]{name}[/]")
            console.print(moecompile.explain(fast))
            diff = max_grad_diff(eager, fast, ids)
            t_eager, t_fast = step_ms(eager, fast, ids)
            bar.advance(task)
            speed.add_row(name, f"{t_eager:.1f}", f"{t_fast:.1f}", f"{t_eager / t_fast:.2f}x", f"{diff:.1e}")
    console.print(speed)


if __name__ == "__main__":
    main()
