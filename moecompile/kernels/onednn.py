"""Expert GEMMs on oneDNN, for fp32 on CPUs where it beats aten's BLAS (native.py takes it where `takes`).

Why: aten's fp32 CPU GEMM is MKL's, tuned by Intel for Intel's CPUs. oneDNN (bundled with torch, reached
through `torch.ops.mkldnn._linear_pointwise`, the op Inductor's CPU linear lowers to) generates its kernels
for the CPU it finds, and on this machine's AMD EPYC (AVX-512) it is faster at every expert size that
matters. Measured here (2 threads, one expert's [m, in] @ [in, out], weights in cache, µs MKL → oneDNN; a
1024³ GEMM: 14.2 → 11.2 ms):

    in × out      m = 1         m = 4         m = 32        m = 128
    512 × 2048    135 → 77      215 → 126     497 → 404     2243 → 1382
    2048 × 512     72 → 55      351 → 140     636 → 403     1688 → 1293
    1024 × 512     39 → 35      148 → 72      280 → 198      994 → 657
    256 × 256       7 → 17       15 → 22       38 → 48       113 → 94

oneDNN costs ~12 µs more per call, so small weights stay on MKL: from 2^19 elements (2 MiB fp32) per expert
it won at every m measured; at 2^18 it lost at 1-4 rows. A Mixtral-like model's training step (2 layers, 8
experts of 512 × 1024, 2×64 tokens; in turns, 3 runs) ran at 1.09-1.21× Hugging Face's speed, against
1.02-1.06× on MKL; its layer without autograd at 1024 tokens 1.40× against 1.11×. The weight
gradients stay on _grouped_mm: this op returns a new tensor (no `out=`), and per expert that means a copy
into the stacked gradient, and for a transposed first operand it measured 600× slower.

Where: x86 CPUs whose vendor is not Intel (MKL's own; not measured there, so MKL is kept).
MOECOMPILE_CPU_GEMM=onednn or =aten overrides the choice.
"""
import os

import torch

MIN_WEIGHT = 1 << 19  # elements of one expert's weight from which its GEMMs take oneDNN


def _chosen() -> bool:
    """Whether fp32 expert GEMMs take oneDNN in this process: the environment's choice, else by CPU vendor."""
    choice = os.environ.get("MOECOMPILE_CPU_GEMM", "")
    if choice not in ("", "onednn", "aten"):
        raise ValueError(f"MOECOMPILE_CPU_GEMM={choice!r}: expected 'onednn' or 'aten'")
    if _LINEAR is None or choice == "aten":
        return False
    return choice == "onednn" or _cpu_vendor() not in ("GenuineIntel", None)


def _cpu_vendor():
    """The x86 vendor string from /proc/cpuinfo (Linux), None where there is none to read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


_LINEAR = (torch.ops.mkldnn._linear_pointwise.default  # the op Inductor's CPU linear lowers to
           if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") else None)
ENABLED = _chosen()


def available() -> bool:
    """Whether this torch build has the oneDNN linear (chosen or not)."""
    return _LINEAR is not None


def takes(rows, W) -> bool:
    """Whether GEMMs of rows [N, in] with the experts' weights W (one expert's [out, in] or stacked [E, ...],
    either orientation) run here: fp32 rows on CPU, and weights it takes (takes_weight)."""
    return rows.dtype == torch.float32 and rows.device.type == "cpu" and takes_weight(W)


def takes_weight(W) -> bool:
    """Whether the experts' weights W take oneDNN: oneDNN chosen, fp32 on CPU, MIN_WEIGHT elements or more."""
    return ENABLED and W.dtype == torch.float32 and W.device.type == "cpu" and W.shape[-1] * W.shape[-2] >= MIN_WEIGHT


def grouped_linear(rows, live, W):
    """rows [N, in] in the expert row blocks `live` ((expert, first row, rows), covering all N rows in order)
    → [N, out]: each block times its W[e] ([in, out], any strides)."""
    return torch.cat([linear(rows[s:s + n], W[e].t()) for e, s, n in live])


def linear(x, w, b=None):
    """F.linear(x, w, b) on oneDNN: x [m, in] @ w.T + b for w [out, in] (any strides) → [m, out]."""
    return _LINEAR(x, w, b, "none", [None], "")
