"""The hand-written ScMoE and DGMoE references (moecompile/models/shortcut.py): what they compute, where
their routed branch reads from, and that optimize() keeps them equal to eager."""
import pytest
import torch

import moecompile
from moecompile.models import gpt_dgmoe, gpt_moe, gpt_scmoe
from moecompile.models.shortcut import double_gate_select
from tests.helpers import assert_same_training_step

SMALL = dict(n_layer=4, d_model=32, d_ff=64, n_head=4, max_seq=16)


def test_double_gate_never_picks_the_same_expert_twice():
    p_prev = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    p_cur = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.1, 0.6, 0.3]])
    i, j = double_gate_select(p_cur, p_prev)
    assert j.tolist() == [0, 2, 1]
    assert i.tolist() == [1, 0, 2]     # token 0 and 2: the current top-1 equals j, so its second choice


def _taps(model, idx):
    """Record the tap (shortcut input) each MoE block receives and the current-block input."""
    seen = []
    for block in model.blocks:
        if hasattr(block, "attn") and block.__class__.__name__ != "Block":
            block.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    model(idx)
    return seen


@pytest.mark.parametrize("build", [gpt_scmoe, gpt_dgmoe])
def test_routed_branch_reads_the_preceding_blocks_post_attention_residual(build):
    torch.manual_seed(0)
    model = build(**SMALL)
    idx = torch.randint(0, 256, (2, 8))
    taps = _taps(model, idx)
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(8))
    dense = model.blocks[0]
    want = dense.ln2(x + dense.attn(dense.ln1(x)))           # Pos-2, through the dense block's own ln2
    assert len(taps) == 2 and torch.allclose(taps[0], want, atol=1e-6)


def test_scmoe_routed_output_ignores_the_current_blocks_attention():
    """Changing block l+1's attention changes the shared-expert path only: with the shared expert silenced
    and the gate coefficient fixed, out - h is the routed branch, a function of the tap alone."""
    torch.manual_seed(0)
    block = gpt_scmoe(**SMALL).blocks[1]
    with torch.no_grad():
        block.shared.proj.weight.zero_()
        block.shared.proj.bias.zero_()
    x, tap = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    routed = block(x, tap) - (x + block.attn(block.ln1(x)))
    with torch.no_grad():
        block.attn.qkv.weight.mul_(3.0)
    routed_after = block(x, tap) - (x + block.attn(block.ln1(x)))
    assert torch.allclose(routed, routed_after, atol=1e-6)
    assert torch.allclose(routed, block.moe(tap), atol=1e-6)


def test_same_flops_per_token_as_top2():
    """Two expert-sized MLPs per token in every variant: ScMoE SE + 1 routed, DGMoE 2 routed, top-2 2."""
    def mlps_per_token(model):
        calls = []
        for name, m in model.named_modules():
            if m.__class__.__name__ == "MLP" and ("experts" in name or "shared" in name):
                m.register_forward_hook(lambda mod, args, out: calls.append(args[0].reshape(-1, 32).shape[0]))
        model(torch.randint(0, 256, (2, 8)))
        return sum(calls) / (16 * 2)  # tokens x MoE blocks
    for build in (gpt_scmoe, gpt_dgmoe, gpt_moe):
        torch.manual_seed(0)
        assert mlps_per_token(build(**SMALL)) == 2


@pytest.mark.parametrize("build", [gpt_scmoe, gpt_dgmoe])
def test_optimize_keeps_them_equal_to_eager(build):
    torch.manual_seed(0)
    eager = build(**SMALL)
    idx = torch.randint(0, 256, (2, 16))
    fast = moecompile.optimize(eager)
    assert_same_training_step(eager, fast, (idx, idx), {})
    assert_same_training_step(eager, fast, (idx.flip(0), idx), {})
    if build is gpt_scmoe:  # its routed MoE is an ordinary top-1 block: lifted
        layers = moecompile.explain(fast).moe_layers
        assert [(m.name, m.top_k, m.rewritten) for m in layers] == [("blocks.1.moe", 1, True), ("blocks.3.moe", 1, True)]


def test_bad_shortcut_requests():
    from moecompile.models.gpt import GPTConfig
    from moecompile.models.shortcut import ShortcutGPT
    with pytest.raises(ValueError, match="expected 'scmoe' or 'dgmoe'"):
        ShortcutGPT(GPTConfig(**SMALL), "pos-2")
    with pytest.raises(ValueError, match="moe_every >= 2"):
        ShortcutGPT(GPTConfig(**{**SMALL, "moe_every": 1}), "scmoe")
