"""Canonical IR: `MoESpec` (what a block is) and the custom ops that run it."""
from moecompile.ir import ops
from moecompile.ir.spec import CapacitySpec, ExpertSpec, ExpertWeights, MoESpec, RouteSpec, WeightRef

__all__ = ["ops", "MoESpec", "RouteSpec", "ExpertSpec", "CapacitySpec", "ExpertWeights", "WeightRef"]
