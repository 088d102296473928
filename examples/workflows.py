"""moecompile inside the workflows people run: lazy `optimize()` then `generate()`, and Hugging Face's
`Trainer`, each against the un-optimized model in the same run.

    make demo            # or: .venv/bin/python examples/workflows.py

1. `fast = moecompile.optimize(model)` compiles at its first call, here `fast.generate(...)`: the compile
   run works on copies of the arguments, so the KV cache is untouched and the tokens are the original's.
2. A `Trainer` of 3 steps on the lazily optimized model (its forward signature is the original's, so the
   Trainer keeps the dataset's columns): the losses equal the un-optimized model's.
"""
import tempfile
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

import moecompile


def mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128)).eval()


def generate(model, prompt):
    t = time.perf_counter()
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, max_new_tokens=20,
                            do_sample=False)
    return tokens, time.perf_counter() - t


def train_losses(model):
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (12, 16),
                                                                         generator=torch.Generator().manual_seed(1))]
    losses = []

    class Losses(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            losses.append(loss.item())
            return loss
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                                 disable_tqdm=True)
        Losses(model=model, args=args, train_dataset=data).train()
    return losses


def main():
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    eager = mixtral()
    want, eager_s = generate(eager, prompt)
    fast = moecompile.optimize(eager)                    # lazy: compiles at the first call, inside generate()
    got, first_s = generate(fast, prompt)
    again, fast_s = generate(fast, prompt)
    rewritten = sum(layer.rewritten for layer in moecompile.explain(fast).moe_layers)
    print(f"generate, 2 prompts × 12 tokens + 20 new: tokens equal to the original's: {torch.equal(got, want)} "
          f"(first call, which compiled: {first_s:.1f} s) and {torch.equal(again, want)} (then {fast_s:.2f} s, "
          f"original {eager_s:.2f} s); {rewritten} MoE blocks rewritten")
    want_losses = train_losses(mixtral().train())
    got_losses = train_losses(moecompile.optimize(mixtral().train()))
    worst = max(abs(a - b) / abs(b) for a, b in zip(got_losses, want_losses))
    print(f"Trainer, 3 steps on the lazily optimized model: losses {', '.join(f'{x:.4f}' for x in got_losses)}; "
          f"original {', '.join(f'{x:.4f}' for x in want_losses)} (max relative difference {worst:.1e})")
    assert torch.equal(got, want) and worst < 1e-4


if __name__ == "__main__":
    main()
