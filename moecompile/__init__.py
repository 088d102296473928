"""moecompile: a compiler-style graph optimizer for Mixture-of-Experts models in PyTorch."""
from moecompile import ir  # noqa: F401  (registers the canonical ops)
from moecompile.api import explain, optimize
from moecompile.tuning import set_parallelism, set_routing
from moecompile.passes import (adaptive_table, expert_parallel, find_moe, lift_moe, schedule_overlap,  # noqa: F401
                               select_kernels, shortcut, validate)  # (registers the passes)
from moecompile.report import MoELayer, Report

__all__ = ["optimize", "explain", "set_routing", "set_parallelism", "Report", "MoELayer"]
__version__ = "0.1.0"
