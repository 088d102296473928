"""moecompile: a compiler-style graph optimizer for Mixture-of-Experts models in PyTorch."""
from moecompile import ir  # noqa: F401  (registers the canonical ops)
from moecompile.api import explain, optimize
from moecompile.passes import (expert_parallel, find_moe, lift_moe, schedule_overlap, select_kernels,  # noqa: F401
                               shortcut, validate)  # (registers the passes)
from moecompile.report import MoELayer, Report

__all__ = ["optimize", "explain", "Report", "MoELayer"]
__version__ = "0.1.0"
