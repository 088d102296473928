"""Reference GPT models and the detection zoo: they run, train, and mean what they say."""
import pytest
import torch
import torch.nn.functional as F

from moecompile.models import MLP, GPTConfig, MoE, gpt_dense, gpt_moe, gpt_moe_top1
from tests.zoo import BiasedBank, EinsumBank, LoopBank, Net, NotMoE

SMALL = dict(n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq=16)


@pytest.mark.parametrize("factory", [gpt_dense, gpt_moe, gpt_moe_top1])
def test_reference_forward_backward(factory):
    torch.manual_seed(0)
    model = factory(**SMALL)
    idx = torch.randint(0, 256, (2, 16))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (2, 16, 256)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            assert block.ffn.router.weight.grad.abs().sum() > 0  # both top-1 and top-2 train the router


def test_moe_placement():
    kinds = lambda m: [isinstance(b.ffn, MoE) for b in m.blocks]
    assert kinds(gpt_moe(n_layer=4)) == [False, True, False, True]
    assert kinds(gpt_moe_top1(n_layer=4)) == [False, True, False, True]
    assert kinds(gpt_dense(n_layer=4)) == [False] * 4
    assert kinds(gpt_moe(n_layer=3, moe_every=1)) == [True] * 3
    assert all(isinstance(b.ffn, MLP) for b in gpt_dense(n_layer=4).blocks)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_weights(top_k):
    """Recompute each token's output token by token: top-1 weighs by the raw softmax probability,
    top-2 by the probabilities renormalised over the chosen pair."""
    torch.manual_seed(0)
    moe = MoE(GPTConfig(d_model=16, d_ff=32, num_experts=4, top_k=top_k))
    x = torch.randn(2, 5, 16)
    out = moe(x).view(10, 16)
    xt = x.view(10, 16)
    probs = F.softmax(xt @ moe.router.weight.t(), dim=-1)  # [T, E]
    for t in range(10):
        chosen = probs[t].argsort(descending=True)[:top_k]
        w = probs[t, chosen]
        if top_k > 1:
            w = w / w.sum()
        else:
            assert 0 < w.item() < 1
        expected = sum(wi * moe.experts[e](xt[t]) for wi, e in zip(w, chosen.tolist()))
        torch.testing.assert_close(out[t], expected)


@pytest.mark.parametrize("cls", [LoopBank, EinsumBank, BiasedBank, NotMoE])
def test_zoo_block(cls):
    def run():
        torch.manual_seed(0)
        net = Net(cls())
        x = torch.randn(2, 6, 32, requires_grad=True)
        y = net(x)
        y.square().mean().backward()
        return y, x.grad

    y, grad = run()
    assert y.shape == (2, 6, 8)
    assert torch.isfinite(y).all() and torch.isfinite(grad).all() and grad.abs().sum() > 0
    y2, grad2 = run()
    assert torch.equal(y, y2) and torch.equal(grad, grad2)
