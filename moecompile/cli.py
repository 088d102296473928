"""The `moecompile` command: explain a model, visualize its graph after each pass, run a benchmark.

    moecompile explain hf:mixtral
    moecompile viz hf:mixtral -o build/mixtral.html          # format from the suffix; -o may repeat
    moecompile viz mypkg.models:build --example-input 2x16:int64 -o graph.json
    moecompile viz gpt-moe --ranks 2 --overlap 2 -o ep.html  # + predicted and measured timelines of 2 ranks
    moecompile bench moe_layer --quick

Exit codes: 0 done; 2 a mistake in the command (one line on stderr, no traceback): a bad option, target or
shape, a factory that raises or needs arguments, a model that raises on the --example-input given, an output
that cannot be written; 1 a rank of viz --ranks failed (its traceback on stderr), or a bug of moecompile (a
traceback); a benchmark's own code. Long steps show a spinner on stderr when it is a terminal.
"""
from __future__ import annotations

import argparse
import ast
import shutil
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager, nullcontext
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner

import moecompile
from moecompile.passes.find_moe import ModelRaised
from moecompile.passes.registry import PIPELINES
from moecompile.runtime.spawn import RankFailed
from moecompile.viz import FORMATS, format_for, render
from moecompile.viz.formats import pick_stage
from moecompile.viz.graph import capture
from moecompile.viz.measure import measure
from moecompile.viz.schedule import measured_title
from moecompile.viz.targets import HF_FAMILIES, TargetError, load

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"  # present in a checkout, not in a wheel
TARGET_HELP = (f"hf:<family> (a tiny random-weight Hugging Face MoE: {', '.join(HF_FAMILIES)}), gpt-moe, "
               "pkg.module:factory (needs --example-input), or a .pt2 file from torch.export.save (viz only)")


class UsageError(Exception):
    """Reported as `moecompile <command>: error: <message>`, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's errors without its usage lines: every mistake is one line on stderr (--help shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def benchmarks() -> dict[str, str]:
    """Benchmark name → the first sentence of its docstring, for the scripts in the repository's benchmarks/."""
    if not BENCH_DIR.is_dir():
        return {}
    names = {}
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem != "common":  # helpers, not a benchmark
            paragraph = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0].split())
            names[path.stem] = textwrap.shorten(paragraph.split(". ")[0].rstrip("."), 96, placeholder=" …")
    return names


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="moecompile", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True, metavar="{explain,viz,bench}")

    def model_args(p):
        p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
        p.add_argument("--example-input", action="append", metavar="SHAPE", default=None,
                       help="one per positional input: dims joined by x, optional dtype, e.g. 2x16:int64 or 2x16x32 "
                            "(float32). Default for hf: and gpt-moe: 2x16:int64")
        p.add_argument("--layers", type=int, metavar="N", help="number of layers of an hf: or gpt-moe target")

    p = commands.add_parser("explain", help="optimize a model and print what was found and rewritten",
                            description="Optimize TARGET with its example inputs and print moecompile.explain().")
    model_args(p)
    p = commands.add_parser("viz", help="write the graph after each pass (html, me-json, text, dot, svg)",
                            description="Capture the graph after each pass of the default pipeline and write it.")
    model_args(p)
    p.add_argument("-o", "--output", action="append", required=True, metavar="OUT",
                   help="file to write; repeat to write several formats from one run")
    p.add_argument("--format", choices=FORMATS,
                   help="default from OUT's suffix: .html html, .json me-json, .txt text, .dot dot, .svg svg")
    p.add_argument("--stage", help="the stage dot/svg show: a pass name, 'input' or an index (default: the last)")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="also train TARGET expert-parallel on N gloo processes of this machine and show each rank's "
                        "measured schedule timeline of the last step beside the predicted one")
    p.add_argument("--overlap", type=_overlap, metavar="off|auto|INT",
                   help="with --ranks: optimize(overlap=...), the pipelining degree (default off)")
    names = benchmarks()
    listing = "\n".join(f"  {name:12} {line}" for name, line in names.items()) or "  (no benchmarks/ folder here)"
    p = commands.add_parser("bench", help="run a benchmark script of the repository",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Run benchmarks/NAME.py with this Python; ARGS go to the script.",
                            epilog="benchmarks:\n" + listing)
    p.add_argument("name", metavar="NAME")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to the script (e.g. --help)")
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, argparse printed it)
        return int(e.code or 0)
    try:
        return {"explain": explain, "viz": viz, "bench": bench}[args.command](args)
    except UsageError as e:  # folded: a model's or factory's error message may span lines
        print(f"moecompile {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _step(text: str):
    """A spinner naming the running step on stderr, only on a terminal: pipes, logs and tests get nothing."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return nullcontext()
    if len(text) > console.width - 3:  # kept to one line, which the spinner redraws in place
        text = text[:console.width - 4] + "…"
    # stdout stays stdout: the report may be piped while stderr is the terminal
    return Live(Spinner("dots", text), console=console, refresh_per_second=12.5, transient=True,
                redirect_stdout=False)


@contextmanager
def _model_runs(args):
    """The model raising on the user's --example-input is a mistake in the command; on the default inputs of a
    built-in target it is a bug of moecompile, left to show its traceback."""
    try:
        yield
    except ModelRaised as e:
        if not args.example_input:
            raise
        cause = e.__cause__
        raise UsageError(f"{args.target} raised {type(cause).__name__} on --example-input "
                         f"{' '.join(args.example_input)}: {cause} (give the shapes and dtypes its forward takes)"
                         ) from None


def _runs_on_its_inputs(target) -> None:
    import torch
    try:
        with torch.no_grad():
            target.model(*target.example_inputs)
    except Exception as e:
        raise ModelRaised(str(e)) from e  # _model_runs words it


def _overlap(text: str) -> str | int:
    if text in ("off", "auto") or (text.isdigit() and int(text) >= 1):
        return text if text in ("off", "auto") else int(text)
    raise argparse.ArgumentTypeError(f"expected off, auto or a pipelining degree >= 1, got {text!r}")


def _load(args):
    if args.layers is not None and args.layers < 1:
        raise UsageError("--layers must be at least 1")
    if args.layers is not None and not (args.target.startswith("hf:") or args.target == "gpt-moe"):
        raise UsageError("--layers applies to hf:<family> and gpt-moe targets")
    if args.example_input and args.target.endswith(".pt2"):
        raise UsageError("--example-input does not apply to a .pt2 file: its graph is already traced")
    try:
        with _step(f"building {args.target}"):
            return load(args.target, args.example_input, args.layers)
    except TargetError as e:
        raise UsageError(str(e)) from None


def explain(args) -> int:
    target = _load(args)
    if target.model is None:
        raise UsageError(f"{args.target} is a saved graph, not a model: explain needs hf:<family>, gpt-moe or "
                         "pkg.module:factory (viz shows a .pt2 file)")
    with _step(f"optimizing ({', '.join(PIPELINES['default'])})"), _model_runs(args):
        fast = moecompile.optimize(target.model, target.example_inputs)
    report, console = moecompile.explain(fast), Console()
    if console.is_terminal:
        console.print(report)
    else:  # piped: the report's own 120 columns, no colour codes (rich would fold names at 80)
        print(report)
    return 0


def viz(args) -> int:
    if args.format and len(args.output) > 1:
        raise UsageError("--format applies to one output; with several -o the suffixes choose the formats")
    outputs = [(out, args.format or format_for(out)) for out in args.output]
    for out, fmt in outputs:
        if fmt is None:
            raise UsageError(f"cannot tell the format of {out!r} from its suffix; add --format {{{','.join(FORMATS)}}}")
        if fmt == "svg" and shutil.which("dot") is None:
            raise UsageError("svg needs Graphviz's `dot` on PATH (install Graphviz), or write .dot or .html instead")
        _check_writable(Path(out))
    if args.stage is not None and not any(fmt in ("dot", "svg") for _, fmt in outputs):
        raise UsageError("--stage picks the stage of a dot or svg output (html, me-json and text show every stage)")
    if args.overlap is not None and args.ranks is None:
        raise UsageError("--overlap applies to a measured run: add --ranks N")
    if args.ranks is not None and (args.ranks < 2 or args.target.endswith(".pt2")):
        raise UsageError("--ranks needs at least 2 ranks" if args.ranks < 2 else
                         f"--ranks trains a model: {args.target} is a saved graph")
    target, measured = _load(args), None
    if args.ranks:  # first: a failing rank is reported before the passes' snapshots are taken
        if args.example_input:  # a mistake in the inputs: one line here, not a traceback from every rank
            with _model_runs(args):
                _runs_on_its_inputs(target)
        try:
            overlap = "off" if args.overlap is None else args.overlap
            with _step(f"training {args.target} on {args.ranks} ranks"):
                measured = measure(args.target, args.example_input, args.layers, args.ranks, overlap)
        except RankFailed as e:
            print(f"moecompile viz: error: the measured run failed: {e}", file=sys.stderr)
            return 1
        print(measured_title(measured))
    with _step(f"capturing the graph after each pass ({', '.join(PIPELINES['default'])})"), _model_runs(args):
        captured = capture(target)
    if measured is not None:  # the schedules of the ranks' own optimize(mesh=...), with what they measured
        captured.measured, captured.schedules = measured, measured.schedules
    blocks = captured.blocks
    print(f"{args.target}: {len(blocks)} MoE block(s), {sum(b.rewritten for b in blocks)} rewritten")
    for out, fmt in outputs:
        try:
            with _step(f"rendering {fmt} to {out}"):
                text = render(captured, fmt, args.stage)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text, encoding="utf-8")
        except KeyError as e:  # no such --stage
            raise UsageError(e.args[0]) from None
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror}") from None
        shown = (f"stage {pick_stage(captured, args.stage).name}" if fmt in ("dot", "svg")
                 else f"{len(captured.stages)} stage(s)")
        print(f"wrote {out} ({fmt}, {shown}, {len(text) // 1024} KiB)")
    return 0


def _check_writable(out: Path) -> None:
    """Before the long work, not after it: an output that cannot be written fails the command in a second."""
    if out.is_dir():
        raise UsageError(f"cannot write {out}: it is a directory")
    existing = next(folder for folder in out.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise UsageError(f"cannot write {out}: {existing} is not a directory")
    if not os.access(out if out.exists() else existing, os.W_OK):
        raise UsageError(f"cannot write {out}: permission denied")


def bench(args) -> int:
    names = benchmarks()
    if not names:
        raise UsageError(f"no benchmarks folder at {BENCH_DIR}: the benchmarks ship with the repository, "
                         "not the installed package (clone it and pip install -e .)")
    if args.name not in names:
        raise UsageError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    return subprocess.call([sys.executable, str(BENCH_DIR / f"{args.name}.py"), *args.args])


if __name__ == "__main__":
    sys.exit(main())
