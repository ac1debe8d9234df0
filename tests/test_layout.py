"""The package's import graph: no circle, no upward import, families independent of each other.

Every ``import`` / ``from ... import`` of a ``tinyonn_jax`` module counts, wherever it stands
(module level or inside a function), so a lazy import cannot hide a circle.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tinyonn_jax"

# Layers, lowest first: a module may import its own layer or lower ones only. Within a family
# package the modules may import each other (their own layer); across families never.
LAYERS = [
    ("errors", "fields", "workdir", "interrupts", "runtime", "backend", "data"),
    ("nn", "families", "families.dyntrm.config", "families.spl.config", "families.dynonn.config"),
    ("config",),
    ("loss", "metrics", "optim", "train_state", "family", "parallel", "checkpoint", "observe",
     "validate"),
    ("families.dyntrm", "families.spl", "families.dynonn"),
    ("families.registry", "eval", "interop"),
    ("trainer",),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every tinyonn_jax module ``path`` imports (``from pkg import mod`` counts as pkg.mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tinyonn_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyonn_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else node.module)
    return {m.removeprefix("tinyonn_jax").lstrip(".") for m in out} - {""}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _layer(module: str) -> tuple[int, str]:
    """(layer index, the group it matched) of the longest group prefix of ``module``."""
    best = (-1, "")
    for i, groups in enumerate(LAYERS):
        for g in groups:
            if (module == g or module.startswith(g + ".")) and len(g) > len(best[1]):
                best = (i, g)
    return best


def test_every_module_has_a_layer():
    missing = [m for m in _graph() if m and _layer(m)[0] < 0]
    assert not missing, missing


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(
                    stack[stack.index(n):] + [n]))
            if n in graph and not state.get(n):
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_no_upward_import_and_families_are_independent():
    bad = []
    for m, deps in _graph().items():
        lm, gm = _layer(m)
        for d in deps:
            ld, gd = _layer(d)
            if ld > lm:
                bad.append(f"{m} (layer {lm}) imports {d} (layer {ld})")
            elif ld == lm and gd != gm and gd.startswith("families.") and gm.startswith(
                    "families."):
                bad.append(f"{m} imports another family's {d}")
    assert not bad, "\n".join(sorted(bad))
