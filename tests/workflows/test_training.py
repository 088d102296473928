"""Training workflows as users write them, on a lazily optimized model (`optimize(model)`, compiled at its
first call) against the un-optimized one: bf16 weights, autocast, activation checkpointing, gradient
accumulation over padded batches of different lengths, frozen parameters, DDP on 2 gloo ranks, and
state_dict / save_pretrained / from_pretrained / deepcopy.

fp32 runs must match eager within 1e-4 (relative, every parameter's gradient); reduced-precision runs are
held to eager's own error: |optimized − eager| ≤ 2·|eager − fp32 reference| + a few bf16 steps."""
import copy

import pytest
import torch

import moecompile
from moecompile.runtime.spawn import run_ranks
from moecompile.validation import max_relative_error
from tests import hf_zoo
from tests.helpers import assert_same_training_step
from tests.workflows.families import assert_all_rewritten, batch, make

HF = ["mixtral", "qwen2_moe", "deepseek_v3"]


def _step(model, args, kwargs):
    """Loss and every parameter's gradient (None: no gradient) of one backward."""
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out[1]
    loss.backward()
    return loss.detach().float(), {n: None if p.grad is None else p.grad.float().clone()
                                   for n, p in model.named_parameters()}


def _assert_as_close_as_eager(got, want, ref, what, steps=4):
    """got (optimized, reduced precision) is as close to want (eager, same precision) as eager is to ref
    (fp32): twice eager's own error, plus a few bf16 rounding steps of the tensor's scale."""
    slack = steps * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    err, own = (got - want).abs().max().item(), (want - ref).abs().max().item()
    assert err <= 2 * own + slack, f"{what}: |optimized − eager| {err:.3g} > 2 × eager's own error {own:.3g} + {slack:.3g}"


def _compare_reduced(family, run):
    """run(model) → (loss, grads) for eager in fp32 (reference), eager and optimized in reduced precision."""
    ref = run(make(family), torch.float32)
    eager_model = make(family)
    want = run(eager_model, None)
    fast = moecompile.optimize(eager_model)
    got = run(fast, None)
    assert_all_rewritten(fast)
    _assert_as_close_as_eager(got[0], want[0], ref[0], "loss")
    for name, g in ref[1].items():
        if g is not None:
            _assert_as_close_as_eager(got[1][name], want[1][name], g, f"gradient of {name}")


@pytest.mark.parametrize("family", [*HF, "gpt_moe"])
def test_bf16_training_step(family):
    args, kwargs = batch(family)

    def run(model, dtype):
        return _step(model.to(dtype or torch.bfloat16), args, kwargs)
    _compare_reduced(family, run)


@pytest.mark.parametrize("family", ["mixtral", "gpt_moe"])
def test_autocast_training_step(family):
    args, kwargs = batch(family)

    def run(model, dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is None):
            return _step(model, args, kwargs)
    _compare_reduced(family, run)


@pytest.mark.parametrize("family", HF)
def test_activation_checkpointing(family):
    eager = make(family)
    eager.gradient_checkpointing_enable()
    eager.train()
    fast = moecompile.optimize(eager)
    args, kwargs = batch(family)
    assert_same_training_step(eager, fast, args, kwargs)
    assert_all_rewritten(fast)


def test_torch_utils_checkpoint_around_an_optimizedmake():
    eager = make("gpt_moe")
    fast = moecompile.optimize(eager)
    (ids, targets), _ = batch("gpt_moe")

    def checkpointed(model):
        return torch.utils.checkpoint.checkpoint(model, ids, targets, use_reentrant=False)[1]
    losses, grads = [], []
    for model in (eager, fast):
        model.zero_grad(set_to_none=True)
        loss = checkpointed(model)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in eager.named_parameters() if p.grad is not None})
    assert_all_rewritten(fast)
    assert max_relative_error(losses[1], losses[0], losses[0]) < 1e-4
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert max_relative_error(grads[1][name], g, g) < 1e-4, name


@pytest.mark.parametrize("family", HF)
def test_gradient_accumulation_over_padded_batches(family):
    """Two micro-batches of different lengths, right-padded, with the pads masked out of the loss."""
    def micro(length, pad, seed):
        ids = torch.randint(1, hf_zoo.V, (2, length), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[1, length - pad:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}
    batches = [micro(12, 3, 0), micro(7, 2, 1)]
    eager = make(family)
    fast = moecompile.optimize(eager)
    grads = []
    for model in (eager, fast):
        model.zero_grad(set_to_none=True)
        for b in batches:
            (model(**b).loss / len(batches)).backward()
        grads.append({n: p.grad.clone() for n, p in eager.named_parameters() if p.grad is not None})
    assert_all_rewritten(fast)
    for name, g in grads[0].items():
        assert max_relative_error(grads[1][name], g, g) < 1e-4, name


@pytest.mark.parametrize("family", ["mixtral", "gpt_moe"])
def test_frozen_parameters(family):
    """Experts frozen (a common fine-tuning recipe), router and the rest trained."""
    eager = make(family)
    for name, p in eager.named_parameters():
        p.requires_grad_("experts" not in name)
    fast = moecompile.optimize(eager)
    args, kwargs = batch(family)
    loss_e, grads_e = _step(eager, args, kwargs)
    loss_f, grads_f = _step(fast, args, kwargs)
    assert_all_rewritten(fast)
    assert max_relative_error(loss_f, loss_e, loss_e) < 1e-4
    for name, g in grads_e.items():
        assert (g is None) == (grads_f[name] is None), name
        if g is not None:
            assert max_relative_error(grads_f[name], g, g) < 1e-4, name
    assert any("experts" in n for n in grads_e) and all(grads_e[n] is None for n in grads_e if "experts" in n)


@pytest.mark.parametrize("family", HF)
def test_state_dict_save_pretrained_and_deepcopy(family, tmp_path):
    eager = make(family)
    fast = moecompile.optimize(eager)
    args, kwargs = batch(family)
    want = eager(*args, **kwargs).logits.detach()
    fast(*args, **kwargs)
    assert fast.state_dict().keys() == eager.state_dict().keys()
    fast.save_pretrained(tmp_path)
    loaded = type(eager).from_pretrained(tmp_path)
    assert torch.equal(loaded(*args, **kwargs).logits.detach(), want)
    twin = copy.deepcopy(fast)
    assert_all_rewritten(twin)
    assert max_relative_error(twin(*args, **kwargs).logits.detach(), want, want) < 1e-5
    assert all(a is not b for a, b in zip(twin.parameters(), eager.parameters()))


def _ddp_rank(rank, world, family):
    from torch.nn.parallel import DistributedDataParallel as DDP
    eager = make(family)
    fast = moecompile.optimize(make(family))
    args, kwargs = batch(family, seed=rank)
    results = []
    for model in (eager, fast):
        ddp = DDP(model)
        out = ddp(*args, **kwargs)
        (out.loss if hasattr(out, "loss") else out[1]).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return results


@pytest.mark.parametrize("family", ["mixtral", "gpt_moe"])
def test_ddp_two_ranks(family):
    for eager, fast in run_ranks(_ddp_rank, 2, family):
        assert eager.keys() == fast.keys()
        for name, g in eager.items():
            assert max_relative_error(fast[name], g, g) < 1e-4, name
