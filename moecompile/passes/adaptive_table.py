"""adaptive_table: give every adaptive-parallel block (runtime/adaptive.py) its per-step table of (r, pipelining
degree, all-to-all algorithm) by capacity bucket (runtime/adaptive_table.py), seeded by the cost model.

Contract:   for every block whose `spec.parallel` is an `AdaptiveExperts`, sets `parallel.table`, whose
            `predict(load)` gives, for each candidate, the predicted forward + backward seconds of the layer
            for a step whose rank q dispatches load[q, e] rows to expert e, and the runtime's pipelining
            degree to the first candidate degree until the table chooses. Candidates: r in the layout's
            choices × degree in `degrees(options.overlap)` ("auto": 1, 2, 4; an int: that; "off": 1) × the
            all-to-all algorithms the layer may use (schedule_overlap.AllToAllCost: "linear" on one node;
            with ranks_per_node, "2dh" too, or only the one forced by options.all_to_all); degree 1 and no
            algorithm for r = 0 (no all-to-all). At run time the table measures each r at its best-predicted candidate and
            EXTRA_TRIALS more.
Invariants: changes no result (every r and degree compute the same function, validated by expert_parallel);
            predictions are agreed over the group (MAX), so every rank ranks the candidates alike.
Pseudo-code:
    link = measure_link(group); slice = this rank's expert-weight bytes (equal on every rank)
    predict(load [W, E]):                                     the slowest rank counts: rows = max_q Σ_e load
      r = 0:  2 · link(slice · (W − 1))                      all-gather forward, reduce-scatter backward
              + expert FFN (fwd + bwd) of all E experts, whole, on this rank's rows
      r ≥ 1:  2 · link(slice · (g − 1)), g = s / r           the shard's gather (none when g = 1)
              + makespan(chunk_dag fwd) + makespan(chunk_dag bwd) over d chunks (schedule_overlap's model):
                send = a2a(algorithm, r · rows · D · elem / d)        (AllToAllCost.seconds_of)
                experts = FFN of the busiest rank's slots (E·s/W of F/r hidden units) on its received
                          rows / d: Σ over its experts of Σ_q load[q, e] (W <= E), or
                          max_e Σ_q load[q, e] / g (W > E: each of the r shards gets all rows of its
                          expert, split over its g ranks)
      → MAX over the group
    FFN times: affine in rows per r, from two sizes measured at compile time (the recorded rows and a quarter)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moecompile.ir.lowering import expert_weights
from moecompile.passes.registry import CompileContext, register_pass
from moecompile.passes.schedule_overlap import (TRIAL_SLACK, AllToAllCost, _expert_seconds, _makespan, chunk_dag,
                                                list_schedule)
from moecompile.runtime.adaptive import AdaptiveExperts
from moecompile.runtime.adaptive_table import AdaptiveTable, Choice
from moecompile.runtime.cost_model import measure_link

EXTRA_TRIALS = 1  # per capacity bucket, measured beyond each r at its best-predicted degree: this many more
                  # predicted within TRIAL_SLACK of the best


@register_pass("adaptive_table")
def adaptive_table(ctx: CompileContext) -> None:
    layers = [lifted for lifted in ctx.lifted if isinstance(lifted.layer.spec.parallel, AdaptiveExperts)]
    if not layers:
        return
    first = layers[0].layer.spec.parallel
    link = measure_link(first.group)                                   # the flat group: the weight gathers
    a2a = AllToAllCost(first.size, link=link) if first.ep.hierarchy is None else \
        AllToAllCost.measure(first.ep, ctx.options.all_to_all)
    for lifted in layers:
        spec, parallel = lifted.layer.spec, lifted.layer.spec.parallel
        rows = lifted.args[0].numel() // spec.hidden * spec.top_k                  # this rank's, compile time
        predict = _predictor(spec, expert_weights(spec, lifted.block), parallel, link, a2a,
                             degrees(ctx.options.overlap), rows)
        parallel.table = AdaptiveTable(predict, parallel.group, extra=EXTRA_TRIALS, slack=TRIAL_SLACK)
        parallel.ep.chunks = degrees(ctx.options.overlap)[0]  # until the table (or set_parallelism) chooses


def degrees(overlap) -> tuple[int, ...]:
    return (1, 2, 4) if overlap == "auto" else (overlap,) if isinstance(overlap, int) else (1,)


def _predictor(spec, w: dict, parallel: AdaptiveExperts, link, a2a: AllToAllCost, degree_choices, rows_now: int):
    """predict(load) for one block. The experts' time is taken as affine in their rows (a per-call overhead,
    which dominates small layers, plus a per-row cost): per r, forward and backward measured now on
    `rows_now` and a quarter of that spread over the slots r computes, so predicting a new bucket at run time
    measures nothing."""
    L = parallel.layout
    W, E, s = L.world, L.experts, L.shards
    elem = w["w2"][0].element_size()
    slice_bytes = sum(t.numel() for ws in w.values() for t in ws) * elem
    hidden = w["w2"][0].shape[-1] * (s if s > 1 else 1)                       # F
    cost = {}  # r → rows → (forward, backward) seconds
    for r in L.choices:  # r = 0: all E experts whole; else E·s/W slots of F/r hidden units
        slots, units = (E, hidden) if r == 0 else (E * s // W, hidden // r)
        weights = _shaped(spec, w, slots, units)
        (n1, t1), (n2, t2) = ((slots * each, _expert_seconds(spec, weights, slots, each))
                              for each in (max(1, rows_now // (4 * slots)), max(2, rows_now // slots)))
        cost[r] = _affine(n1, t1, n2, t2)

    def predict(load: torch.Tensor) -> dict[Choice, float]:
        rows = int(load.sum(1).max())                                           # the busiest sender's rows
        per_expert = load.sum(0)                                                # [E] rows of each expert
        out = {}
        for r in L.choices:
            if r == 0:
                out[Choice(0, 1)] = 2 * link.transfer_s(slice_bytes * (W - 1)) + sum(cost[0](rows))
                continue
            g = s // r
            gather_s = 2 * link.transfer_s(slice_bytes * (g - 1)) if g > 1 else 0.0
            busiest = int(per_expert.view(W, -1).sum(1).max()) if s == 1 else int(per_expert.max()) // g
            for d, algorithm in ((d, a) for d in degree_choices for a in a2a.algorithms):
                send = a2a.seconds_of(algorithm, r * rows * spec.hidden * elem / d)
                fwd, bwd = cost[r](busiest / d)
                out[Choice(r, d, algorithm)] = (gather_s + _makespan(list_schedule(chunk_dag(d, send, fwd)))
                                                + _makespan(list_schedule(chunk_dag(d, send, bwd))))
        agreed = torch.tensor(list(out.values()), dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=parallel.group)
        return dict(zip(out, agreed.tolist()))
    return predict


def _affine(n1: int, t1: tuple, n2: int, t2: tuple):
    """rows → (forward, backward) seconds on the line through (n1, t1) and (n2, t2), never below zero."""
    slopes = [(b - a) / max(n2 - n1, 1) for a, b in zip(t1, t2)]
    return lambda rows: tuple(max(0.0, a + k * (rows - n1)) for a, k in zip(t1, slopes))


def _shaped(spec, w: dict, experts: int, hidden: int) -> dict:
    """Stacked weights of `experts` experts with `hidden` hidden units, shaped like the block's (values do not
    matter: they are only timed)."""
    D, gate_up = spec.hidden, 2 if spec.expert.fused else 1
    shape = {"w1": (gate_up * hidden, D), "w3": (hidden, D), "w2": (D, hidden),
             "b1": (gate_up * hidden,), "b3": (hidden,), "b2": (D,)}
    dtype = w["w2"][0].dtype
    return {role: [torch.randn(experts, *shape[role], dtype=dtype) * 0.02] if ws else [] for role, ws in w.items()}
