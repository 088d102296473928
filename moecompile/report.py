"""What `explain()` returns: every MoE block found, whether it was rewritten, and why not."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from moecompile.ir.spec import MoESpec


@dataclass
class MoELayer:
    name: str                    # qualified module name in the original model
    num_experts: int | None
    top_k: int | None
    scoring: str | None
    rewritten: bool
    reason: str | None = None    # why not rewritten, or None
    spec: MoESpec | None = None

    @property
    def details(self) -> str:
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
        if s.parallel is not None:
            parts.append(_parallel_details(s.parallel))
        backends = set(s.kernels.values())
        parts.append("kernels: " + (backends.pop() if len(backends) == 1 else
                                    " ".join(f"{op}={k}" for op, k in s.kernels.items())))
        return ", ".join(parts)


@dataclass
class Report:
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
            t.add_row(m.name, _s(m.num_experts), _s(m.top_k), _s(m.scoring),
                      "[green]yes[/]" if m.rewritten else "[red]no[/]", m.reason or m.details)
        return t

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=io.StringIO(), color_system=None)
        console.print(self)
        return console.export_text().rstrip()


def _capacity_details(s: MoESpec) -> str:
    """The capacity rule (the block's own or the user's factor), its groups and slot order, and the slots
    routed and dropped: cumulative over training calls and in the last call."""
    own, x = s.capacity, s.routing.capacity_factor
    rule = f"capacity {own.capacity}" if x is None else f"capacity factor {x:g} (C = " + (
        f"⌈k·{x:g}·G/E⌉)" if x > 0 else "the call's largest expert load)" if x == 0 else
        f"the call's largest expert load, at most ⌈k·{-x:g}·G/E⌉)")
    if own and own.describe():  # "per sequence", "per 12 tokens"
        rule += " " + own.describe()
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


def _parallel_details(p) -> str:
    """Placement, the chosen schedule with its predictions, and what the runtime measured so far."""
    from moecompile.runtime.adaptive import AdaptiveExperts  # report is imported by the passes it describes
    text = p.summary() if isinstance(p, AdaptiveExperts) else \
        f"expert parallel over {p.size} ranks (experts per rank {list(p.placement.sizes)})"
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
