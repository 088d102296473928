"""Grouped GEMMs over expert-major row blocks, in Triton.

moecompile sorts (token, slot) rows expert-major, so expert ``e`` owns the contiguous rows
``[start_e, start_e + counts[e])`` of ``x_perm``. The expert FFN needs two kinds of GEMM over those blocks:

- ``grouped_mm(x, w, counts)``: ``y[rows_e] = x[rows_e] @ w[e]ᵀ`` with ``w`` stacked ``[E, Nout, K]`` in
  nn.Linear layout and any strides. The forward pass and the input gradient are both this op; the input
  gradient passes a transposed view of the weight (``w.transpose(1, 2)``), which only changes strides.
- ``grouped_mm_weight_grad(dy, x, counts)``: ``dW[e] = dy[rows_e]ᵀ @ x[rows_e]`` → ``[E, Nout, K]``;
  experts without rows get zeros.

Inputs are fp32, fp16 or bf16; products accumulate in fp32 and results come back in the input dtype.
Both wrappers take CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run) or CUDA tensors on a GPU,
and neither reads ``counts`` back to the host: the launch grids are sized from ``x.shape`` alone, and
programs that find no work in the tile map return at once.
"""
import os
import time

import torch
import triton
import triton.language as tl

__all__ = ["grouped_mm", "grouped_mm_weight_grad"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _bench(kernel_call, quantiles=None):
    """Timing function handed to the autotuner.

    Triton's default benchmarker asks the active GPU driver, which does not exist under the interpreter
    (it fails with "0 active drivers"). On a GPU use Triton's own ``do_bench``; otherwise one timed call is
    enough to rank configs and keeps interpreted tuning to a single run per config."""
    if not _INTERPRET and torch.cuda.is_available():
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
    start = time.perf_counter()
    kernel_call()
    return (time.perf_counter() - start) * 1e3


def _pow2_bucket(n):
    """Autotuning key for the ragged row count: retune per power of two, not for every new N."""
    return 1 << max(int(n) - 1, 0).bit_length()


# ---- y[rows_e] = x[rows_e] @ w[e]ᵀ ---------------------------------------------------------------------------
# The row tiles of each expert are listed in a host-built tile map, one table per distinct BLOCK_M among the
# configs (the split into tiles depends on BLOCK_M); MAP_ROW picks the table a config was built for.
_MM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "MAP_ROW": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "MAP_ROW": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "MAP_ROW": 1}, num_warps=8, num_stages=3),
]
_MM_BLOCK_MS = (64, 128)  # BLOCK_M of table MAP_ROW


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, y_ptr, tile_map_ptr,
    K, Nout, N_BUCKET,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_ym, stride_yn,
    stride_map,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAP_ROW: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program computes a BLOCK_M × BLOCK_N tile of y.

    Axis 0 walks the row tiles, which are laid out per expert: the tile map gives each one its expert and
    its row range [row_start, row_end), at most BLOCK_M rows that never cross into the next expert, so a
    whole tile multiplies by a single weight matrix. Axis 1 walks BLOCK_N output columns. The K loop
    streams BLOCK_K-wide slices of x's rows and of w[e]'s rows and accumulates in fp32; the last rows of an
    expert's block and the ragged edges of K and Nout are handled by masks."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    entry = tile_map_ptr + MAP_ROW * stride_map + pid_t * 3
    expert = tl.load(entry)
    row_start = tl.load(entry + 1)
    row_end = tl.load(entry + 2)
    # the grid is an upper bound on the tile count (no device→host sync); spare programs have no rows
    if row_start >= row_end:
        return

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < Nout
    # 64-bit offsets: rows × stride can pass 2³¹ for large activations and stacked weights
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        a = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # w[e] is [Nout, K]; loading it as a [BLOCK_K, BLOCK_N] tile gives w[e]ᵀ directly, whatever strides
        b = tl.load(w_cols + k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_grouped_mm_tuned = triton.autotune(configs=_MM_CONFIGS, key=["N_BUCKET", "Nout", "K"], do_bench=_bench)(
    _grouped_mm_kernel)


# ---- dW[e] = dy[rows_e]ᵀ @ x[rows_e] -------------------------------------------------------------------------
_WG_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


@triton.jit
def _grouped_mm_weight_grad_kernel(
    dy_ptr, x_ptr, dw_ptr, bounds_ptr,
    K, Nout, N_BUCKET,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_dwe, stride_dwn, stride_dwk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program owns a BLOCK_N × BLOCK_K tile of dW[e] for one expert e.

    The grid is (expert, Nout tile, K tile). The reduction runs over the expert's rows, BLOCK_M at a time:
    dy's slice is loaded transposed ([BLOCK_N, BLOCK_M]) so each step is a plain tl.dot with x's slice
    ([BLOCK_M, BLOCK_K]). The tile is written once at the end, so an expert with no rows stores zeros and
    the output needs no zero-fill (and re-running the kernel while autotuning is harmless)."""
    pid_e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row_start = tl.load(bounds_ptr + pid_e * 2)
    row_end = tl.load(bounds_ptr + pid_e * 2 + 1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < Nout
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        m = m0 + offs_m
        mask_m = m < row_end
        rows = m.to(tl.int64)
        dyt = tl.load(dy_ptr + rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                      mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        xs = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xs = xs.to(tl.float32)
        acc = tl.dot(dyt, xs, acc, input_precision=PRECISION)

    dw = (dw_ptr + pid_e.to(tl.int64) * stride_dwe
          + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk)
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


_grouped_mm_weight_grad_tuned = triton.autotune(
    configs=_WG_CONFIGS, key=["N_BUCKET", "Nout", "K"], do_bench=_bench)(_grouped_mm_weight_grad_kernel)


# ---- host side ---------------------------------------------------------------------------------------------
def _dot_flags(dtype):
    """(UPCAST, PRECISION) for tl.dot. fp32 uses IEEE products, so a GPU agrees with the interpreter. bf16
    tiles are widened to fp32 first (the interpreter's bf16 dot is wrong); every bf16 value is exact in
    tf32, so the tf32 tensor-core path loses nothing for them on a GPU. fp16 dots natively."""
    if dtype == torch.float32:
        return False, "ieee"
    if dtype == torch.bfloat16:
        return True, "tf32"
    if dtype == torch.float16:
        return False, "tf32"  # the precision flag only matters for fp32 operands
    raise TypeError(f"grouped GEMM supports float32, float16 and bfloat16, got {dtype}")


def _expert_bounds(counts, num_rows):
    """counts [E] → int64 (starts, ends) of each expert's row block, clipped to the rows that exist."""
    counts = counts.to(torch.int64)
    ends = counts.cumsum(0).clamp(max=num_rows)
    starts = (ends - counts).clamp(min=0)
    return starts, ends


def _max_tiles(num_rows, num_experts, block_m):
    """Upper bound on Σ_e ⌈counts[e] / BLOCK_M⌉, from shapes only: each expert adds at most one partial
    tile, and every tile holds at least one row."""
    return max(min(triton.cdiv(num_rows, block_m) + num_experts - 1, num_rows), 0)


def _tile_map(counts, num_rows, block_ms):
    """One int32 table [T, 3] of (expert, row_start, row_end) per BLOCK_M, stacked → [len(block_ms), T, 3];
    row_end - row_start <= BLOCK_M.

    Tile t of a table belongs to the expert e with tile_cum[e-1] <= t < tile_cum[e] (searchsorted over the
    running tile counts); entries past the real tile count are (0, 0, 0), which the kernel skips."""
    E = counts.numel()
    starts, ends = _expert_bounds(counts, num_rows)
    sizes = ends - starts
    T = max(_max_tiles(num_rows, E, bm) for bm in block_ms)
    table = torch.zeros(len(block_ms), T, 3, dtype=torch.int32, device=counts.device)
    for r, bm in enumerate(block_ms):
        tiles = (sizes + bm - 1) // bm
        tile_cum = tiles.cumsum(0)
        t = torch.arange(_max_tiles(num_rows, E, bm), device=counts.device)
        e = torch.searchsorted(tile_cum, t, right=True)
        valid = e < E
        e = e.clamp(max=E - 1)
        row_start = starts[e] + (t - (tile_cum[e] - tiles[e])) * bm
        row_end = torch.minimum(ends[e], row_start + bm)
        entries = torch.stack([e, row_start, row_end], 1) * valid[:, None]
        table[r, : t.numel()] = entries.to(torch.int32)
    return table


def _check(a, b, counts, name_a, name_b):
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device or counts.device != a.device:
        raise ValueError(f"{name_a}, {name_b} and counts must be on one device")
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D [E], got shape {tuple(counts.shape)}")
    _dot_flags(a.dtype)


def _explicit(config):
    """A fixed config (dict with BLOCK_M, BLOCK_N, BLOCK_K and optionally num_warps, num_stages)."""
    meta = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    return meta, opts


def grouped_mm(x, w, counts, *, config=None):
    """y[rows_e] = x[rows_e] @ w[e]ᵀ for each expert's contiguous row block.

    x: [N, K] rows sorted expert-major (any strides). w: [E, Nout, K], any strides (e.g. a transposed or
    sliced view of a parameter). counts: [E] integer rows per expert, summing to N. → y [N, Nout] in x's
    dtype. `config` pins the tiling (dict of BLOCK_M, BLOCK_N, BLOCK_K[, num_warps, num_stages]) instead
    of autotuning."""
    _check(x, w, counts, "x", "w")
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"expected x [N, K] and w [E, Nout, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    N, K = x.shape
    E, Nout, Kw = w.shape
    if Kw != K or counts.numel() != E:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}, counts {tuple(counts.shape)}")
    y = x.new_empty(N, Nout)
    if N == 0 or Nout == 0:
        return y
    if K == 0 or E == 0:
        return y.zero_()
    upcast, precision = _dot_flags(x.dtype)
    block_ms = _MM_BLOCK_MS if config is None else (config["BLOCK_M"],)
    tile_map = _tile_map(counts, N, block_ms)

    def grid(meta):
        return (_max_tiles(N, E, meta["BLOCK_M"]), triton.cdiv(Nout, meta["BLOCK_N"]))

    args = (x, w, y, tile_map, K, Nout, _pow2_bucket(N), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            w.stride(2), y.stride(0), y.stride(1), tile_map.stride(0))
    if config is None:
        _grouped_mm_tuned[grid](*args, UPCAST=upcast, PRECISION=precision)
    else:
        meta, opts = _explicit(config)
        _grouped_mm_kernel[grid(meta)](*args, **meta, MAP_ROW=0, UPCAST=upcast, PRECISION=precision, **opts)
    return y


def grouped_mm_weight_grad(dy, x, counts, *, config=None):
    """dW[e] = dy[rows_e]ᵀ @ x[rows_e] → [E, Nout, K] in x's dtype; experts with no rows get zeros.

    dy: [N, Nout], x: [N, K], both expert-major with any strides; counts: [E] rows per expert, summing to
    N. `config` pins the tiling as in grouped_mm."""
    _check(dy, x, counts, "dy", "x")
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"expected dy [N, Nout] and x [N, K], got {tuple(dy.shape)} and {tuple(x.shape)}")
    N, Nout = dy.shape
    K = x.shape[1]
    E = counts.numel()
    if N == 0 or E == 0 or Nout == 0 or K == 0:
        return x.new_zeros(E, Nout, K)
    dw = x.new_empty(E, Nout, K)
    upcast, precision = _dot_flags(x.dtype)
    starts, ends = _expert_bounds(counts, N)
    bounds = torch.stack([starts, ends], 1).to(torch.int32).contiguous()

    def grid(meta):
        return (E, triton.cdiv(Nout, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))

    args = (dy, x, dw, bounds, K, Nout, _pow2_bucket(N), dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2))
    if config is None:
        _grouped_mm_weight_grad_tuned[grid](*args, UPCAST=upcast, PRECISION=precision)
    else:
        meta, opts = _explicit(config)
        _grouped_mm_weight_grad_kernel[grid(meta)](*args, **meta, UPCAST=upcast, PRECISION=precision, **opts)
    return dw
