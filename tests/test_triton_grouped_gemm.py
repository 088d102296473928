"""Triton grouped GEMMs against a per-expert torch loop (interpreter on CPU; the gpu test needs CUDA)."""
import pytest
import torch

from moecompile.kernels.triton_grouped_gemm import _tile_map, grouped_mm, grouped_mm_weight_grad

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # several tiles per expert and ragged edges at these shapes


def ref_mm(x, w, counts):
    """Per-expert fp32 loop: y[rows_e] = x[rows_e] @ w[e]ᵀ."""
    out = [xe.float() @ w[e].float().T for e, xe in enumerate(x.split(counts.tolist()))]
    return torch.cat(out).reshape(x.shape[0], w.shape[1]).to(x.dtype)


def ref_weight_grad(dy, x, counts):
    """Per-expert fp32 loop: dW[e] = dy[rows_e]ᵀ @ x[rows_e]."""
    parts = zip(dy.split(counts.tolist()), x.split(counts.tolist()))
    return torch.stack([g.float().T @ xe.float() for g, xe in parts]).to(x.dtype)


def assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol = TOL[ref.dtype]
    scale = max(1.0, ref.float().abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=rtol * scale)


def make_case(case, dtype, seed=0):
    """→ (x [N, K], w [E, Nout, K] view, counts [E]) for a named layout."""
    g = torch.Generator().manual_seed(seed)
    K, Nout = 40, 24
    if case == "ragged":                   # random counts including empty experts
        counts = torch.tensor([7, 0, 19, 1, 0, 3, 0, 18])
    elif case == "one_token":
        counts = torch.tensor([0, 1, 0])
    elif case == "all_experts":            # top-k = E: every expert sees every token
        counts = torch.full((3,), 16)
    elif case == "single_expert":
        counts = torch.tensor([37])
    else:
        counts = torch.tensor([5, 0, 11, 17, 2, 0, 9, 1])
    E, N = counts.numel(), int(counts.sum())
    x = torch.randn(N, K, generator=g).to(dtype)
    w = torch.randn(E, Nout, K, generator=g).to(dtype)
    if case == "transposed_w":             # parameter stored [E, K, Nout], used as its transpose
        w = torch.randn(E, K, Nout, generator=g).to(dtype).transpose(1, 2)
    elif case == "sliced_w":               # every other output row of a larger parameter
        w = torch.randn(E, 2 * Nout, K, generator=g).to(dtype)[:, ::2]
    elif case == "strided_x":              # a column slice of a wider activation
        x = torch.randn(N, K + 16, generator=g).to(dtype)[:, 8:8 + K]
    return x, w, counts


CASES = ["ragged", "one_token", "all_experts", "single_expert", "transposed_w", "sliced_w", "strided_x"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_grouped_mm_matches_loop(case, dtype):
    x, w, counts = make_case(case, dtype)
    ref = ref_mm(x, w, counts)
    assert_close(grouped_mm(x, w, counts, config=SMALL), ref)
    if dtype == torch.float32 or case == "ragged":  # the autotuned path once per dtype, all layouts in fp32
        assert_close(grouped_mm(x, w, counts), ref)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_weight_grad_matches_loop(case, dtype):
    x, w, counts = make_case(case, dtype, seed=1)
    dy = torch.randn(x.shape[0], 2 * w.shape[1]).to(dtype)[:, ::2]  # a strided dy too
    ref = ref_weight_grad(dy, x, counts)
    assert_close(grouped_mm_weight_grad(dy, x, counts, config=SMALL), ref)
    if dtype == torch.float32 or case == "ragged":
        assert_close(grouped_mm_weight_grad(dy, x, counts), ref)


@pytest.mark.interpreter
def test_input_grad_via_transposed_weight():
    """dx[rows_e] = dy[rows_e] @ W[e] is grouped_mm with the weight viewed as [E, K, Nout]."""
    x, w, counts = make_case("ragged", torch.float32)
    w = w.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    y = ref_mm(xr, w, counts)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(grouped_mm(dy, w.detach().transpose(1, 2), counts, config=SMALL), xr.grad)
    assert_close(grouped_mm_weight_grad(dy, x, counts, config=SMALL), w.grad)


@pytest.mark.interpreter
def test_no_rows():
    x = torch.empty(0, 16)
    w = torch.randn(3, 24, 16)
    counts = torch.zeros(3, dtype=torch.int64)
    assert grouped_mm(x, w, counts).shape == (0, 24)
    dw = grouped_mm_weight_grad(torch.empty(0, 24), x, counts)
    assert dw.shape == (3, 24, 16) and not dw.any()


@pytest.mark.interpreter
def test_many_experts_few_rows():
    """E far above N: most experts are empty and get exact zeros in dW."""
    counts = torch.zeros(64, dtype=torch.int64)
    counts[[3, 40, 63]] = torch.tensor([2, 1, 2])
    x, w = torch.randn(5, 16), torch.randn(64, 16, 16)
    dy = torch.randn(5, 16)
    assert_close(grouped_mm(x, w, counts, config=SMALL), ref_mm(x, w, counts))
    dw = grouped_mm_weight_grad(dy, x, counts, config=SMALL)
    assert_close(dw, ref_weight_grad(dy, x, counts))
    assert not dw[counts == 0].any()


@pytest.mark.interpreter
def test_uneven_tiles_and_int32_counts():
    """K and Nout not multiples of any block size, counts as int32, autotuned and pinned configs."""
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([13, 0, 33], dtype=torch.int32)
    x, w = torch.randn(46, 24, generator=g), torch.randn(3, 40, 24, generator=g)
    dy = torch.randn(46, 40, generator=g)
    for config in (None, SMALL, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=2)):
        assert_close(grouped_mm(x, w, counts, config=config), ref_mm(x, w, counts))
        assert_close(grouped_mm_weight_grad(dy, x, counts, config=config), ref_weight_grad(dy, x, counts))


@pytest.mark.interpreter
def test_tile_map_partitions_rows():
    """Every row lands in exactly one tile, tiles never cross experts, spare entries are empty."""
    counts = torch.tensor([5, 0, 17, 1, 0, 9, 32])
    N = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    table = _tile_map(counts, N, (4, 16))
    for r, bm in enumerate((4, 16)):
        seen = torch.zeros(N, dtype=torch.int64)
        for e, start, end in table[r].tolist():
            assert 0 <= end - start <= bm
            seen[start:end] += 1
            assert (owner[start:end] == e).all()
        assert (seen == 1).all()


@pytest.mark.gpu
def test_cuda_matches_loop(cuda_triton):
    for dtype in DTYPES:
        for case in ("ragged", "transposed_w", "strided_x"):
            x, w, counts = (t.cuda() for t in make_case(case, dtype))
            dy = torch.randn(x.shape[0], w.shape[1], device="cuda").to(dtype)
            assert_close(grouped_mm(x, w, counts), ref_mm(x, w, counts))
            assert_close(grouped_mm_weight_grad(dy, x, counts), ref_weight_grad(dy, x, counts))


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [None, SMALL], ids=["autotuned", "pinned"])
def test_accumulate_and_bias_into_out(config):
    """y += x @ w[e]ᵀ + bias[e] into a given strided out. Autotuning runs the kernel once per config, so the
    accumulator must be restored between runs (it was not: the GPU path's input gradient came out wrong)."""
    x, w, counts = make_case("ragged", torch.float32)
    bias = torch.randn(w.shape[0], w.shape[1])
    base = torch.randn(w.shape[1], x.shape[0]).T                          # a transposed out
    out = base.clone()
    grouped_mm(x, w, counts, bias=bias, out=out, accumulate=True, config=config)
    want = base + ref_mm(x, w, counts) + bias.repeat_interleave(counts, 0)
    assert_close(out, want)
