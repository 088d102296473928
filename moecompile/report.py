"""What `explain()` returns: every MoE block found, whether it was rewritten, and why not."""
from __future__ import annotations

import io
import weakref
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from moecompile.ir.spec import MoESpec, dtype_name
from moecompile.kernels import bagged, batched, padded


@dataclass
class MoELayer:
    """One MoE block that moecompile found, as `explain()` reports it.

    Attributes:
        name: the block's qualified module name in the model ("" for the model itself).
        num_experts: E, when the routing was read (else None).
        top_k: experts per token (after `set_routing(top_k=...)`, the new k).
        scoring: "softmax" or "sigmoid", when the routing was read.
        rewritten: whether the block now runs the canonical ops (False: it runs its own code).
        reason: why it was not rewritten, or None.
        spec: the `MoESpec` read from the block (moecompile/ir/spec.py), or None when analysis failed.
        details: (property) what was read and chosen, in words: activation, renormalization, scale, groups,
            score bias, capacity and drops, shared expert, expert-parallel placement and schedule, kernels.
    """
    name: str                    # qualified module name in the original model
    num_experts: int | None
    top_k: int | None
    scoring: str | None
    rewritten: bool
    reason: str | None = None    # why not rewritten, or None
    spec: MoESpec | None = None

    @property
    def details(self) -> str:
        """What was read and chosen for the block, in words ("" without a spec)."""
        s = self.spec
        if s is None:
            return ""
        parts = [s.expert.activation + (" +bias" if s.expert.bias else "")
                 + (f" (fused gate/up, {s.expert.fused})" if s.expert.fused else "")]
        if s.route.renormalize:
            parts.append("renorm")
        if s.route.scale != 1.0:
            parts.append(f"scale {s.route.scale:g}")
        if s.route.n_group > 1:
            parts.append(f"groups {s.route.topk_group}/{s.route.n_group}")
        if s.score_bias:
            parts.append("score bias")
        if s.capacity or s.routing.capacity_factor is not None:
            parts.append(_capacity_details(s))
        elif s.routing.batch_prioritized:
            parts.append("batch-prioritized (no effect: dropless)")
        if s.shared:
            parts.append("shared expert" + (" (gated)" if s.shared_gate else ""))
        parts += _batched_forms(s)
        stages = {"router": s.route.dtype, "experts": s.expert.dtype, "combine": s.combine_dtype}
        parts += [f"{stage} in {dtype_name(d)}" for stage, d in stages.items() if d is not None]
        parts += [f"{stage} in the model's precision, not the original's {dtype_name(d)} (precision='model')"
                  for stage, d in s.raised_stages]
        parts += [u.describe() for u in s.buffer_updates]
        if s.parallel is not None:
            parts.append(_parallel_details(s.parallel))
        backends = set(s.kernels.values())
        parts.append("kernels: " + (backends.pop() if len(backends) == 1 else
                                    " ".join(f"{op}={k}" for op, k in s.kernels.items())))
        if s.onednn:
            parts.append("expert GEMMs on oneDNN, not aten's BLAS (this CPU is not Intel's, or "
                         f"MOECOMPILE_CPU_GEMM=onednn): {_onednn_calls(s)}")
        return ", ".join(parts)


@dataclass
class Report:
    """What `explain()` returns. `print(report)` (or `str(report)`) gives a table with one row per block;
    rich renders it directly.

    Attributes:
        moe_layers: one `MoELayer` per MoE block found, in the model's order.
        notes: model-wide notes: blocks not found or not MoE routing, architecture changes, compiled graphs.
        passes: the names of the passes that ran, in order.
    """
    moe_layers: list[MoELayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)

    def __rich__(self) -> Table:
        t = Table(title=f"moecompile: {len(self.moe_layers)} MoE block(s), "
                        f"{sum(m.rewritten for m in self.moe_layers)} rewritten",
                  caption="\n".join(self.notes) or None, caption_justify="left")
        for col in ("block", "experts", "top-k", "scoring", "rewritten", "details / reason"):
            t.add_column(col, overflow="fold")
        for m in self.moe_layers:
            t.add_row(m.name or "(the whole model)", _s(m.num_experts), _s(m.top_k), _s(m.scoring),
                      "[green]yes[/]" if m.rewritten else "[red]no[/]", m.reason or m.details)
        return t

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=io.StringIO(), color_system=None)
        console.print(self)
        return console.export_text().rstrip()


def _batched_forms(s) -> list[str]:
    """Which calls take the batched forms (ir/lowering.batched_path), by tokens per call, and whether calls
    without autograd take the eager fast path (ir/fast_path.fast_call)."""
    def calls(slots: int) -> str:
        tokens = slots // s.route.top_k
        return "1-token calls" if tokens == 1 else f"calls of ≤ {tokens} tokens"
    threaded = batched.decode_slots_on_threads(s.decode_slots, s.num_experts) if s.stacked_path else 0
    parts = []
    if max(s.decode_slots, threaded) >= s.route.top_k:
        one = calls(s.decode_slots) if s.decode_slots >= s.route.top_k else "none"
        more = f" ({calls(threaded)} on ≥ 2 threads)" if threaded > s.decode_slots else ""
        with_grad = " with autograd" if s.bag_slots else ""  # without it, the bagged form below
        parts.append(f"decode path (gather + bmm){with_grad}: {one}{more}")
    if s.stacked_path:
        parts.append("on ≥ 2 threads without autograd, one bmm over all experts where most get rows"
                     + (" (not while oneDNN takes the GEMMs)" if s.onednn else ""))
    if s.kernels.get("expert_ffn") == "native" and s.num_experts >= padded.MIN_EXPERTS and not s.onednn:
        parts.append(f"with autograd on ≥ 2 threads (fp32), {calls(padded.MOST_ROWS * s.num_experts)} whose "
                     f"experts get rows evenly (padded rows ≤ {padded.MOST_PADDING:g}× the rows + "
                     f"{padded.SPARE_ROWS} per expert, rows for ≥ 3/4 of the experts): expert GEMMs as bmm over "
                     "rows padded per expert")
    if s.fast_path:
        parts.append("eager calls without autograd skip the canonical ops' wrappers")
    if s.bag_slots >= s.route.top_k:
        one = bagged.slots_on_threads(s.bag_slots, threads=1)
        parts.append(f"without autograd, {calls(s.bag_slots)} on ≥ 2 threads ("
                     f"{calls(one) if one >= s.route.top_k else 'none'} on one): experts as weighted sums of rows "
                     "of a copy of their weights (as many bytes again, made at the first such call)")
    return parts


def _onednn_calls(s: MoESpec) -> str:
    """Which of a block's expert GEMMs kernels/onednn.py takes (native.py's choice, by the block's weights)."""
    if s.stacked_path and not s.expert.bias:
        return "forward and input gradients (weight gradients on aten's)"
    return "calls without autograd of many rows only (the expert weights are " + \
        ("not stacked)" if not s.stacked_path else "biased)")


def _capacity_details(s: MoESpec) -> str:
    """The capacity rule (the block's own or the user's factor), its groups and slot order, and the slots
    routed and dropped: cumulative over training calls and in the last call."""
    own, x = s.capacity, s.routing.capacity_factor
    if x is not None:
        rule = f"capacity factor {x:g} (C = " + (
            f"⌈k·{x:g}·G/E⌉)" if x > 0 else "the call's largest expert load)" if x == 0 else
            f"the call's largest expert load, at most ⌈k·{-x:g}·G/E⌉)")
    else:
        rule = _own_rule(own, s.top_k, s.num_experts) if own.factor else f"capacity {own.capacity}"
    if own and own.describe():  # "per sequence", "per 12 tokens"
        rule += " " + own.describe()
    if own and own.order == "choice":
        rule += ", first choices before later ones"
    if own and own.dropped == "identity":
        rule += ", dropped tokens pass unchanged"
    if s.routing.batch_prioritized:
        rule += ", batch-prioritized" + (" (dispatch: reference kernels)" if s.kernels["dispatch"] == "triton" else "")
    d = s.drops
    if d.last_capacity is not None:
        rule += (f"; last call: capacity {d.last_capacity}, dropped {d.last_dropped} of {d.last_routed} "
                 f"token-slots; training: dropped {d.dropped} of {d.routed}")
        if d.routed:
            rule += f" ({100 * d.dropped / d.routed:.1f}%)"
    return rule


def _own_rule(own, k: int, E: int) -> str:
    """The block's own capacity rule as read (CapacitySpec.factor, min_capacity), in this k and E."""
    term = f"⌈{k}·{own.factor:g}·G/{E}⌉"
    return (f"capacity max({own.min_capacity}, {term})" if own.min_capacity else f"capacity {term}") + \
        " for G tokens" + ("" if own.describe() else " per call")


def _parallel_details(p) -> str:
    """Placement, the chosen schedule with its predictions, and what the runtime measured so far."""
    text = p.summary()  # runtime.expert_parallel.ExpertParallel or runtime.adaptive.AdaptiveExperts
    if p.schedule is not None:
        text += "; " + p.schedule.summary()
    if p.tuner is not None:
        text += "; " + p.tuner.summary()
    calls = p.stats["calls"]
    if calls:
        text += (f"; measured per call: exchange region {p.stats['region'] / calls * 1e3:.2f} ms fwd, exposed "
                 f"comm {p.stats['forward'] / calls * 1e3:.2f} ms fwd + {p.stats['backward'] / calls * 1e3:.2f} ms bwd")
    return text


def _s(v) -> str:
    return "-" if v is None else str(v)


# ---- where reports live ------------------------------------------------------------------------------------
# Kept here, below the passes, the runtime and the entry points that file and read them.
STATE = "_moecompile"  # an optimize() result's attribute: its CompileContext (None until compiled)
# reports of graphs compiled by the torch.compile backend, by the model parameters they read,
# id(p) → (weakref to p, reports): tensors compare by value, so no WeakKeyDictionary
_COMPILED: dict[int, tuple[weakref.ref, list[Report]]] = {}


def file_compiled(report: Report, example_inputs) -> None:
    """File a compiled graph's report under the model parameters it reads, for explain(torch.compile(m, ...))."""
    for value in example_inputs:
        if isinstance(value, torch.nn.Parameter):
            ref, reports = _COMPILED.get(id(value), (None, []))
            if ref is None or ref() is not value:
                _COMPILED[id(value)] = ref, reports = weakref.ref(value), []
            reports.append(report)


def compiled_reports(model: torch.nn.Module) -> Report:
    """One Report from every graph compiled with the backend that reads `model`'s parameters."""
    seen, out = set(), Report()
    for p in model.parameters():
        ref, reports = _COMPILED.get(id(p), (None, []))
        for r in reports if ref is not None and ref() is p else ():
            if id(r) not in seen:
                seen.add(id(r))
                out.moe_layers += r.moe_layers
                out.notes += r.notes
                out.passes = r.passes
    if not seen:
        out.notes.append("no graph of this model has been compiled with backend='moecompile' yet")
    return out


def moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The MoE blocks optimize() found in `model` (also under a torch.compile wrapper); [] before a lazy
    model's first call. Raises ValueError for a model optimize() did not return."""
    model = getattr(model, "_orig_mod", model)
    ctx = getattr(model, STATE, False)
    if ctx is False:
        raise ValueError(f"{type(model).__name__} was not returned by moecompile.optimize()")
    return ctx.report.moe_layers if ctx is not None else []
