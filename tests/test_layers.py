"""moecompile's packages import downward only: a module may import modules of its own layer or of the layers
before it in LAYERS (the order README.md's "Repository layout" shows), never of a later one. Every import
counts, at module level or inside a function: a function-level import still ties the lower layer to the
higher one. Read from the source (ast), nothing is imported."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moecompile"
# lowest first; the names are moecompile's top-level modules and subpackages
LAYERS = [
    {"_lazy", "validation", "models"},
    {"kernels"},
    {"ir"},
    {"report"},
    {"frontend"},
    {"runtime"},
    {"passes"},
    {"api", "tuning"},
    {"backend"},
    {"sim", "viz"},
    {"cli"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        # `from moecompile.x import y`: the module y if it is one, else the module x
        found |= {n for n in names if n in modules and n != "moecompile"}
    return found


def _upward() -> set[tuple[str, str]]:
    modules = _modules()
    upward = set()
    for module, path in modules.items():
        here = _layer(module)
        if here is None:
            continue
        for imported in _imports(path, modules):
            there = _layer(imported)
            if there is not None and there > here:
                upward.add((module, imported))
    return upward


def test_every_module_has_a_layer():
    tops = {m.split(".")[1] for m in _modules() if "." in m}
    assert tops <= set().union(*LAYERS), f"add to LAYERS: {sorted(tops - set().union(*LAYERS))}"


def test_lower_layers_do_not_import_higher_ones():
    upward = sorted(_upward())
    assert not upward, "lower layers import higher ones (move the code down instead):\n" + \
        "\n".join(f"  {a} imports {b}" for a, b in upward)
