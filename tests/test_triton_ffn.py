"""The Triton expert FFN (fused activation epilogues) against the pure-torch reference, forward and backward,
under TRITON_INTERPRET=1 on CPU."""
import pytest
import torch

from moecompile.kernels import reference, triton_ffn

TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}
ROLES = ("w1", "w2", "w3", "b1", "b2", "b3")


def make_weights(E, D, F, activation, fused, bias, layout, dtype, gen):
    """Expert weights as a model would hold them. layout: "stacked" [E, out, in], "transposed" (stored
    [E, in, out] and used as its transpose) or "list" (one tensor per expert)."""
    gated = activation in ("swiglu", "geglu", "clamped_swiglu")
    F1 = 2 * F if fused else F

    def param(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype).requires_grad_()

    def weight(out, inp):
        return param(E, inp, out).transpose(1, 2) if layout == "transposed" else param(E, out, inp)

    w = {"w1": weight(F1, D), "w2": weight(D, F), "w3": weight(F, D) if gated and not fused else None,
         "b1": param(E, F1) if bias else None, "b2": param(E, D) if bias else None,
         "b3": param(E, F) if bias and gated and not fused else None}
    return w


def as_op_lists(w, layout):
    if layout == "list":
        return {n: list(t.unbind(0)) if t is not None else [] for n, t in w.items()}
    return {n: [t] if t is not None else [] for n, t in w.items()}


CASES = [  # activation, fused, bias, layout, counts
    ("swiglu", "", False, "list", [5, 0, 9, 1]),
    ("swiglu", "", True, "transposed", [2, 6, 3, 0]),     # separate up projection with biases
    ("swiglu", "halves", False, "stacked", [3, 7, 0, 0]),
    ("geglu", "interleaved", True, "transposed", [4, 4, 4, 4]),
    ("clamped_swiglu", "interleaved", True, "stacked", [6, 1, 0, 8]),
    ("gelu", "", True, "transposed", [0, 0, 13, 0]),
    ("gelu_tanh", "", False, "list", [2, 3, 5, 7]),
    ("relu", "", True, "stacked", [1, 0, 0, 0]),         # one row
    ("silu", "", False, "stacked", [9, 9, 0, 9]),
]


def run_both(activation, fused, bias, layout, counts, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, D, F = len(counts), 24, 20
    counts = torch.tensor(counts)
    N = int(counts.sum())
    w = make_weights(E, D, F, activation, fused, bias, layout, dtype, gen)
    x = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    lists = as_op_lists(w, layout)
    alpha, limit = 1.702, 0.9  # a small limit so the clamps are active on some elements
    ref_args = [lists[n] or None for n in ROLES]
    y_ref = reference.expert_ffn(x, counts, *ref_args, activation, fused, alpha, limit)
    dy = torch.randn(y_ref.shape, generator=gen).to(dtype)
    leaves = [x] + [t for n in ROLES for t in lists[n]]
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)

    with torch.no_grad():
        detached = {n: [t.detach() for t in lists[n]] for n in ROLES}
        y, *saved = triton_ffn.expert_ffn_forward(x.detach(), counts, *[detached[n] or None for n in ROLES],
                                                  activation, fused, alpha, limit)
        grad_x, grads = triton_ffn.expert_ffn_backward(dy, x.detach(), counts, saved,
                                                       *[detached[n] or None for n in ROLES],
                                                       activation, fused, alpha, limit)
    # one stacked gradient per role; per-expert weights get theirs as its rows
    got = [grad_x] + [t for n in ROLES if grads[n] is not None
                      for t in (grads[n].unbind(0) if layout == "list" else [grads[n]])]
    return (y, y_ref), list(zip(got, grads_ref, leaves))


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = TOL[dtype]
    scale = max(1.0, ref.float().abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation,fused,bias,layout,counts", CASES)
def test_expert_ffn_matches_reference(activation, fused, bias, layout, counts):
    (y, y_ref), grads = run_both(activation, fused, bias, layout, counts, torch.float32)
    assert_close(y, y_ref, torch.float32)
    for got, ref, _ in grads:
        assert_close(got, ref, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_expert_ffn_low_precision(dtype):
    (y, y_ref), grads = run_both("swiglu", "halves", True, "stacked", [5, 0, 9, 2], dtype)
    assert_close(y, y_ref, dtype)
    for got, ref, _ in grads:
        assert_close(got, ref, dtype)


@pytest.mark.interpreter
def test_gradients_keep_the_weight_layout():
    """A weight stored transposed gets its gradient with the same strides (autograd adds it without a copy);
    per-expert slices of one stacked parameter are read in place, not stacked."""
    w = torch.randn(4, 8, 6).transpose(1, 2)                    # [E, out=6, in=8] view of [E, 8, 6]
    assert triton_ffn.stacked([w], 3) is w
    parts = list(w.unbind(0))
    restacked = triton_ffn.stacked(parts, 3)
    assert restacked.data_ptr() == w.data_ptr() and restacked.stride() == w.stride()
    assert torch.equal(triton_ffn.stacked([t.clone() for t in parts], 3), w)
    (_, _), grads = run_both("gelu", "", False, "transposed", [3, 2, 0, 4], torch.float32)
    for got, _, weight in grads[1:]:
        assert got.stride() == weight.stride()


@pytest.mark.interpreter
def test_expert_ffn_autotuned(monkeypatch):
    """The GPU path autotunes (the interpreter path pins one tiling): the tuned configs give the same
    results (the accumulating GEMM's own tuning hazard is tested in test_triton_grouped_gemm.py)."""
    monkeypatch.setattr(triton_ffn, "INTERPRETER_CONFIG", None)
    (y, y_ref), grads = run_both("swiglu", "", True, "transposed", [2, 6, 3, 0], torch.float32, seed=3)
    assert_close(y, y_ref, torch.float32)
    for got, ref, _ in grads:
        assert_close(got, ref, torch.float32)
