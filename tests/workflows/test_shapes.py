"""A model optimized on one batch shape, then run on others: batch sizes 1 and 3 and 1, 7, 12 and 24 tokens per
sequence (one-token decoding included), as inference and training run it. Every shape must equal the
un-optimized model, the whole model and each rewritten MoE block called directly.

The families cover what could bake the example's shape into a rewrite: Switch Transformers' capacity of
`expert_capacity` slots *per sequence* (its groups are each call's sequences, not the example's 12 tokens);
dropless routing (Mixtral), a gated shared expert (Qwen2-MoE), group-limited routing with shared experts
(DeepSeek-V2) and moecompile's own GPT-MoE. Then how the analysis reads capacity groups from a recording:
per sequence, all of a call's tokens, a fixed group, and refusals where one call cannot tell them apart.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecompile
from moecompile.ir.spec import CapacitySpec
from moecompile.models import gpt_moe
from tests import hf_zoo
from tests.helpers import assert_same_training_step, first_output

H = 32
SHAPES = [(b, s) for b in (1, 3) for s in (1, 7, 12, 24)]  # (batch, tokens per sequence)
FAMILIES = {"switch": hf_zoo.switch, "mixtral": hf_zoo.mixtral, "qwen2_moe": hf_zoo.qwen2_moe,
            "deepseek_v2": hf_zoo.deepseek_v2,
            "gpt_moe": lambda: gpt_moe(n_layer=2, n_head=2, d_model=H, d_ff=64, max_seq=32, num_experts=4)}


@functools.cache
def compiled(family):
    """(un-optimized model, optimized on a [2, 12] example, its MoE layers); eval mode: no dropout."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    args, kwargs = hf_zoo.inputs(family)  # 2 sequences of 12 tokens (Switch: 7 decoder tokens)
    fast = moecompile.optimize(model, args, {} if family == "gpt_moe" else kwargs)
    layers = moecompile.explain(fast).moe_layers
    assert layers and all(layer.rewritten for layer in layers), [layer.reason for layer in layers]
    return model, fast, layers


def batch(family, b, s, seed=0):
    """(args, kwargs) of a call on b sequences of s tokens (Switch: s decoder tokens too)."""
    g = torch.Generator().manual_seed(seed + 100 * b + s)
    ids = torch.randint(1, hf_zoo.V, (b, s), generator=g)
    if family == "switch":
        return (), {"input_ids": ids, "decoder_input_ids": torch.randint(1, hf_zoo.V, (b, s), generator=g)}
    return (ids,), {}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shape_equals_the_original(family):
    """Whole model (logits), then each MoE block on hidden states [b, s, 32] of every shape."""
    model, fast, layers = compiled(family)
    with torch.no_grad():
        for b, s in SHAPES:
            args, kwargs = batch(family, b, s)
            want, got = first_output(model(*args, **kwargs)), first_output(fast(*args, **kwargs))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"model on {b}x{s}: {m}")
            for layer in layers:
                x = torch.randn(b, s, H, generator=torch.Generator().manual_seed(b * s))
                want, got = model.get_submodule(layer.name)(x), fast.get_submodule(layer.name)(x)
                for o, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
                    torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5,
                                               msg=lambda m: f"{layer.name} on [{b}, {s}, {H}]: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_on_another_shape(family):
    """Forward and backward (loss and every parameter's gradient) on 3 sequences of 7 tokens."""
    model, fast, _ = compiled(family)
    args, kwargs = batch(family, 3, 7, seed=1)
    if family == "switch":
        kwargs["labels"] = kwargs.pop("decoder_input_ids")
    elif family != "gpt_moe":
        kwargs["labels"] = args[0]
    else:
        args = (args[0], args[0])
    assert_same_training_step(model, fast, args, kwargs)


def test_switch_capacity_is_per_sequence_of_each_call():
    """Switch's capacity: expert_capacity = 4 slots per expert in each sequence, whatever its length; the
    24-token sequences drop tokens (top-1 of 4 experts: at most 16 of 24 are kept), 1-token ones never do."""
    model, fast, layers = compiled("switch")
    for layer in layers:
        assert layer.spec.capacity == CapacitySpec(4, group="sequence"), layer.spec.capacity
        assert "capacity 4 per sequence" in layer.details
        block = fast.get_submodule(layer.name)
        with torch.no_grad():
            block(torch.randn(3, 24, H))
            assert layer.spec.drops.last_dropped >= 3 * 8
            block(torch.randn(3, 1, H))
            assert layer.spec.drops.last_dropped == 0


def test_switch_greedy_generation_equals_the_original():
    """Decoding: the decoder's MoE block sees one token per sequence at each step (with a KV cache)."""
    model, fast, _ = compiled("switch")
    ids = torch.randint(1, hf_zoo.V, (2, 10), generator=torch.Generator().manual_seed(5))
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want, got = model.generate(ids, **options), fast.generate(ids, **options)
    assert want.shape == (2, 1 + 8) and torch.equal(got, want)  # the decoder's start token, 8 new ones


# ---- how the analysis reads capacity groups ---------------------------------------------------------------
E, C = 4, 3


class CountingMoE(nn.Module):
    """Top-1 with a capacity of C slots per expert, counted by a cumsum of one-hot choices over tokens, as
    Switch Transformers counts them; `regroup` lays the one-hot choices out for the count (→ [.., tokens, E]),
    `restore` puts the keep-mask back to [B, S, E]. The router: `bias` makes F.linear an addmm and a view."""

    def __init__(self, regroup, bias=False):
        super().__init__()
        self.regroup = regroup
        self.router = nn.Linear(H, E, bias=bias)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(H, 16), nn.ReLU(), nn.Linear(16, H)) for _ in range(E))

    def forward(self, x):
        probs = self.router(x).softmax(-1)                                     # [B, S, E]
        onehot = F.one_hot(probs.argmax(-1), E)                                # [B, S, E]
        mask = onehot * (self.regroup(onehot, x).cumsum(-2) <= C).reshape(onehot.shape)
        weight = probs.max(-1).values.reshape(-1, 1)                           # [T, 1]
        flat, mask = x.reshape(-1, H), mask.reshape(-1, E)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            (rows,) = torch.where(mask[:, e] > 0)
            out.index_add_(0, rows, expert(flat[rows]) * weight[rows])
        return out.view(x.shape)


GROUPINGS = {  # name → (regroup, router bias, CapacitySpec read from a [2, 12] example, or the refusal)
    "per sequence": (lambda m, x: m, False, CapacitySpec(C, group="sequence")),
    "all tokens": (lambda m, x: m.reshape(-1, E), False, CapacitySpec(C)),
    "fixed groups of 8": (lambda m, x: m.reshape(-1, 8, E), False, CapacitySpec(C, 8)),
    # a fixed group of 12 tokens, or each sequence (12 tokens here)?
    "groups of 12 = the sequence length": (lambda m, x: m.reshape(-1, 12, E), False, "cannot be told apart"),
    # a fixed 4 groups (of 6 here), or groups of 6?
    "4 groups": (lambda m, x: m.reshape(4, -1, E), False, "cannot be told from one call"),
    # a router with a bias restores [B, S] with a view, as a user's reshape would be recorded
    "per sequence, router bias": (lambda m, x: m, True, "cannot be told from one call"),
    "counted over the batch": (lambda m, x: m.transpose(0, 1), False, "after a transpose"),
}


@pytest.mark.parametrize("name", GROUPINGS)
def test_capacity_groups_are_read_or_refused(name):
    regroup, bias, want = GROUPINGS[name]
    torch.manual_seed(0)
    block = CountingMoE(regroup, bias)
    fast = moecompile.optimize(block, (torch.randn(2, 12, H),))
    (layer,) = moecompile.explain(fast).moe_layers
    if isinstance(want, str):
        assert not layer.rewritten and want in layer.reason, layer.reason
        return
    assert layer.rewritten, layer.reason
    assert layer.spec.capacity == want
    with torch.no_grad():
        for b, s in [(1, 24), (3, 8), (2, 16)]:  # token counts that split into groups of 8
            x = torch.randn(b, s, H)
            torch.testing.assert_close(fast(x), block(x), rtol=1e-4, atol=1e-5, msg=lambda m: f"[{b}, {s}]: {m}")
