"""Reference models used across the project."""
from moecompile.models.gpt import GPT, MLP, GPTConfig, MoE, gpt_dense, gpt_moe, gpt_moe_top1

__all__ = ["GPT", "GPTConfig", "MLP", "MoE", "gpt_dense", "gpt_moe", "gpt_moe_top1"]
