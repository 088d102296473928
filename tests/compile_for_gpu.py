"""Compile every Triton kernel of moecompile for an NVIDIA GPU (sm_90, PTX via ptxas), without one.

The interpreter the tests run on CPU checks what kernels compute, not whether they compile: it accepts
code the GPU compiler rejects (e.g. a non-constexpr global read in a jitted function). This script is run
by tests/test_triton_compiles.py in a fresh process with TRITON_INTERPRET=0, so the kernels are real
JITFunctions; it compiles each kernel for fp32, bf16 and fp16 data, in the variants `variants` lists, on
every core (each compile is one core's work for ~1 s, and this is the suite's longest test otherwise).
Argument types: data pointers take the data dtype, the rest come from TYPES.
"""
import concurrent.futures
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moecompile.kernels import triton_grouped_gemm as gg, triton_routing as rt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {  # every pointer that does not hold the data dtype, and the float scalars
    "tile_map_ptr": "*i32", "bounds_ptr": "*i32", "counts_ptr": "*i32", "hist_ptr": "*i32",
    "indices_ptr": "*i64", "order_ptr": "*i64", "inverse_ptr": "*i64", "rank_base_ptr": "*i64",
    "dest_base_ptr": "*i64", "weights_ptr": "*fp32", "grad_w_ptr": "*fp32", "bias_ptr": "*fp32",
    "alpha": "fp32", "limit": "fp32", "scale": "fp32",
}
GEMM = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


def flags(**options):
    """Every combination of the given constexpr options: flags(A=(0, 1)) → [{A: 0}, {A: 1}]."""
    keys = list(options)
    return [dict(zip(keys, values)) for values in itertools.product(*options.values())]


def variants(dtype):
    """fp32: every constexpr variant the wrappers launch; fp16/bf16: the kernels whose code depends on the
    dtype (the GEMMs' dot path; one activation), the rest only move or sum data."""
    dot = dict(UPCAST=dtype == "bf16", PRECISION="ieee" if dtype == "fp32" else "tf32")
    acts = ("silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu") if dtype == "fp32" else ("silu",)
    yield gg._grouped_mm_kernel, {**GEMM, **dot, "MAP_ROW": 0, "HAS_BIAS": True, "ACCUMULATE": True}
    yield gg._grouped_mm_weight_grad_kernel, {**GEMM, **dot}
    yield from ((gg._grouped_mm_act_kernel, {**GEMM, **dot, "MAP_ROW": 0, "HAS_BIAS": gated, "HAS_UP_BIAS": gated,
                                              "GATED": gated, "ACT": act})
                for act, gated in itertools.product(acts, (False, True)))
    yield from ((gg._grouped_mm_act_grad_kernel, {**GEMM, **dot, "MAP_ROW": 0, "GATED": gated, "ACT": act})
                for act, gated in itertools.product(acts, (False, True)))
    if dtype != "fp32":
        return
    yield from ((rt._route_kernel, dict(K=2, BLOCK_T=16, BLOCK_E=8, BLOCK_K=2, BLOCK_G=4, **f))
                for f in [*flags(SIGMOID=(False, True), HAS_BIAS=(True,), RENORMALIZE=(True,), N_GROUP=(1,),
                                 TOPK_GROUP=(1,), GROUP_TOP2=(False,)),
                          *flags(SIGMOID=(True,), HAS_BIAS=(True,), RENORMALIZE=(True,), N_GROUP=(4,),
                                 TOPK_GROUP=(2,), GROUP_TOP2=(False, True))])
    yield from ((rt._sort_kernel, dict(BLOCK_S=32, BLOCK_E=8, BLOCK_D=64, HISTOGRAM=h)) for h in (False, True))
    yield from ((rt._gather_sum_kernel, dict(BLOCK_T=16, BLOCK_D=64, **f))
                for f in flags(HAS_WEIGHTS=(False, True), HAS_FILL=(False, True)))
    yield from ((rt._combine_backward_kernel, dict(BLOCK_T=16, BLOCK_D=64, HAS_FILL=f)) for f in (False, True))


def signature(kernel, dtype, constexprs):
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in TYPES:
            return TYPES[name]
        if name.endswith("_ptr"):
            return f"*{dtype}"
        return "i64" if name.startswith("stride") else "i32"
    return {name: kind(name) for name in kernel.arg_names}


def compile_one(dtype: str, index: int) -> str | None:
    """Compile the `index`-th of variants(dtype) (an index: JITFunctions do not pickle) → a failure, or None."""
    kernel, constexprs = list(variants(dtype))[index]
    src = ASTSource(kernel, signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": 4, "num_stages": 3})
    return None if "ptx" in compiled.asm else f"{kernel.__name__} {dtype} {constexprs}: no PTX"


def main():
    jobs = [(dtype, i) for dtype in ("fp32", "bf16", "fp16") for i in range(len(list(variants(dtype))))]
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        failures = [f for f in pool.map(compile_one, *zip(*jobs)) if f is not None]
    if failures:
        raise SystemExit("\n".join(failures))
    print(f"compiled {len(jobs)} kernel variants for sm_90")


if __name__ == "__main__":
    main()
