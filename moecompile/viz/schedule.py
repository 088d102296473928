"""An expert-parallel layer's `Schedule` (passes/schedule_overlap.py) and its measured timeline
(viz/measure.py) as data for the page's timelines, and as text.

Exposed communication, predicted: the time the link lane is busy while the compute lane is idle, the part
of the all-to-alls that the schedule does not hide behind expert work. Measured: the time a rank was
blocked in a wait for an exchange; beside it the measured lanes' link-busy-compute-idle time (the predicted
figure's definition) and the time spent inside the exchanges' launch calls.
"""
from __future__ import annotations

from moecompile.passes.schedule_overlap import Schedule, Slot
from moecompile.viz.measure import Measured


def exposed_intervals(slots: list[Slot]) -> list[tuple[float, float]]:
    """Intervals (seconds) covered by a link slot and by no compute slot (measured exchanges overlap: their
    union counts)."""
    compute = sorted((s.start_s, s.end_s) for s in slots if s.lane == "compute")
    links: list[list[float]] = []
    for a, b in sorted((s.start_s, s.end_s) for s in slots if s.lane == "link"):
        if links and a <= links[-1][1]:
            links[-1][1] = max(links[-1][1], b)
        else:
            links.append([a, b])
    exposed = []
    for start, end in links:
        for c_start, c_end in compute:
            if c_end <= start or c_start >= end:
                continue
            if c_start > start:
                exposed.append((start, c_start))
            start = max(start, c_end)
        if start < end:
            exposed.append((start, end))
    return exposed


def schedule_data(block: str, schedule: Schedule) -> dict:
    """JSON-ready: per phase (forward, backward) the slots and exposed intervals in milliseconds."""
    phases = []
    for name, slots in (("forward", schedule.forward), ("backward", schedule.backward)):
        phases.append({
            "name": name,
            "slots": [{"step": s.step, "chunk": s.chunk, "lane": s.lane, "start": s.start_s * 1e3,
                       "end": s.end_s * 1e3} for s in slots],
            "exposed": [[a * 1e3, b * 1e3] for a, b in exposed_intervals(slots)],
            "makespan": max((s.end_s for s in slots), default=0.0) * 1e3})
    return {"block": block, "chunks": schedule.chunks, "summary": schedule.summary(), "phases": phases}


def schedule_lines(block: str, schedule: Schedule) -> list[str]:
    lines = [f"schedule of {block}: {schedule.summary()}"]
    for phase in schedule_data(block, schedule)["phases"]:
        exposed = sum(b - a for a, b in phase["exposed"])
        lines.append(f"  {phase['name']} ({phase['makespan']:.3f} ms, exposed comm {exposed:.3f} ms):")
        lines += [f"    {s['lane']:8} {s['step'] + str(s['chunk']):10} {s['start']:8.3f} – {s['end']:8.3f} ms"
                  for s in sorted(phase["slots"], key=lambda s: (s["lane"], s["start"]))]
    return lines


def measured_data(measured: Measured) -> list[dict]:
    """JSON-ready, per MoE layer: per phase the ranks' slots (lanes compute and link), exposed intervals (their
    waits) and launch calls ("issue") in milliseconds from the phase's first event on any rank, beside the
    predicted makespans."""
    layers = []
    for i, layer in enumerate(measured.timelines[0].layers):
        predicted = measured.schedules.get(layer.block)
        phases = []
        for name in ("forward", "backward"):
            per_rank = [getattr(t.layers[i], name) for t in measured.timelines]
            origin = min((s.start_s for slots in per_rank for s in slots), default=0.0)
            ms = lambda t: (t - origin) * 1e3  # noqa: E731
            ranks = [_rank_data(t.rank, slots, ms) for t, slots in zip(measured.timelines, per_rank)]
            predicted_slots = getattr(predicted, name) if predicted else []
            phases.append({"name": name, "ranks": ranks,
                           "makespan": max((ms(s.end_s) for slots in per_rank for s in slots), default=0.0),
                           "predicted": max((s.end_s for s in predicted_slots), default=0.0) * 1e3})
        layers.append({"block": layer.block, "chunks": layer.chunks, "phases": phases,
                       "tuning": measured.tuning.get(layer.block, ""),
                       "predicted_chunks": predicted.chunks if predicted else None})
    return layers


def _rank_data(rank: int, slots: list[Slot], ms) -> dict:
    lanes = [s for s in slots if s.lane in ("compute", "link")]
    total = lambda lane: sum(s.end_s - s.start_s for s in slots if s.lane == lane) * 1e3  # noqa: E731
    return {"rank": rank,
            "slots": [{"step": s.step, "chunk": s.chunk, "lane": s.lane, "start": ms(s.start_s), "end": ms(s.end_s)}
                      for s in lanes],
            "exposed": [[ms(s.start_s), ms(s.end_s)] for s in slots if s.lane == "wait"],
            "issue": [[ms(s.start_s), ms(s.end_s)] for s in slots if s.lane == "issue"],
            "exposed_ms": total("wait"), "issue_ms": total("issue"), "link_ms": total("link"),
            "idle_ms": sum(b - a for a, b in exposed_intervals(lanes)) * 1e3}


def measured_title(measured: Measured) -> str:
    steps = ", ".join(f"rank {t.rank} {(t.step_s[1] - t.step_s[0]) * 1e3:.3f} ms" for t in measured.timelines)
    return (f"measured on {measured.ranks} gloo ranks of this machine (overlap={measured.overlap}), the last of "
            f"{measured.steps} training steps (forward, loss, backward): {steps}")


def measured_lines(measured: Measured) -> list[str]:
    lines = [measured_title(measured)]
    for layer in measured_data(measured):
        total = sum(p["makespan"] for p in layer["phases"])
        predicted = sum(p["predicted"] for p in layer["phases"])
        lines.append(f"measured timeline of {layer['block']}: degree {layer['chunks']} (predicted for degree "
                     f"{layer['predicted_chunks']}), fwd+bwd predicted {predicted:.3f} ms, measured {total:.3f} ms"
                     + (f"; {layer['tuning']}" if layer["tuning"] else ""))
        for phase in layer["phases"]:
            lines.append(f"  {phase['name']} (measured {phase['makespan']:.3f} ms, predicted "
                         f"{phase['predicted']:.3f} ms):")
            for rank in phase["ranks"]:
                lines.append(f"    rank {rank['rank']}: exposed comm (blocked in waits) {rank['exposed_ms']:.3f} ms "
                             f"of {rank['link_ms']:.3f} ms summed over its exchanges; link busy, no expert computing "
                             f"{rank['idle_ms']:.3f} ms; in launch calls {rank['issue_ms']:.3f} ms")
                rows = [(s["lane"], s["step"] + str(s["chunk"]), s["start"], s["end"]) for s in rank["slots"]]
                rows += [("exposed", "wait", a, b) for a, b in rank["exposed"]]
                rows += [("issue", "launch", a, b) for a, b in rank["issue"]]
                lines += [f"      {lane:8} {step:10} {a:8.3f} – {b:8.3f} ms"
                          for lane, step, a, b in sorted(rows, key=lambda r: (r[0], r[2]))]
    return lines
