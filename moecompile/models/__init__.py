"""Reference models used across the project."""
from moecompile.models.gpt import GPT, MLP, GPTConfig, MoE, gpt_dense, gpt_moe, gpt_moe_top1
from moecompile.models.moe_stack import MoEStack
from moecompile.models.shortcut import DGMoEBlock, ScMoEBlock, ShortcutGPT, gpt_dgmoe, gpt_scmoe

__all__ = ["GPT", "GPTConfig", "MLP", "MoE", "gpt_dense", "gpt_moe", "gpt_moe_top1", "MoEStack",
           "ShortcutGPT", "ScMoEBlock", "DGMoEBlock", "gpt_scmoe", "gpt_dgmoe"]
