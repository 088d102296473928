"""expert_parallel: shard every lifted block's experts over the mesh's expert-parallel dimension.

Contract:   with `options.mesh` set (a DeviceMesh; its "ep" dimension, or the whole mesh if it has one
            dimension and no "ep"), each block in `ctx.lifted` that is still rewritten keeps only the experts
            its ep rank owns (`Placement.even`, or `options.placement` experts per rank) and gets
            `spec.parallel`, which makes run_moe exchange rows by all-to-all (runtime/expert_parallel.py).
            Stacked [E, ...] expert parameters are replaced, in the optimized copy only, by new Parameters
            holding the local [E_r, ...] slice (same names); per-expert parameters of other ranks' experts
            are dropped from the copy. The user's model keeps every expert.
Invariants: runs after validate, on every rank in the same order (the exchanges are collectives); without
            a mesh it changes nothing. With validation on, each block is checked collectively on its
            recorded input against its single-process rewrite (outputs; the group agrees on the verdict)
            and a mismatch is an error, never a silent fallback.
Pseudo-code:
    group, rank, size = ep dimension of mesh
    for lifted block (rewritten):
        want = block(recorded input)                           # single process, all experts
        placement = even(E, size) or explicit(options.placement)
        for each expert weight role: slice stacked params / drop other ranks' per-expert params
        spec.parallel = ExpertParallel(group, rank, size, placement, expert_params=names)
        check: max over group of rel_err(block(recorded input), want) <= tolerance
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moecompile.ir.spec import ExpertWeights, WeightRef
from moecompile.passes.registry import CompileContext, register_pass
from moecompile.runtime.expert_parallel import ExpertParallel, Placement
from moecompile.validation import max_relative_error


@register_pass("expert_parallel")
def expert_parallel(ctx: CompileContext) -> None:
    mesh = ctx.options.mesh
    if mesh is None:
        return
    group, rank, size = ep_dimension(mesh)
    for lifted in ctx.lifted:
        layer, spec, block = lifted.layer, lifted.layer.spec, lifted.block
        if not layer.rewritten:
            continue
        with torch.no_grad():
            want = _run_alone(lifted) if ctx.options.validate else None
        E = spec.num_experts
        placement = (Placement.explicit(ctx.options.placement, E, size) if ctx.options.placement is not None
                     else Placement.even(E, size))
        local = placement.local(rank)
        names = _shard(block, spec.weights, local)
        prefix = layer.name + "." if layer.name else ""
        spec.parallel = ExpertParallel(group, rank, size, placement, expert_params=[prefix + n for n in names])
        spec.notes.append(f"expert parallel: {size} ranks, experts per rank {list(placement.sizes)}; "
                          f"this rank (ep {rank}) holds experts {local.start}..{local.stop - 1}")
        if want is not None:
            with torch.no_grad():
                got = _run_alone(lifted)
            err = torch.tensor([max_relative_error(got, want, want)], dtype=torch.float64)
            dist.all_reduce(err, op=dist.ReduceOp.MAX, group=group)
            if not err.item() <= ctx.options.tolerance:
                raise RuntimeError(f"moecompile: the expert-parallel {layer.name or 'block'} differs from its "
                                   f"single-process rewrite (relative error {err.item():.2e}); this is a bug")
            spec.notes.append(f"expert parallel validated across the group: max relative error {err.item():.1e}")


def ep_dimension(mesh) -> tuple[object, int, int]:
    """(process group, this rank's index in it, its size) of the mesh's expert-parallel dimension."""
    names = mesh.mesh_dim_names or ()
    if "ep" in names:
        sub = mesh["ep"]
    elif mesh.ndim == 1:
        sub = mesh
    else:
        raise ValueError(f"moecompile: the mesh has dimensions {names}; name the expert-parallel one 'ep'")
    return sub.get_group(), sub.get_local_rank(), sub.size()


def _shard(block: nn.Module, weights: ExpertWeights, local: range) -> list[str]:
    """Keep only the `local` experts' weights in `block` (see the module docstring); returns the names,
    relative to the block, of the expert parameters left."""
    kept, sliced = [], set()
    for role, refs in list(vars(weights).items()):
        if refs is None:
            continue
        if isinstance(refs, WeightRef):
            if refs.name not in sliced:
                owner, attr = _owner(block, refs.name)
                full = getattr(owner, attr)
                setattr(owner, attr, nn.Parameter(full.detach()[local.start:local.stop].clone(),
                                                  requires_grad=full.requires_grad))
                sliced.add(refs.name)
                kept.append(refs.name)
            continue
        for e, ref in enumerate(refs):
            if e not in local:
                owner, attr = _owner(block, ref.name)
                owner._parameters[attr] = None  # gone from this rank's copy (and its state_dict)
            elif ref.name not in kept:
                kept.append(ref.name)
        setattr(weights, role, [refs[e] for e in local])
    return kept


def _owner(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return block.get_submodule(owner), attr


def _run_alone(lifted):
    """The block's first output on its recorded input (a shortcut block gets its recorded shortcut input)."""
    if lifted.layer.spec.shortcut is not None:
        lifted.layer.spec.shortcut.prime()
    out = lifted.block(*lifted.args, **lifted.kwargs)
    return out[0] if isinstance(out, tuple) else out
