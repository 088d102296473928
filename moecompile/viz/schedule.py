"""An expert-parallel layer's `Schedule` (passes/schedule_overlap.py) as data for the timeline, and as text.

Exposed communication is the time the link lane is busy while the compute lane is idle: the part of the
all-to-alls that the schedule does not hide behind expert work.
"""
from __future__ import annotations

from moecompile.passes.schedule_overlap import Schedule, Slot


def exposed_intervals(slots: list[Slot]) -> list[tuple[float, float]]:
    """Intervals (seconds) covered by a link slot and by no compute slot."""
    compute = sorted((s.start_s, s.end_s) for s in slots if s.lane == "compute")
    exposed = []
    for link in sorted((s.start_s, s.end_s) for s in slots if s.lane == "link"):
        start, end = link
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
