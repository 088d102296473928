"""moecompile quickstart: optimize MoE models, see what was found, and time training steps.

    make demo            # or: .venv/bin/python examples/quickstart.py

1. The project's reference GPT-MoE (top-2 MoE every other block, 8 experts), a tiny random-weight Hugging
   Face Mixtral, and one Hugging Face Mixtral MoE layer at the size of benchmarks/moe_layer.py's main case
   go through `moecompile.optimize`.
2. `moecompile.explain` prints what was found and rewritten.
3. A forward+backward step of eager vs optimized is timed in the same run (median of 8 steps, the two
   alternating), and the gradients are checked equal. In the whole models the MoE layers are a minority of
   the step (attention, dense layers, embeddings), so the whole-model speed-up is smaller than the layer's.
4. Kernel backends: the same Mixtral layer with `kernels="native"` (the CPU default) against
   `kernels="reference"` (the pure-torch definitions), timed the same way; and a small GPT-MoE trained one
   step with `kernels="triton"` — on a CUDA machine real Triton kernels, here Triton's interpreter — checked
   against eager.
`make demo` runs this with glibc malloc tunables that keep large freed blocks on the heap; without them
step times swing by about ±20% with allocation order (see benchmarks/common.py).
"""
import os
import statistics
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import moecompile
from moecompile.models import gpt_moe

if not torch.cuda.is_available():  # Triton runs on CPU only in its interpreter; set before kernels load
    os.environ.setdefault("TRITON_INTERPRET", "1")

console = Console(width=130)
STEPS = 8


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, router_jitter_noise=0.0, max_position_embeddings=512)
    return MixtralForCausalLM(cfg)


def mixtral_layer():
    """The MoE block of a 1-layer Mixtral (hidden 512, ffn 1024, 8 experts, top-2), weights N(0, 0.02)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=32, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
    block = MixtralForCausalLM(cfg).model.layers[0].mlp
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def cases():
    """(name, eager model, args, kwargs, loss of the output)."""
    ids = torch.randint(0, 256, (4, 256))
    x = torch.randn(1, 4096, 512)
    cot = torch.randn(1, 4096, 512)
    return [
        ("GPT-MoE (reference, 4 layers, 8 experts, top-2), 1024 tokens", gpt_moe(n_layer=4, d_model=256, d_ff=1024),
         (ids, ids), {}, lambda out: out[1]),
        ("Hugging Face Mixtral (tiny, 2 layers), 1024 tokens", tiny_mixtral(),
         (ids,), {"labels": ids}, lambda out: out.loss),
        ("Hugging Face Mixtral MoE layer (hidden 512, ffn 1024), 4096 tokens", mixtral_layer(),
         (x,), {}, lambda out: (out * cot).sum()),
    ]


def step_ms(eager, fast, args, kwargs, loss_fn) -> tuple[float, float]:
    """Median training-step time of each model, alternating steps so both see the same machine state."""
    times = {eager: [], fast: []}
    for i in range(STEPS + 2):
        for model in (eager, fast):
            t = time.perf_counter()
            loss_fn(model(*args, **kwargs)).backward()
            if i >= 2:  # two warm-up steps
                times[model].append((time.perf_counter() - t) * 1e3)
            model.zero_grad(set_to_none=True)
    return statistics.median(times[eager]), statistics.median(times[fast])


def max_grad_diff(eager, fast, args, kwargs, loss_fn) -> float:
    grads = []
    for m in (eager, fast):
        m.zero_grad(set_to_none=True)
        loss_fn(m(*args, **kwargs)).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    eager.zero_grad(set_to_none=True)
    return max((a - b).abs().max().item() / b.abs().max().clamp_min(1e-12).item() for a, b in zip(*grads))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    speed = Table(title=f"training step (forward+backward), fp32, {torch.get_num_threads()} threads, same run")
    for col in ("model", "eager ms", "moecompile ms", "speed-up", "max grad rel. diff"):
        speed.add_column(col)
    todo = cases()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("optimizing and timing", total=len(todo) * 2)
        for name, eager, args, kwargs, loss_fn in todo:
            fast = moecompile.optimize(eager, args, kwargs)
            bar.advance(task)
            console.print(f"[bold]{name}[/]")
            console.print(moecompile.explain(fast))
            diff = max_grad_diff(eager, fast, args, kwargs, loss_fn)
            t_eager, t_fast = step_ms(eager, fast, args, kwargs, loss_fn)
            bar.advance(task)
            speed.add_row(name, f"{t_eager:.1f}", f"{t_fast:.1f}", f"{t_eager / t_fast:.2f}x", f"{diff:.1e}")
    console.print(speed)
    console.print(kernel_backends())


def kernel_backends() -> Table:
    """The kernel backends of the canonical ops, measured in this run."""
    t = Table(title="kernel backends (optimize(model, kernels=...)), same run", caption_justify="left", caption=(
        "reference: the pure-torch definitions of the canonical ops (kernels/reference.py), differentiated by "
        "plain autograd:\nthe test oracle. Per-op timings and floors: benchmarks/kernel_ops.py."))
    for col in ("model", "backend", "train step ms", "vs reference backend", "max grad rel. diff vs eager"):
        t.add_column(col)
    _, layer, args, kwargs, loss_fn = cases()[2]
    reference = moecompile.optimize(layer, args, kwargs, kernels="reference")
    native = moecompile.optimize(layer, args, kwargs)  # "auto": native on CPU
    assert set(moecompile.explain(native).moe_layers[0].spec.kernels.values()) == {"native"}
    t_ref, t_native = step_ms(reference, native, args, kwargs, loss_fn)
    name = "Mixtral MoE layer, 4096 tokens"
    t.add_row(name, "reference", f"{t_ref:.1f}", "1.00x", f"{max_grad_diff(layer, reference, args, kwargs, loss_fn):.1e}")
    t.add_row(name, "native (CPU default)", f"{t_native:.1f}", f"{t_ref / t_native:.2f}x",
              f"{max_grad_diff(layer, native, args, kwargs, loss_fn):.1e}")
    small = gpt_moe(n_layer=2, d_model=64, d_ff=128)
    ids = torch.randint(0, 256, (2, 32))
    triton_model = moecompile.optimize(small, (ids, ids), kernels="triton")
    where = "CUDA" if torch.cuda.is_available() else "interpreter on CPU: correctness only, not timed"
    diff = max_grad_diff(small, triton_model, (ids, ids), {}, lambda out: out[1])
    t.add_row("GPT-MoE (2 layers, d 64), 64 tokens", f"triton ({where})", "-", "-", f"{diff:.1e}")
    return t


if __name__ == "__main__":
    main()
