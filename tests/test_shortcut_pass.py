"""The shortcut pass (passes/shortcut.py): GPT-MoE top-2 → ScMoE equals the hand-written ScMoE reference
(moecompile/models/shortcut.py) with the same weights, outputs and every gradient."""
import pytest
import torch

import moecompile
from moecompile.models import gpt_dgmoe, gpt_moe, gpt_scmoe
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


def test_a_first_block_moe_is_left_alone_with_a_reason():
    torch.manual_seed(0)
    model = gpt_moe(**{**SMALL, "moe_every": 1})            # MoE in every block
    idx = torch.randint(0, 256, (2, 16))
    fast = moecompile.optimize(model, (idx,), shortcut="scmoe")
    layers = moecompile.explain(fast).moe_layers
    assert all(m.top_k == 2 for m in layers)
    assert "no preceding block" in " ".join(layers[0].spec.notes)
    assert "MoE too" in " ".join(layers[1].spec.notes)


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
