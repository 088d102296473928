"""The documentation is tested: every ```python block of README.md and docs/guide/*.md runs, and docs/api.md is
what tools/gen_api_docs.py generates from the docstrings.

How the snippets run:
- one test per page; its ```python blocks run in order in one namespace (a later block may use what an
  earlier one defined, as a reader who copies them in order would), in a temporary working directory;
- a block whose first line is `# torchrun --nproc-per-node N <file>.py` is a whole script for N processes: it
  runs on N spawned gloo ranks (moecompile.runtime.spawn.run_ranks, the spawner the other multi-rank tests use),
  in a namespace of its own; `init_process_group()` and `destroy_process_group()` in it are no-ops there
  (the spawner has set the process group up and tears it down). Starting ranks is the slow part (each
  imports torch and transformers), so all scripts of one rank count run in one spawn, one after another, in
  test_multi_rank_snippets;
- a ```bash block preceded by the line `<!-- doc-test: run -->` has its `moecompile ...` lines run in this
  process through moecompile.cli.main (other bash blocks are not run).
Snippets must stay small (tiny random-weight models, a few tokens): the whole suite has a time budget.
"""
import contextlib
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs" / "guide").glob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
TORCHRUN = re.compile(r"#\s*torchrun\s+--nproc-per-node[ =](\d+)")
RUN_MARK = "<!-- doc-test: run -->"


@dataclass
class Block:
    lang: str
    code: str
    line: int          # 1-based line of the opening fence
    ranks: int = 0     # > 0: a torchrun script for that many processes
    run: bool = False  # a bash block marked to run


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        lang, code = m.group(1), m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        first = code.lstrip().split("\n", 1)[0]
        ranks = int(TORCHRUN.match(first).group(1)) if lang == "python" and TORCHRUN.match(first) else 0
        found.append(Block(lang, code, line, ranks, before == RUN_MARK))
    return found


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    ran = 0
    for block in blocks(page):
        where = f"{_page_id(page)}:{block.line}"
        if block.lang == "python" and block.ranks:
            pass  # runs in test_multi_rank_snippets
        elif block.lang == "python":
            # blank lines first: a traceback names the page and its line numbers
            exec(compile("\n" * block.line + block.code, str(page), "exec"), namespace)  # noqa: S102
        elif block.lang == "bash" and block.run:
            _run_commands(block, where)
        else:
            continue
        ran += 1
    assert ran, f"{_page_id(page)} has no snippet that runs"


MULTI_RANK = [(page, block) for page in PAGES for block in blocks(page) if block.lang == "python" and block.ranks]


@pytest.mark.parametrize("ranks", sorted({block.ranks for _, block in MULTI_RANK}))
def test_multi_rank_snippets(ranks, tmp_path):
    from moecompile.runtime.spawn import RankFailed, run_ranks
    scripts = []
    for page, block in MULTI_RANK:
        if block.ranks == ranks:
            script = tmp_path / f"{page.stem}_line{block.line}.py"
            script.write_text("\n" * block.line + block.code)  # blank lines: tracebacks show the page's line numbers
            scripts.append(str(script))
    try:
        run_ranks(_scripts_on_rank, ranks, scripts, str(tmp_path), timeout_s=120.0, deadline_s=600.0)
    except RankFailed as e:
        pytest.fail(f"a snippet failed on {ranks} ranks (the file name is <page>_line<N>.py):\n{e}", pytrace=False)


def _scripts_on_rank(rank: int, world_size: int, scripts: list[str], cwd: str) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    init, destroy = dist.init_process_group, dist.destroy_process_group
    dist.init_process_group = lambda *a, **k: None  # the spawner's process group is the scripts'
    dist.destroy_process_group = lambda *a, **k: None
    try:
        for script in scripts:
            os.makedirs(os.path.join(cwd, Path(script).stem), exist_ok=True)
            os.chdir(os.path.join(cwd, Path(script).stem))
            torch.manual_seed(0)
            runpy.run_path(script, run_name="__main__")
            dist.barrier()
    finally:
        dist.init_process_group, dist.destroy_process_group = init, destroy


def _run_commands(block: Block, where: str) -> None:
    from moecompile.cli import main
    for line in block.code.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line.startswith("moecompile "):
            continue
        with contextlib.redirect_stdout(sys.stderr):
            code = main(shlex.split(line)[1:])
        assert code in (0, None), f"{where}: `{line}` exited with {code}"


def test_every_guide_page_starts_with_a_snippet_that_runs():
    for page in PAGES[1:]:
        first = next((b for b in blocks(page) if b.lang in ("python", "bash")), None)
        assert first is not None and (first.lang == "python" or first.run), \
            f"{_page_id(page)}: the first code block should be a snippet the tests run"


def test_api_reference_is_current(capsys):
    """tools/gen_api_docs.py --check: docs/api.md is what the docstrings generate, and the docstrings of
    moecompile.__all__ document every parameter, what they return and what they raise."""
    generator = runpy.run_path(str(ROOT / "tools" / "gen_api_docs.py"))
    code = generator["main"](["--check"])
    assert code == 0, capsys.readouterr().err


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text())
    found = set()
    for heading in re.findall(r"^#+\s+(.*)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_links_between_pages_resolve():
    """Relative Markdown links of README.md and docs/**.md point at files that exist, and at headings that
    exist when they name one."""
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    broken = []
    for page in pages:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # not in code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            path = (page.parent / path_part).resolve() if path_part else page
            if not path.exists():
                broken.append(f"{_page_id(page)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{_page_id(page)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _reasons() -> list[tuple[str, str]]:
    """(where, message with {…} for its formatted parts) of every `Unsupported(...)` raised in moecompile/:
    the reasons explain() gives for a block it does not rewrite."""
    import ast
    found = []
    for path in sorted((ROOT / "moecompile").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Unsupported" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    text = str(arg.value)
                elif isinstance(arg, ast.JoinedStr):
                    text = "".join(v.value if isinstance(v, ast.Constant) else "{…}" for v in arg.values)
                else:
                    continue
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", text))
    return found


def test_troubleshooting_lists_every_reason():
    """Each reason a block can be refused with appears in docs/guide/troubleshooting.md: its first words up to
    the first formatted part (at most 40 characters)."""
    page = " ".join((ROOT / "docs" / "guide" / "troubleshooting.md").read_text().split())
    reasons = _reasons() + [("moecompile/passes/lift_moe.py", "the block's hidden states are not its first positional argument"),
                            ("moecompile/passes/validate.py", "translation validation failed"),
                            ("moecompile/passes/validate.py", "translation validation could not run the lifted block on"),
                            ("moecompile/passes/validate.py", "translation validation of the routing options")]
    missing = []
    for where, text in reasons:
        fragment = next((f for f in text.split("{…}") if len(f.strip(" :(")) >= 10), "")
        fragment = " ".join(fragment.split()).strip(" :(")[:40]
        if fragment and fragment not in page:
            missing.append(f"{where}: {text}")
    assert not missing, "reasons not in docs/guide/troubleshooting.md (add them, with what to do):\n" + "\n".join(missing)
