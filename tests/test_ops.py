"""Each canonical op, on every kernel backend, against its pure-torch reference, forward and backward, and
torch.library.opcheck. The Triton backend runs in Triton's interpreter here (tests/conftest.py)."""
import pytest
import torch

from moecompile.ir import ops
from moecompile.kernels import reference as ref

BACKENDS = ["native", "reference", pytest.param("triton", marks=pytest.mark.interpreter)]


class Ops:
    """The canonical ops with one backend bound (the ops take it as their last argument), called as the
    lowering calls them (ops.call: the eager path; opcheck below covers the custom ops themselves)."""

    def __init__(self, backend):
        for name in ("route", "combine"):
            setattr(self, name, lambda *args, op=getattr(ops, name): ops.call(op, *args, backend))
        self.dispatch = lambda *args: ops.call(ops.dispatch, *args, None, backend)  # no batch priority
        self.expert_ffn = lambda *args: ops.call(ops.expert_ffn, *args, True, backend)  # save for backward

CASES = [  # T, D, F, E, k, activation, bias, capacity
    (10, 6, 5, 4, 2, "swiglu", False, -1),
    (10, 6, 5, 4, 2, "gelu", True, -1),
    (1, 6, 5, 4, 1, "relu", True, -1),          # one token
    (7, 6, 5, 3, 3, "clamped_swiglu", True, -1),  # top-k = E
    (16, 6, 5, 8, 1, "gelu_tanh", False, -1),     # some experts get no token
    (12, 6, 5, 4, 2, "geglu", False, 3),          # capacity: slots dropped
]


def run(impl, x, logits, w, T, E, k, act, bias, cap, gated):
    """The whole canonical pipeline through one implementation; returns out and its input gradients."""
    weights, idx, counts = impl.route(logits, None, E, k, "softmax", k > 1, 1.0, 1, 1, "max")
    x_perm, order, counts = impl.dispatch(x, idx, E, cap, 0)
    absent = None if impl is ref else []
    lists = {n: list(t.unbind(0)) if t is not None else absent for n, t in w.items()}
    y = impl.expert_ffn(x_perm, counts, lists["w1"], lists["w2"], lists["w3"], lists["b1"], lists["b2"],
                        lists["b3"], act, "", 1.702, 7.0)
    y = y[0] if isinstance(y, tuple) else y
    out = impl.combine(y, order, weights, None)
    leaves = [x, logits] + [t for t in w.values() if t is not None]
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    return out, torch.autograd.grad(out, leaves, cot, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,D,F,E,k,act,bias,cap", CASES)
def test_pipeline_matches_reference(T, D, F, E, k, act, bias, cap, backend):
    torch.manual_seed(0)
    gated = act in ("swiglu", "geglu", "clamped_swiglu")
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    mk = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    # w1 stored [E, D, F] and transposed: the ops must accept non-contiguous expert views
    w = {"w1": mk(E, D, F).transpose(1, 2), "w2": mk(E, D, F), "w3": mk(E, F, D) if gated else None,
         "b1": mk(E, F) if bias else None, "b2": mk(E, D) if bias else None,
         "b3": mk(E, F) if bias and gated else None}
    out1, g1 = run(Ops(backend), x, logits, w, T, E, k, act, bias, cap, gated)
    out2, g2 = run(ref, x, logits, w, T, E, k, act, bias, cap, gated)
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused,act,bias,transposed", [("halves", "swiglu", False, False),
                                                       ("interleaved", "clamped_swiglu", True, True),
                                                       ("halves", "geglu", True, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_fused_weights_match_reference(fused, act, bias, transposed, backend):
    """Stacked [E, ...] weights passed whole, a fused gate/up projection, [in, out] storage."""
    torch.manual_seed(0)
    T, D, F, E, k = 12, 6, 5, 4, 2
    x = torch.randn(T, D, requires_grad=True)
    idx = torch.randn(T, E).topk(k, -1).indices
    w1 = torch.randn(E, D, 2 * F, requires_grad=True) if transposed else torch.randn(E, 2 * F, D, requires_grad=True)
    w2 = torch.randn(E, D, F, requires_grad=True)
    b1, b2 = torch.randn(E, 2 * F, requires_grad=True), torch.randn(E, D, requires_grad=True)
    results = []
    for impl in (Ops(backend), ref):
        x_perm, order, counts = impl.dispatch(x, idx, E, -1, 0)
        bs = ([b1], [b2]) if bias else ([], [])
        absent = None if impl is ref else []
        if impl is ref:
            bs = tuple(b or None for b in bs)
        y = impl.expert_ffn(x_perm, counts, [w1.transpose(1, 2) if transposed else w1], [w2],
                            absent, bs[0], bs[1], absent, act, fused, 1.702, 7.0)
        y = y[0] if isinstance(y, tuple) else y
        leaves = [x, w1, w2] + ([b1, b2] if bias else [])
        results.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y))))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_variants_match_reference_semantics(backend):
    torch.manual_seed(0)
    logits = torch.randn(9, 8)
    bias = torch.randn(8)
    w, idx, counts = ops.route(logits, bias, 8, 2, "sigmoid", True, 2.5, 4, 2, "top2sum", backend)
    scores = logits.sigmoid()
    # chosen experts lie in the 2 best groups (group score: sum of the top-2 biased scores in the group)
    group_score = (scores + bias).view(9, 4, 2).topk(2, -1).values.sum(-1)
    best = group_score.topk(2, -1).indices
    assert all(set((idx[t] // 2).tolist()) <= set(best[t].tolist()) for t in range(9))
    # weights are the unbiased scores, renormalized, scaled
    expect = scores.gather(1, idx)
    torch.testing.assert_close(w, 2.5 * expect / expect.sum(-1, keepdim=True))
    assert counts.sum() == 18 and torch.equal(counts, torch.bincount(idx.flatten(), minlength=8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_keeps_first_tokens_per_group(backend):
    idx = torch.tensor([[0], [0], [0], [1], [0], [0]])           # T=6, k=1
    x = torch.arange(6.0).unsqueeze(1)
    x_perm, order, counts = ops.dispatch(x, idx, 2, 2, 3, None, backend)  # capacity 2 per group of 3 tokens
    assert order.tolist() == [0, 1, 4, 5, 3] and counts.tolist() == [4, 1]
    assert x_perm.squeeze(1).tolist() == [0.0, 1.0, 4.0, 5.0, 3.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.manual_seed(0)
    T, D, F, E, k = 6, 4, 3, 3, 2
    logits = torch.randn(T, E, requires_grad=True)
    x = torch.randn(T, D, requires_grad=True)
    torch.library.opcheck(ops.route, (logits, None, E, k, "softmax", True, 1.0, 1, 1, "max", backend))
    weights, idx, _ = ops.route(logits, None, E, k, "softmax", True, 1.0, 1, 1, "max", backend)
    torch.library.opcheck(ops.dispatch, (x, idx, E, -1, 0, None, backend))
    # capacity: a data-dependent N. opcheck's AOT-dispatch checks cannot run an op whose output size is
    # data-dependent (static: DynamicOutputShapeException; dynamic: "Node sym_size_int was invalid, but is
    # output"), so only those two are left out here
    torch.library.opcheck(ops.dispatch, (x, idx, E, 3, 0, None, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    x_perm, order, counts = ops.dispatch(x, idx, E, -1, 0, None, backend)
    ws = [[torch.randn(*s, requires_grad=True) for _ in range(E)] for s in ((F, D), (D, F), (F, D))]
    torch.library.opcheck(ops.expert_ffn, (x_perm.detach().requires_grad_(), counts, *ws, [], [], [],
                                           "swiglu", "", 1.702, 7.0, True, backend))
    fused = [torch.randn(E, 2 * F, D, requires_grad=True)], [torch.randn(E, D, F, requires_grad=True)]
    torch.library.opcheck(ops.expert_ffn, (x_perm.detach().requires_grad_(), counts, *fused, [],
                                           [torch.randn(E, 2 * F, requires_grad=True)],
                                           [torch.randn(E, D, requires_grad=True)], [], "swiglu", "interleaved",
                                           1.702, 7.0, True, backend))
    y = torch.randn(T * k, D, requires_grad=True)
    w = weights.detach().requires_grad_()
    torch.library.opcheck(ops.combine, (y, order, w, None, backend))
    torch.library.opcheck(ops.combine, (y, order, w, x.detach().requires_grad_(), backend))


@pytest.mark.parametrize("E,k,scoring", [(8, 2, "softmax"), (32, 4, "softmax"), (8, 1, "sigmoid")])
def test_native_route_fast_paths_match_reference(E, k, scoring):
    """Many rows take native's max-based top-k and (E <= 16) the transposed softmax."""
    logits = torch.randn(2048, E, generator=torch.Generator().manual_seed(E), requires_grad=True)
    want = ref.route(logits, None, E, k, scoring, k > 1, 2.0, 1, 1, "max")
    cot = torch.randn(2048, k)
    (grad_want,) = torch.autograd.grad(want[0], logits, cot)
    args = (logits, None, E, k, scoring, k > 1, 2.0, 1, 1, "max", "native")
    # the custom op with its closed-form backward (traced graphs), and eager autograd through the forward
    for got in (ops.route(*args), ops.call(ops.route, *args)):
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[0], want[0])
        (grad,) = torch.autograd.grad(got[0], logits, cot)
        torch.testing.assert_close(grad, grad_want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_without_save_matches(backend):
    """save=False (inference): same y, nothing kept for a backward."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 6)
    w = [[torch.randn(3, 4, 6)], [torch.randn(3, 6, 4)], [torch.randn(3, 4, 6)]]
    with torch.no_grad():
        kept = ops.call(ops.expert_ffn, x, counts, *w, [], [], [], "swiglu", "", 1.702, 7.0, True, backend)
        lean = ops.call(ops.expert_ffn, x, counts, *w, [], [], [], "swiglu", "", 1.702, 7.0, False, backend)
    torch.testing.assert_close(lean[0], kept[0])
    assert all(t.shape[0] == 0 for t in lean[1:])


@pytest.mark.parametrize("T,k,E,capacity,group_size", [(4096, 1, 8, 512, 0), (2048, 2, 32, 40, 512),
                                                       (1024, 2, 4, 0, 0)])
def test_native_capacity_dispatch_by_sorting_matches_reference(T, k, E, capacity, group_size):
    """Enough slots for native's sort-based capacity path: same order, rows and kept counts."""
    g = torch.Generator().manual_seed(T + E)
    idx, x = torch.randint(0, E, (T, k), generator=g), torch.randn(T, 4, generator=g)
    got = ops.dispatch(x, idx, E, capacity, group_size, None, "native")
    want = ref.dispatch(x, idx, E, capacity, group_size)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
