"""The models the workflow tests run, as users would build them: tiny random-init Hugging Face families
(tests/hf_zoo.py) and the reference GPT-MoE, with the calls that return a loss."""
import torch
from torch import nn

import moecompile
from moecompile.models import gpt_moe
from tests import hf_zoo

FAMILIES = {**hf_zoo.FAMILIES,
            "gpt_moe": lambda: gpt_moe(n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq=64, num_experts=4)}


def make(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]()


def batch(family: str, shape: tuple[int, int] = (2, 12), seed: int = 0):
    """(args, kwargs) of a call on `shape` (sequences, tokens) random token ids that returns a loss."""
    ids = torch.randint(1, hf_zoo.V, shape, generator=torch.Generator().manual_seed(seed))
    return ((ids, ids), {}) if family == "gpt_moe" else ((ids,), {"labels": ids})


def rewritten(model) -> tuple[int, int]:
    """(blocks rewritten, MoE blocks found) by explain()."""
    layers = moecompile.explain(model).moe_layers
    return sum(layer.rewritten for layer in layers), len(layers)


def assert_all_rewritten(model) -> None:
    done, found = rewritten(model)
    assert found > 0 and done == found, str(moecompile.explain(model))
