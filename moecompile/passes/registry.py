"""Passes are data: each is a function `pass_(ctx)` registered under a name; pipelines are lists of names."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from moecompile.frontend.capture import Site
from moecompile.report import MoELayer, Report


@dataclass
class Options:
    validate: bool = True          # translation validation of every rewrite
    tolerance: float = 1e-4        # max relative error accepted by validation (fp32)
    pipeline: str = "default"
    kernels: str = "auto"          # "auto" (per op and device), or one backend for every op: native/triton/reference
    mesh: object = None            # DeviceMesh whose "ep" dimension shards the experts (None: one process)
    placement: tuple | None = None # experts per ep rank (None: even)
    overlap: object = "off"        # "off", "auto" (cost model), or a pipelining degree (int)
    all_to_all: str = "auto"       # "auto" (cost model, per layer), "linear" or "2dh" (hierarchical, multi-node)
    ranks_per_node: int | None = None  # consecutive ep ranks sharing a node, for "2dh" (None: one node)
    parallelism: str = "ep"        # "ep": experts sharded whole; "adaptive": Tutel's layout, r switchable per step
    shortcut: str | None = None    # "scmoe" | "dgmoe": shortcut-connected MoE blocks (an architecture change)
    num_experts: int | None = None # with shortcut="scmoe" on a dense model: upcycle to this many experts
    upcycle_noise: float = 0.0     # relative std of the noise added to each upcycled expert's copy
    capacity_factor: float | None = None  # Tutel's capacity factor for every block (None: each block's own)
    batch_prioritized: bool = False       # keep slots by token importance when a capacity drops (V-MoE BPR)
    precision: str = "original"    # "original": each stage in the precision the block computes it in; "model": the
                                   # stages it casts below its own precision in its own (frontend/precision.py)
    decode_copy_bytes: int = 1 << 30  # the most bytes of expert-weight copies CPU decode calls may keep (kernels/bagged.py)


@dataclass
class Lifted:
    """A block rewritten by lift_moe, with what validation needs to check it and, if need be, undo it."""
    layer: MoELayer
    block: nn.Module
    original: Callable             # the block's forward before the rewrite
    args: tuple                    # the block's inputs recorded in the compile run
    kwargs: dict


@dataclass
class CompileContext:
    """What passes read and write. `model` is the optimized copy (sharing parameters with the original)."""
    model: nn.Module
    args: tuple
    kwargs: dict
    options: Options
    report: Report = field(default_factory=Report)
    sites: list[Site] = field(default_factory=list)
    lifted: list[Lifted] = field(default_factory=list)

    def __getstate__(self) -> dict:
        """Pickled (with the model: pickle, torch.save, copy.deepcopy) as what outlives compilation: the options
        and the report (explain(), set_routing()). The compile run's inputs, sites and lifted blocks (recorded
        activations, bound methods) are for the passes only."""
        return {**self.__dict__, "args": (), "kwargs": {}, "sites": [], "lifted": []}


class InstalledForward:
    # Base of the callables moecompile installs as a module's `forward` (`module.forward = obj`).
    #
    # Objects of module-level classes, not closures or methods bound to functions the class lacks: pickle
    # saves a bound method as `getattr(module, function name)`, which does not load back, and a closure not
    # at all. Holding the module, they pickle and deep-copy with it. They present the class forward's
    # signature, name and docstring (`__doc__` is a property here, hence comments), as `module.forward` did
    # before, so code inspecting it (Hugging Face's Trainer keeps the dataset columns that
    # `inspect.signature(model.forward)` names) sees no difference.

    module: nn.Module

    @property
    def __wrapped__(self):
        return type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__wrapped__)

    @property
    def __code__(self):  # what runs (torch.export names its fake-tensor environment after it)
        return type(self).__call__.__code__

    @property
    def __name__(self) -> str:
        return getattr(type(self.module).forward, "__name__", "forward")

    @property
    def __doc__(self) -> str | None:
        return type(self.module).forward.__doc__

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__doc__ = InstalledForward.__dict__["__doc__"]  # a class without a docstring has __doc__ = None

    def __repr__(self) -> str:
        return f"<moecompile {type(self).__name__} of {type(self.module).__name__}.forward>"


PASSES: dict[str, Callable[[CompileContext], None]] = {}
PIPELINES: dict[str, list[str]] = {
    "default": ["find_moe", "lift_moe", "select_kernels", "validate", "shortcut", "expert_parallel",
                "schedule_overlap", "adaptive_table"],
    "none": [],
}


def register_pass(name: str):
    def wrap(fn):
        PASSES[name] = fn
        return fn
    return wrap


def run_pipeline(ctx: CompileContext) -> None:
    if ctx.options.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {ctx.options.pipeline!r}; known: {sorted(PIPELINES)}")
    for name in PIPELINES[ctx.options.pipeline]:
        PASSES[name](ctx)
        ctx.report.passes.append(name)
