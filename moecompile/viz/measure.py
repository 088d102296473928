"""The measured expert-parallel timeline: a target trained for a few steps on N gloo processes of this
machine, and what every rank's MoE layers did in the last step, beside what the cost model predicted.

Contract:  measure(spec, example_input, layers, ranks, overlap) spawns `ranks` processes with
           runtime.spawn.run_ranks (one thread each, tcp://127.0.0.1 on a free port). Each builds the target
           (same seeded weights), draws its own batch of the example inputs' shapes, runs
           `moecompile.optimize(model, batch, mesh=init_device_mesh("cpu", (ranks,)), overlap=overlap)`, then
           training steps (forward, a loss, backward; no optimizer step): WARMUP_STEPS, more while
           overlap="auto" is still re-tuning (at most MAX_STEPS), then one measured with every layer's
           `ExpertParallel.trace` on. A rank that fails, or ranks that do not finish within
           TIMEOUT_S, raise spawn.RankFailed with the rank's traceback; the other ranks are ended.
Times:     perf_counter seconds from the measured step's start on the earliest rank. Processes of one machine
           read one monotonic clock, so the ranks' lanes share an axis (and show which rank waited for which).
Slots:     lanes "compute", "link", "issue" (inside an exchange's launch call: with gloo on CPU it can take
           as long as the experts) and "wait" (blocked in a wait: exposed communication). Forward compute is each
           experts step after its rows arrived; in backward the experts' gradient runs inside autograd, so its
           compute slot is measured from the arrival of the chunk's output gradients to the launch of its input
           gradients' return. The shared expert, the counts exchange and the code between layers are not slots.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.passes.schedule_overlap import Schedule, Slot
from moecompile.runtime.spawn import run_ranks
from moecompile.viz.targets import load, make_inputs

WARMUP_STEPS = 2
MAX_STEPS = 60
TIMEOUT_S = 180.0


@dataclass
class LayerTimeline:
    block: str             # the MoE block's module name, dotted
    chunks: int            # the pipelining degree the measured step ran
    forward: list[Slot]    # lanes "compute" | "link" | "issue" | "wait"
    backward: list[Slot]


@dataclass
class RankTimeline:
    rank: int
    step_s: tuple[float, float]   # the measured step's start and end (forward, loss, backward)
    forward_end_s: float          # where its forward (and loss) ended and its backward began
    layers: list[LayerTimeline]


@dataclass
class Measured:
    ranks: int
    overlap: str | int
    steps: int                      # training steps run; the last one is measured
    timelines: list[RankTimeline]   # rank order
    schedules: dict[str, Schedule]  # block → rank 0's predicted schedule (the same on every rank)
    tuning: dict[str, str]          # block → what overlap="auto" re-tuned (empty otherwise)


def measure(spec: str, example_input: list[str] | None, layers: int | None, ranks: int,
            overlap: str | int) -> Measured:
    """The last training step of `spec` (viz.targets.load's arguments) on `ranks` spawned gloo ranks."""
    results = run_ranks(_run, ranks, spec, example_input, layers, overlap, timeout_s=TIMEOUT_S, deadline_s=TIMEOUT_S)
    origin = min(t.step_s[0] for t, _, _, _ in results)
    timelines = [_shifted(t, origin) for t, _, _, _ in results]
    _, schedules, tuning, steps = results[0]
    return Measured(ranks, overlap, steps, timelines, schedules, tuning)


def _run(rank, ranks, spec, example_input, layers, overlap):
    target = load(spec, example_input, layers)  # seeded: the same weights on every rank
    torch.manual_seed(1 + rank)                 # each rank its own batch
    batch = make_inputs([(tuple(t.shape), t.dtype) for t in target.example_inputs], target.model)
    fast = moecompile.optimize(target.model, batch, mesh=init_device_mesh("cpu", (ranks,)), overlap=overlap)
    eps = [(m.name, m.spec.parallel) for m in moecompile.explain(fast).moe_layers
           if m.spec is not None and m.spec.parallel is not None]

    def step():
        for p in fast.parameters():
            p.grad = None
        loss = _loss(fast(*batch))
        forward_end = time.perf_counter()
        loss.backward()
        return forward_end
    steps = 0
    while steps < WARMUP_STEPS or (steps < MAX_STEPS and any(ep.tuner and ep.tuner.chosen is None for _, ep in eps)):
        step()  # every rank stops at the same step: the tuners decide together
        steps += 1
    dist.barrier()
    for _, ep in eps:
        ep.trace = []
    began = time.perf_counter()
    forward_end = step()
    ended = time.perf_counter()
    layers_out = []
    for name, ep in eps:
        events, ep.trace = ep.trace, None
        forward = [e for e in events if e[3] < forward_end]
        backward = [e for e in events if e[3] >= forward_end]
        layers_out.append(LayerTimeline(name, ep.chunks, _slots(forward, False), _slots(backward, True)))
    timeline = RankTimeline(rank, (began, ended), forward_end, layers_out)
    schedules = {name: ep.schedule for name, ep in eps if ep.schedule is not None}
    tuning = {name: ep.tuner.summary() for name, ep in eps if ep.tuner is not None}
    return timeline, schedules, tuning, steps + 1


def _loss(out) -> torch.Tensor:
    """A scalar from the model's first output (logits, or the output itself): the mean of its squares."""
    first = out if isinstance(out, torch.Tensor) else out[0]
    return first.float().pow(2).mean()


def _slots(events: list[tuple], backward: bool) -> list[Slot]:
    """Trace events (kind, step, chunk, start, end) → slots; a chunk's compute ends where its return is
    launched; in backward it begins where its output gradients arrived (the end of its "send")."""
    slots = [Slot(step, c, kind, start, end) for kind, step, c, start, end in events]
    launched = {s.chunk: s.start_s for s in slots if s.lane == "link" and s.step == "return"}
    if backward:
        arrived = {s.chunk: s.end_s for s in slots if s.lane == "link" and s.step == "send"}
        slots += [Slot("experts", c, "compute", arrived[c], launched[c]) for c in sorted(arrived) if c in launched]
    else:  # the step's trace ends after launching the return; the launch itself belongs to the link lane
        for s in slots:
            if s.lane == "compute" and s.chunk in launched:
                s.end_s = max(s.start_s, min(s.end_s, launched[s.chunk]))
    return sorted(slots, key=lambda s: (s.start_s, s.end_s))


def _shifted(t: RankTimeline, origin: float) -> RankTimeline:
    move = lambda slots: [Slot(s.step, s.chunk, s.lane, s.start_s - origin, s.end_s - origin)  # noqa: E731
                          for s in slots]
    layers = [LayerTimeline(lt.block, lt.chunks, move(lt.forward), move(lt.backward)) for lt in t.layers]
    return RankTimeline(t.rank, (t.step_s[0] - origin, t.step_s[1] - origin), t.forward_end_s - origin, layers)

