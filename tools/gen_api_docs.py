"""Generate docs/api.md, the API reference, from the docstrings of moecompile's public names.

    python tools/gen_api_docs.py            # write docs/api.md
    python tools/gen_api_docs.py --check    # exit 1 when docs/api.md differs from what this would write

The public names are `moecompile.__all__`, plus the few names of submodules that the guides use (EXTRA).
Docstrings are Google-style: a summary, then sections, each a line `Title:` followed by entries indented by
4 spaces (`name: text`, continued by lines indented by 8) or by indented text. Sections of parameters
become one table; several of them (optimize()'s groups) become one table with a group column. `--check` also
fails when a function of `moecompile.__all__` does not document every parameter, what it returns and what it
raises, or a class does not document every field (tests/test_docs.py runs it).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"
EXTRA = ["moecompile.runtime.expert_parallel.reduce_gradients",
         "moecompile.runtime.expert_parallel.expert_parameter_names",
         "moecompile.runtime.PECCheckpointer"]
HEADER = re.compile(r"^([A-Z][A-Za-z ]*):$")
ENTRY = re.compile(r"^    (\*{0,2}[A-Za-z_][\w.]*)(?: \(([^)]*)\))?: ?(.*)$")
NOT_PARAMETERS = ("Returns", "Raises", "Yields", "Example", "Examples", "Note", "Notes")


@dataclasses.dataclass
class Section:
    title: str
    entries: list[tuple[str, str]]  # (name, text); empty for a section of plain text
    text: str


def parse(doc: str, params: frozenset = frozenset()) -> tuple[list[str], list[Section]]:
    """(prose paragraphs, sections) of a cleaned docstring. Lines `name: text` at the margin, where name is one
    of `params`, also make entries (of an "Args" section), continued by lines indented by 4."""
    prose, sections, paragraph = [], [], []
    lines = doc.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        loose = re.match(r"^(\w+): (.*)$", line)
        if loose and loose.group(1) in params:
            if paragraph:
                prose.append(" ".join(paragraph))
                paragraph = []
            if not sections or sections[-1].title != "Args" or sections[-1].text:
                sections.append(Section("Args", [], ""))
            text = loose.group(2).strip()
            i += 1
            while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():
                text += " " + lines[i].strip()
                i += 1
            sections[-1].entries.append((loose.group(1), text))
            continue
        m = HEADER.match(line)
        if m and i + 1 < len(lines) and lines[i + 1].startswith("    "):
            body = []
            i += 1
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                if not lines[i].strip() and (i + 1 >= len(lines) or not lines[i + 1].startswith("    ")):
                    break
                body.append(lines[i])
                i += 1
            sections.append(_section(m.group(1), body))
            continue
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            prose.append(" ".join(paragraph))
            paragraph = []
        i += 1
    if paragraph:
        prose.append(" ".join(paragraph))
    return prose, sections


def _section(title: str, body: list[str]) -> Section:
    entries: list[list[str]] = []
    for line in body:
        m = ENTRY.match(line)
        if m and title not in ("Returns", "Yields"):
            entries.append([m.group(1), m.group(3).strip()])
        elif entries and line.startswith("        "):
            entries[-1][1] += " " + line.strip()
        elif line.strip():
            entries = []
            break
    if entries:
        return Section(title, [(n, t) for n, t in entries], "")
    return Section(title, [], " ".join(line.strip() for line in body if line.strip()))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _repr(value) -> str:
    """repr(value), with `...` for a sentinel object (its repr names a memory address, which changes per run)."""
    text = repr(value)
    return "..." if re.search(r" at 0x[0-9a-fA-F]+>$", text) else text


def _default(value) -> str:
    return "" if value is inspect.Parameter.empty else f"`{_repr(value)}`"


def _signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    parts, star = [], False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            parts.append(p.name + ("" if p.default is p.empty else f"={_repr(p.default)}"))
    one = f"{name}({', '.join(parts)})"
    if len(one) <= 100:
        return one
    return f"{name}(\n" + "".join(f"    {p},\n" for p in parts) + ")"


def _parameters_table(sections: list[Section], obj, kind: str) -> list[str]:
    groups = [s for s in sections if s.entries and s.title not in NOT_PARAMETERS]
    if not groups:
        return []
    defaults = {}
    if dataclasses.is_dataclass(obj):
        defaults = {f.name: f.type for f in dataclasses.fields(obj)}
    else:
        kind = "function"  # a function, or a class documenting its constructor's parameters
        defaults = {p.name: p.default for p in inspect.signature(obj).parameters.values()}
    grouped = len(groups) > 1
    second = "default" if kind == "function" else "type"
    head = (["group"] if grouped else []) + ["name", second, "meaning"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in groups:
        for n, text in s.entries:
            if kind == "function":
                extra = _default(defaults.get(n, inspect.Parameter.empty))
            else:
                extra = f"`{defaults[n]}`" if n in defaults else ""
            cells = ([s.title] if grouped else []) + [f"`{n}`", extra, _cell(text)]
            rows.append("| " + " | ".join(cells) + " |")
    return rows + [""]


def _rest(sections: list[Section]) -> list[str]:
    out = []
    for s in sections:
        if s.entries and s.title not in NOT_PARAMETERS:
            continue
        if s.title == "Raises":
            out.append("**Raises:**\n")
            out += [f"- `{n}`: {t}" for n, t in s.entries] or [f"- {s.text}"]
            out.append("")
        elif s.entries:
            out.append(f"**{s.title}:**\n")
            out += [f"- `{n}`: {t}" for n, t in s.entries]
            out.append("")
        else:
            out += [f"**{s.title}:** {s.text}", ""]
    return out


def _resolve(path: str):
    import importlib
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def document(path: str, obj, level: int = 2) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    kind = "class" if inspect.isclass(obj) else "function"
    try:
        params = frozenset(inspect.signature(obj).parameters) - {"self"}
    except (TypeError, ValueError):
        params = frozenset()
    prose, sections = parse(doc, params)
    out = [f"{'#' * level} `{path}`", "", "```python", _signature(path, obj), "```", ""]
    for p in prose:
        out += [p, ""]
    out += _parameters_table(sections, obj, kind)
    out += _rest(sections)
    if kind == "class":
        documented = {n for s in sections for n, _ in s.entries}
        for name, member in sorted(vars(obj).items()) + _inherited(obj):
            if name.startswith("_") or name in documented:
                continue
            if isinstance(member, property):
                out += [f"{'#' * (level + 1)} `{path.rsplit('.', 1)[-1]}.{name}` (property)", ""]
                out += [inspect.getdoc(member) or "", ""]
            elif inspect.isfunction(member):
                out += document(f"{path.rsplit('.', 1)[-1]}.{name}", member, level + 1)
    return out


def _inherited(cls) -> list:
    """Public members that `cls` inherits from moecompile classes."""
    own, found = set(vars(cls)), {}
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("moecompile"):
            for name, member in vars(base).items():
                if name not in own and name not in found:
                    found[name] = member
    return sorted(found.items())


def problems() -> list[str]:
    """What the docstrings of moecompile.__all__ leave out."""
    import moecompile
    found = []
    for name in moecompile.__all__:
        obj = getattr(moecompile, name)
        doc = inspect.getdoc(obj)
        if not doc:
            found.append(f"moecompile.{name} has no docstring")
            continue
        _, sections = parse(doc)
        named = {n for s in sections if s.title not in NOT_PARAMETERS for n, _ in s.entries}
        titles = {s.title for s in sections}
        if inspect.isclass(obj):
            fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
            found += [f"moecompile.{name}: field {f} is not documented" for f in sorted(fields - named)]
        else:
            params = set(inspect.signature(obj).parameters)
            found += [f"moecompile.{name}: parameter {p} is not documented" for p in sorted(params - named)]
            found += [f"moecompile.{name}: no {t} section" for t in ("Returns", "Raises") if t not in titles]
    for path in EXTRA:
        if not inspect.getdoc(_resolve(path)):
            found.append(f"{path} has no docstring")
    return found


def render() -> str:
    import moecompile
    out = ["# API reference", "",
           "<!-- Generated by tools/gen_api_docs.py from the docstrings; do not edit. The test suite checks "
           "that it is current. -->", "",
           "The public names of `moecompile` (`moecompile.__all__`), then the names of submodules that the "
           "[guides](README.md) use. Task-oriented documentation: [docs/README.md](README.md).", ""]
    out += ["Contents: " + ", ".join(f"`{n}`" for n in moecompile.__all__) + "; " +
            ", ".join(f"`{p}`" for p in EXTRA) + ".", ""]
    for name in moecompile.__all__:
        out += document(f"moecompile.{name}", getattr(moecompile, name))
    out += ["## From submodules", ""]
    for path in EXTRA:
        out += document(path, _resolve(path), level=3)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    issues = problems()
    for issue in issues:
        print(f"gen_api_docs: {issue}", file=sys.stderr)
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("gen_api_docs: docs/api.md is stale; run `python tools/gen_api_docs.py`", file=sys.stderr)
            return 1
        return 1 if issues else 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
