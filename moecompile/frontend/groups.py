"""Group-limited ("node-limited") routing, read from the ops between the router and the expert top-k.

DeepSeek-V2/V3 score the experts in `n_group` equal groups of consecutive experts, keep the best `topk_group`
groups and choose the top-k only among their experts. Written as a mask:

    scores [..., E] ─ view [..., G, E/G] ─ group score [..., G] ─ top groups ─ 0/1 mask [..., G] ─ widen to E ─┐
    scores [..., E] ─────────────────────────────────────────────── masked_fill / where / × mask ──────── top-k

A group scores by its best expert ("max": amax, max) or by the sum of its two best ("top2sum": topk(2) or a
descending sort cut to two, then summed). The other groups' experts are set to 0 (masked_fill with 0, a
product with the mask) or excluded (-inf). How the mask is widened from groups to experts (expand and
reshape, repeat_interleave, indexing) does not matter: the group view and the group selection say which
experts belong to which group.
"""
from __future__ import annotations

import math
from operator import getitem

import torch
from torch import fx

from moecompile.frontend.capture import SELECTIONS
from moecompile.frontend.graph import Reader, Unsupported, constant, shape

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
MASKINGS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor,
            aten.where.self, aten.mul.Tensor}
BEST = {aten.amax.default, aten.max.dim}  # a group scored by its best expert ("max")
SORTS = {aten.sort.default, aten.sort.stable}


def read_groups(g: Reader, route_nodes: set[fx.Node], sels: list[fx.Node], E: int) -> dict:
    """RouteSpec fields n_group, topk_group, group_score, group_fill; a single group when none is formed."""
    for view in sorted(route_nodes, key=g.order.get):
        s = shape(view)
        if view.target not in VIEWS or len(s) < 3 or s[-2] * s[-1] != E or not 1 < s[-2] < E or \
                shape(view.args[0])[-1:] != (E,):
            continue
        G = s[-2]
        group_sel = [m for m in route_nodes if m.target in SELECTIONS and m not in sels
                     and shape(m.args[0]) == s[:-1] and g.depends(m, view)]
        if not group_sel:
            raise Unsupported(f"the expert scores are viewed as {G} groups of {E // G} experts, but no choice of "
                              "the best groups follows")
        sel = group_sel[0]
        k_group = sel.args[1] if sel.target is aten.topk.default else 1
        return dict(n_group=G, topk_group=k_group, group_score=_group_score(g, view, sel),
                    group_fill=_group_fill(g, route_nodes, sel, sels, E))
    return dict(n_group=1, topk_group=1, group_score="max", group_fill="zero")


def _group_score(g: Reader, view: fx.Node, sel: fx.Node) -> str:
    scoring = g.between(view, sel.args[0]) - {view}
    targets = {n.target for n in scoring}
    if targets & BEST and not targets & ({aten.sum.dim_IntList, aten.topk.default} | SORTS):
        return "max"
    best_two = [n for n in scoring if (n.target is aten.topk.default and n.args[1] == 2) or
                (n.target is aten.slice.Tensor and _width(n) == 2 and _after_descending_sort(n))]
    if (best_two or shape(view)[-1] == 2) and aten.sum.dim_IntList in targets:  # (of two, the sum of all)
        return "top2sum"
    raise Unsupported("the expert groups are scored by something other than their best expert's score or the sum "
                      "of their two best (the forms of DeepSeek-V2 and V3)")


def _width(n: fx.Node) -> int | None:
    """How many entries a slice keeps along its dim (None: to the end)."""
    start, end = (n.args[2] if len(n.args) > 2 else 0) or 0, n.args[3] if len(n.args) > 3 else None
    return None if end is None else min(end, shape(n.args[0])[n.args[1]]) - start


def _after_descending_sort(n: fx.Node) -> bool:
    """Whether a slice is of the values of a descending sort."""
    src = n.args[0]
    if src.target is getitem and src.args[1] == 0:
        src = src.args[0]
    if src.target not in SORTS:
        return False
    return bool(src.args[2] if src.target is aten.sort.default and len(src.args) > 2
                else src.kwargs.get("descending", False))


def _group_fill(g: Reader, route_nodes, group_sel: fx.Node, sels, E: int) -> str:
    """"zero" or "exclude": what the experts of the groups not kept are set to before the top-k."""
    expert_sel = [s for s in sels if g.depends(s, group_sel)]
    for n in sorted(route_nodes, key=g.order.get):
        if n.target not in MASKINGS or shape(n)[-1:] != (E,) or not g.depends(n, group_sel) or \
                not any(g.depends(s, n) for s in expert_sel):
            continue
        if n.target is aten.mul.Tensor:
            return "zero"
        # masked_fill(scores, mask, v); where(mask, scores, v) or where(mask, v, scores)
        fills = n.args[1:3] if n.target is aten.where.self else n.args[2:3]
        value = next((v for v in map(constant, fills) if v is not None), None)
        if value == 0:
            return "zero"
        if value == -math.inf:
            return "exclude"
        raise Unsupported(f"the experts outside the best groups are set to {value} before the top-k; "
                          "0 and -inf are understood")
    raise Unsupported("the best expert groups are chosen, but how the other groups' experts are left out of the "
                      "top-k was not understood (expected a mask applied to the scores)")
