"""Expert activations as Triton device functions, for the epilogues of the grouped GEMMs.

The same functions as `moecompile/kernels/activations.py`, written on fp32 register tiles: the gate's
activation `a = act(g)`, the factor the up projection contributes (`u`, or `clamp(u, -limit, limit) + 1`
for gpt-oss' clamped SwiGLU), and their derivatives for the backward epilogue. `ACT` is the gate's base
function, a compile-time string: "silu" (SwiGLU), "gelu" (GeGLU), "gelu_tanh", "relu" or "clamped_swiglu".
Derivatives follow torch's autograd conventions where they are a choice: relu' is 0 at 0, and a clamp
passes the gradient at its bounds.
"""
import triton
import triton.language as tl

# Constants are literals in the jitted code: a plain global is rejected by the GPU compiler (the interpreter
# does not check), and a tl.constexpr global breaks arithmetic with tensors under the interpreter.
# √½ = 0.7071067811865476, 1/√(2π) = 0.3989422804014327, √(2/π) = 0.7978845608028654, GELU cubic 0.044715.


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0  # no tanh in tl outside libdevice


@triton.jit
def gate_act(g, ACT: tl.constexpr, alpha, limit):
    """a = act(g), elementwise on an fp32 tile."""
    if ACT == "silu":
        a = g * tl.sigmoid(g)
    elif ACT == "gelu":
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    elif ACT == "relu":
        a = tl.maximum(g, 0.0)
    else:  # clamped_swiglu: gc·σ(α·gc), gc = min(g, limit)
        gc = tl.minimum(g, limit)
        a = gc * tl.sigmoid(alpha * gc)
    return a


@triton.jit
def gate_act_grad(g, ACT: tl.constexpr, alpha, limit):
    """d act(g) / dg."""
    if ACT == "silu":
        s = tl.sigmoid(g)
        d = s * (1.0 + g * (1.0 - s))
    elif ACT == "gelu":
        d = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476)) + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == "gelu_tanh":
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    elif ACT == "relu":
        d = tl.where(g > 0.0, 1.0, 0.0)
    else:
        gc = tl.minimum(g, limit)
        s = tl.sigmoid(alpha * gc)
        d = tl.where(g <= limit, s + alpha * gc * s * (1.0 - s), 0.0)
    return d


@triton.jit
def up_factor(u, ACT: tl.constexpr, limit):
    """What multiplies act(g) in a gated FFN: u itself, or gpt-oss' clamp(u, -limit, limit) + 1."""
    if ACT == "clamped_swiglu":
        f = tl.minimum(tl.maximum(u, -limit), limit) + 1.0
    else:
        f = u
    return f


@triton.jit
def up_factor_grad(u, ACT: tl.constexpr, limit):
    if ACT == "clamped_swiglu":
        d = tl.where((u >= -limit) & (u <= limit), 1.0, 0.0)
    else:
        d = tl.full(u.shape, 1.0, tl.float32)
    return d
