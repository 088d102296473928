"""optimize() must not change what a model computes: outputs, loss and every gradient match eager."""
import pytest
import torch

import moecompile
from moecompile.models import gpt_dense, gpt_moe, gpt_moe_top1
from tests import hf_families, hf_zoo
from tests.helpers import assert_same_training_step
from tests.zoo import BiasedBank, EinsumBank, LoopBank, Net

EXPECTED_HF = {  # family → (blocks, experts, top-k, scoring, details that must be recognized)
    "mixtral": (2, 4, 2, "softmax", dict(renormalize=True, activation="swiglu", fused="halves")),
    "qwen2_moe": (2, 8, 2, "softmax", dict(renormalize=True, activation="swiglu", shared=True, shared_gate=True)),
    "deepseek_v2": (1, 8, 2, "softmax", dict(n_group=4, topk_group=2, scale=2.0, shared=True, shared_gate=False)),
    "switch": (2, 4, 1, "softmax", dict(capacity=4, activation="relu")),
    "deepseek_v3": (1, 8, 2, "sigmoid", dict(score_bias=True, n_group=4, topk_group=2, scale=2.5,
                                              renormalize=True, shared=True)),
    "gpt_oss": (2, 4, 2, "softmax", dict(activation="clamped_swiglu", bias=True, router_bias=True,
                                         renormalize=True, fused="interleaved", alpha=1.5, limit=0.5)),
    "ernie4_5_moe": (2, 8, 2, "softmax", dict(renormalize=True, score_bias=True, shared=True)),
    "cohere2_moe": (2, 8, 2, "sigmoid", dict(renormalize=True, shared=True)),
}


def check_layer(layer, E, k, scoring, details):
    assert layer.rewritten, layer.reason
    assert (layer.num_experts, layer.top_k, layer.scoring) == (E, k, scoring)
    s = layer.spec
    facts = dict(renormalize=s.route.renormalize, activation=s.expert.activation, shared=s.shared is not None,
                 shared_gate=s.shared_gate is not None, n_group=s.route.n_group, topk_group=s.route.topk_group,
                 scale=s.route.scale, capacity=s.capacity.capacity if s.capacity else None,
                 score_bias=s.score_bias is not None, bias=s.expert.bias, router_bias=s.router_bias is not None,
                 fused=s.expert.fused, alpha=s.expert.alpha, limit=s.expert.limit)
    assert {key: facts[key] for key in details} == details


@pytest.mark.parametrize("family", sorted(hf_zoo.FAMILIES))
def test_hugging_face_family(family):
    torch.manual_seed(0)
    eager = hf_zoo.FAMILIES[family]()
    fast = moecompile.optimize(eager)
    args, kwargs = hf_zoo.inputs(family, seed=1)
    assert_same_training_step(eager, fast, args, kwargs)   # the first call compiles
    blocks, E, k, scoring, details = EXPECTED_HF[family]
    report = moecompile.explain(fast)
    assert len(report.moe_layers) == blocks
    for layer in report.moe_layers:
        check_layer(layer, E, k, scoring, details)
    assert_same_training_step(eager, fast, *hf_zoo.inputs(family, seed=2))  # new data, compiled model


@pytest.mark.parametrize("factory,blocks,k", [(gpt_moe, 2, 2), (gpt_moe_top1, 2, 1), (gpt_dense, 0, None)])
def test_reference_models(factory, blocks, k):
    torch.manual_seed(0)
    eager = factory(n_layer=4, d_model=64, d_ff=128)
    idx = torch.randint(0, 256, (2, 16))
    fast = moecompile.optimize(eager, (idx, idx))
    report = moecompile.explain(fast)
    assert [m.name for m in report.moe_layers] == [f"blocks.{i}.ffn" for i in (1, 3)][:blocks]
    for layer in report.moe_layers:
        check_layer(layer, 8, k, "softmax", dict(activation="gelu", renormalize=k > 1))
    assert_same_training_step(eager, fast, (idx, torch.roll(idx, 1)), {})


@pytest.mark.parametrize("block,E,k,scoring,details", [
    (LoopBank, 4, 2, "softmax", dict(activation="swiglu", renormalize=True, shared=False)),
    (EinsumBank, 4, 2, "sigmoid", dict(activation="gelu", renormalize=True)),
    (BiasedBank, 4, 1, "softmax", dict(activation="relu", renormalize=False, shared=True, shared_gate=True)),
])
def test_detection_ignores_names(block, E, k, scoring, details):
    """Hand-written MoEs with unusual names, loop/index_add and gather/einsum styles, inside a model."""
    torch.manual_seed(0)
    eager = Net(block())
    x = torch.randn(2, 8, 32)
    fast = moecompile.optimize(eager)
    assert_same_training_step(eager, fast, (x,), {})
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.name == "block"
    check_layer(layer, E, k, scoring, details)
    assert_same_training_step(eager, fast, (torch.randn(3, 5, 32),), {})


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "switch"])
def test_auxiliary_losses_from_router_hooks(family):
    """output_router_logits=True: Hugging Face records router outputs through hooks on the router module;
    the loss (with load-balancing / z-losses) and every gradient must still match."""
    torch.manual_seed(0)
    eager = hf_zoo.FAMILIES[family]()
    fast = moecompile.optimize(eager)
    args, kwargs = hf_zoo.inputs(family, seed=3)
    kwargs = {**kwargs, "output_router_logits": True}
    assert_same_training_step(eager, fast, args, kwargs)
    assert all(layer.rewritten for layer in moecompile.explain(fast).moe_layers)
    out = fast(*args, **kwargs)
    aux = [k for k in out.keys() if k.endswith("aux_loss")]
    assert aux and all(out[k].item() > 0 for k in aux)


def test_bare_block_with_an_input_that_needs_no_gradient():
    """The expert op skips the input-gradient GEMMs when nothing upstream needs them."""
    torch.manual_seed(0)
    block = hf_zoo.mixtral().model.layers[0].mlp
    x = torch.randn(2, 12, 32)
    fast = moecompile.optimize(block, (x,))
    assert moecompile.explain(fast).moe_layers[0].rewritten
    assert_same_training_step(block, fast, (x,), {})


@pytest.mark.parametrize("family", sorted(hf_families.FAMILIES))
def test_more_hugging_face_families(family):
    """Every MoE block rewritten, and the training step equal to eager (biases made non-zero)."""
    import transformers
    model_cls, config_cls, kwargs = hf_families.FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"this transformers release has no {model_cls}")
    torch.manual_seed(0)
    eager = hf_zoo.nonzero_biases(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)))
    args, kwargs = hf_zoo.inputs("causal_lm", seed=4)
    fast = moecompile.optimize(eager)
    assert_same_training_step(eager, fast, args, kwargs)
    layers = moecompile.explain(fast).moe_layers
    assert layers and all(layer.rewritten for layer in layers), [layer.reason for layer in layers]
