"""schedule_overlap: per expert-parallel MoE layer, choose the pipelining degree and the order in which its
exchanges are issued, from a cost model, so the all-to-alls hide behind the expert computation.

Contract:   for every block whose `spec.parallel` is an ExpertParallel (set by expert_parallel; adaptive
            parallelism's blocks are the adaptive_table pass's), sets `parallel.chunks` (n) and
            `parallel.order` (the executor's steps) and attaches `parallel.schedule`, a `Schedule` with the
            timed slots of the forward and backward and the predicted times, for explain() and later views.
            n is options.overlap when it is an int, 1 when "off", and with "auto" the candidate of CANDIDATES
            with the least predicted forward + backward time (1 unless chunking pays), then re-tuned at run
            time from measured times among the degrees predicted within TRIAL_SLACK of it, and 1
            (`runtime.expert_parallel.Tuner`, Tutel's adaptive pipelining degree). Either way a degree
            above 1 must be at least MIN_GAIN faster than 1, or 1 is kept. A shortcut-connected block sends
            its rows where its input appears, before the block (lowering.begin_routed): its exchange overlaps
            the model's own computation, which this per-layer model does not see, so it is not re-tuned;
            instead its experts' slot (at the block, or early, when the block starts) is chosen from the
            measured windows (`_choose_slot`, the paper's adaptive operator placement). On a multi-node
            mesh (`parallel.hierarchy`, set by expert_parallel) it also sets `parallel.algorithm`, the
            all-to-all: options.all_to_all when forced, with "auto" the faster of "linear" and "2dh" by
            cost_model.all_to_all_seconds at the chosen degree's message size (`AllToAllCost`).
Invariants: changes no result (every n and every dependency-respecting order compute the same function:
            runtime/expert_parallel.py); identical on every rank (the inputs are the recorded token count,
            the spec, and rates that measure_link makes the same on all ranks), as the collectives require.
Pseudo-code:
    link = measure_link(ep group)                              # latency and bandwidth, at start-up
           (multi-node: intra-node, inter-node and stride-copy rates, Hierarchy.rates)
    for layer, for n in candidates:
        send = link.transfer(bytes this rank sends / n)         # rows · D · elem · (ep-1)/ep
           (multi-node: the allowed algorithm predicted fastest for rows · D · elem / n)
        experts = measured (fwd, bwd) time of the expert FFN on rows·ep/(E·n) rows per local expert (cached)
        costs = max over the ep group (every rank must choose the same n)
        dag(n): send_c (link) → experts_c (compute) → return_c (link), c < n     [networkx DiGraph]
                + side (compute, no dependencies): the shared expert, measured like the experts
        slots = list_schedule(dag): repeatedly start the ready node that can start earliest (ties: longest
                path to the end first) on its lane (one link, one compute stream)
        predicted(n) = makespan(forward dag) + makespan(backward dag, with the backward expert time)
    order = the executor's steps sorted by start time; waits for the results are last (as late as possible)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecompile._lazy import nx
from moecompile.passes.registry import CompileContext, register_pass
from moecompile.ir.lowering import capacity_rows, expert_ffn, expert_weights
from moecompile.runtime.cost_model import (ALL_TO_ALL_ALGORITHMS, LinkRates, all_to_all_seconds,
                                           measure_link, measured_s)
from moecompile.runtime.expert_parallel import ExpertParallel, Tuner

CANDIDATES = (1, 2, 4, 8)
TRIAL_SLACK = 1.25  # "auto" tries the degrees predicted within 25% of the best (at most 3, and 1)
MIN_GAIN = 0.03     # chunking is chosen only if it is predicted (or measured) at least 3% faster than none
SHORTCUT_DEGREES = (1, 2, 4)  # a shortcut block's chunkings considered with overlap="auto"


@dataclass
class Slot:
    step: str        # "send" | "experts" | "return" | "side"
    chunk: int
    lane: str        # "link" | "compute"
    start_s: float
    end_s: float


@dataclass
class Schedule:
    """One layer's chosen schedule and what the cost model predicts for it."""
    chunks: int
    forward: list[Slot]
    backward: list[Slot]
    predicted_s: dict[int, float]          # candidate n → predicted forward + backward seconds
    comm_s: float                          # all-to-all time of forward + backward, unhidden
    compute_s: float                       # expert computation of forward + backward
    note: str = ""                         # a shortcut block's slot choice
    all_to_all: str = ""                   # multi-node: the algorithm chosen and its predictions

    @property
    def predicted_total_s(self) -> float:
        return self.predicted_s[self.chunks]

    @property
    def exposed_comm_s(self) -> float:
        return max(0.0, self.predicted_total_s - self.compute_s)

    def summary(self) -> str:
        hidden = 1 - self.exposed_comm_s / self.comm_s if self.comm_s else 1.0
        return (f"pipelining degree {self.chunks}: predicted {self.predicted_total_s * 1e3:.2f} ms fwd+bwd "
                f"(comm {self.comm_s * 1e3:.2f} ms, {hidden:.0%} hidden; compute {self.compute_s * 1e3:.2f} ms)"
                + (f"; {self.note}" if self.note else "") + (f"; {self.all_to_all}" if self.all_to_all else ""))


@dataclass
class AllToAllCost:
    """Predicted seconds of one all-to-all in which each rank holds `nbytes` of rows, its own share included.
    One node: the flat exchange over the measured ep link. A hierarchy (multi-node): cost_model's
    all_to_all_seconds for both algorithms from the measured intra-node, inter-node and copy rates (agreed
    over the group), the forced algorithm or, with "auto", the faster. On one machine the
    "nodes" are simulated and both rates are loopback: the choice only means something across real nodes."""
    size: int
    link: LinkRates | None = None  # one node
    hierarchy: object = None       # runtime.hierarchical.Hierarchy
    rates: tuple = ()              # (intra LinkRates, inter LinkRates, copy bytes/s)
    forced: str | None = None      # "2dh", or None: "auto"

    @staticmethod
    def measure(ep, option: str) -> "AllToAllCost":
        """Collective over ep.group: the link (one node) or the node rates (a hierarchy)."""
        if ep.hierarchy is None:
            return AllToAllCost(ep.size, link=measure_link(ep.group))
        return AllToAllCost(ep.size, hierarchy=ep.hierarchy, rates=ep.hierarchy.rates(ep.group),
                            forced=None if option == "auto" else option)

    @property
    def algorithms(self) -> tuple[str, ...]:
        """What a layer may use: the flat exchange on one node, else the forced algorithm, or either."""
        return ("linear",) if self.hierarchy is None else (self.forced,) if self.forced else ALL_TO_ALL_ALGORITHMS

    def seconds_of(self, algorithm: str, nbytes: float) -> float:
        if self.hierarchy is None:
            return self.link.transfer_s(nbytes * (self.size - 1) / self.size)
        return all_to_all_seconds(algorithm, nbytes, self.hierarchy.nodes, self.hierarchy.per_node, *self.rates)

    def algorithm(self, nbytes: float) -> tuple[str, float]:
        """The allowed algorithm predicted fastest for `nbytes` ("linear" on ties), and its seconds."""
        return min(((a, self.seconds_of(a, nbytes)) for a in self.algorithms), key=lambda pair: pair[1])

    def seconds(self, nbytes: float) -> float:
        return self.algorithm(nbytes)[1]

    def choose(self, spec, nbytes: int, n: int) -> str:
        """Set a multi-node layer's `parallel.algorithm` for degree n (the largest `nbytes` of the group, so
        every rank picks the same); what explain() shows of it ("" on one node)."""
        if self.hierarchy is None:
            return ""
        agreed = torch.tensor([float(nbytes)], dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=spec.parallel.group)
        per_chunk, h = agreed.item() / n, self.hierarchy
        spec.parallel.algorithm = self.algorithm(per_chunk)[0]
        times = ", ".join(f"{a} {all_to_all_seconds(a, per_chunk, h.nodes, h.per_node, *self.rates) * 1e3:.2f} ms"
                          for a in ALL_TO_ALL_ALGORITHMS)
        return (f"all-to-all {spec.parallel.algorithm}{' (forced)' if self.forced else ''} over {h.nodes} nodes × "
                f"{h.per_node} ranks (predicted per exchange at degree {n}: {times})")


@register_pass("schedule_overlap")
def schedule_overlap(ctx: CompileContext) -> None:
    # adaptive-parallel layers (runtime/adaptive.py) are the adaptive_table pass's
    layers = [lifted for lifted in ctx.lifted if isinstance(lifted.layer.spec.parallel, ExpertParallel)]
    if not layers:
        return
    a2a_cost = AllToAllCost.measure(layers[0].layer.spec.parallel, ctx.options.all_to_all)
    windows = _shortcut_windows(ctx, layers)
    overlap = ctx.options.overlap
    candidates = CANDIDATES if overlap == "auto" else (overlap if isinstance(overlap, int) else 1,)
    for lifted in layers:
        spec = lifted.layer.spec
        tokens = lifted.args[0].numel() // spec.hidden
        send_s, experts_s = layer_costs(spec, lifted.block, tokens, a2a_cost)
        side = _shared_seconds(spec, lifted.block, tokens) if spec.shared is not None else (0.0, 0.0)
        costs = {n: (send_s(n), *experts_s(n), *side) for n in candidates}
        # every rank must choose the same degree (the exchanges are collectives): the slowest rank's costs
        agreed = torch.tensor([costs[n] for n in candidates], dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=spec.parallel.group)
        costs = dict(zip(candidates, agreed.tolist()))
        forward = {n: list_schedule(chunk_dag(n, c[0], c[1], c[3])) for n, c in costs.items()}
        backward = {n: list_schedule(chunk_dag(n, c[0], c[2], c[4])) for n, c in costs.items()}
        predicted = {n: _makespan(forward[n]) + _makespan(backward[n]) for n in candidates}
        n, note = _choose(predicted), ""
        if lifted.layer.name in windows:  # a shortcut block: its slot and degree from its measured windows
            side_fwd = costs[n][3]
            note = _choose_slot(spec, windows[lifted.layer.name], send_s, side_fwd,
                                SHORTCUT_DEGREES if overlap == "auto" else (n,))
            n = spec.parallel.chunks
        spec.parallel.chunks = n
        spec.parallel.order = executor_order(forward[n])
        send, fwd, bwd, side_fwd, side_bwd = costs[n]
        spec.parallel.schedule = Schedule(n, forward[n], backward[n], predicted, comm_s=4 * send * n,
                                          compute_s=(fwd + bwd) * n + side_fwd + side_bwd, note=note,
                                          all_to_all=a2a_cost.choose(spec, layer_bytes(spec, lifted.block, tokens), n))
        if overlap == "auto" and spec.shortcut is None:  # measured trials among the plausible degrees, and 1
            trials = [c for c in sorted(candidates, key=lambda c: (predicted[c], c))
                      if predicted[c] <= TRIAL_SLACK * predicted[n]][:3]
            trials += [1] if 1 not in trials else []
            spec.parallel.tuner = Tuner({c: executor_order(forward[c]) for c in trials}, _choose)
        spec.parallel.stats.clear()  # measurements start with the model the user gets


def _shortcut_windows(ctx: CompileContext, layers) -> dict[str, tuple[float, float]]:
    """For each shortcut block with an early slot: the seconds from its tap to its block's start (the
    preceding MLP) and from there to the block (the attention), measured in one forward on the compile-time
    inputs (every rank runs it: the exchanges in it are collectives)."""
    taps = {lifted.layer.name: lifted.layer.spec.shortcut for lifted in layers
            if lifted.layer.spec.shortcut is not None and lifted.layer.spec.shortcut.early_module is not None}
    if not taps:
        return {}
    for tap in taps.values():
        tap.timing = {}
    with torch.no_grad():
        ctx.model(*ctx.args, **ctx.kwargs)
    windows = {}
    for name, tap in taps.items():
        t, tap.timing = tap.timing, None
        windows[name] = (t["early"] - t["tap"], t["block"] - t["early"])
    return windows


def _choose_slot(spec, window: tuple[float, float], send_s, shared_s: float, degrees) -> str:
    """Where a shortcut block's experts run, and in how many chunks (ScMoE's adaptive operator placement,
    §3.2 of the paper, with two of its slots, plus chunking when the communication exceeds its window).
    Predicted exposed forward communication at degree n, all chunks sent at the tap (n·send_s(n)) and
    only the last chunk's return left to hide:
        "block":  max(0, n·send − (mlp + attention)) + max(0, send − shared expert)
        "early":  max(0, n·send − mlp) + max(0, send − (attention + shared expert))
    agreed over the group (the slowest rank's figures); the least wins, preferring "block" and fewer
    chunks unless the gain is at least MIN_GAIN of the transfer time."""
    mlp, attention = window
    options = [(slot, n) for n in degrees for slot in ("block", "early")]
    exposed = torch.tensor([max(0.0, n * send_s(n) - (mlp + (attention if slot == "block" else 0.0)))
                            + max(0.0, send_s(n) - shared_s - (attention if slot == "early" else 0.0))
                            for slot, n in options], dtype=torch.float64)
    dist.all_reduce(exposed, op=dist.ReduceOp.MAX, group=spec.parallel.group)
    cost = dict(zip(options, exposed.tolist()))
    margin = MIN_GAIN * 2 * send_s(1)
    best = options[0]
    for option in options[1:]:
        if cost[option] < cost[best] - margin:
            best = option
    spec.shortcut.slot, spec.parallel.chunks = best
    table = ", ".join(f"{slot}/{n}: {cost[(slot, n)] * 1e3:.1f}" for slot, n in options)
    return (f"shortcut experts at the {best[0]} slot in {best[1]} chunk(s) (predicted exposed fwd comm, ms: "
            f"{table}; windows: MLP {mlp * 1e3:.1f} ms, attention {attention * 1e3:.1f} ms, shared expert "
            f"{shared_s * 1e3:.1f} ms)")


def _choose(times: dict[int, float]) -> int:
    """The fastest degree, unless it beats no chunking by less than MIN_GAIN: chunking costs per-chunk
    overheads the model does not see, so a marginal predicted gain is not worth the risk."""
    best = min(times, key=lambda c: (times[c], c))
    return 1 if 1 in times and times[best] > (1 - MIN_GAIN) * times[1] else best


def layer_costs(spec, block, tokens: int, a2a_cost: "AllToAllCost"):
    """(send_s(n), experts_s(n)): one chunk's all-to-all time (either direction) and its forward and
    backward expert times at degree n, for `tokens` tokens per rank and experts loaded evenly."""
    ep = spec.parallel
    w = expert_weights(spec, block)
    rows = _rows(spec, tokens)
    nbytes = layer_bytes(spec, block, tokens)
    local = ep.placement.sizes[ep.rank]

    def experts_s(n):  # → (forward, backward) seconds of one chunk: rows from every rank for my experts
        per_expert = max(1, rows * ep.size // (spec.num_experts * n))
        return _expert_seconds(spec, w, local, per_expert)
    return (lambda n: a2a_cost.seconds(nbytes / n)), experts_s


def _rows(spec, tokens: int) -> int:
    """Rows each rank dispatches: tokens · top-k, or with a capacity the fixed [E, C] buffer, padding included."""
    return spec.num_experts * capacity_rows(spec.capacity, tokens) if spec.capacity is not None else tokens * spec.top_k


def layer_bytes(spec, block, tokens: int) -> int:
    """Bytes of the rows one rank sends in a layer's exchange, its own share included: [rows, D]."""
    return _rows(spec, tokens) * spec.hidden * expert_weights(spec, block)["w1"][0].element_size()


def _shared_seconds(spec, block, tokens: int) -> tuple[float, float]:
    """Measured (forward, backward) seconds of the shared expert on `tokens` tokens, run on a copy of it
    (the model's gradients are not touched)."""
    module = copy.deepcopy(block.get_submodule(spec.shared))
    weight = next(module.parameters())
    x = torch.randn(tokens, spec.hidden, dtype=weight.dtype, requires_grad=True)
    grad = torch.randn_like(x)
    key = f"shared {type(module).__name__} {x.dtype} T{tokens} " + " ".join(
        f"{tuple(p.shape)}" for p in module.parameters())
    return _fwd_bwd_seconds(key, lambda: module(x), grad)


def _expert_seconds(spec, w, experts: int, rows: int) -> tuple[float, float]:
    """Measured (forward, backward) seconds of the expert FFN on `rows` rows for each of `experts` experts,
    with detached copies of the real weights (the model's gradients are not touched)."""
    w = {k: [t.detach().requires_grad_(t.is_floating_point()) for t in ts] for k, ts in w.items()}
    x = torch.randn(experts * rows, spec.hidden, dtype=w["w1"][0].dtype, requires_grad=True)
    counts = torch.full((experts,), rows, dtype=torch.int64)
    grad = torch.randn_like(x)
    key = (f"experts {spec.expert.activation}/{spec.expert.fused or '-'} {spec.kernels['expert_ffn']} "
           f"{x.dtype} E{experts} rows{rows} " + " ".join(f"{k}{tuple(ts[0].shape)}" for k, ts in w.items() if ts))
    return _fwd_bwd_seconds(key, lambda: expert_ffn(spec, w, x, counts, save=True), grad)


def _fwd_bwd_seconds(key: str, run, grad) -> tuple[float, float]:
    """(forward, backward) seconds of `run()`, measured once per machine under `key` (cost_model.measured_s)."""
    with torch.enable_grad():
        forward = measured_s(key + " fwd", run)
        both = measured_s(key + " fwd+bwd", lambda: run().backward(grad))
    return forward, max(both - forward, 0.0)


def chunk_dag(n: int, send_s: float, experts_s: float, side_s: float = 0.0) -> nx.DiGraph:
    """n chunks, each: its rows' exchange (send_s) → its expert work (experts_s) → the exchange back; and,
    when side_s > 0, the layer's independent work (a shared expert) as a compute node with no dependencies."""
    dag = nx.DiGraph()
    if side_s > 0:
        dag.add_node(("side", 0), lane="compute", duration=side_s)
    for c in range(n):
        dag.add_node(("send", c), lane="link", duration=send_s)
        dag.add_node(("experts", c), lane="compute", duration=experts_s)
        dag.add_node(("return", c), lane="link", duration=send_s)
        dag.add_edge(("send", c), ("experts", c))
        dag.add_edge(("experts", c), ("return", c))
    return dag


def list_schedule(dag: nx.DiGraph) -> list[Slot]:
    """Place every node on its lane: repeatedly the ready node that can start earliest, ties broken by the
    longest remaining path (its duration plus its longest chain of successors), then by chunk."""
    to_end = {}
    for node in reversed(list(nx.topological_sort(dag))):
        to_end[node] = dag.nodes[node]["duration"] + max((to_end[s] for s in dag.successors(node)), default=0.0)
    lane_free: dict[str, float] = {}
    done: dict = {}
    waiting = {node: dag.in_degree(node) for node in dag}
    ready = [node for node, k in waiting.items() if k == 0]
    slots = []

    def earliest(node):
        deps = max((done[p] for p in dag.predecessors(node)), default=0.0)
        return max(deps, lane_free.get(dag.nodes[node]["lane"], 0.0))
    while ready:
        node = min(ready, key=lambda v: (earliest(v), -to_end[v], v[1]))
        ready.remove(node)
        attrs = dag.nodes[node]
        start = earliest(node)
        done[node] = lane_free[attrs["lane"]] = start + attrs["duration"]
        slots.append(Slot(node[0], node[1], attrs["lane"], start, done[node]))
        for s in dag.successors(node):
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    return slots


def executor_order(slots: list[Slot]) -> list[tuple[str, int]]:
    """The runtime's steps: sends and expert work by start time (a return is issued by its expert step),
    then the waits for the results, as late as possible."""
    timed = sorted((s for s in slots if s.step != "return"), key=lambda s: (s.start_s, s.lane != "link", s.chunk))
    chunks = sorted({s.chunk for s in slots})
    return [(s.step, s.chunk) for s in timed] + [("collect", c) for c in chunks]


def _makespan(slots: list[Slot]) -> float:
    return max(s.end_s for s in slots)
