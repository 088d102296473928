"""Expert parallelism: each rank of an expert-parallel (ep) group holds a slice of the experts, and the rows
the local dispatch produced travel to the ranks owning their experts and back by all-to-all.

One MoE layer on rank r (route, dispatch and combine stay local; only the expert FFN is distributed):

    x_perm [N, D] expert-major, counts [E]      ← local dispatch of this rank's tokens
    all_to_all(counts)                          → recv_counts [ep, E_r]: what each source sends to my experts
    for chunk c in 0..n-1 (schedule order):     every expert's rows split into n near-equal parts
        start(a2a of chunk c's rows)            → rows from every source, (source, expert)-major
        wait, regroup to (expert, source)-major, expert FFN on my E_r experts, regroup back
        start(a2a back), wait                   → chunk c's outputs, in the order they were sent
    y_perm [N, D]                               → local combine

Chunking every expert's rows (rather than the tokens) leaves route, dispatch and combine untouched, so any
degree n computes the same function, with or without a capacity. A rank with no tokens, or an expert that
receives none, is ordinary: empty splits. Capacity is applied by the local dispatch, so under expert
parallelism each rank's batch is one capacity group (as in GShard and Tutel); a single process reproduces it
with `group_size` = the tokens per rank. With a capacity the exchange is a fixed [E, C, D] buffer (`start`'s
capacity_rows): the counts exchange and its host synchronization disappear, every rank must then pass the
same number of tokens (as GShard requires), and the padding rows are computed and dropped.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moecompile.runtime import all_to_all as a2a


@dataclass(frozen=True)
class Placement:
    """Experts per ep rank: rank r owns experts [starts[r], starts[r] + sizes[r])."""
    sizes: tuple[int, ...]

    @staticmethod
    def even(num_experts: int, ranks: int) -> "Placement":
        if num_experts % ranks:
            raise ValueError(f"{num_experts} experts cannot be split evenly over an expert-parallel group of "
                             f"{ranks} ranks; use a group size that divides {num_experts}, or pass an "
                             f"explicit placement (experts per rank, e.g. placement={_suggest(num_experts, ranks)})")
        return Placement((num_experts // ranks,) * ranks)

    @staticmethod
    def explicit(sizes, num_experts: int, ranks: int) -> "Placement":
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) != ranks or sum(sizes) != num_experts or min(sizes) < 1:
            raise ValueError(f"placement {list(sizes)} must give each of the {ranks} expert-parallel ranks at "
                             f"least one expert and {num_experts} in all")
        return Placement(sizes)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.sizes[:r]) for r in range(len(self.sizes)))

    def local(self, rank: int) -> range:
        return range(self.starts[rank], self.starts[rank] + self.sizes[rank])


def _suggest(num_experts: int, ranks: int) -> list[int]:
    return [num_experts // ranks + (r < num_experts % ranks) for r in range(ranks)]


@dataclass
class ExpertParallel:
    """How one lifted block runs its experts: over `group` (this rank is `rank` of `size`), holding the experts
    `placement.local(rank)`, in `chunks` pipelined chunks, issuing the exchanges in `order` (a list of
    (step, chunk) from the schedule_overlap pass; None: the plain pipeline of `pipeline_order`)."""
    group: object
    rank: int
    size: int
    placement: Placement
    chunks: int = 1
    order: list[tuple[str, int]] | None = None
    schedule: object = None  # passes.schedule_overlap.Schedule: the cost model's predictions, for explain()
    algorithm: str = "linear"  # of the all-to-alls: "linear" | "2dh" (over `hierarchy`'s node groups)
    hierarchy: object = None   # runtime.hierarchical.Hierarchy of the ep group (multi-node meshes), or None
    expert_params: list[str] = field(default_factory=list)  # qualified names of the local expert parameters
    # measured at run time: calls, seconds blocked waiting for exchanges ("forward" / "backward": the exposed
    # communication), wall seconds of the exchange region ("region" forward, "backward_region" from the first
    # exchange to the last wait of the backward, counted once the next call begins)
    stats: dict = field(default_factory=lambda: defaultdict(float))
    tuner: "Tuner | None" = None  # re-tunes `chunks` from measured times (overlap="auto")
    # a list: the calls from now on append (kind, step, chunk, start, end) perf_counter seconds: "compute"
    # (an experts step after its wait), "link" (an exchange, launch to waited), "issue" (its launch call)
    # and "wait" (blocked in it): all_to_all.Exchange.trace.
    # For the measured timeline of `moecompile viz --ranks`; None (off) costs nothing
    trace: list | None = None

    def summary(self) -> str:
        return f"expert parallel over {self.size} ranks (experts per rank {list(self.placement.sizes)})"

    @property
    def local_experts(self) -> range:
        return self.placement.local(self.rank)

    def fold_backward(self) -> float | None:
        """Count the last backward's exchange-region span into the stats (done at each call; call it after the
        last step to read complete stats); its seconds, or None if no backward ran since."""
        if "backward_begin" not in self.stats:
            return None
        span = self.stats.pop("backward_end") - self.stats.pop("backward_begin")
        self.stats["backward_region"] += span
        return span

    def start(self, x_perm: Tensor, counts: Tensor, capacity_rows: int | None = None) -> "Flight":
        """Put a layer's rows on their way: x_perm [N, D] expert-major over all E experts, counts [E]. With
        `capacity_rows` (C: no expert has more rows, the same on every rank) each expert's block is padded to
        C rows and exchanged as a fixed [E, C, D] buffer: no count exchange, no host synchronization, at the
        price of computing the padding rows. Nothing is sent until the returned Flight's steps run."""
        return Flight(self, x_perm, counts, capacity_rows)

    def run(self, x_perm: Tensor, counts: Tensor, ffn: Callable[[Tensor, Tensor], Tensor],
            capacity_rows: int | None = None, side: Callable[[], object] | None = None) -> tuple[Tensor, object]:
        """The whole exchange in the schedule's order → (y_perm [N, D], side()). `ffn(x, counts)` runs the
        local experts on rows grouped by local expert; `side`, work independent of the exchange (a shared
        expert), runs at the schedule's ("side", 0) step, while rows are in flight."""
        if torch.compiler.is_compiling():  # traced: no timers, no re-tuning (the degree is part of the graph)
            return self._walk(x_perm, counts, ffn, capacity_rows, side)
        backward_s = self.fold_backward()  # the previous call's backward, if it has run
        tuning = self.tuner is not None and self.tuner.chosen is None
        if tuning:
            self.tuner.record(self, backward_s)
        began = time.perf_counter()
        y_perm, side_out = self._walk(x_perm, counts, ffn, capacity_rows, side)
        elapsed = time.perf_counter() - began
        self.stats["calls"] += 1
        self.stats["region"] += elapsed
        if tuning:
            self.tuner.previous_s = elapsed if torch.is_grad_enabled() and y_perm.requires_grad else None
        return y_perm, side_out

    def _walk(self, x_perm, counts, ffn, capacity_rows, side) -> tuple[Tensor, object]:
        flight, side_out = self.start(x_perm, counts, capacity_rows), None
        order = self.order or pipeline_order(self.chunks)
        if side is not None and ("side", 0) not in order:  # after the first send: it computes while rows travel
            order = order[:1] + [("side", 0)] + order[1:]
        for step, c in order:
            if step == "side":
                side_out = side() if side is not None else None
            else:
                flight.step(step, c, ffn)
        return flight.result(), side_out


@dataclass
class Tuner:
    """Tutel's adaptive pipelining degree, re-tuned from measured times: each candidate degree runs for
    `calls` training calls, a call costing its exchange region's wall time, forward plus backward; then the
    group agrees on the slowest rank's median per candidate and keeps for good the degree `choose` picks
    (the fastest, unless it beats degree 1 by too little). Every rank switches at the same call, as the
    collectives require."""
    orders: dict[int, list]                  # candidate degree → executor order, in trial order
    choose: Callable[[dict[int, float]], int]  # measured seconds per degree → the degree to keep
    calls: int = 3
    samples: dict[int, list[float]] = field(default_factory=dict)
    chosen: int | None = None
    previous_s: float | None = None          # the forward region of the call before, awaiting its backward

    def record(self, ep: "ExpertParallel", backward_s: float | None) -> None:
        """The previous call (at ep.chunks) took previous_s + backward_s; pick the degree for the next."""
        if self.previous_s is not None and backward_s is not None:
            self.samples.setdefault(ep.chunks, []).append(self.previous_s + backward_s)
        untried = [n for n in self.orders if len(self.samples.get(n, [])) < self.calls]
        if untried:
            ep.chunks, ep.order = untried[0], self.orders[untried[0]]
            return
        medians = torch.tensor([sorted(self.samples[n])[len(self.samples[n]) // 2] for n in self.orders],
                               dtype=torch.float64)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=ep.group)
        self.samples = {n: [m] for n, m in zip(self.orders, medians.tolist())}
        self.chosen = self.choose({n: v[0] for n, v in self.samples.items()})
        ep.chunks, ep.order = self.chosen, self.orders[self.chosen]

    def summary(self) -> str:
        if self.chosen is None:
            return f"re-tuning over degrees {list(self.orders)} ({sum(map(len, self.samples.values()))} calls measured)"
        times = ", ".join(f"{n}: {v[0] * 1e3:.1f}" for n, v in self.samples.items())
        return f"re-tuned from measured times: degree {self.chosen} (ms per call fwd+bwd by degree: {times})"


def pipeline_order(chunks: int) -> list[tuple[str, int]]:
    """Each exchange issued as early and waited for as late as the chunk dependencies allow: chunk c+1's
    rows leave while chunk c's experts compute, and chunk c's results travel back meanwhile.
    Steps: ("send", c) starts chunk c's exchange to the experts; ("experts", c) waits for it, runs the
    local experts and starts the exchange back; ("collect", c) waits for that; ("side", 0), when the layer
    has independent work (a shared expert), runs it."""
    order = [("send", 0)]
    for c in range(chunks):
        if c + 1 < chunks:
            order.append(("send", c + 1))
        order.append(("experts", c))
    return order + [("collect", c) for c in range(chunks)]


class Flight:
    """One layer's rows in flight between the ranks: the chunk plans (after the counts exchange, unless the
    blocks are fixed-size), advanced by steps in any order that respects each chunk's send → experts →
    collect, then read with `result()`. `ExpertParallel.run` walks the schedule's order at once; a
    shortcut-connected block sends early (`send_all`, where its input appears) and finishes later.

    Under torch.compile (`traced`) the exchanges are functional collectives (all_to_all.start_traced and
    wait_traced, at the same steps as eager's start and wait) on split sizes read with `.tolist()`: Dynamo's
    capture_scalar_outputs makes them unbacked SymInts, so the data-dependent splits stay in one graph. Eager
    runs the start/wait autograd pair, with its stats and traces."""

    def __init__(self, ep: ExpertParallel, x_perm: Tensor, counts: Tensor, capacity_rows: int | None):
        self.ep, self.slot, self.traced = ep, None, torch.compiler.is_compiling()
        n, sizes = ep.chunks, ep.placement.sizes
        mine = sizes[ep.rank]
        if capacity_rows is not None:  # fixed [E, C] blocks: pad each expert's rows to C, nothing to ask
            E, N = counts.numel(), x_perm.shape[0]
            starts = counts.cumsum(0) - counts                                           # [E]
            expert_of = torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=N)
            self.slot = torch.arange(N, device=counts.device) - starts[expert_of] + expert_of * capacity_rows
            x_perm = x_perm.new_zeros(E * capacity_rows, x_perm.shape[1]).index_copy(0, self.slot, x_perm)
            send, recv = [capacity_rows] * E, [[capacity_rows] * mine for _ in range(ep.size)]
        else:  # what every source sends each of my experts: send [E, 1] → receive [ep·E_r, 1] (tiny; blocking)
            recv_splits, send_splits = [mine] * ep.size, list(sizes)
            if self.traced:
                recv_counts = a2a.wait_traced(a2a.start_traced(counts, send_splits, recv_splits, ep.group))
            else:
                recv_counts = counts.new_empty(ep.size * mine)
                dist.all_to_all_single(recv_counts, counts.contiguous(), recv_splits, send_splits, group=ep.group)
            send = _host_sizes(counts, self.traced)                           # [E] host ints
            recv = _host_sizes(recv_counts, self.traced)                      # [ep·E_r]
            recv = [recv[s * mine:(s + 1) * mine] for s in range(ep.size)]    # [ep][E_r]
        owners = [r for r, k in enumerate(sizes) for _ in range(k)]           # expert → rank
        self.plans = [_ChunkPlan(send, recv, owners, ep, c, n, x_perm.device, self.traced) for c in range(n)]
        self.x_perm, self.inbound, self.back, self.results = x_perm, {}, {}, [None] * n
        self.experts_done = False

    def step(self, step: str, c: int, ffn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        p = self.plans[c]
        if step == "send":
            rows = self.x_perm if p.rows is None else self.x_perm.index_select(0, p.rows)
            self.inbound[c] = self._start(rows, p, out=True)
        elif step == "experts":
            got = self._wait(self.inbound.pop(c), p, out=True)                # [M, D] (source, expert)-major
            timed = self.ep.trace is not None and not self.traced
            began = time.perf_counter() if timed else 0.0
            local = got if p.regroup is None else got.index_select(0, p.regroup)
            y = ffn(local, p.local_counts)
            self.back[c] = self._start(y if p.regroup is None else y.index_select(0, p.ungroup), p, out=False)
            if timed:
                self.ep.trace.append(("compute", "experts", c, began, time.perf_counter()))
        elif step == "collect":
            self.results[c] = self._wait(self.back.pop(c), p, out=False)
        else:
            raise ValueError(f"unknown schedule step {step!r}")

    def _start(self, rows: Tensor, p: "_ChunkPlan", out: bool):
        """Send chunk rows to the experts (`out`) or the experts' results home; → what `_wait` takes."""
        if self.traced:
            splits = (p.in_splits, p.out_splits) if out else (p.out_splits, p.in_splits)
            return a2a.start_traced(rows, *splits, self.ep.group)
        return a2a.start(rows, p.there if out else p.back)

    def _wait(self, token, p: "_ChunkPlan", out: bool) -> Tensor:
        return a2a.wait_traced(token) if self.traced else a2a.wait(token, p.there if out else p.back)

    def send_all(self) -> None:
        for c in range(len(self.plans)):
            self.step("send", c)

    def run_experts(self, ffn) -> None:
        """After send_all: every chunk's experts (each waits for its rows) and its results' exchange back."""
        for c in range(len(self.plans)):
            self.step("experts", c, ffn)
        self.experts_done = True

    def finish(self, ffn, side=None) -> tuple[Tensor, object]:
        """The experts unless run_experts ran already, then `side` while the results travel back."""
        if not self.experts_done:
            self.run_experts(ffn)
        side_out = side() if side is not None else None
        for c in range(len(self.plans)):
            self.step("collect", c)
        return self.result(), side_out

    def result(self) -> Tensor:
        """y_perm [N, D] in x_perm's row order."""
        y = self.results[0] if len(self.plans) == 1 else \
            torch.cat(self.results).index_select(0, _inverse(torch.cat([p.rows for p in self.plans])))
        return y if self.slot is None else y.index_select(0, self.slot)


def _host_sizes(counts: Tensor, traced: bool) -> list:
    """counts as host ints; traced, unbacked SymInts that the compiler is told are sizes (≥ 0)."""
    sizes = counts.tolist()
    if traced:
        for s in sizes:
            torch._check(s >= 0)
    return sizes


class _ChunkPlan:
    """Chunk c of n: each expert's rows [⌊c·cnt/n⌋, ⌊(c+1)·cnt/n⌋) of its block, on both sides of the exchange.
    Eager, `there` and `back` are the two exchanges (all_to_all.Exchange); traced, the splits are enough."""

    def __init__(self, send, recv, owners, ep, c, n, device, traced=False):
        part = lambda cnt: cnt * (c + 1) // n - cnt * c // n  # noqa: E731
        mine = ep.placement.sizes[ep.rank]
        sent = [part(x) for x in send]                                          # [E]
        got = [[part(x) for x in row] for row in recv]                          # [ep][E_r]
        self.out_splits = out_splits = [sum(row) for row in got]
        self.in_splits = in_splits = [0] * ep.size
        for e, k in enumerate(sent):
            in_splits[owners[e]] += k
        if not traced:
            how = ep.algorithm, ep.hierarchy
            self.there = a2a.Exchange(ep.group, in_splits, out_splits, sum(out_splits), ep.stats, *how)
            self.back = a2a.Exchange(ep.group, out_splits, in_splits, sum(in_splits), ep.stats, *how)
            if ep.trace is not None:  # each exchange's role: backward, the gradients travel the other way
                self.there.trace, self.back.trace = (ep.trace, c, "send", "return"), (ep.trace, c, "return", "send")
        self.local_counts = torch.tensor([sum(row[e] for row in got) for e in range(mine)], dtype=torch.int64,
                                         device=device)
        self.rows = None if n == 1 else _segments([x * c // n for x in send], sent, _starts(send), device)
        self.regroup = self.ungroup = None
        if ep.size > 1 and mine > 1:  # received (source, expert)-major; the FFN wants (expert, source)-major
            flat = [k for row in got for k in row]
            starts = _starts(flat)
            by_expert = [(starts[s * mine + e], got[s][e]) for e in range(mine) for s in range(ep.size)]
            self.regroup = _segments([a for a, _ in by_expert], [k for _, k in by_expert], [0] * len(by_expert),
                                     device)
            self.ungroup = _inverse(self.regroup)


def _starts(sizes):
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out


def _segments(offsets, lengths, bases, device) -> Tensor:
    """Concatenation of ranges [base + offset, base + offset + length) as one index tensor."""
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    firsts = torch.tensor([b + o for b, o in zip(bases, offsets)], dtype=torch.int64, device=device)
    total = int(sum(lengths))
    ends = lengths_t.cumsum(0)
    step_in = torch.arange(total, device=device) - torch.repeat_interleave(ends - lengths_t, lengths_t, output_size=total)
    return torch.repeat_interleave(firsts, lengths_t, output_size=total) + step_in


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def reduce_gradients(model, mesh) -> None:
    """Make every gradient of an expert-parallel `model` what one process would get on the whole global batch,
    for a loss that is a mean over each rank's (equal-sized) batch: non-expert gradients summed over every rank
    of the mesh, expert gradients over the "dp" dimension only (their "ep" peers' contributions already
    arrived through the all-to-all's backward), both divided by the number of ranks.

    For DDP/FSDP instead: wrap with the expert parameters excluded (DDP:
    `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))`)
    and reduce those over the dp dimension yourself; see docs/design/expert_parallel.md."""
    experts = set(expert_parameter_names(model))
    names = mesh.mesh_dim_names or ()
    groups = {dim: mesh[dim].get_group() for dim in names} if mesh.ndim > 1 else {"ep": mesh.get_group()}
    world = mesh.size()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for dim, group in groups.items():
            if dim == "dp" or name not in experts:
                dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)


def expert_parameter_names(model) -> list[str]:
    """Qualified names of the expert parameters the expert_parallel pass sharded in `model`."""
    from moecompile.report import moe_layers
    return [n for layer in moe_layers(model) if layer.spec is not None and layer.spec.parallel is not None
            for n in layer.spec.parallel.expert_params]
