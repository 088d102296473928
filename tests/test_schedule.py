"""The overlap scheduler's pure parts: the chunk DAG, the list schedule, the executor order, the choice."""
import pytest

from moecompile.passes.schedule_overlap import _choose, _makespan, chunk_dag, executor_order, list_schedule
from moecompile.runtime.expert_parallel import pipeline_order


def test_one_chunk_is_sequential():
    slots = list_schedule(chunk_dag(1, send_s=2.0, experts_s=5.0))
    assert [(s.step, s.start_s, s.end_s) for s in slots] == [("send", 0, 2), ("experts", 2, 7), ("return", 7, 9)]


@pytest.mark.parametrize("send,work", [(1.0, 4.0), (4.0, 1.0), (2.0, 2.0)])
def test_pipeline_hides_the_smaller_of_comm_and_compute(send, work):
    """n chunks: the link carries 2n transfers, the compute lane n blocks. Each lane does one thing at a time,
    dependencies hold, and the makespan beats the serial time while respecting the lower bounds: the link's
    total, and the compute's total plus the first transfer before it and the last one after it."""
    n = 4
    slots = list_schedule(chunk_dag(n, send / n, work / n))
    lanes = {}
    for s in slots:
        lanes.setdefault(s.lane, []).append((s.start_s, s.end_s))
    for spans in lanes.values():  # one thing at a time per lane
        spans.sort()
        assert all(a_end <= b_start + 1e-12 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    done = {(s.step, s.chunk): s for s in slots}
    for c in range(n):  # dependencies respected
        assert done[("send", c)].end_s <= done[("experts", c)].start_s + 1e-12
        assert done[("experts", c)].end_s <= done[("return", c)].start_s + 1e-12
    serial = 2 * send + work
    assert _makespan(slots) < serial
    assert _makespan(slots) >= max(2 * send, work + 2 * send / n) - 1e-12


def test_executor_order_issues_sends_early_and_waits_last():
    order = executor_order(list_schedule(chunk_dag(3, 1.0, 1.0)))
    assert order[:2] == [("send", 0), ("send", 1)]          # chunk 1 leaves while chunk 0 computes
    assert order[-3:] == [("collect", 0), ("collect", 1), ("collect", 2)]
    position = {step: i for i, step in enumerate(order)}
    assert all(position[("send", c)] < position[("experts", c)] for c in range(3))
    assert sorted(order) == sorted(pipeline_order(3))       # the same steps as the runtime's default


def test_chunking_must_pay():
    assert _choose({1: 100.0, 2: 98.5, 4: 99.0}) == 1       # 1.5% is within the noise: keep 1
    assert _choose({1: 100.0, 2: 90.0, 4: 85.0}) == 4
    assert _choose({4: 50.0}) == 4                          # a forced degree


def test_a_shared_expert_fills_the_first_transfer():
    """Independent work (the shared expert) starts with the first send, on the idle compute lane."""
    slots = list_schedule(chunk_dag(2, 1.0, 1.0, side_s=1.0))
    order = executor_order(slots)
    assert order[:2] == [("send", 0), ("side", 0)]
    assert _makespan(slots) < _makespan(list_schedule(chunk_dag(2, 1.0, 1.0))) + 1.0   # it hid behind the link
