"""The `moecompile` command line and its views, run as a user runs them; the HTML page in headless Chromium."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moecompile
from moecompile import cli
from moecompile.cli import main
from moecompile.models import gpt_moe
from moecompile.passes import find_moe
from moecompile.passes.registry import PIPELINES
from moecompile.passes.schedule_overlap import Schedule, Slot, chunk_dag, list_schedule
from moecompile.viz import render
from moecompile.viz.graph import capture
from moecompile.viz.schedule import exposed_intervals
from moecompile.viz.targets import load

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"  # build/ is gitignored
CANONICAL = {"moecompile.route", "moecompile.dispatch", "moecompile.expert_ffn", "moecompile.combine"}
STAGES = len(PIPELINES["default"]) + 1  # the input and the graph after each pass


def tiny_gpt_moe():
    """A factory target: `test_cli:tiny_gpt_moe` (pytest puts tests/ on sys.path)."""
    return gpt_moe(n_layer=2, n_head=2, d_model=32, d_ff=64, num_experts=4, vocab_size=64, max_seq=32)


def broken_factory():
    """A factory target that fails as a user's may: `test_cli:broken_factory`."""
    raise ValueError("no checkpoint at /nowhere")


@pytest.fixture(scope="session")
def mixtral_views(tmp_path_factory):
    """hf:mixtral written in four formats by one viz run."""
    out = tmp_path_factory.mktemp("mixtral")
    outputs = [arg for suffix in ("html", "json", "txt", "dot") for arg in ("-o", str(out / f"m.{suffix}"))]
    assert main(["viz", "hf:mixtral", *outputs]) == 0
    return out


@pytest.fixture(scope="session")
def gpt32_pt2(tmp_path_factory):
    """An optimized 32-layer GPT-MoE saved by torch.export.save (validation off: it is tested elsewhere and would
    take most of this file's time budget here)."""
    model = gpt_moe(n_layer=32, n_head=4, d_model=64, d_ff=128, max_seq=64).eval()
    ids = torch.randint(0, 256, (2, 16))
    fast = moecompile.optimize(model, (ids,), validate=False)
    path = tmp_path_factory.mktemp("gpt32") / "gpt32.pt2"
    torch.export.save(torch.export.export(fast, (ids,), strict=False), path)
    return path


def browse(chromium, page: Path, tmp_path, *flags: str, url_suffix="#selftest"):
    """Open `page` in headless Chromium (with --dump-dom unless other `flags`); (stdout, console lines)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", *(flags or ["--dump-dom"]), page.as_uri() + url_suffix]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def selftest(dom: str) -> str:
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    assert found, "the page wrote no self-test result"
    return found.group(1)


def test_explain_shows_blocks_rewritten(capsys):
    assert main(["explain", "hf:mixtral"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp" in out and "model.layers.1.mlp" in out
    assert "2 MoE block(s), 2 rewritten" in out


def test_me_json_one_graph_per_stage(mixtral_views):
    graphs = json.loads((mixtral_views / "m.json").read_text())
    assert [g["id"] for g in graphs] == ["input", *PIPELINES["default"]]
    before, lifted = graphs[0]["nodes"], graphs[PIPELINES["default"].index("lift_moe") + 1]["nodes"]
    assert not any(n["label"].startswith("moecompile.") for n in before)
    assert CANONICAL <= {n["label"] for n in lifted}
    route = next(n for n in lifted if n["label"] == "moecompile.route")
    assert route["namespace"] == "model/layers/0/mlp" and route["incomingEdges"]
    assert {"key": "moe_block", "value": "model.layers.0.mlp"} in route["attrs"]
    ids = {n["id"] for n in lifted}
    assert all(e["sourceNodeId"] in ids for n in lifted for e in n["incomingEdges"])
    assert any(n["outputsMetadata"][0]["attrs"][0]["value"] == "[2, 16, 128]" for n in lifted if n["outputsMetadata"])


def test_text_and_dot(mixtral_views):
    text = (mixtral_views / "m.txt").read_text()
    lifted = text[text.index("== stage 2: lift_moe =="):text.index("== stage 3")]
    changed = next(line for line in lifted.splitlines() if line.startswith("changed in"))
    assert changed.startswith("changed in model.layers.0.mlp, model.layers.1.mlp: +1 moecompile.")
    assert all(f"+1 {op}" in changed for op in CANONICAL) and "-1 aten.topk" in changed
    assert "route = moecompile.route(" in lifted and "no expert-parallel schedule" in text
    dot = (mixtral_views / "m.dot").read_text()
    assert dot.startswith(f'digraph "{PIPELINES["default"][-1]}"') and 'label="model/layers/0"' in dot
    assert "moecompile.expert_ffn" in dot and "fillcolor=plum" in dot


def test_diff_of_lift_moe_adds_the_canonical_ops(tiny_captured):
    stages = tiny_captured.stages
    assert [s.name for s in stages] == ["input", *PIPELINES["default"]]
    lift = stages[2].diff
    assert list(lift) == ["blocks.1.ffn"]  # the only MoE block; nothing outside it changed
    assert all(lift["blocks.1.ffn"][op] == 1 for op in CANONICAL) and lift["blocks.1.ffn"]["aten.topk"] == -1
    assert stages[1].diff == {}  # find_moe reads, it does not rewrite


def test_a_stage_that_fails_to_export_shows_the_error(tiny_captured, chromium, tmp_path):
    failed = tiny_captured.stages[5]
    assert failed.nodes is None and "injected export failure" in failed.error
    assert tiny_captured.stages[6].nodes and tiny_captured.stages[6].diff == {}
    assert "== stage 5: shortcut ==\ntorch.export failed: RuntimeError: injected" in render(tiny_captured, "text")
    page = tmp_path / "tiny.html"
    page.write_text(render(tiny_captured, "html"))
    dom, console = browse(chromium, page, tmp_path)
    assert selftest(dom).startswith(f"ok stages={STAGES} ") and not console


@pytest.mark.parametrize("argv, message", [
    (["viz", "hf:nope", "-o", "x.html"], "unknown Hugging Face family 'nope'"),
    (["viz", "what", "-o", "x.html"], "unknown target 'what'"),
    (["viz", "hf:mixtral", "-o", "x.png"], "cannot tell the format of 'x.png'"),
    (["viz", "hf:mixtral", "-o", "x.html", "--format", "png"], "invalid choice: 'png'"),
    (["viz", "hf:mixtral", "-o", "x.html", "--stage", "input"], "--stage picks the stage of a dot or svg"),
    (["viz", "hf:mixtral", "-o", "x.html", "--overlap", "2"], "--overlap applies to a measured run: add --ranks N"),
    (["viz", "hf:mixtral", "-o", "x.html", "--ranks", "1"], "--ranks needs at least 2 ranks"),
    (["viz", "hf:mixtral", "-o", "x.html", "--ranks", "2", "--overlap", "0"], "expected off, auto or a pipelining"),
    (["viz", "missing.pt2", "-o", "x.html", "--ranks", "2"], "--ranks trains a model: missing.pt2 is a saved graph"),
    (["explain", "test_cli:tiny_gpt_moe"], "needs --example-input"),
    (["explain", "test_cli:tiny_gpt_moe", "--example-input", "2x8:complex64"], "bad --example-input '2x8:complex64'"),
    (["explain", "no_such_module:f", "--example-input", "2x8"], "cannot import 'no_such_module'"),
    (["explain", "missing.pt2"], "no such file: missing.pt2"),
    (["explain", "gpt-moe", "--layers", "0"], "--layers must be at least 1"),
    (["bench", "nope"], "unknown benchmark 'nope'; available: " + ", ".join(cli.benchmarks())),
    (["explain", "test_cli:nope", "--example-input", "2x16"], "test_cli has no callable 'nope'"),
    (["explain", "zoo:Net", "--example-input", "2x16x32"], "zoo:Net needs arguments (missing a required argument"),
    (["explain", "test_cli:broken_factory", "--example-input", "2x16"],
     "test_cli:broken_factory() raised ValueError: no checkpoint at /nowhere"),
    (["explain", "test_cli:tiny_gpt_moe", "--example-input", "2x0:int64"], "bad --example-input '2x0:int64'"),
    (["explain", "test_cli:tiny_gpt_moe", "--example-input", f"{10**12}x{10**12}:int64"], "cannot make a 1000"),
    (["explain", "test_cli:tiny_gpt_moe", "--example-input", "2x16"],  # float where token ids are needed
     "test_cli:tiny_gpt_moe raised RuntimeError on --example-input 2x16: Expected tensor for argument #1 'indices'"),
    (["viz", "test_cli:tiny_gpt_moe", "--example-input", "2x16x32", "-o", "x.html"],
     "test_cli:tiny_gpt_moe raised RuntimeError on --example-input 2x16x32"),
    (["viz", "test_cli:tiny_gpt_moe", "--example-input", "2x16", "--ranks", "2", "-o", "x.html"],  # before spawning
     "test_cli:tiny_gpt_moe raised RuntimeError on --example-input 2x16"),
])
def test_user_mistakes_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"moecompile {argv[0]}: error: "), err
    assert not list(tmp_path.iterdir())  # nothing written


def test_unwritable_output_fails_before_the_work(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.html").mkdir()
    for out, message in [(tmp_path / "file" / "g.html", "file is not a directory"),
                         (tmp_path / "folder.html", "folder.html: it is a directory")]:
        assert main(["viz", "hf:nope", "-o", str(out)]) == 2  # the output is checked before the target is built
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_bugs_of_moecompile_keep_their_traceback(monkeypatch):
    """Only the user's mistakes become one line: an unexpected error, or the model failing on the inputs
    moecompile itself chose, propagates (a traceback and exit code 1 from the console script)."""
    monkeypatch.setattr(find_moe, "find_routing_sites", lambda *a: 1 / 0)
    with pytest.raises(find_moe.ModelRaised):
        main(["explain", "gpt-moe"])
    monkeypatch.setattr(moecompile, "optimize", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["explain", "test_cli:tiny_gpt_moe", "--example-input", "2x16:int64"])


def test_spinner_only_on_a_terminal(capsys, monkeypatch):
    for tty in ("0", "1"):
        monkeypatch.setenv("TTY_COMPATIBLE", tty)  # what rich asks before isatty()
        with cli._step("building hf:mixtral"):
            print("report")
        out, err = capsys.readouterr()
        assert out == "report\n"  # stdout is never the spinner's
        assert ("building hf:mixtral" in err) == (tty == "1")


def test_dot_renders_with_graphviz(graphviz, mixtral_views, tmp_path):
    """The dot output is valid Graphviz (dot renders it), and svg output is what dot makes of it."""
    subprocess.run([graphviz, "-Tsvg", str(mixtral_views / "m.dot"), "-o", str(tmp_path / "m.svg")], check=True)
    assert main(["viz", "hf:mixtral", "-o", str(tmp_path / "g.svg")]) == 0
    svg = (tmp_path / "g.svg").read_text()
    assert "<svg" in svg and "moecompile.expert_ffn" in svg


def test_svg_without_graphviz_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    assert main(["viz", "hf:mixtral", "-o", str(tmp_path / "g.svg")]) == 2
    assert "Graphviz's `dot`" in capsys.readouterr().err


def test_bench_runs_the_script_and_needs_the_repository(capfd, monkeypatch, tmp_path):
    assert main(["bench", "kernel_ops", "--help"]) == 0  # --help goes to the script
    assert "usage: kernel_ops.py" in capfd.readouterr().out
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path / "benchmarks")
    assert main(["bench", "moe_layer"]) == 2
    assert "no benchmarks folder" in capfd.readouterr().err


def test_no_benchmark_shadows_an_installed_module():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named as an installed module
    hides it from every import (a benchmarks/kernels.py broke transformers, which imports HF's `kernels`)."""
    stems = [p.stem for p in cli.BENCH_DIR.glob("*.py")]
    code = "import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    found = subprocess.run([sys.executable, "-I", "-c", code, *stems], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout


@pytest.mark.parametrize("command", [[], ["explain"], ["viz"], ["bench"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moecompile")
    if command == ["bench"]:
        assert all(name in out for name in ("moe_layer", "kernel_ops", "checkpoint", "ep_overlap", "quality"))


def test_runs_as_a_module():
    run = subprocess.run([sys.executable, "-m", "moecompile.cli", "viz", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--format {html,me-json,text,dot,svg}" in run.stdout


def test_pt2_target_shows_its_graph(gpt32_pt2, tmp_path, capsys):
    assert main(["viz", str(gpt32_pt2), "-o", str(tmp_path / "g.txt")]) == 0
    text = (tmp_path / "g.txt").read_text()
    assert "== stage 0: exported ==" in text and "== stage 1" not in text
    assert "MoE block blocks.31.ffn: rewritten" in text and "route_15 = moecompile.route(" in text
    assert main(["explain", str(gpt32_pt2)]) == 2
    assert "is a saved graph, not a model" in capsys.readouterr().err


def test_html_page_in_chromium(mixtral_views, chromium, tmp_path):
    page = mixtral_views / "m.html"
    assert "<script src" not in page.read_text() and "http" not in page.read_text().replace("http://www.w3.org", "")
    dom, console = browse(chromium, page, tmp_path)
    result = selftest(dom)
    assert result.startswith(f"ok stages={STAGES} "), result  # every stage clicked, each shown, no errors
    assert not console, console
    assert "model.layers.0.mlp" in dom and "contains MoE" in dom and "stage 2: lift_moe" in dom
    assert "No expert-parallel schedule for this model" in dom
    shot = tmp_path / "mixtral.png"
    browse(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1400,900", url_suffix="")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)


def test_schedule_timeline_in_chromium(gpt32_pt2, chromium, tmp_path):
    """Schedules exist only under expert parallelism (torchrun): this one comes from the pass's own scheduler."""
    forward, backward = (list_schedule(chunk_dag(2, 1e-3, e, side_s=5e-4)) for e in (2e-3, 4e-3))
    schedule = Schedule(2, forward, backward, {1: 0.02, 2: 0.015}, comm_s=8e-3, compute_s=1.3e-2)
    stages = capture(load(str(gpt32_pt2)))
    stages.schedules["blocks.1.ffn"] = schedule
    assert "schedule of blocks.1.ffn: pipelining degree 2" in render(stages, "text")
    page = tmp_path / "schedule.html"
    page.write_text(render(stages, "html"))
    dom, console = browse(chromium, page, tmp_path)
    assert selftest(dom).startswith("ok stages=1") and not console
    assert dom.count('class="slot ') == len(forward) + len(backward) and 'class="exposed"' in dom


def test_exposed_communication_is_link_time_without_compute():
    slots = [Slot("send", 0, "link", 0.0, 1.0), Slot("experts", 0, "compute", 1.0, 3.0),
             Slot("send", 1, "link", 1.0, 2.0), Slot("return", 0, "link", 3.0, 4.0),
             Slot("side", 0, "compute", 3.5, 5.0)]
    assert exposed_intervals(slots) == [(0.0, 1.0), (3.0, 3.5)]


def test_32_layer_page_renders(gpt32_pt2, chromium, tmp_path):
    page = tmp_path / "gpt32.html"
    assert main(["viz", str(gpt32_pt2), "-o", str(page)]) == 0
    dom, console = browse(chromium, page, tmp_path)
    result = selftest(dom)
    assert result.startswith("ok stages=1") and not console, result
    assert dom.count('class="group') < 100  # collapsed: the layers' rows are made on expand
    print(f"\n32-layer GPT-MoE page ({page.stat().st_size // 1024} KiB) in Chromium: {result}")
