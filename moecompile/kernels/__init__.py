"""Kernel backends for the canonical ops (moecompile/ir/ops.py).

Each backend is a namespace of the same eight functions: route, route_backward, dispatch,
dispatch_backward, expert_ffn_forward, expert_ffn_backward, combine_forward, combine_backward; and
DIFFERENTIABLE, the ops whose forward is plain differentiable torch, which eager calls may then let
autograd differentiate instead of the op's formula (ir/ops.call).
- "native": the fast CPU path (kernels/native.py); plain torch, so it also runs on any other device;
- "triton": Triton kernels (kernels/triton_*.py) on CUDA, or on CPU under TRITON_INTERPRET=1;
- "reference": the pure-torch definitions (kernels/reference.py), differentiated by autograd.
Triton is imported on first use only: a CPU user never pays for it, and TRITON_INTERPRET may be set any
time before that.
"""
import functools
import os
import types

BACKENDS = ("native", "triton", "reference")


@functools.cache
def backend(name: str):
    if name == "native":
        from moecompile.kernels import native
        return native
    if name == "reference":
        from moecompile.kernels import reference
        return reference
    if name == "triton":
        from moecompile.kernels import native, triton_ffn, triton_routing
        return types.SimpleNamespace(
            route=triton_routing.route, route_backward=native.route_backward,  # backward: [T, E] elementwise
            dispatch=triton_routing.dispatch, dispatch_backward=triton_routing.dispatch_backward,
            expert_ffn_forward=triton_ffn.expert_ffn_forward, expert_ffn_backward=triton_ffn.expert_ffn_backward,
            combine_forward=triton_routing.combine_forward, combine_backward=triton_routing.combine_backward,
            DIFFERENTIABLE=frozenset())
    raise ValueError(f"unknown kernel backend {name!r}; known: {', '.join(BACKENDS)}")


def why_no_triton(device_type: str) -> str | None:
    """Why the Triton backend cannot run on this device type, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if device_type == "cuda":
        return None
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    return (f"Triton kernels run on CUDA devices (on CPU only in Triton's interpreter: set TRITON_INTERPRET=1 "
            f"before moecompile's kernels are first used); this model is on {device_type!r}")
