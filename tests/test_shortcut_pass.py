"""The shortcut pass (passes/shortcut.py): GPT-MoE top-2 → ScMoE equals the hand-written ScMoE reference
(moecompile/models/shortcut.py) with the same weights, outputs and every gradient."""
import pytest
import torch

import moecompile
from moecompile.models import gpt_dense, gpt_dgmoe, gpt_moe, gpt_scmoe
from moecompile.validation import max_relative_error

SMALL = dict(n_layer=4, d_model=32, d_ff=64, n_head=4, max_seq=16, num_experts=8)


def _reference_names(name: str) -> str:
    """The reference's name for a parameter of the converted GPT-MoE."""
    name = name.replace(".ffn.shortcut_gate", ".coef.weight")
    for ours, theirs in (("w1", "fc.weight"), ("b1", "fc.bias"), ("w2", "proj.weight"), ("b2", "proj.bias")):
        name = name.replace(f".ffn.shortcut_shared.{ours}", f".shared.{theirs}")
    return name.replace(".ffn.router.", ".moe.router.").replace(".ffn.experts.", ".moe.experts.") \
        if any(f"blocks.{i}.ffn" in name for i in (1, 3)) else name


def _converted_and_reference():
    torch.manual_seed(0)
    model = gpt_moe(**SMALL)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    fast = moecompile.optimize(model, (idx, idx), shortcut="scmoe")
    with torch.no_grad():  # a gate that is not zero, so a misplaced coefficient shows
        for i in (1, 3):
            fast.blocks[i].ffn.shortcut_gate.normal_(0, 0.5)
    ref = gpt_scmoe(**SMALL)
    ours = dict(fast.named_parameters())
    state = {_reference_names(n): (p[0] if ".shortcut_shared." in n else p).detach() for n, p in ours.items()}
    ref.load_state_dict(state, strict=True)
    return fast, ref, idx


def _assert_same_step(fast, ref, idx, reference_name):
    """Outputs and every gradient of `fast` equal `ref`'s, parameters paired by `reference_name`."""
    (out, loss), (want, want_loss) = fast(idx, idx), ref(idx, idx)
    assert max_relative_error(out, want, want) < 1e-5
    loss.backward()
    want_loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g = theirs[reference_name(name)].grad
        g = g.unsqueeze(0) if ".shortcut_shared." in name else g   # ours are stacked [1, ...]
        assert max_relative_error(p.grad, g, p) < 1e-5, name


def test_scmoe_conversion_equals_the_reference():
    fast, ref, idx = _converted_and_reference()
    _assert_same_step(fast, ref, idx, _reference_names)


def test_explain_says_the_architecture_changed():
    fast, _, _ = _converted_and_reference()
    report = moecompile.explain(fast)
    assert [(m.name, m.top_k) for m in report.moe_layers] == [("blocks.1.ffn", 1), ("blocks.3.ffn", 1)]
    note = next(n for n in report.notes if n.startswith("architecture changed"))
    before = sum(p.numel() for p in gpt_moe(**SMALL).parameters())
    after = sum(p.numel() for p in fast.parameters())
    assert f"{before:,} → {after:,}" in note and "blocks.1.ffn, blocks.3.ffn" in note
    assert after == before + 2 * (2 * 32 * 64 + 64 + 32 + 32)       # a shared expert and a gate per block


def test_moe_in_every_block_taps_the_attention_input():
    """MoE in every block (Mixtral-style): the paper's Pos-1, the routed branch reads the block's first norm's
    output (its attention's input). Checked against the formula with a top-1 GPT MoE holding the same weights."""
    from moecompile.models.gpt import GPTConfig, MoE
    torch.manual_seed(0)
    model = gpt_moe(**{**SMALL, "moe_every": 1})
    idx = torch.randint(0, 256, (2, 16))
    fast = moecompile.optimize(model, (idx,), shortcut="scmoe")
    layers = moecompile.explain(fast).moe_layers
    assert [m.top_k for m in layers] == [1] * 4
    assert "blocks.2.ln1, its attention's input (Pos-1" in " ".join(layers[2].spec.notes)
    block, x = fast.blocks[2], torch.randn(2, 16, 32)
    routed = MoE(GPTConfig(**{**SMALL, "top_k": 1}))
    routed.load_state_dict({k: v for k, v in block.ffn.state_dict().items() if k.startswith(("router", "experts"))})
    with torch.no_grad():
        h = x + block.attn(block.ln1(x))
        c = block.ln2(h)
        want = h + torch.sigmoid(c @ block.ffn.shortcut_gate.t()) * block.ffn.shortcut_shared(c.reshape(-1, 32)
                                                                                              ).view_as(c) \
            + routed(block.ln1(x))
        assert max_relative_error(block(x), want, want) < 1e-5
    out, loss = fast(idx, idx)
    loss.backward()
    assert all(layer.spec.shortcut is not None for layer in layers)


def test_bad_requests():
    with pytest.raises(ValueError, match="expected None, 'scmoe' or 'dgmoe'"):
        moecompile.optimize(gpt_moe(**SMALL), (torch.zeros(1, 4, dtype=torch.long),), shortcut="pos-9")
    with pytest.raises(ValueError, match="needs example_inputs"):
        moecompile.optimize(gpt_moe(**SMALL), shortcut="scmoe")


def test_dgmoe_conversion_equals_the_reference():
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    fast = moecompile.optimize(gpt_moe(**SMALL), (idx, idx), shortcut="dgmoe")
    ref = gpt_dgmoe(**SMALL)
    rename = lambda n: n.replace(".ffn.router.", ".router.").replace(".ffn.experts.", ".experts.") \
        if any(f"blocks.{i}.ffn" in n for i in (1, 3)) else n  # noqa: E731
    ref.load_state_dict({rename(n): p.detach() for n, p in fast.named_parameters()}, strict=True)
    _assert_same_step(fast, ref, idx, rename)
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in gpt_moe(**SMALL).parameters())


def _upcycled_pairs(model):
    """(parameter of the upcycled GPT, the expert index or None, the reference's name for that part)."""
    layers = {"w1": "fc.weight", "b1": "fc.bias", "w2": "proj.weight", "b2": "proj.bias"}
    for n, p in model.named_parameters():
        role = n.rsplit(".", 1)[-1]
        if n.startswith(("blocks.1.ffn.", "blocks.3.ffn.")) and role in layers:
            for e in range(p.shape[0]):
                yield p, e, n.replace(f"ffn.{role}", f"moe.experts.{e}.{layers[role]}")
        else:
            for ours, theirs in (("ffn.router", "moe.router.weight"), ("ffn.gate", "coef.weight"),
                                 ("ffn.shared.", "shared.")):
                n = n.replace(ours, theirs)
            yield p, None, n


def test_dense_gpt_upcycled_to_scmoe_equals_the_reference():
    """Experts copied from the block before, the block's FFN as shared expert (output layer doubled: the
    zero gate halves it), and then the same function as the hand-written ScMoE with those weights."""
    torch.manual_seed(0)
    dense = gpt_dense(**SMALL)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    want_dense = {n: p.detach().clone() for n, p in dense.named_parameters()}
    fast = moecompile.optimize(dense, (idx, idx), shortcut="scmoe", num_experts=8)
    assert all(torch.equal(p, want_dense[n]) for n, p in dense.named_parameters())   # the user's model untouched
    block = fast.blocks[1].ffn
    assert torch.equal(block.w1[5], dense.blocks[0].ffn.fc.weight)                   # experts: the FFN before
    assert torch.equal(block.shared.proj.weight, 2 * dense.blocks[1].ffn.proj.weight)
    _, fast_loss = fast(idx, idx)
    _, dense_loss = dense(idx, idx)
    assert abs(fast_loss.item() - dense_loss.item()) < 0.01 * dense_loss.item()      # starts close

    ref = gpt_scmoe(**SMALL)
    pairs = list(_upcycled_pairs(fast))
    ref.load_state_dict({name: (p if e is None else p[e]).detach() for p, e, name in pairs}, strict=True)
    (out, loss), (want, want_loss) = fast(idx, idx), ref(idx, idx)
    assert max_relative_error(out, want, want) < 1e-5
    loss.backward()
    want_loss.backward()
    theirs = dict(ref.named_parameters())
    for p, e, name in pairs:
        ours = p.grad if e is None else p.grad[e]
        assert max_relative_error(ours, theirs[name].grad, theirs[name]) < 1e-5, name


def test_upcycling_requests():
    with pytest.raises(ValueError, match="needs shortcut='scmoe'"):
        moecompile.optimize(gpt_dense(**SMALL), (torch.zeros(1, 4, dtype=torch.long),), num_experts=8)
    with pytest.raises(ValueError, match="already has MoE blocks"):
        moecompile.optimize(gpt_moe(**SMALL), (torch.zeros(1, 4, dtype=torch.long),), shortcut="scmoe",
                            num_experts=8)


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_hugging_face_dense_models_upcycle(family):
    """Hugging Face dense decoders (SwiGLU MLPs, no biases): every second layer's MLP becomes a ScMoE block
    that starts close to it and trains (router, experts, gate and shared expert all get gradients)."""
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)
    dense = getattr(transformers, f"{family}ForCausalLM")(config)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    fast = moecompile.optimize(dense, (ids,), {"labels": ids}, shortcut="scmoe", num_experts=4)
    layers = moecompile.explain(fast).moe_layers
    assert [(m.name, m.top_k, m.spec.expert.activation) for m in layers] == \
        [("model.layers.1.mlp", 1, "swiglu"), ("model.layers.3.mlp", 1, "swiglu")]
    loss = fast(ids, labels=ids).loss
    assert abs(loss.item() - dense(ids, labels=ids).loss.item()) < 0.01 * loss.item()
    loss.backward()
    block = fast.model.layers[1].mlp
    for name in ("router", "gate", "w1", "w2", "w3", "shared.down_proj.weight"):
        assert block.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hugging_face_top2_models_convert(family):
    """Mixtral and Qwen2-MoE put an MoE in every layer: Pos-1, routed on each layer's input_layernorm output.
    Qwen2-MoE keeps its own gated shared expert (no new parameters); Mixtral gets one per layer."""
    from tests import hf_zoo
    torch.manual_seed(0)
    model = hf_zoo.FAMILIES[family]()
    args, kwargs = hf_zoo.inputs(family)
    fast = moecompile.optimize(model, args, kwargs, shortcut="scmoe")
    layers = moecompile.explain(fast).moe_layers
    assert [m.top_k for m in layers] == [1, 1]
    assert all(f"model.layers.{i}.input_layernorm" in m.spec.notes[-1] for i, m in enumerate(layers))
    added = sum(p.numel() for p in fast.parameters()) - sum(p.numel() for p in model.parameters())
    assert (added == 0) == (family == "qwen2_moe")
    fast(*args, **kwargs).loss.backward()
    assert fast.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0       # the router trains


@pytest.mark.parametrize("shortcut", ["scmoe", "dgmoe"])
def test_shortcut_model_round_trips_through_torch_save(shortcut):
    """The taps that feed the routed branch are hooks of the model: they travel with it and still feed it."""
    import io
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    fast = moecompile.optimize(gpt_moe(**SMALL), (idx, idx), shortcut=shortcut)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    other = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (got, _), (want, _) = loaded(other, other), fast(other, other)
    assert max_relative_error(got, want, want) < 1e-6
    assert sum(layer.rewritten for layer in moecompile.explain(loaded).moe_layers) == 2
