"""optimize()/explain() behaviour a user relies on: same parameters, clear reasons, nothing silently wrong."""
import pytest
import torch
from torch import nn

import moecompile
from moecompile.models import gpt_dense, gpt_moe
from tests.helpers import assert_same_training_step
from tests.zoo import LoopBank, Net, NotMoE


class TanhBank(LoopBank):
    """An MoE whose experts use tanh, which the canonical expert op does not have."""

    def __init__(self):
        super().__init__()
        for w in self.workers:
            w.forward = lambda x, w=w: w.c(torch.tanh(w.a(x)) * w.b(x))


class SquaredWeights(LoopBank):
    """Routing weights squared after top-k: reads like softmax + top-k, computes something else."""

    def forward(self, x):
        B, S, D = x.shape
        x = x.reshape(-1, D)
        w, idx = self.scorer(x).softmax(-1).topk(self.k, dim=-1)
        from tests.zoo import _loop_dispatch
        return _loop_dispatch(x, self.workers, w * w, idx).view(B, S, D)


def test_shares_parameters_and_state_dict_keys():
    eager = gpt_moe(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (1, 8))
    fast = moecompile.optimize(eager, (idx,))
    assert all(a is b for a, b in zip(eager.parameters(), fast.parameters()))
    assert list(fast.state_dict()) == list(eager.state_dict())
    assert type(fast) is type(eager)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)   # training the fast model trains the original
    before = eager.lm_head.weight.detach().clone()
    fast(idx, idx)[1].backward()
    opt.step()
    assert not torch.equal(before, eager.lm_head.weight)
    assert eager.blocks[1].ffn.forward.__func__ is type(eager.blocks[1].ffn).forward  # original untouched


def test_explain_before_first_call_says_so():
    fast = moecompile.optimize(gpt_moe(n_layer=2, d_model=32, d_ff=64))
    assert "not compiled yet" in str(moecompile.explain(fast))
    fast(torch.randint(0, 256, (1, 8)))
    assert len(moecompile.explain(fast).moe_layers) == 1


def test_model_without_moe_is_returned_working_and_unchanged():
    eager = gpt_dense(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (2, 8))
    fast = moecompile.optimize(eager)
    assert torch.equal(fast(idx)[0], eager(idx)[0])
    report = moecompile.explain(fast)
    assert report.moe_layers == [] and "no MoE blocks found" in str(report)


class TopKPool(nn.Module):
    """Keeps each token's 4 largest features: a top-k over [B, S, D] that routes nothing."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        h = self.proj(x)
        kth = h.topk(4, dim=-1).values[..., -1:]
        return h * (h >= kth)


def test_topk_that_is_not_routing_is_not_an_moe():
    x = torch.randn(2, 8, 32)
    report = moecompile.explain(moecompile.optimize(Net(NotMoE()), (x,)))   # top-k over attention scores
    assert report.moe_layers == [] and "no MoE blocks found" in str(report)
    fast = moecompile.optimize(Net(TopKPool()), (x,))                       # top-k over features
    report = moecompile.explain(fast)
    assert report.moe_layers == []
    assert any("block" in n and "not MoE routing" in n for n in report.notes)
    assert torch.equal(fast(x), Net.forward(fast, x))


@pytest.mark.parametrize("bank,reason", [(TanhBank, "unrecognized expert activation"),
                                         (SquaredWeights, "translation validation failed")])
def test_unsupported_block_is_left_alone_with_a_reason(bank, reason):
    torch.manual_seed(0)
    eager = Net(bank())
    x = torch.randn(2, 8, 32)
    fast = moecompile.optimize(eager, (x,))
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.name == "block" and not layer.rewritten and reason in layer.reason
    assert "block" in str(moecompile.explain(fast))
    assert torch.equal(fast(x), eager(x))


def test_validate_false_trusts_the_analysis():
    torch.manual_seed(0)
    eager = Net(SquaredWeights())
    x = torch.randn(2, 8, 32)
    fast = moecompile.optimize(eager, (x,), validate=False)
    assert moecompile.explain(fast).moe_layers[0].rewritten
    assert not torch.allclose(fast(x), eager(x))  # exactly why validation is on by default


def test_bad_input_gives_clear_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        moecompile.optimize(lambda x: x)
    with pytest.raises(ValueError, match="returned by moecompile.optimize"):
        moecompile.explain(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown pipeline"):
        moecompile.optimize(nn.Linear(2, 2), (torch.randn(1, 2),), pipeline="nope")


def test_optimized_model_traces_with_the_canonical_ops():
    """The custom ops have fake implementations: export sees them, Dynamo compiles without graph breaks."""
    torch.manual_seed(0)
    eager = gpt_moe(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (2, 8))
    fast = moecompile.optimize(eager, (idx,))
    ops = [str(n.target) for n in torch.export.export(fast, (idx,)).graph.nodes if "moecompile" in str(n.target)]
    assert ops == ["moecompile.route.default", "moecompile.dispatch.default", "moecompile.expert_ffn.default",
                   "moecompile.combine.default"]
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    assert_same_training_step(eager, compiled, (idx, idx), {})


class NoisyBank(LoopBank):
    """Keeps running statistics and uses dropout before routing: compiling must not advance either."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        B, S, D = x.shape
        return super().forward(self.drop(self.norm(x.reshape(-1, D))).view(B, S, D))


def test_compiling_has_no_side_effects_on_buffers_or_rng():
    torch.manual_seed(0)
    model = Net(NoisyBank()).train()
    x = torch.randn(2, 8, 32)
    stats = model.block.norm.running_mean.clone()
    rng = torch.get_rng_state()
    moecompile.optimize(model, (x,))
    assert torch.equal(model.block.norm.running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)


def test_validation_accepts_a_gradient_that_is_zero_up_to_rounding():
    """Top-1 with renormalization: the weight is always 1, so the router gradient is rounding noise."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=1)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    fast = moecompile.optimize(block, (torch.randn(1, 16, 32),))
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    assert (layer.top_k, layer.spec.route.renormalize) == (1, True)


def test_an_error_of_the_model_itself_is_reported_as_such():
    fast = moecompile.optimize(gpt_moe(n_layer=2, d_model=32, d_ff=64, max_seq=8))
    with pytest.raises(RuntimeError, match="the model itself raised IndexError"):
        fast(torch.randint(0, 256, (1, 16)))   # longer than max_seq
    fast(torch.randint(0, 256, (1, 8)))        # a good call compiles after all
    assert len(moecompile.explain(fast).moe_layers) == 1


def test_a_real_construct_outside_the_spec_is_refused_not_mistranslated():
    """Cohere2-MoE's default averages routed and shared outputs, (routed + shared) / 2: no MoESpec field
    says so, so the reading misses the / 2 and translation validation must refuse the rewrite."""
    from tests.hf_zoo import cohere2_moe, inputs
    torch.manual_seed(0)
    eager = cohere2_moe(shared_expert_combination_strategy="average")
    args, kwargs = inputs("cohere2_moe")
    fast = moecompile.optimize(eager, args, kwargs)
    layers = moecompile.explain(fast).moe_layers
    assert len(layers) == 2
    assert all(not layer.rewritten and "translation validation failed" in layer.reason for layer in layers)
    assert torch.equal(fast(*args, **kwargs).logits, eager(*args, **kwargs).logits)


def test_kernels_default_to_native_on_cpu_and_can_be_forced():
    eager = gpt_moe(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (2, 8))
    fast = moecompile.optimize(eager, (idx, idx))
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.spec.kernels == dict.fromkeys(("route", "dispatch", "expert_ffn", "combine"), "native")
    assert "kernels: native" in str(moecompile.explain(fast))
    ref = moecompile.optimize(eager, (idx, idx), kernels="reference")
    (layer,) = moecompile.explain(ref).moe_layers
    assert layer.rewritten and set(layer.spec.kernels.values()) == {"reference"}
    assert_same_training_step(eager, ref, (idx, idx), {})
    with pytest.raises(ValueError, match="kernels='cuda'"):
        moecompile.optimize(eager, kernels="cuda")


@pytest.mark.interpreter
def test_triton_kernels_under_the_interpreter_match_eager():
    eager = gpt_moe(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (2, 8))
    fast = moecompile.optimize(eager, (idx, idx), kernels="triton")
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten and set(layer.spec.kernels.values()) == {"triton"}
    assert_same_training_step(eager, fast, (idx, idx), {})


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    eager = gpt_moe(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        moecompile.optimize(eager, (idx,), kernels="triton")


@pytest.mark.gpu
def test_cuda_model_runs_triton_kernels(cuda_triton):
    eager = gpt_moe(n_layer=2, d_model=64, d_ff=128).cuda()
    idx = torch.randint(0, 256, (2, 32), device="cuda")
    fast = moecompile.optimize(eager, (idx, idx))   # kernels="auto"
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten and set(layer.spec.kernels.values()) == {"triton"}, layer.reason
    assert_same_training_step(eager, fast, (idx, idx), {})
