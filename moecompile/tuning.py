"""Changing an optimize() result without recompiling: `set_routing` (top-k, capacity, priority) and
`set_parallelism` (an adaptive model's r, pipelining degree and all-to-all algorithm)."""
from __future__ import annotations

import dataclasses

from torch import nn

from moecompile.api import _check_routing, _torch_compiled, explain
from moecompile.report import STATE

_KEEP = object()  # set_routing: leave this setting as it is


def set_routing(model: nn.Module, *, top_k: int | None = None, capacity_factor=_KEEP, batch_prioritized=_KEEP
                ) -> None:
    """Change the routing of every MoE block of an optimize() result, from its next call on, without
    recompiling (each call reads the block's spec). Settings not passed stay as they are. Nothing is
    validated again: the lift was proven at compile time, and the ops are tested for any k, capacity and
    slot order against the reference kernels.

    Args:
        model: a compiled `optimize()` result (after its first call, or optimized with example inputs) whose
            MoE blocks were all rewritten.
        top_k: experts per token, 1 <= k <= E (with a group limit, at most the experts of the kept groups).
            Route, dispatch, capacity, combine and the renormalization follow k; the scoring,
            renormalization rule and scale stay as read at compile time, so a model that renormalizes only
            when k > 1 (Tutel's gate, GPT-MoE here) differs there, and losses computed outside the blocks
            from the model's config (Hugging Face's auxiliary loss) keep the config's k.
        capacity_factor: as optimize()'s; None restores each block's own capacity.
        batch_prioritized: as optimize()'s.

    Returns:
        None; the model is changed in place.

    Raises:
        ValueError: `model` is a torch.compile wrapper, not compiled yet, or has a block that was not
            rewritten; `top_k` is out of range (or not 1 for a DGMoE block); an option value is invalid.
    """
    if _torch_compiled(model):
        raise ValueError("set_routing() takes the optimize() result; torch.compile it after changing the routing")
    ctx = getattr(model, STATE, False)
    if not ctx:
        raise ValueError("set_routing() takes a model returned by moecompile.optimize() that has compiled (after "
                         "its first call, or pass example_inputs= to optimize())")
    changes = {}
    if capacity_factor is not _KEEP:
        _check_routing("set_routing", capacity_factor, False)
        changes["capacity_factor"] = None if capacity_factor is None else float(capacity_factor)
    if batch_prioritized is not _KEEP:
        _check_routing("set_routing", None, batch_prioritized)
        changes["batch_prioritized"] = batch_prioritized
    layers = ctx.report.moe_layers
    left = [layer.name or "(the whole model)" for layer in layers if not layer.rewritten]
    if left:
        raise ValueError(f"set_routing(): MoE block(s) {', '.join(left)} were not rewritten (explain() says why), "
                         "so their routing cannot be changed")
    for layer in layers if top_k is not None else ():
        r, shortcut = layer.spec.route, layer.spec.shortcut
        selectable = r.num_experts * r.topk_group // r.n_group if r.n_group > 1 else r.num_experts
        if type(top_k) is not int or not 1 <= top_k <= selectable:
            raise ValueError(f"set_routing(top_k={top_k!r}): expected an int in [1, {selectable}] for {layer.name}")
        if shortcut is not None and shortcut.kind == "dgmoe" and top_k != 1:
            raise ValueError(f"set_routing(top_k={top_k}): {layer.name} is a DGMoE block, top-1 by construction")
    for layer in layers:
        spec = layer.spec
        spec.routing = dataclasses.replace(spec.routing, **changes)
        if top_k is not None:
            spec.route = dataclasses.replace(spec.route, top_k=top_k)
            layer.top_k = top_k


def set_parallelism(model: nn.Module, r: int | None, degree: int | None = None, algorithm: str | None = None
                    ) -> None:
    """Fix the parallelism of every block of an `optimize(parallelism="adaptive")` model from its next
    call on. Call it on every rank alike (the exchanges are collectives). Nothing moves: every r runs on the
    same layout.

    Args:
        model: an `optimize(..., mesh=mesh, parallelism="adaptive")` result.
        r: 0 (data parallel), 1 (expert + data parallel), up to the ranks per expert (+ model parallel); None
            hands r, the degree and the algorithm back to each block's adaptive table.
        degree: the pipelining degree (>= 1); None: the one in effect.
        algorithm: the all-to-all algorithm: "linear", or "2dh" on a multi-node mesh (`ranks_per_node=`).

    Returns:
        None; the model is changed in place.

    Raises:
        ValueError: `model` was not optimized with parallelism="adaptive"; `r` is not a parallelism of the
            layout; `degree` or `algorithm` is invalid.
    """
    from moecompile.runtime.adaptive import AdaptiveExperts
    blocks = [m.spec.parallel for m in explain(model).moe_layers
              if m.spec is not None and isinstance(m.spec.parallel, AdaptiveExperts)]
    if not blocks:
        raise ValueError("set_parallelism needs a model from moecompile.optimize(..., parallelism='adaptive')")
    for parallel in blocks:
        parallel.pin(r, degree, algorithm)
