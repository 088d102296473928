"""A rewritten MoE block called on its own, as a user calls it (`fast.model.layers[0].mlp(h)`), must do what
the original block does: the same outputs and gradients at 0, 1, k, E and many tokens, on every kernel
backend, and an error where the original raises one (hidden states of the wrong width or dtype).
The original is the un-optimized model's same submodule; both share their parameters."""
import functools

import pytest
import torch
import torch.nn as nn

import moecompile
from moecompile.models import gpt_moe
from tests import hf_zoo

H = 32  # the hidden size of every model here


class LogitsMoE(nn.Module):
    """A block as transformers 4.x wrote Mixtral's: returns (out [B, S, D], router logits [T, E]), the
    logits for an auxiliary loss."""

    def __init__(self, d=H, f=64, e=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)) for _ in range(e))

    def forward(self, x):
        B, S, D = x.shape
        x = x.reshape(-1, D)                                                    # [T, D]
        logits = self.gate(x)                                                   # [T, E]
        w, idx = logits.softmax(-1).topk(self.k, dim=-1)                        # [T, k] ×2
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)                                 # [n] ×2
            out.index_add_(0, token, expert(x[token]) * w[token, slot, None])
        return out.view(B, S, D), logits


class WithAuxLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = LogitsMoE()

    def forward(self, x):
        out, logits = self.moe(x)
        return out.sum() + logits.logsumexp(-1).square().mean()


def _hf(family):
    args, kwargs = hf_zoo.inputs(family)
    return hf_zoo.FAMILIES[family](), args, kwargs


MODELS = {  # name → () → (model, example args, example kwargs); E experts, k per token
    "mixtral": functools.partial(_hf, "mixtral"),          # E = 4, k = 2, fused gate/up
    "qwen2_moe": functools.partial(_hf, "qwen2_moe"),      # E = 8, k = 2, gated shared expert
    "deepseek_v2": functools.partial(_hf, "deepseek_v2"),  # E = 8, k = 2, group-limited, shared experts
    "switch": functools.partial(_hf, "switch"),            # E = 4, k = 1, capacity
    "gpt_moe": lambda: (gpt_moe(n_layer=2, d_model=H, d_ff=64), (torch.randint(0, 256, (2, 8)),), {}),
    "logits": lambda: (WithAuxLoss(), (torch.randn(2, 8, H),), {}),
    # optimize()'s own capacity over a dropless block: it drops tokens the original keeps, so it matches
    # the original only where nothing is routed (0 tokens)
    "mixtral_capacity": functools.partial(_hf, "mixtral"),
}
OPTIONS = {"mixtral_capacity": dict(capacity_factor=1.0, batch_prioritized=True)}


@functools.cache
def blocks(name, backend):
    """(original block, its rewrite, E, k): the first block optimize() rewrote."""
    torch.manual_seed(0)
    model, args, kwargs = MODELS[name]()
    fast = moecompile.optimize(model, args, kwargs, kernels=backend, **OPTIONS.get(name, {}))
    layer = next(m for m in moecompile.explain(fast).moe_layers if m.rewritten)
    return model.get_submodule(layer.name), fast.get_submodule(layer.name), layer.num_experts, layer.top_k


def forward_backward(block, x):
    """→ (the block's output, gradients of a fixed random projection of its float outputs w.r.t. x and
    every parameter of the block; zeros for a parameter the outputs do not reach)."""
    x = x.detach().requires_grad_()
    out = block(x)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in as_tuple(out) if o.is_floating_point())
    leaves = [x, *block.parameters()]
    # Switch's original starts from zeros_like(x) and returns it untouched when no token reaches an expert
    # (0 tokens): an output outside autograd, whose gradients are zeros. The rewrite stays differentiable.
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return out, [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_same(name, backend, x):
    orig, fast, *_ = blocks(name, backend)
    (want, want_grads), (got, got_grads) = forward_backward(orig, x), forward_backward(fast, x)
    assert type(got) is type(want) and len(as_tuple(got)) == len(as_tuple(want))  # a tensor, or a tuple
    for o, w in zip(as_tuple(got), as_tuple(want)):
        assert (o.shape, o.dtype) == (w.shape, w.dtype)
        assert o.requires_grad  # a backward through it runs
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)
    for d, w in zip(got_grads, want_grads):
        torch.testing.assert_close(d, w, rtol=1e-4, atol=1e-5)


ALL = ["mixtral", "qwen2_moe", "deepseek_v2", "switch", "gpt_moe", "logits"]


def cases(names, triton_names):
    """(model, backend) pairs: every name on the torch backends; Triton's interpreter is slow (seconds
    per model), so only a few there: group-limited routing and shared experts (deepseek_v2), capacity
    and top-1 (switch)."""
    return [(n, b) for b in ("native", "reference") for n in names] + \
        [pytest.param(n, "triton", marks=pytest.mark.interpreter) for n in triton_names]


@pytest.mark.parametrize("name,backend", cases(ALL + ["mixtral_capacity"], ["deepseek_v2", "switch"]))
def test_zero_tokens_give_what_the_original_gives(name, backend):
    """An empty batch or an empty sequence: an empty result of the original's structure, shapes and dtype,
    and a backward that gives zero gradients."""
    for shape in [(2, 0, H), (0, 3, H)]:
        assert_same(name, backend, torch.randn(shape))


@pytest.mark.parametrize("name,backend", cases(ALL, ["deepseek_v2"]))
def test_token_counts_match_the_original(name, backend):
    """1 token, k tokens (a token per slot), E tokens (as many as experts) and many (native's
    thousand-row paths; fewer in the interpreter), forward and backward."""
    _, _, E, k = blocks(name, backend)
    many = 64 if backend == "triton" else 1030
    for T in sorted({1, k, E, many}):
        assert_same(name, backend, torch.randn(1, T, H))


@pytest.mark.parametrize("name", ALL)
def test_hidden_states_the_original_refuses_raise(name):
    """A wrong hidden size must not be regrouped into rows of H (that returned a [2, 12, 16] result):
    the error names the expected size and the shape received. A dtype the block's weights do not take
    raises as in the original."""
    orig, fast, *_ = blocks(name, "native")
    for x in [torch.randn(2, 12, H // 2), torch.randn(2, 12, 2 * H)]:
        with pytest.raises(Exception):  # noqa: B017 whatever the original's own code trips on
            orig(x)
        with pytest.raises(ValueError, match=rf"{H}.*\[2, 12, {x.shape[-1]}\]"):
            fast(x)
    for x in [torch.randn(2, 12, H, dtype=torch.float64), torch.randint(0, 9, (2, 12, H))]:
        with pytest.raises(RuntimeError):
            orig(x)
        with pytest.raises(RuntimeError):
            fast(x)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_moe", "logits"])  # DeepSeek's takes any [..., D]
def test_dims_the_original_refuses_raise(name):
    """These blocks unpack `B, S, D = x.shape`: flat [T, D] tokens or a 4-D input raise in the original."""
    orig, fast, *_ = blocks(name, "native")
    for x in [torch.randn(6, H), torch.randn(1, 2, 3, H)]:
        with pytest.raises(ValueError):
            orig(x)
        with pytest.raises((ValueError, RuntimeError)):
            fast(x)
