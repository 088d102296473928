"""Triton routing, dispatch and combine against moecompile.kernels.reference (interpreter on CPU; the gpu
test needs CUDA). Forward: exact ids, orders and counts, close values; backward: against autograd through
the reference."""
import pytest
import torch

from moecompile.kernels import reference
from moecompile.kernels import triton_routing as tr

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(out, ref, dtype=None):
    """Within the tolerance of `dtype` (the data's, default ref's: an fp32 grad of fp16 data is fp16-exact)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol = TOL[dtype or ref.dtype]
    scale = max(1.0, ref.float().abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=rtol * scale)


def make_indices(T, E, k, device="cpu", seed=0, unused=()):
    """Distinct experts per token from random scores; experts in `unused` are never picked."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    scores[:, list(unused)] = -1.0
    return scores.topk(k, -1).indices.to(device)


# ---- route -------------------------------------------------------------------------------------------------
ROUTES = {  # name: (T, E, k, scoring, bias, renormalize, scale, n_group, topk_group, group_score, layout, dtype)
    "softmax": (13, 8, 2, "softmax", False, False, 1.0, 1, 1, "max", "plain", torch.float32),
    "softmax_renorm_scaled": (13, 8, 3, "softmax", False, True, 2.5, 1, 1, "max", "plain", torch.float32),
    "sigmoid_bias": (13, 8, 2, "sigmoid", True, False, 1.0, 1, 1, "max", "plain", torch.float32),
    "sigmoid_bias_renorm": (13, 8, 2, "sigmoid", True, True, 1.5, 1, 1, "max", "plain", torch.float16),
    "softmax_bias_renorm": (9, 6, 2, "softmax", True, True, 1.0, 1, 1, "max", "plain", torch.float32),
    "one_token": (1, 8, 2, "softmax", False, True, 1.0, 1, 1, "max", "plain", torch.float32),
    "topk_is_e": (7, 4, 4, "softmax", False, False, 1.0, 1, 1, "max", "plain", torch.float32),
    "transposed": (70, 12, 3, "softmax", False, True, 1.0, 1, 1, "max", "transposed", torch.bfloat16),
    "col_sliced": (21, 8, 2, "sigmoid", True, True, 1.0, 1, 1, "max", "col_sliced", torch.float16),
    "groups_max": (11, 16, 4, "softmax", False, True, 1.0, 4, 2, "max", "plain", torch.float32),
    "groups_top2sum": (11, 16, 4, "sigmoid", True, True, 2.5, 4, 2, "top2sum", "plain", torch.float32),
}


def check_route(case, device="cpu"):
    T, E, k, scoring, has_bias, renorm, scale, n_group, topk_group, group_score, layout, dtype = ROUTES[case]
    g = torch.Generator().manual_seed(len(case))
    # each row a shuffled ramp with step 0.5: exact in every dtype and free of ties (whose order is untested)
    logits = (torch.rand(T, E, generator=g).argsort(-1) - E / 2).to(dtype) * 0.5
    if layout == "transposed":     # stored [E, T], used as its transpose
        logits = logits.t().contiguous().t()
    elif layout == "col_sliced":   # every other column of a wider tensor
        logits = torch.stack([logits, torch.zeros_like(logits)], -1).flatten(1)[:, ::2]
    bias = torch.randn(E, generator=g) * 0.1 if has_bias else None
    args = (E, k, scoring, renorm, scale, n_group, topk_group, group_score)
    ref_w, ref_i, ref_c = reference.route(logits, bias, *args)
    logits = logits.to(device)
    w, i, c = tr.route(logits, None if bias is None else bias.to(device), *args)
    assert torch.equal(i.cpu(), ref_i) and torch.equal(c.cpu(), ref_c)
    assert_close(w.cpu(), ref_w)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ROUTES)
def test_route_matches_reference(case):
    check_route(case)


# ---- dispatch ----------------------------------------------------------------------------------------------
DISPATCHES = {  # name: (T, E, k, capacity, group_size, layout)
    "dropless_ragged": (40, 8, 2, -1, 0, "plain"),       # 80 slots: 3 blocks; experts 1, 4, 6 empty
    "one_token": (1, 8, 2, -1, 0, "plain"),
    "topk_is_e": (10, 4, 4, -1, 0, "plain"),
    "capacity_drops": (40, 8, 2, 4, 0, "plain"),
    "capacity_groups": (48, 8, 2, 3, 16, "plain"),       # 3 groups of 32 slots
    "capacity_big_groups": (48, 4, 2, 13, 24, "plain"),  # 2 blocks per group; drops cut into the 2nd
    "capacity_zero": (8, 4, 2, 0, 0, "plain"),
    "strided": (40, 8, 3, 5, 20, "strided"),             # column-sliced x, transposed int32 indices
}


def dispatch_case(case, dtype, device="cpu"):
    T, E, k, capacity, group_size, layout = DISPATCHES[case]
    g = torch.Generator().manual_seed(T + k)
    indices = make_indices(T, E, k, seed=T, unused=(1, 4, 6) if case == "dropless_ragged" else ())
    x = torch.randn(T, 48, generator=g).to(dtype)
    if layout == "strided":
        x = torch.randn(T, 80, generator=g).to(dtype)[:, 8:56]
        indices = indices.t().contiguous().t().to(torch.int32)  # int32 ids in transposed storage
    return x.to(device), indices.to(device), E, k, capacity, group_size


def check_dispatch(case, dtype, device="cpu"):
    x, indices, E, _, capacity, group_size = dispatch_case(case, dtype, device)
    ref = reference.dispatch(x.cpu(), indices.cpu().long(), E, capacity, group_size)
    out = tr.dispatch(x, indices, E, capacity, group_size)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and torch.equal(o.cpu(), r)


# every layout in fp32; the sort does not look at x, so the other dtypes on two layouts
@pytest.mark.interpreter
@pytest.mark.parametrize("case, dtype", [(c, torch.float32) for c in DISPATCHES]
                         + [(c, d) for c in ("dropless_ragged", "strided") for d in DTYPES[1:]], ids=str)
def test_dispatch_matches_reference(case, dtype):
    check_dispatch(case, dtype)


def check_dispatch_capacity(case, device="cpu"):
    x, indices, E, k, capacity, group_size = dispatch_case(case, torch.float16, device)
    T, D = x.shape
    order, _ = reference.slot_order(indices.cpu().long(), E, capacity, group_size)
    per_group = group_size if group_size > 0 else T
    G = T // per_group
    want_buf, want_slot = x.new_zeros(E, G * capacity, D).cpu(), torch.full((E, G * capacity), -1)
    flat = indices.cpu().flatten()
    fill = {}
    for s in order.tolist():  # expert-major, slot order within an expert: the i-th of (g, e) at g·C + i
        e, grp = int(flat[s]), s // k // per_group
        row = grp * capacity + fill.setdefault((e, grp), 0)
        fill[(e, grp)] += 1
        want_buf[e, row], want_slot[e, row] = x[s // k].cpu(), s
    buf, slot, dropped = tr.dispatch_capacity(x, indices, E, capacity, group_size)
    assert torch.equal(buf.cpu(), want_buf) and torch.equal(slot.cpu(), want_slot)
    assert dropped.dim() == 0 and int(dropped) == T * k - order.numel()


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["capacity_drops", "capacity_groups", "capacity_zero", "strided"])
def test_dispatch_capacity_layout(case):
    check_dispatch_capacity(case)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["dropless_ragged", "capacity_groups", "strided"])
def test_dispatch_backward_matches_autograd(case, dtype):
    x, indices, E, k, capacity, group_size = dispatch_case(case, dtype)
    x = x.detach().requires_grad_()
    x_perm, order, _ = reference.dispatch(x, indices.long(), E, capacity, group_size)
    grad = torch.randn(x_perm.shape[0], 2 * x.shape[1]).to(dtype)[:, ::2]  # a strided gradient
    (want,) = torch.autograd.grad(x_perm, x, grad)
    assert_close(tr.dispatch_backward(grad, order, k, x.shape[0]), want)


# ---- combine -----------------------------------------------------------------------------------------------
def combine_case(case, dtype, with_fill, device="cpu"):
    x, indices, E, k, capacity, group_size = dispatch_case(case, dtype)
    T, D = x.shape
    g = torch.Generator().manual_seed(7)
    order, _ = reference.slot_order(indices.long(), E, capacity, group_size)
    y_perm = torch.randn(order.numel(), D + 8, generator=g).to(dtype)[:, 4:4 + D]  # column-sliced
    weights = torch.rand(k, T, generator=g).t()                                   # transposed
    fill = torch.randn(T, D, generator=g).to(dtype) if with_fill else None
    return [t if t is None else t.to(device) for t in (y_perm, order, weights, fill)]


def check_combine(case, dtype, with_fill, device="cpu"):
    y_perm, order, weights, fill = combine_case(case, dtype, with_fill, device)
    leaves = [t.detach().cpu().requires_grad_() for t in (y_perm, weights) + ((fill,) if with_fill else ())]
    ref = reference.combine(leaves[0], order.cpu(), leaves[1], leaves[2] if with_fill else None)
    out = tr.combine_forward(y_perm, order, weights, fill)
    assert_close(out.cpu(), ref.detach())
    grad_out = torch.randn(ref.shape[1], ref.shape[0]).to(dtype).t()  # a transposed gradient
    want = torch.autograd.grad(ref, leaves, grad_out)
    got = tr.combine_backward(grad_out.to(device), y_perm, order, weights, fill)
    for o, w in zip(got, want):
        assert_close(o.cpu(), w, dtype)
    assert (got[2] is None) == (not with_fill)


@pytest.mark.interpreter
@pytest.mark.parametrize("with_fill", [False, True], ids=["zero", "fill"])
@pytest.mark.parametrize("case, dtype", [(c, torch.float32) for c in ("dropless_ragged", "capacity_groups")]
                         + [("capacity_drops", d) for d in DTYPES], ids=str)
def test_combine_matches_reference(case, dtype, with_fill):
    check_combine(case, dtype, with_fill)


# ---- edges -------------------------------------------------------------------------------------------------
@pytest.mark.interpreter
def test_empty_inputs():
    x, idx = torch.randn(0, 16), torch.zeros(0, 2, dtype=torch.int64)
    w, i, c = tr.route(torch.randn(0, 8), None, 8, 2, "softmax", True, 1.0, 1, 1, "max")
    assert w.shape == (0, 2) and i.shape == (0, 2) and torch.equal(c, torch.zeros(8, dtype=torch.int64))
    x_perm, order, counts = tr.dispatch(x, idx, 8, -1, 0)
    assert x_perm.shape == (0, 16) and order.shape == (0,) and counts.sum() == 0
    buf, slot, dropped = tr.dispatch_capacity(x, idx, 8, 4, 0)
    assert buf.shape == (8, 0, 16) and slot.shape == (8, 0) and int(dropped) == 0
    assert tr.dispatch_backward(x_perm, order, 2, 0).shape == (0, 16)
    assert tr.combine_forward(x_perm, order, torch.zeros(0, 2), None).shape == (0, 16)
    grad_y, grad_w, grad_fill = tr.combine_backward(x, x_perm, order, torch.zeros(0, 2), x)
    assert grad_y.shape == (0, 16) and grad_w.shape == (0, 2) and grad_fill.shape == (0, 16)
    # all slots dropped, N = 0 but T > 0: combine is the fill alone
    fill, weights = torch.randn(3, 16), torch.rand(3, 2)
    want = weights.sum(1, keepdim=True) * fill
    assert_close(tr.combine_forward(x_perm, order, weights, fill), want)


@pytest.mark.interpreter
def test_bad_inputs_raise():
    x, idx = torch.randn(4, 16), torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="must lie in"):
        tr.dispatch(x, idx + 8, 8, -1, 0)
    with pytest.raises(ValueError, match="rows"):
        tr.dispatch(x[:3], idx, 8, -1, 0)
    with pytest.raises(ValueError, match="groups of"):
        tr.dispatch(x, idx, 8, 2, 3)
    with pytest.raises(TypeError, match="indices must be one of"):
        tr.dispatch(x, idx.float(), 8, -1, 0)
    with pytest.raises(TypeError, match="logits must be one of"):
        tr.route(idx, None, 2, 1, "softmax", False, 1.0, 1, 1, "max")
    with pytest.raises(ValueError, match="top_k"):
        tr.route(x, None, 16, 17, "softmax", False, 1.0, 1, 1, "max")
    with pytest.raises(ValueError, match="order has"):
        tr.combine_forward(torch.randn(5, 16), torch.arange(4), torch.rand(2, 2), None)
    with pytest.raises(ValueError, match="fill must be"):
        tr.combine_forward(torch.randn(4, 16), torch.arange(4), torch.rand(2, 2), torch.randn(2, 8))


@pytest.mark.gpu
def test_gpu_matches_reference(cuda_triton):
    for case in ROUTES:
        check_route(case, "cuda")
    for case in DISPATCHES:
        check_dispatch(case, torch.bfloat16, "cuda")
    for case in ("capacity_drops", "capacity_groups", "strided"):
        check_dispatch_capacity(case, "cuda")
    for dtype in DTYPES:
        for with_fill in (False, True):
            check_combine("capacity_drops", dtype, with_fill, "cuda")
