"""Expert GEMMs on oneDNN (kernels/onednn.py): which CPUs and weights take them, and that they change
results only by fp32 rounding, through every native path that calls them: the expert FFN with autograd
(forward and input gradients), the whole-call forward, the per-expert loop of large calls without autograd,
and the fast path. No timings here (benchmarks/small.py)."""
import pytest
import torch

import moecompile
from moecompile.kernels import native, onednn
from moecompile.kernels import reference as ref

from test_small_paths import ROLES, close, expert_weights

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")


@pytest.fixture
def counted(monkeypatch):
    """oneDNN forced on for every weight size; the list of its calls' row counts."""
    calls, linear = [], onednn._LINEAR

    def counting(x, *args):
        calls.append(x.shape[0])
        return linear(x, *args)
    monkeypatch.setattr(onednn, "ENABLED", True)
    monkeypatch.setattr(onednn, "MIN_WEIGHT", 0)
    monkeypatch.setattr(onednn, "_LINEAR", counting)
    return calls


@pytest.mark.parametrize("choice,vendor,chosen", [("", "AuthenticAMD", True), ("", "GenuineIntel", False),
                                                  ("", None, False), ("aten", "AuthenticAMD", False),
                                                  ("onednn", "GenuineIntel", True)])
def test_the_choice_is_the_environments_else_the_cpu_vendors(choice, vendor, chosen, monkeypatch):
    monkeypatch.setenv("MOECOMPILE_CPU_GEMM", choice)
    monkeypatch.setattr(onednn, "_cpu_vendor", lambda: vendor)
    assert onednn._chosen() is chosen


def test_a_wrong_choice_is_an_error(monkeypatch):
    monkeypatch.setenv("MOECOMPILE_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="'onednn' or 'aten'"):
        onednn._chosen()


def test_only_large_fp32_cpu_weights_take_it(monkeypatch):
    monkeypatch.setattr(onednn, "ENABLED", True)
    rows, big, small = torch.randn(4, 512), torch.randn(8, 2048, 512), torch.randn(8, 256, 256)
    assert onednn.takes(rows, big) and onednn.takes(rows, big[0].t())
    assert not onednn.takes(rows, small)
    assert not onednn.takes(rows.bfloat16(), big.bfloat16())
    monkeypatch.setattr(onednn, "ENABLED", False)
    assert not onednn.takes(rows, big)


def test_linear_is_f_linear():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 64, generator=gen), torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    assert close(onednn.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert close(onednn.linear(x, w.t().contiguous().t()), x @ w.t())  # a transposed view as the weight
    assert onednn.linear(x[:0], w).shape == (0, 96)


KINDS = [("swiglu", "halves", False), ("swiglu", "", False), ("gelu", "", True)]


@pytest.mark.parametrize("T", [0, 1, 4, 64])
@pytest.mark.parametrize("path", ["autograd", "whole-call", "loop"])
@pytest.mark.parametrize("activation,fused,bias", KINDS)
def test_expert_ffn_on_onednn_is_the_references(T, path, activation, fused, bias, counted, monkeypatch):
    """native expert_ffn with oneDNN's GEMMs: the reference's outputs (and with autograd its gradients)
    at 0, 1, k and many tokens; oneDNN ran wherever rows reached an expert without biases (biased
    GEMMs keep aten's addmm, save in the loop, which takes them). 8 experts: from 16 with autograd, rows
    padded per expert take a bmm first (kernels/padded.py)."""
    E, K, D, F = 8, 2, 8, 6
    gen = torch.Generator().manual_seed(T + 7)
    w = expert_weights(E, D, F, fused, bias, gen)
    if activation == "gelu":
        w["w3"], w["b3"] = None, None
    if path == "loop":
        monkeypatch.setattr(native, "SMALL_ROWS", 0)
    indices = torch.rand(T, E, generator=gen).topk(K, -1).indices
    x_perm, _, counts = ref.dispatch(torch.randn(T, D, generator=gen), indices, E, -1, 0)
    x_perm.requires_grad_()
    args = (*({r: None if t is None else [t] for r, t in w.items()}[r] for r in ROLES), activation, fused, 1.702, 7.0)
    want = ref.expert_ffn(x_perm, counts, *args)
    plain = [None if w[r] is None else [w[r].detach()] for r in ROLES]
    save = path == "autograd"
    y, *saved = native.expert_ffn_forward(x_perm.detach(), counts, *plain, *args[6:], save=save)
    assert close(y, want)
    assert bool(counted) == (T > 0 and (not bias or path == "loop"))
    if not save:
        return
    grad_y = torch.randn(y.shape, generator=gen)
    grad_x, grads = native.expert_ffn_backward(grad_y, x_perm.detach(), counts, saved, *plain, *args[6:])
    leaves = [x_perm] + [w[r] for r in ROLES if w[r] is not None]
    expected = torch.autograd.grad(want, leaves, grad_y, allow_unused=True)
    assert close(grad_x, expected[0])
    for r, e in zip([r for r in ROLES if w[r] is not None], expected[1:]):
        assert close(grads[r], e), r


def mixtral_block():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).model.layers[0].mlp


@pytest.mark.parametrize("T", [1, 2, 8, 64])
@pytest.mark.parametrize("training", [False, True])
def test_an_optimized_block_on_onednn_is_the_original(T, training, counted, monkeypatch):
    """A Hugging Face Mixtral block, optimized, oneDNN forced: outputs (and the input's and weights'
    gradients in training) equal to the original's and to the aten GEMMs' within fp32 rounding, at decode
    and prefill sizes; without autograd through the fast path (its whole-call form: no row blocks given)."""
    block = mixtral_block()
    fast = moecompile.optimize(block, example_inputs=(torch.randn(1, 4, 32),))
    counted.clear()  # optimize()'s own checks ran the block
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(T))
    params = [p for p in block.parameters() if p.requires_grad]

    def run(module):
        module.train(training)
        xi = x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out = module(xi)
            out = out[0] if isinstance(out, tuple) else out
            cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            grads = torch.autograd.grad(out, [xi] + params, cot) if training else []
        return out.detach(), grads

    want, want_g = run(block)
    got, got_g = run(fast)
    ran = len(counted)
    monkeypatch.setattr(onednn, "ENABLED", False)
    plain, plain_g = run(fast)
    assert close(got, want) and close(got, plain)
    for g, r, p in zip(got_g, want_g, plain_g):
        assert close(g, r, rtol=1e-4) and close(g, p, rtol=1e-4)
    if T == 64 or training and T > 1:  # else the decode path (autograd) or the bagged form: no GEMMs
        assert ran > 0


def test_the_stacked_form_steps_aside_for_onednn(counted, monkeypatch):
    """Without autograd the grouped path on oneDNN is taken where the stacked form (one bmm over padded
    rows) would pay on aten's GEMMs."""
    from moecompile.ir import lowering
    from test_small_paths import E_, qwen3_block
    block = qwen3_block()
    spec = moecompile.explain(moecompile.optimize(block, example_inputs=(torch.randn(2, 8, 32),))).moe_layers[0].spec
    spread = torch.arange(E_ * 2).remainder(E_).view(-1, spec.top_k)  # every expert twice: the stacked form pays
    tokens, w1 = torch.randn(spread.shape[0], 32), block.experts.gate_up_proj
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with torch.no_grad():
        assert lowering.batched_path(spec, spread, tokens, w1) == (None, None)
        monkeypatch.setattr(onednn, "ENABLED", False)
        assert lowering.batched_path(spec, spread, tokens, w1)[0] == "stacked"


def test_explain_says_where_expert_gemms_run(monkeypatch):
    """explain() names oneDNN for blocks whose weights it takes, at the size it takes (here every size, as
    forced; by default 2 MiB per expert), and not where it is off or the weights are too small."""
    def details():
        fast = moecompile.optimize(mixtral_block(), example_inputs=(torch.randn(1, 4, 32),))
        return moecompile.explain(fast).moe_layers[0].details
    monkeypatch.setattr(onednn, "ENABLED", True)
    monkeypatch.setattr(onednn, "MIN_WEIGHT", 0)
    assert "expert GEMMs on oneDNN" in details() and "forward and input gradients" in details()
    assert "not while oneDNN takes the GEMMs" in details()
    monkeypatch.setattr(onednn, "MIN_WEIGHT", 1 << 19)
    assert "oneDNN" not in details()
    monkeypatch.setattr(onednn, "MIN_WEIGHT", 0)
    monkeypatch.setattr(onednn, "ENABLED", False)
    assert "oneDNN" not in details()


def test_explain_drops_the_padded_gemms_for_onednn(monkeypatch):
    """A block of 16 experts names the padded GEMMs with autograd on aten's GEMMs, not where oneDNN takes them."""
    from test_small_paths import qwen3_block

    def details():
        fast = moecompile.optimize(qwen3_block(), example_inputs=(torch.randn(1, 4, 32),))
        return moecompile.explain(fast).moe_layers[0].details
    monkeypatch.setattr(onednn, "MIN_WEIGHT", 0)
    monkeypatch.setattr(onednn, "ENABLED", False)
    assert "bmm over rows padded per expert" in details()
    monkeypatch.setattr(onednn, "ENABLED", True)
    assert "bmm over rows padded per expert" not in details() and "forward and input gradients" in details()
