"""Grouped GEMMs over expert-major row blocks, in Triton.

moecompile sorts (token, slot) rows expert-major, so expert ``e`` owns the contiguous rows
``[start_e, start_e + counts[e])`` of ``x_perm``. The expert FFN needs two kinds of GEMM over those blocks:

- ``grouped_mm(x, w, counts)``: ``y[rows_e] = x[rows_e] @ w[e]ᵀ`` with ``w`` stacked ``[E, Nout, K]`` in
  nn.Linear layout and any strides. The forward pass and the input gradient are both this op; the input
  gradient passes a transposed view of the weight (``w.transpose(1, 2)``), which only changes strides.
- ``grouped_mm_weight_grad(dy, x, counts)``: ``dW[e] = dy[rows_e]ᵀ @ x[rows_e]`` → ``[E, Nout, K]``;
  experts without rows get zeros.

Two variants carry the expert FFN's activation in their epilogue, so it costs no pass of its own:
``grouped_mm_act`` (first layer: gate and up projections from the same x tiles, then act(g)·u) and
``grouped_mm_act_grad`` (the input gradient of the second layer, then the activation's derivative).
Every function writes into given ``out=`` tensors of any strides when asked, which is how gradients land
directly in a weight's own layout, and takes ``counts`` or a ``RowBlocks`` built once per FFN call.

Inputs are fp32, fp16 or bf16; products accumulate in fp32 and results come back in the input dtype.
Both wrappers take CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run) or CUDA tensors on a GPU,
and neither reads ``counts`` back to the host: the launch grids are sized from ``x.shape`` alone, and
programs that find no work in the tile map return at once.
"""
import functools
import os
import time

import torch
import triton
import triton.language as tl

from moecompile.kernels.triton_activations import gate_act, gate_act_grad, up_factor, up_factor_grad

__all__ = ["RowBlocks", "grouped_mm", "grouped_mm_act", "grouped_mm_act_grad", "grouped_mm_weight_grad"]

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


# ---- row-tiled GEMMs: y[rows_e] = x[rows_e] @ w[e]ᵀ, with epilogues ------------------------------------------
# The row tiles of each expert are listed in a host-built tile map, one table per distinct BLOCK_M among the
# configs (the split into tiles depends on BLOCK_M); MAP_ROW picks the table a config was built for.
_MM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "MAP_ROW": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "MAP_ROW": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "MAP_ROW": 1}, num_warps=8, num_stages=3),
]
_MM_BLOCK_MS = (64, 128)  # BLOCK_M of table MAP_ROW


@triton.jit
def _out_tile(tile_map_ptr, stride_map, Nout,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MAP_ROW: tl.constexpr):
    """This program's output tile: (expert, rows, row mask, columns, column mask, whether it has no rows).

    Axis 0 walks the row tiles from the tile map, laid out per expert: at most BLOCK_M rows
    [row_start, row_end) that never cross into the next expert, so a whole tile multiplies by a single
    weight matrix. Axis 1 walks BLOCK_N output columns. The grid is an upper bound on the tile count (no
    device→host sync): spare programs find no rows and must return."""
    entry = tile_map_ptr + MAP_ROW * stride_map + tl.program_id(0) * 3
    expert = tl.load(entry)
    row_start = tl.load(entry + 1)
    row_end = tl.load(entry + 2)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, offs_m, offs_m < row_end, offs_n, offs_n < Nout, row_start >= row_end


@triton.jit
def _tile_dot(x_ptr, w_ptr, expert, offs_m, mask_m, offs_n, mask_n, K,
              stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x[rows] @ w[expert][cols]ᵀ as an fp32 [BLOCK_M, BLOCK_N] tile.

    The K loop streams BLOCK_K-wide slices of x's rows and of w[e]'s rows; w[e] is [Nout, K], and loading
    it as a [BLOCK_K, BLOCK_N] tile gives w[e]ᵀ directly, whatever its strides. Ragged edges are masked."""
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit offsets: rows × stride can pass 2³¹ for large activations and stacked weights
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        a = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _bias_row(b_ptr, expert, offs_n, mask_n, stride_be, stride_bn):
    """bias[expert, cols] as a [1, BLOCK_N] fp32 row."""
    b = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
    return b.to(tl.float32)[None, :]


@triton.jit
def _tile_ptrs(ptr, offs_m, offs_n, stride_m, stride_n):
    return ptr + offs_m.to(tl.int64)[:, None] * stride_m + offs_n[None, :] * stride_n


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, tile_map_ptr,
    K, Nout, N_BUCKET,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ym, stride_yn,
    stride_map,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAP_ROW: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of y = x @ w[e]ᵀ (+ bias[e]) (+ y when ACCUMULATE); axis 1 walks columns."""
    expert, offs_m, mask_m, offs_n, mask_n, idle = _out_tile(tile_map_ptr, stride_map, Nout, BLOCK_M, BLOCK_N,
                                                             MAP_ROW)
    if idle:
        return
    acc = _tile_dot(x_ptr, w_ptr, expert, offs_m, mask_m, offs_n, mask_n, K, stride_xm, stride_xk,
                    stride_we, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += _bias_row(b_ptr, expert, offs_n, mask_n, stride_be, stride_bn)
    y = _tile_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn)
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(y, mask=mask, other=0.0).to(tl.float32)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_mm_act_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, g_ptr, u_ptr, a_ptr, h_ptr, tile_map_ptr,
    K, Nout, N_BUCKET, alpha, limit,
    stride_xm, stride_xk, stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_be, stride_bn, stride_bue, stride_bun,
    stride_gm, stride_gn, stride_um, stride_un, stride_am, stride_an, stride_hm, stride_hn,
    stride_map,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAP_ROW: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr,
):
    """The expert FFN's first layer with its activation fused into the epilogue.

    g = x @ wg[e]ᵀ (+ bg), and when GATED u = x @ wu[e]ᵀ (+ bu) from the same x tiles; then a = act(g) and
    h = a · up_factor(u) are computed in registers. g, u, a, h are all stored (the backward reads them), so
    the separate activation pass, which would read g and u back from memory, is gone."""
    expert, offs_m, mask_m, offs_n, mask_n, idle = _out_tile(tile_map_ptr, stride_map, Nout, BLOCK_M, BLOCK_N,
                                                             MAP_ROW)
    if idle:
        return
    mask = mask_m[:, None] & mask_n[None, :]
    g = _tile_dot(x_ptr, wg_ptr, expert, offs_m, mask_m, offs_n, mask_n, K, stride_xm, stride_xk,
                  stride_wge, stride_wgn, stride_wgk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    if HAS_BIAS:
        g += _bias_row(bg_ptr, expert, offs_n, mask_n, stride_be, stride_bn)
    out_ty = g_ptr.dtype.element_ty
    # act(g) from g as stored, so the backward (which reloads g) differentiates the exact same values
    g = g.to(out_ty)
    tl.store(_tile_ptrs(g_ptr, offs_m, offs_n, stride_gm, stride_gn), g, mask=mask)
    a = gate_act(g.to(tl.float32), ACT, alpha, limit)
    tl.store(_tile_ptrs(a_ptr, offs_m, offs_n, stride_am, stride_an), a.to(out_ty), mask=mask)
    if GATED:
        u = _tile_dot(x_ptr, wu_ptr, expert, offs_m, mask_m, offs_n, mask_n, K, stride_xm, stride_xk,
                      stride_wue, stride_wun, stride_wuk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        if HAS_UP_BIAS:
            u += _bias_row(bu_ptr, expert, offs_n, mask_n, stride_bue, stride_bun)
        u = u.to(out_ty)
        tl.store(_tile_ptrs(u_ptr, offs_m, offs_n, stride_um, stride_un), u, mask=mask)
        h = a.to(out_ty).to(tl.float32) * up_factor(u.to(tl.float32), ACT, limit)
        tl.store(_tile_ptrs(h_ptr, offs_m, offs_n, stride_hm, stride_hn), h.to(out_ty), mask=mask)


@triton.jit
def _grouped_mm_act_grad_kernel(
    dy_ptr, w_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, tile_map_ptr,
    K, Nout, N_BUCKET, alpha, limit,
    stride_dym, stride_dyk, stride_we, stride_wn, stride_wk,
    stride_gm, stride_gn, stride_um, stride_un, stride_dgm, stride_dgn, stride_dum, stride_dun,
    stride_map,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAP_ROW: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
):
    """The backward of the second layer and the activation, fused: grad_h = dy @ w2[e] (w passed as the
    [E, F, D] view of w2) stays in registers, and the epilogue reloads g (and u) to write
    dg = grad_h · up_factor(u) · act'(g) and du = grad_h · act(g) · up_factor'(u). act(g) is recomputed
    from g rather than read back: arithmetic is cheaper than the memory pass."""
    expert, offs_m, mask_m, offs_n, mask_n, idle = _out_tile(tile_map_ptr, stride_map, Nout, BLOCK_M, BLOCK_N,
                                                             MAP_ROW)
    if idle:
        return
    mask = mask_m[:, None] & mask_n[None, :]
    grad_h = _tile_dot(dy_ptr, w_ptr, expert, offs_m, mask_m, offs_n, mask_n, K, stride_dym, stride_dyk,
                       stride_we, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    g = tl.load(_tile_ptrs(g_ptr, offs_m, offs_n, stride_gm, stride_gn), mask=mask, other=0.0).to(tl.float32)
    out_ty = dg_ptr.dtype.element_ty
    dg = grad_h * gate_act_grad(g, ACT, alpha, limit)
    if GATED:
        u = tl.load(_tile_ptrs(u_ptr, offs_m, offs_n, stride_um, stride_un), mask=mask, other=0.0).to(tl.float32)
        a = gate_act(g, ACT, alpha, limit).to(out_ty).to(tl.float32)
        du = grad_h * a * up_factor_grad(u, ACT, limit)
        tl.store(_tile_ptrs(du_ptr, offs_m, offs_n, stride_dum, stride_dun), du.to(out_ty), mask=mask)
        dg = dg * up_factor(u, ACT, limit)
    tl.store(_tile_ptrs(dg_ptr, offs_m, offs_n, stride_dgm, stride_dgn), dg.to(out_ty), mask=mask)


_KEY = ["N_BUCKET", "Nout", "K"]
# tuning runs a kernel once per config: an accumulating GEMM (y += x @ wᵀ) must find y as it was each time
_grouped_mm_tuned = triton.autotune(configs=_MM_CONFIGS, key=_KEY, do_bench=_bench, restore_value=["y_ptr"])(
    _grouped_mm_kernel)
_grouped_mm_act_tuned, _grouped_mm_act_grad_tuned = (
    triton.autotune(configs=_MM_CONFIGS, key=_KEY, do_bench=_bench)(kernel)
    for kernel in (_grouped_mm_act_kernel, _grouped_mm_act_grad_kernel))


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


class RowBlocks:
    """The expert row layout of one counts vector, for every GEMM of one expert FFN call: the tile map
    (built on counts' device, never read back to the host) and each expert's [start, end) rows."""

    def __init__(self, counts, num_rows):
        if counts.dim() != 1:
            raise ValueError(f"counts must be 1-D [E], got shape {tuple(counts.shape)}")
        self.counts, self.num_rows, self.num_experts = counts, num_rows, counts.numel()
        self._maps = {}

    def tile_map(self, block_ms):
        if block_ms not in self._maps:
            self._maps[block_ms] = _tile_map(self.counts, self.num_rows, block_ms)
        return self._maps[block_ms]

    @functools.cached_property
    def bounds(self):
        """int32 [E, 2] (start, end) rows of each expert, built once: a backward runs up to five weight
        gradients over the same rows."""
        starts, ends = _expert_bounds(self.counts, self.num_rows)
        return torch.stack([starts, ends], 1).to(torch.int32).contiguous()


def _rows(counts, num_rows):
    return counts if isinstance(counts, RowBlocks) else RowBlocks(counts, num_rows)


def _check(a, b, counts, name_a, name_b):
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    c = counts.counts if isinstance(counts, RowBlocks) else counts
    if a.device != b.device or c.device != a.device:
        raise ValueError(f"{name_a}, {name_b} and counts must be on one device")
    if c.dim() != 1:
        raise ValueError(f"counts must be 1-D [E], got shape {tuple(c.shape)}")
    _dot_flags(a.dtype)


def _check_gemm(x, w, counts):
    _check(x, w, counts, "x", "w")
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"expected x [N, K] and w [E, Nout, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    E = counts.num_experts if isinstance(counts, RowBlocks) else counts.numel()
    if w.shape[2] != x.shape[1] or w.shape[0] != E:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}, {E} experts in counts")


def _explicit(config):
    """A fixed config (dict with BLOCK_M, BLOCK_N, BLOCK_K and optionally num_warps, num_stages)."""
    meta = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    return meta, opts


def _strides(*tensors):
    """Row/column (or expert/row/column) strides of each tensor, flattened; None (absent) gives zeros."""
    return tuple(s for t in tensors for s in ((0, 0) if t is None else t.stride()))


def _launch_rows(tuned, kernel, rows, pointers, K, Nout, rest, config, **constexprs):
    """Launch a row-tiled kernel: grid (tile upper bound, Nout tiles), autotuned unless `config` pins it."""
    N, E = rows.num_rows, rows.num_experts
    tile_map = rows.tile_map(_MM_BLOCK_MS if config is None else (config["BLOCK_M"],))
    pointers = tuple(tile_map if p is None else p for p in pointers)  # absent operands: any valid pointer
    args = (*pointers, tile_map, K, Nout, _pow2_bucket(N), *rest, tile_map.stride(0))

    def grid(meta):
        return (_max_tiles(N, E, meta["BLOCK_M"]), triton.cdiv(Nout, meta["BLOCK_N"]))

    if config is None:
        tuned[grid](*args, **constexprs)
    else:
        meta, opts = _explicit(config)
        kernel[grid(meta)](*args, **meta, MAP_ROW=0, **constexprs, **opts)


def grouped_mm(x, w, counts, *, bias=None, out=None, accumulate=False, config=None):
    """y[rows_e] = x[rows_e] @ w[e]ᵀ (+ bias[e]) for each expert's contiguous row block.

    x: [N, K] rows sorted expert-major (any strides). w: [E, Nout, K], any strides (e.g. a transposed or
    sliced view of a parameter). counts: [E] integer rows per expert summing to N, or a RowBlocks.
    bias: [E, Nout] or None. out: an [N, Nout] tensor (any strides) to write, or to add to when
    `accumulate`. → y [N, Nout] in x's dtype. `config` pins the tiling (dict of BLOCK_M, BLOCK_N,
    BLOCK_K[, num_warps, num_stages]) instead of autotuning."""
    _check_gemm(x, w, counts)
    N, K = x.shape
    Nout = w.shape[1]
    y = x.new_empty(N, Nout) if out is None else out
    if N == 0 or Nout == 0:
        return y
    if K == 0 or w.shape[0] == 0:
        if not accumulate:
            y.zero_()
        return y if bias is None else y.add_(_bias_per_row(bias, counts, N))
    upcast, precision = _dot_flags(x.dtype)
    _launch_rows(_grouped_mm_tuned, _grouped_mm_kernel, _rows(counts, N), (x, w, bias, y), K, Nout,
                 _strides(x, w, bias, y), config, UPCAST=upcast, PRECISION=precision,
                 HAS_BIAS=bias is not None, ACCUMULATE=accumulate)
    return y


def _bias_per_row(bias, counts, N):
    c = counts.counts if isinstance(counts, RowBlocks) else counts
    return bias.repeat_interleave(c, 0, output_size=N)


def grouped_mm_act(x, w_gate, w_up, counts, *, activation, alpha=1.702, limit=7.0, bias_gate=None,
                   bias_up=None, out=None, config=None):
    """The expert FFN's first layer and its activation in one pass over each row tile.

    g = x @ w_gate[e]ᵀ (+ bias_gate[e]), u = x @ w_up[e]ᵀ (+ bias_up[e]) when `w_up` is given (gated FFN),
    a = act(g), h = a · u (or a · (clamp(u, ±limit) + 1) for "clamped_swiglu"). `activation` is the gate's
    function: "silu", "gelu", "gelu_tanh", "relu" or "clamped_swiglu" (SwiGLU is "silu" with a w_up).
    out: (g, u, a, h) [N, F] tensors to write (any strides; u and h None when not gated).
    → (g, u, a, h) in x's dtype."""
    _check_gemm(x, w_gate, counts)
    gated = w_up is not None
    if gated:
        _check_gemm(x, w_up, counts)
    N, K = x.shape
    F = w_gate.shape[1]
    if out is None:
        out = tuple(x.new_empty(N, F) if present else None for present in (True, gated, True, gated))
    g, u, a, h = out
    if N == 0 or F == 0:
        return out
    upcast, precision = _dot_flags(x.dtype)
    w_up = w_up if gated else w_gate  # a stand-in the kernel never reads
    _launch_rows(_grouped_mm_act_tuned, _grouped_mm_act_kernel, _rows(counts, N),
                 (x, w_gate, w_up, bias_gate, bias_up, g, u, a, h), K, F,
                 (alpha, limit) + _strides(x, w_gate, w_up, bias_gate, bias_up, g, u, a, h), config,
                 UPCAST=upcast, PRECISION=precision, HAS_BIAS=bias_gate is not None,
                 HAS_UP_BIAS=gated and bias_up is not None, GATED=gated, ACT=activation)
    return out


def grouped_mm_act_grad(dy, w, counts, g, u, *, activation, alpha=1.702, limit=7.0, out=None, config=None):
    """Backward through the second layer and the activation: grad_h = dy[rows_e] @ w[e]ᵀ with w the
    [E, F, D] view of the second layer's weight, then dg = grad_h · up · act'(g) and du = grad_h · act(g)
    · up' (u None: not gated, dg = grad_h · act'(g)). out: (dg, du) to write. → (dg, du)."""
    _check_gemm(dy, w, counts)
    N, K = dy.shape
    F = w.shape[1]
    gated = u is not None
    if out is None:
        out = (dy.new_empty(N, F), dy.new_empty(N, F) if gated else None)
    dg, du = out
    if N == 0 or F == 0:
        return out
    upcast, precision = _dot_flags(dy.dtype)
    _launch_rows(_grouped_mm_act_grad_tuned, _grouped_mm_act_grad_kernel, _rows(counts, N),
                 (dy, w, g, u, dg, du), K, F, (alpha, limit) + _strides(dy, w, g, u, dg, du), config,
                 UPCAST=upcast, PRECISION=precision, GATED=gated, ACT=activation)
    return out


def grouped_mm_weight_grad(dy, x, counts, *, out=None, config=None):
    """dW[e] = dy[rows_e]ᵀ @ x[rows_e] → [E, Nout, K] in x's dtype; experts with no rows get zeros.

    dy: [N, Nout], x: [N, K], both expert-major with any strides; counts: [E] rows per expert summing
    to N (or a RowBlocks). out: an [E, Nout, K] tensor with any strides (e.g. the gradient buffer of a
    weight stored transposed) to write. `config` pins the tiling as in grouped_mm."""
    _check(dy, x, counts, "dy", "x")
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"expected dy [N, Nout] and x [N, K], got {tuple(dy.shape)} and {tuple(x.shape)}")
    N, Nout = dy.shape
    K = x.shape[1]
    rows = _rows(counts, N)
    E = rows.num_experts
    dw = x.new_empty(E, Nout, K) if out is None else out
    if N == 0 or E == 0 or Nout == 0 or K == 0:
        return dw.zero_()
    upcast, precision = _dot_flags(x.dtype)
    bounds = rows.bounds

    def grid(meta):
        return (E, triton.cdiv(Nout, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))

    args = (dy, x, dw, bounds, K, Nout, _pow2_bucket(N), *_strides(dy, x, dw))
    if config is None:
        _grouped_mm_weight_grad_tuned[grid](*args, UPCAST=upcast, PRECISION=precision)
    else:
        meta, opts = _explicit(config)
        _grouped_mm_weight_grad_kernel[grid(meta)](*args, **meta, UPCAST=upcast, PRECISION=precision, **opts)
    return dw
