"""expert_parallel: shard every lifted block's experts over the mesh's expert-parallel dimension.

Contract:   with `options.mesh` set (a DeviceMesh; its "ep" dimension, or the whole mesh if it has one
            dimension and no "ep"), each block in `ctx.lifted` that is still rewritten keeps only the experts
            its ep rank owns (`Placement.even`, or `options.placement` experts per rank) and gets
            `spec.parallel`, which makes run_moe exchange rows by all-to-all (runtime/expert_parallel.py).
            Stacked [E, ...] expert parameters are replaced, in the optimized copy only, by new Parameters
            holding the local [E_r, ...] slice (same names); per-expert parameters of other ranks' experts
            are dropped from the copy. The user's model keeps every expert. With `options.ranks_per_node`
            below the ep size (all_to_all "auto") or any (all_to_all "2dh"), the ep group's node groups are
            built once (runtime/hierarchical.py) and every layer's exchanges use the 2D all-to-all, which
            schedule_overlap may turn back to "linear" under "auto".
Invariants: runs after validate, on every rank in the same order (the exchanges are collectives); without
            a mesh it changes nothing. With validation on, each block is checked collectively on its
            recorded input against its single-process rewrite (outputs; the group agrees on the verdict)
            and a mismatch is an error, never a silent fallback.
Pseudo-code:
    group, rank, size = ep dimension of mesh
    hierarchy = nodes × ranks_per_node groups of the ep dimension, or None (linear)
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

from moecompile.ir.lowering import expert_weights
from moecompile.ir.spec import ExpertWeights, WeightRef
from moecompile.passes.registry import CompileContext, register_pass
from moecompile.runtime.adaptive import HIDDEN_DIM, AdaptiveExperts, Layout
from moecompile.runtime.expert_parallel import ExpertParallel, Placement
from moecompile.runtime.hierarchical import Hierarchy
from moecompile.validation import max_relative_error


@register_pass("expert_parallel")
def expert_parallel(ctx: CompileContext) -> None:
    mesh = ctx.options.mesh
    if mesh is None:
        return
    group, rank, size = ep_dimension(mesh)
    hierarchy = _hierarchy(ctx.options, mesh, size)
    for lifted in ctx.lifted:
        layer, spec, block = lifted.layer, lifted.layer.spec, lifted.block
        if not layer.rewritten:
            continue
        with torch.no_grad():
            want = _run_alone(lifted) if ctx.options.validate else None
        prefix = layer.name + "." if layer.name else ""
        if ctx.options.parallelism == "adaptive":
            spec.parallel = _adaptive(block, spec, group, rank, size, prefix, hierarchy)
        else:
            E = spec.num_experts
            placement = (Placement.explicit(ctx.options.placement, E, size) if ctx.options.placement is not None
                         else Placement.even(E, size))
            local = placement.local(rank)
            names = _shard(block, spec.weights, local)
            spec.parallel = ExpertParallel(group, rank, size, placement, expert_params=[prefix + n for n in names],
                                           algorithm="linear" if hierarchy is None else "2dh", hierarchy=hierarchy)
            spec.notes.append(f"expert parallel: {size} ranks, experts per rank {list(placement.sizes)}; "
                              f"this rank (ep {rank}) holds experts {local.start}..{local.stop - 1}")
        if want is None:
            continue
        adaptive = isinstance(spec.parallel, AdaptiveExperts)
        # adaptive: every r must agree, and with a hierarchy, each all-to-all algorithm where rows travel
        variants = [(r, a) for r in spec.parallel.layout.choices
                    for a in (("linear",) if r == 0 or hierarchy is None else ("linear", "2dh"))] if adaptive else \
            [(None, None)]
        for r, algorithm in variants:
            if adaptive:
                spec.parallel.pin(r, algorithm=algorithm)
            with torch.no_grad():
                got = _run_alone(lifted)
            err = torch.tensor([max_relative_error(got, want, want)], dtype=torch.float64)
            dist.all_reduce(err, op=dist.ReduceOp.MAX, group=group)
            what = "expert-parallel" if r is None else f"adaptive-parallel (r={r}, {algorithm} all-to-all)"
            if not err.item() <= ctx.options.tolerance:
                raise RuntimeError(f"moecompile: the {what} {layer.name or 'block'} differs from its "
                                   f"single-process rewrite (relative error {err.item():.2e}); this is a bug")
            spec.notes.append(f"{what} validated across the group: max relative error {err.item():.1e}")
        if adaptive:  # back to r = 1 over the flat exchange until the table chooses, at the first call
            spec.parallel.pin(1, algorithm="linear")
            spec.parallel.pin(None)


def _hierarchy(options, mesh, size: int) -> Hierarchy | None:
    """The ep group as nodes × ranks_per_node when the 2D all-to-all may run (all_to_all "2dh", or "auto" over
    more than one node), else None: linear. Its exchanges start as "2dh", so validation checks the 2D path;
    with "auto", schedule_overlap then picks per layer."""
    per_node = options.ranks_per_node
    if options.all_to_all == "linear" or per_node is None or (options.all_to_all == "auto" and per_node >= size):
        return None
    return Hierarchy.of_ep(mesh, per_node)


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


def _adaptive(block: nn.Module, spec, group, rank: int, size: int, prefix: str, hierarchy) -> AdaptiveExperts:
    """Shard the block's experts into Tutel's layout (runtime/adaptive.py) and build its runtime; the process
    groups of every r's model-parallel shards are created here (a collective: every rank, same order)."""
    E, D = spec.num_experts, spec.hidden
    F = expert_weights(spec, block)["w2"][0].shape[-1]
    Layout.check(size, E, F, D)
    layout = Layout(size, E, rank)
    s = layout.shards
    names = (_shard(block, spec.weights, layout.local_experts) if s == 1 else
             _shard_hidden(block, spec.weights, layout, spec.expert.fused))
    shard_groups = {}
    for r in layout.choices[1:]:
        g = s // r
        for first in range(0, size, g):  # every shard's g ranks, this rank's kept
            members = list(range(first, first + g))
            pg = dist.new_group([dist.get_global_rank(group, q) for q in members]) if g > 1 else None
            if rank in members:
                shard_groups[r] = (pg, g)
    ep = ExpertParallel(group, rank, size, Placement.even(E * s, size), hierarchy=hierarchy)
    spec.notes.append(f"adaptive parallelism: {size} ranks, {E} experts, "
                      + (f"{E // size} whole experts per rank" if s == 1 else f"each expert's hidden units in {s} slices")
                      + f"; r in {list(layout.choices)} switchable per step")
    return AdaptiveExperts(group, layout, spec.expert.fused, ep, shard_groups, [prefix + n for n in names])


def _shard_hidden(block: nn.Module, weights: ExpertWeights, layout: Layout, fused: str) -> list[str]:
    """Keep this rank's hidden-unit slice of its one expert (runtime/adaptive.py's layout): a stacked
    parameter becomes [1, ...] with the slice, a per-expert one keeps only this expert's, sliced; the
    parameters keep their names. Returns the names of the expert parameters left."""
    e, kept = layout.local_experts.start, []
    for role, refs in list(vars(weights).items()):
        if refs is None:
            continue
        stacked = isinstance(refs, WeightRef)
        for i, ref in enumerate([refs] if stacked else refs):
            if ref.index:
                raise ValueError(f"adaptive parallelism over more ranks than experts cannot slice {ref.name}, which "
                                 "this block's experts read as parts of one parameter; use at most as many ranks "
                                 "as experts")
            owner, attr = _owner(block, ref.name)
            if not stacked and i != e:
                owner._parameters[attr] = None
                continue
            full = getattr(owner, attr)
            dim = HIDDEN_DIM.get(role, -1)  # b2: its D entries
            if ref.transpose:
                dim = -1 if dim == -2 else -2
            part = (full.detach()[e:e + 1] if stacked else full.detach())
            idx = torch.tensor(_owned(role, part.shape[dim], layout, fused))
            setattr(owner, attr, nn.Parameter(part.index_select(dim, idx).clone(), requires_grad=full.requires_grad))
            kept.append(ref.name)
        if not stacked:
            setattr(weights, role, [refs[e]])
    return kept


def _owned(role: str, n: int, layout: Layout, fused: str) -> list[int]:
    """Indices of the `n` units along a role's sliced dim that this rank owns: its slice of the hidden units,
    taken from both halves of a fused [gate; up] weight, or as (gate, up) pairs of an interleaved one."""
    if role in ("w1", "b1") and fused == "halves":
        F = n // 2
        return [*layout.hidden_slice(F), *(F + k for k in layout.hidden_slice(F))]
    if role in ("w1", "b1") and fused == "interleaved":
        return [u for k in layout.hidden_slice(n // 2) for u in (2 * k, 2 * k + 1)]
    return list(layout.hidden_slice(n))


def _owner(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return block.get_submodule(owner), attr


def _run_alone(lifted):
    """The block's first output on its recorded input (a shortcut block gets its recorded shortcut input)."""
    if lifted.layer.spec.shortcut is not None:
        lifted.layer.spec.shortcut.prime()
    out = lifted.block(*lifted.args, **lifted.kwargs)
    return out[0] if isinstance(out, tuple) else out
