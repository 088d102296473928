"""Tutel's adaptive parallelism: one expert-weight layout that every parallelism `r` runs on, so the choice can
change at every step with nothing migrated.

Layout (fixed at compile time, ZeRO-3 style: every rank owns a unique slice of the expert weights). W ranks of
the expert-parallel group, E experts, F the experts' hidden size:
    W <= E: rank q owns experts [q·E/W, (q+1)·E/W), whole                        (s = 1 shard per expert)
    W >  E: s = W/E ranks per expert; rank q = e·s + j owns hidden units [j·F/s, (j+1)·F/s) of expert e
            (rows of W1/W3, columns of W2, entries of b1/b3; a fused gate/up weight keeps its halves or
            interleaving) and, of the output bias b2[e], entries [j·D/s, (j+1)·D/s)
The output bias is applied where the rows came from, after they return: b2 is all-gathered (E·D numbers)
and added per row, so no r ever adds it twice.

Execution for a step's r (every rank the same r, since the collectives must match):
    r = 0  (DP)          all-gather every expert weight over the W ranks (backward: reduce-scatter of its
                         gradient, the cost of DP's all-reduce); this rank's rows run through all E experts
                         locally; no all-to-all
    r >= 1 (EP+DP+MP)    r must divide s (W <= E: r = 1 only). Expert e's s ranks form r model-parallel
                         shards of g = s/r ranks each; a shard's g ranks all-gather their slices into the
                         shard's F/r hidden units (g = 1: nothing to gather). Each expert's rows are repeated
                         r times (one copy per shard) and split g ways (data parallel inside a shard), sent
                         by the expert-parallel all-to-all (runtime/expert_parallel.py) to rank
                         e·s + m·g + i (shard m, part i), computed on the shard's hidden units, sent back,
                         and the r partial outputs of each row summed locally (index_add)
    r = 1 is EP+DP (every rank of an expert holds it whole after the gather), r = s is EP+MP (no gather);
    with W <= E, r = 1 is plain expert parallelism.
Every r computes the same function, and the same gradients for the slices (tests/test_adaptive.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moecompile.kernels.activations import is_stacked
from moecompile.runtime.adaptive_table import AdaptiveTable, Choice
from moecompile.runtime.expert_parallel import ExpertParallel, _segments

HIDDEN_DIM = {"w1": -2, "w3": -2, "b1": -1, "b3": -1, "w2": -1}  # the F dim of each role in nn.Linear layout


@dataclass(frozen=True)
class Layout:
    """Which slice of which expert rank `rank` of `world` owns (module docstring)."""
    world: int
    experts: int
    rank: int

    @staticmethod
    def check(world: int, experts: int, hidden: int, d_model: int) -> None:
        if world <= experts and experts % world:
            raise ValueError(f"adaptive parallelism needs the {experts} experts to split evenly over the {world} "
                             f"ranks (or a rank count that is a multiple of {experts})")
        if world > experts:
            s = world // experts
            if world % experts or hidden % s or d_model % s:
                raise ValueError(f"adaptive parallelism over {world} ranks with {experts} experts shards each "
                                 f"expert {s} ways: the rank count must be a multiple of {experts} and the expert "
                                 f"hidden size ({hidden}) and model width ({d_model}) multiples of {s}")

    @property
    def shards(self) -> int:
        """s: ranks per expert (1 when every rank owns whole experts)."""
        return max(1, self.world // self.experts)

    @property
    def local_experts(self) -> range:
        """The experts this rank holds (a slice of) in the layout."""
        if self.world > self.experts:
            return range(self.rank // self.shards, self.rank // self.shards + 1)
        per = self.experts // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def choices(self) -> tuple[int, ...]:
        """Valid r: 0, and every divisor of s (Tutel's r in [1, ⌈W/E⌉], restricted to even shard groups)."""
        return (0,) + tuple(r for r in range(1, self.shards + 1) if self.shards % r == 0)

    def hidden_slice(self, size: int, j: int | None = None, parts: int | None = None) -> range:
        """Of `size` units (F or D), the slice shard j of `parts` owns (defaults: this rank's of s)."""
        j = self.rank % self.shards if j is None else j
        parts = parts or self.shards
        return range(j * size // parts, (j + 1) * size // parts)


class _Stamp(torch.autograd.Function):
    """Identity; its backward appends the time to `stamps[name]` (the ends of a layer's backward span)."""

    @staticmethod
    def forward(ctx, x: Tensor, stamps: dict, name: str) -> Tensor:
        ctx.stamps, ctx.name = stamps, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.stamps.setdefault(ctx.name, []).append(time.perf_counter())
        return grad, None, None


class _Gather(torch.autograd.Function):
    """all-gather over `group` → [g, *x.shape]; backward: reduce-scatter of the gradient (each rank gets the
    sum over the group of the gradients of its own slice)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, size: int) -> Tensor:
        ctx.group = group
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))      # gloo: concatenated along dim 0
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out.view((size,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_single(out, grad.flatten(0, 1).contiguous(), group=ctx.group)
        return out, None, None


def gather(x: Tensor, group, size: int) -> Tensor:
    return x.unsqueeze(0) if size == 1 else _Gather.apply(x, group, size)


def join_hidden(pieces: Tensor, role: str, fused: str) -> Tensor:
    """pieces [p, ..., F/p along the role's hidden dim, ...] of one expert → [..., F, ...]: concatenated along
    the hidden dim, except a fused gate/up weight in halves, whose gate halves come first, then the up halves."""
    dim = HIDDEN_DIM[role]
    if fused == "halves" and role in ("w1", "b1"):
        gates, ups = zip(*(piece.chunk(2, dim) for piece in pieces.unbind(0)))
        return torch.cat(gates + ups, dim)
    return torch.cat(pieces.unbind(0), dim)


@dataclass
class AdaptiveExperts:
    """A block's experts on the adaptive layout: `run` executes a step at the current `r`; the expert-parallel
    runtime `ep` (one slot per rank when W > E, else E/W experts each) carries the rows for r >= 1."""
    group: object
    layout: Layout
    fused: str                          # the block's fused gate/up form ("", "halves", "interleaved")
    ep: ExpertParallel
    shard_groups: dict = field(default_factory=dict)  # r → (process group, size) of this rank's shard
    expert_params: list[str] = field(default_factory=list)
    r: int = 1
    table: AdaptiveTable | None = None  # chooses r and the degree per step (passes/adaptive_table.py)
    pinned: bool = False                # set_parallelism() fixed them: the table is not consulted
    pending: tuple | None = None        # the last training call's (bucket, choice, forward s, backward stamps)

    def __post_init__(self):
        self.schedule = self.tuner = None  # ExpertParallel's fields that explain() and the views read

    @property
    def size(self) -> int:
        return self.layout.world

    @property
    def local_experts(self) -> range:
        return self.layout.local_experts

    @property
    def stats(self):
        return self.ep.stats

    def pin(self, r: int | None, degree: int | None = None, algorithm: str | None = None) -> None:
        """Fix r (and the pipelining degree, the all-to-all algorithm) for the following calls; r=None hands
        them back to the table."""
        if r is None:
            self.pinned = False
            return
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
            raise ValueError(f"degree={degree!r}; expected a pipelining degree >= 1")
        if algorithm not in (None, "linear") and (algorithm != "2dh" or self.ep.hierarchy is None):
            raise ValueError(f"algorithm={algorithm!r}; expected 'linear', or '2dh' on a multi-node mesh "
                             "(optimize(..., ranks_per_node=...))")
        if r not in self.layout.choices:
            raise ValueError(f"r={r!r} is not a parallelism of this layout ({self.layout.world} ranks, "
                             f"{self.layout.experts} experts); choose one of {list(self.layout.choices)}")
        self.r = r
        self.ep.chunks, self.ep.order = degree or self.ep.chunks, None
        self.ep.algorithm = algorithm or self.ep.algorithm
        self.pinned = True

    def summary(self) -> str:
        L = self.layout
        kind = ("DP" if self.r == 0 else "EP" if L.shards == 1 else "EP+DP" if self.r == 1 else
                "EP+MP" if self.r == L.shards else "EP+DP+MP")
        text = (f"adaptive parallelism over {L.world} ranks: r={self.r} ({kind}) of {list(L.choices)}, "
                f"pipelining degree {self.ep.chunks}" + ("" if self.ep.hierarchy is None else
                                                         f", {self.ep.algorithm} all-to-all"))
        if self.pinned or self.table is None:
            return text + " (fixed)"
        return text + f"; adaptive table by capacity bucket: {self.table.summary()}"

    def _consult_table(self, counts: Tensor, training: bool) -> tuple[int, Choice] | None:
        """Record the previous training call's time, then set r and the degree for this call from the table
        (None when this call will not be measured: no gradients, or its bucket has chosen already)."""
        if self.pending is not None:  # complete once every stamped input's gradient has been computed
            key, choice, forward_s, stamps, ends = self.pending
            if "begin" in stamps and len(stamps.get("end", ())) == ends:
                self.table.record(key, choice, forward_s + max(stamps["end"]) - stamps["begin"][0])
            self.pending = None
        load = counts.new_empty(self.layout.world * counts.numel())
        dist.all_gather_single(load, counts.contiguous(), group=self.group)
        key, choice = self.table.pick(load.view(self.layout.world, -1), training)        # [W, E] rows
        self.r, self.ep.chunks, self.ep.order, self.ep.algorithm = choice.r, choice.degree, None, choice.algorithm
        return (key, choice) if training and self.table.entries[key].chosen is None else None

    def run(self, x_perm: Tensor, counts: Tensor, ffn, capacity_rows: int | None = None, side=None):
        """x_perm [N, D] expert-major, counts [E] → (y_perm [N, D], side()). `ffn` is lowering's ExpertsFFN on
        this rank's slices; it runs here on the weights this r needs. Fixed capacity buffers are not used (the
        counts path carries any capacity's rows)."""
        measured = self._consult_table(counts, ffn.save) if self.table is not None and not self.pinned else None
        w = dict(ffn.weights)
        if measured is not None:  # the backward span: from y_perm's gradient to the last input's (r = 0: a
            stamps, began = {}, time.perf_counter()  # weight's gradient arrives after its reduce-scatter)
            ends = [x_perm] * x_perm.requires_grad + [t for ws in w.values() for t in ws if t.requires_grad]
            if x_perm.requires_grad:
                x_perm = _Stamp.apply(x_perm, stamps, "end")
            w = {role: [_Stamp.apply(t, stamps, "end") if t.requires_grad else t for t in ws] for role, ws in w.items()}
        b2 = w.pop("b2", None)
        L, r = self.layout, self.r
        if r == 0:
            full = {role: self._gather_all(role, ws) for role, ws in w.items()}
            y_perm = _without_b2(ffn, full, b2)(x_perm, counts)
            side_out = side() if side is not None else None
        elif L.shards == 1:  # whole experts on their owners: plain expert parallelism
            y_perm, side_out = self.ep.run(x_perm, counts, _without_b2(ffn, w, b2), side=side)
        else:
            group, size = self.shard_groups[r]
            mine = {role: [] if not ws else [join_hidden(gather(_stacked(role, ws), group, size).squeeze(1), role,
                                                             self.fused).unsqueeze(0)] for role, ws in w.items()}
            send, slot_counts = self._replicas(counts)                                   # [r·N], [E·s]
            y_send, side_out = self.ep.run(x_perm.index_select(0, send), slot_counts, _without_b2(ffn, mine, b2),
                                           side=side)
            y_perm = x_perm.new_zeros(x_perm.shape).index_add(0, send, y_send)        # Σ over the r shards
        if b2:
            full_b2 = self._gather_all("b2", b2)                                           # [E, D]
            y_perm = y_perm + full_b2.repeat_interleave(counts, dim=0, output_size=x_perm.shape[0])
        if measured is not None:
            y_perm = _Stamp.apply(y_perm, stamps, "begin")
            self.pending = (*measured, time.perf_counter() - began, stamps, len(ends))
        return y_perm, side_out

    def _gather_all(self, role: str, ws: list[Tensor]) -> list[Tensor] | Tensor:
        """Every expert's whole weight for `role` from every rank's slice: [E, ...] (b2 as a tensor, the
        others as the one-element stacked list expert_ffn takes)."""
        if not ws:
            return []
        L = self.layout
        pieces = gather(_stacked(role, ws), self.group, L.world)                # [W, E/W or 1, ...]
        if L.shards == 1:
            whole = pieces.flatten(0, 1)                                  # [E, ...]
        else:
            by_expert = pieces.squeeze(1).unflatten(0, (L.experts, L.shards))  # [E, s, ...]
            whole = torch.stack([_join(role, p, self.fused) for p in by_expert.unbind(0)])
        return whole if role == "b2" else [whole]

    def _replicas(self, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Rows to send, as indices into x_perm: each expert's block repeated r times; and the rows per slot
        (e, m, i): the i-th of g near-equal parts of expert e's rows."""
        r, g = self.r, self.layout.shards // self.r
        starts = counts.cumsum(0) - counts                                                   # [E]
        lengths = counts.repeat_interleave(r)                                                # [E·r]
        send = _segments(torch.zeros_like(lengths).tolist(), lengths.tolist(),
                         starts.repeat_interleave(r).tolist(), counts.device)                 # [r·N]
        i = torch.arange(g, device=counts.device)
        c = counts.view(-1, 1, 1)
        per_slot = (c * (i + 1) // g - c * i // g).expand(-1, r, g)                          # [E, r, g]
        return send, per_slot.flatten()


def _without_b2(ffn, weights: dict, b2):
    """`ffn` on `weights` with a zero output bias where the block has one (it is added at the source: the
    kernels take biases as a set)."""
    zeros = []
    if b2:
        w2 = weights["w2"]
        zeros = [b2[0].new_zeros(w2[0].shape[0] if is_stacked(w2, 3) else len(w2), w2[0].shape[-2])]  # [E', D]
    return dataclasses.replace(ffn, weights={**weights, "b2": zeros})


def _stacked(role: str, ws: list[Tensor]) -> Tensor:
    """A role's weights as one [E_local, ...] tensor (per-expert tensors are stacked: a differentiable copy)."""
    return ws[0] if is_stacked(ws, 2 if role.startswith("b") else 3) else torch.stack(ws)


def _join(role: str, pieces: Tensor, fused: str) -> Tensor:
    return pieces.flatten(0, 1) if role == "b2" else join_hidden(pieces, role, fused)
