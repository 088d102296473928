"""`moecompile viz --ranks`: the measured expert-parallel timeline of a real 2-rank gloo run, as a user runs it.

Timings vary from run to run, so only the timelines' structure is checked: every interval well-formed and
inside its step and phase, each chunk's experts after its rows arrived, waits inside their exchanges.
"""
import json
import re

import pytest
import torch.distributed as dist
from test_cli import STAGES, browse, selftest, tiny_gpt_moe

from moecompile import cli
from moecompile.cli import main

RANKS, DEGREE = 2, 2


def gpt_moe_failing_on_rank_1():
    """A factory target (`test_viz_measured:gpt_moe_failing_on_rank_1`) that raises on rank 1 of a measured run."""
    if dist.is_initialized() and dist.get_rank() == 1:
        raise RuntimeError("injected failure on rank 1")
    return tiny_gpt_moe()


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    """One `viz --ranks 2 --overlap 2` run writing html and text; (output folder, the Measured it showed)."""
    out, seen = tmp_path_factory.mktemp("measured"), []

    def recording(*args):
        seen.append(measure(*args))
        return seen[-1]
    measure = cli.measure
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "measure", recording)
        argv = ["viz", "test_cli:tiny_gpt_moe", "--example-input", "2x8:int64", "--ranks", str(RANKS),
                "--overlap", str(DEGREE), "-o", str(out / "ep.html"), "-o", str(out / "ep.txt")]
        assert main(argv) == 0
    return out, seen[0]


def test_every_rank_measured_every_chunk(measured_run):
    _, measured = measured_run
    assert [t.rank for t in measured.timelines] == list(range(RANKS)) and measured.steps >= 3
    assert measured.schedules["blocks.1.ffn"].chunks == DEGREE  # rank 0's predicted schedule, overlap=2
    for t in measured.timelines:
        begin, end = t.step_s
        assert begin <= t.forward_end_s <= end
        assert [layer.block for layer in t.layers] == ["blocks.1.ffn"] and t.layers[0].chunks == DEGREE
        layer = t.layers[0]
        for phase, (lo, hi) in ((layer.forward, (begin, t.forward_end_s)), (layer.backward, (t.forward_end_s, end))):
            for s in phase:
                assert lo <= s.start_s <= s.end_s <= hi, s
            slot = {(s.lane, s.step, s.chunk): s for s in phase}
            assert len(slot) == len(phase)  # one slot per lane, step and chunk
            for c in range(DEGREE):
                send, experts, back = slot["link", "send", c], slot["compute", "experts", c], slot["link", "return", c]
                assert send.end_s <= experts.start_s <= back.start_s  # a chunk's experts after its rows arrived
                assert experts.end_s <= back.start_s  # and its results leave when they are done
                for step in ("send", "return"):
                    link, wait, issue = (slot[lane, step, c] for lane in ("link", "wait", "issue"))
                    assert link.start_s == issue.start_s and issue.end_s <= wait.start_s and wait.end_s == link.end_s
            exposed = sum(s.end_s - s.start_s for s in phase if s.lane == "wait")
            assert 0 <= exposed <= sum(s.end_s - s.start_s for s in phase if s.lane == "link")


def test_text_shows_the_measured_timeline(measured_run):
    out, measured = measured_run
    text = (out / "ep.txt").read_text()
    assert f"measured on {RANKS} gloo ranks of this machine (overlap={DEGREE}), the last of {measured.steps}" in text
    assert f"measured timeline of blocks.1.ffn: degree {DEGREE} (predicted for degree {DEGREE})" in text
    measured_part = text[text.index("measured timeline of"):]
    assert measured_part.count("    rank 1: exposed comm (blocked in waits)") == 2  # forward and backward
    assert len(re.findall(r"      compute  experts\d ", measured_part)) == 2 * RANKS * DEGREE


def test_page_draws_every_rank_lanes(measured_run, chromium, tmp_path):  # noqa: F811
    out, measured = measured_run
    page = (out / "ep.html").read_text()
    data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    assert [layer["block"] for layer in data["measured"]] == ["blocks.1.ffn"]
    slots = sum(len([s for s in getattr(layer, phase) if s.lane in ("compute", "link")])
                for t in measured.timelines for layer in t.layers for phase in ("forward", "backward"))
    waits = sum(len([s for s in getattr(layer, phase) if s.lane == "wait"])
                for t in measured.timelines for layer in t.layers for phase in ("forward", "backward"))
    assert slots == RANKS * 2 * 3 * DEGREE and waits == RANKS * 2 * 2 * DEGREE
    dom, console = browse(chromium, out / "ep.html", tmp_path)
    result = selftest(dom)
    assert result.startswith(f"ok stages={STAGES} "), result
    assert result.endswith(f"measured_slots={slots} waits={waits}"), result
    assert not console, console
    assert dom.count("rank 1 compute") == 2 and "blocked in waits rank 0" in dom


def test_a_failing_rank_reports_its_traceback(capsys, tmp_path):
    argv = ["viz", "test_viz_measured:gpt_moe_failing_on_rank_1", "--example-input", "2x8:int64", "--ranks", "2",
            "-o", str(tmp_path / "g.txt")]
    assert main(argv) == 1
    assert not list(tmp_path.iterdir())  # nothing written
    err = capsys.readouterr().err
    assert err.startswith("moecompile viz: error: the measured run failed: rank 1 of 2 failed:")
    assert "Traceback" in err and "RuntimeError: injected failure on rank 1" in err
