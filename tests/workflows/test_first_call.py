"""The first call of a lazily optimized model, as users make it: Hugging Face `generate` (its first call
brings the caller's KV cache), and first calls under no_grad, inference_mode, autocast, eval(), activation
checkpointing and FSDP2. Compiling happens inside that call and must have no effect the caller can observe
except speed: the caller's objects (cache, RNG, buffers, counters) end as an eager call leaves them, the
blocks are rewritten whatever the context, and the rewrite behaves as the original does in that context."""
import contextlib
import functools
import logging

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moecompile
from moecompile.models import gpt_dense, gpt_moe
from moecompile.runtime.spawn import run_ranks
from moecompile.validation import max_relative_error
from tests import hf_zoo
from tests.helpers import first_output, loss_of
from tests.workflows.families import assert_all_rewritten, batch, make, rewritten

HF = ["mixtral", "qwen2_moe", "deepseek_v2"]


# ---- generate: the first call brings the caller's KV cache --------------------------------------------------
def prompts(padded: bool):
    """input_ids and attention_mask: one prompt of 8, or a batch of 3 left-padded to 8."""
    g = torch.Generator().manual_seed(3)
    if not padded:
        return torch.randint(3, hf_zoo.V, (1, 8), generator=g), torch.ones(1, 8, dtype=torch.long)
    ids = torch.randint(3, hf_zoo.V, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((3, 0, 5)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def generate(model, padded: bool):
    ids, mask = prompts(padded)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("family", HF)
@pytest.mark.parametrize("how", ["lazy", "example"])
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left-padded"])
def test_generate_gives_the_original_models_tokens_from_the_first_call(family, how, padded):
    eager = make(family).eval()
    ids, mask = prompts(padded)
    fast = moecompile.optimize(eager) if how == "lazy" else moecompile.optimize(eager, (ids,), {"attention_mask": mask})
    want = generate(eager, padded)
    got = generate(fast, padded)  # lazy: the first call, which compiles, is generate's prefill
    assert_all_rewritten(fast)
    assert got.tolist() == want.tolist()
    assert generate(fast, padded).tolist() == want.tolist()


@pytest.mark.parametrize("family", HF)
def test_first_call_leaves_the_callers_kv_cache_as_an_eager_call_does(family):
    from transformers import DynamicCache
    eager = make(family).eval()
    fast = moecompile.optimize(eager)
    ids, _ = prompts(False)
    caches, logits = {}, {}
    with torch.no_grad():
        for name, model in (("eager", eager), ("fast", fast)):
            cache = caches[name] = DynamicCache(config=eager.config)
            first = model(ids, cache=cache, use_cache=True)
            assert first.past_key_values is cache
            nxt = first.logits[:, -1:].argmax(-1)
            logits[name] = (first.logits, model(nxt, cache=cache, use_cache=True).logits)
    assert_all_rewritten(fast)
    assert caches["fast"].get_seq_length() == caches["eager"].get_seq_length() == ids.shape[1] + 1
    for got, want in zip(logits["fast"], logits["eager"]):
        assert max_relative_error(got, want, want) < 1e-4
    for a, b in zip(caches["fast"].layers, caches["eager"].layers):
        assert max_relative_error(a.keys, b.keys, b.keys) < 1e-4
        assert max_relative_error(a.values, b.values, b.values) < 1e-4


class Counted(nn.Module):
    """A model that counts its calls and the tokens it saw, in an attribute and in a buffer."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def forward(self, idx, targets=None):
        self.calls += 1
        self.tokens_seen += idx.numel()
        return self.inner(idx, targets)


def test_first_call_leaves_rng_buffers_counters_and_arguments_as_an_eager_call_does():
    eager = Counted(gpt_moe(n_layer=2, d_model=32, d_ff=64, max_seq=16, dropout=0.1)).train()  # dropout: RNG
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    before = idx.clone()
    torch.manual_seed(5)
    want = eager(idx, idx)
    want_rng, want_counts = torch.get_rng_state(), (eager.calls, eager.tokens_seen.item())
    eager.calls = 0
    eager.tokens_seen.zero_()
    fast = moecompile.optimize(eager)  # its own `calls`, the same buffer
    torch.manual_seed(5)
    got = fast(idx, idx)
    assert_all_rewritten(fast)
    assert torch.equal(torch.get_rng_state(), want_rng)  # the compile run forked it; the call drew as eager
    assert (fast.calls, fast.tokens_seen.item()) == want_counts == (1, 24)
    assert torch.equal(idx, before)
    assert max_relative_error(got[1], want[1], want[1]) < 1e-4  # the same dropout masks


# ---- first calls in any context: the blocks are rewritten, the rewrite behaves as the original there -------
def _autocast(dtype):
    return functools.partial(torch.autocast, "cpu", dtype=dtype)


CONTEXTS = {  # name → (context of the first call, whether it trains, whether it is autocast)
    "no_grad": (torch.no_grad, False),
    "inference_mode": (torch.inference_mode, False),
    "eval": (contextlib.nullcontext, True),
    "autocast_bf16": (_autocast(torch.bfloat16), True),
    "autocast_fp16": (_autocast(torch.float16), True),
    "checkpoint": (contextlib.nullcontext, True),                 # torch.utils.checkpoint around the call
    "hf_gradient_checkpointing": (contextlib.nullcontext, True),  # model.gradient_checkpointing_enable()
}
CASES = [(f, c) for f in ("mixtral", "gpt_moe") for c in CONTEXTS if not (f == "gpt_moe" and c.startswith("hf"))] + \
    [("qwen2_moe", "inference_mode"), ("qwen2_moe", "autocast_bf16"), ("deepseek_v2", "autocast_bf16"),
     ("deepseek_v2", "hf_gradient_checkpointing")]


def _step(model, family, context, trains):
    """The call in `context`: outputs, and the loss and every parameter's gradient when it trains."""
    args, kwargs = batch(family, seed=1)
    enter, _ = CONTEXTS[context]
    for p in model.parameters():
        p.grad = None
    with enter():
        if context == "checkpoint":
            out = checkpoint(lambda *a: model(*a, **kwargs), *args, use_reentrant=False)
        else:
            out = model(*args, **kwargs)
        loss = loss_of(out)
    grads = {}
    if trains:
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return first_output(out).detach().float(), loss.detach().float(), grads


def _prepared(model, context):
    if context == "eval":
        return model.eval()
    if context == "hf_gradient_checkpointing":
        model.gradient_checkpointing_enable()
        return model.train()
    return model.eval()  # (random weights, no dropout configured: train and eval compute the same)


@pytest.mark.parametrize("family,context", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_first_call_in_context_rewrites_the_blocks_and_matches_eager_there(family, context):
    eager = _prepared(make(family), context)
    trains = CONTEXTS[context][1]
    want = _step(eager, family, context, trains)
    fast = moecompile.optimize(eager)
    got = _step(fast, family, context, trains)  # the first call: compiles in this context
    assert_all_rewritten(fast)
    if not context.startswith("autocast"):
        for a, b in zip(got[:2], want[:2]):
            assert max_relative_error(a, b, b) < 1e-4
        for name, g in want[2].items():
            assert max_relative_error(got[2][name], g, g) < 1e-4, name
        assert got[2].keys() == want[2].keys()
        return
    # under autocast: as close to eager-under-autocast as eager is to the fp32 model (its own rounding), for
    # outputs, loss and gradients; the rewrite keeps each matmul in the precision the original uses
    exact = _step(_prepared(make(family), "eval"), family, "eval", True)
    for name, a, b, ref in [("logits", got[0], want[0], exact[0]), ("loss", got[1], want[1], exact[1])] + \
            [(n, got[2][n], g, exact[2][n]) for n, g in want[2].items()]:
        own = (b.double() - ref.double()).abs().max().item()
        assert (a.double() - b.double()).abs().max().item() <= 2 * own + 1e-7, name
        assert (a.double() - ref.double()).abs().max().item() <= 2 * own + 1e-7, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["mixtral", "gpt_moe"])
def test_rewritten_block_computes_in_the_originals_precision_under_autocast(family, dtype):
    """Mixtral's experts run aten._grouped_mm, which autocast leaves in fp32; GPT-MoE's nn.Linear experts
    run in autocast's dtype: the rewritten block does the same and equals the original block to fp32 rounding
    (computed in bf16 the two would differ by ~1e-3; bit-equality depends on how the threads split the GEMMs)."""
    eager = make(family).eval()
    fast = moecompile.optimize(eager, *batch(family, seed=1))
    name = next(layer.name for layer in moecompile.explain(fast).moe_layers if layer.rewritten)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want, got = eager.get_submodule(name)(x), fast.get_submodule(name)(x)
    want, got = (w[0] if isinstance(w, tuple) else w for w in (want, got))
    assert got.dtype == want.dtype
    assert max_relative_error(got, want, want) < 1e-5


# ---- nothing rewritten: said once -------------------------------------------------------------------------
def test_model_with_nothing_rewritten_logs_one_warning(caplog):
    fast = moecompile.optimize(gpt_dense(n_layer=2, d_model=32, d_ff=64, max_seq=16))
    idx = torch.randint(0, 256, (2, 12))
    with caplog.at_level(logging.WARNING, logger="moecompile"):
        fast(idx)
        fast(idx)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("moecompile")]
    assert len(warnings) == 1 and "no block" in warnings[0].getMessage()


# ---- FSDP2 -------------------------------------------------------------------------------------------------
def _fsdp_rank(rank, world_size):
    from torch.distributed.fsdp import fully_shard

    from tests import hf_zoo as zoo
    torch.manual_seed(0)
    eager = zoo.mixtral()
    args, kwargs = zoo.inputs("mixtral", seed=rank)
    out = eager(*args, **kwargs)
    out.loss.backward()
    want = out.loss.item(), {n: p.grad.clone() for n, p in eager.named_parameters()}
    eager.zero_grad()
    fast = moecompile.optimize(eager)  # optimize, then shard the optimized model (it shares the Parameters)
    for layer in fast.model.layers:
        fully_shard(layer)
    fully_shard(fast)
    out = fast(*args, **kwargs)  # the first call compiles, inside FSDP's root forward
    out.loss.backward()
    layers = moecompile.explain(fast).moe_layers
    grads = {n: p.grad.full_tensor() for n, p in fast.named_parameters()}  # averaged over the 2 ranks
    return [layer.rewritten for layer in layers], out.loss.item(), want, grads


@pytest.mark.slow
def test_fsdp2_first_call_rewrites_the_blocks_and_trains_as_eager():
    results = run_ranks(_fsdp_rank, 2, timeout_s=120.0, deadline_s=300.0)
    for rewritten_layers, loss, (want_loss, _), _ in results:
        assert rewritten_layers == [True, True]
        assert abs(loss - want_loss) <= 1e-4 * abs(want_loss)
    for name, g in results[0][3].items():  # FSDP averages the ranks' gradients
        want = (results[0][2][1][name] + results[1][2][1][name]) / 2
        assert max_relative_error(g, want, want) < 1e-4, name
