"""The house's dependency rules, read from the source with `ast`:

- no import circle among the modules of `synord`, `protocols`, `runtimes` and
  `hwprobe` (imports inside functions count: they run too; imports under
  ``if TYPE_CHECKING:`` do not, they never run);
- `protocols`, `runtimes` and `hwprobe` never import `synord`.

The graph is built from whatever modules are there, so new ones are checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("synord", "protocols", "runtimes", "hwprobe")
LOWER = ("protocols", "runtimes", "hwprobe")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, module: str, is_pkg: bool) -> set[str]:
    """Every module name ``module`` imports at run time (TYPE_CHECKING blocks skipped)."""
    out: set[str] = set()
    package = module if is_pkg else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for imp in _imported(tree, name, path.name == "__init__.py"):
            # `import a.b.c` runs a, a.b and a.b.c: each is an edge if it is ours.
            parts = imp.split(".")
            for i in range(1, len(parts) + 1):
                cand = ".".join(parts[:i])
                if cand in modules and cand != name:
                    targets.add(cand)
        graph[name] = targets
    return graph


def _package_edge(src: str, dst: str) -> bool:
    """A package's __init__ importing its own submodules, or a module its enclosing
    package (`from .. import x`), is how Python packages load, not a design circle."""
    return dst.startswith(src + ".") or src.startswith(dst + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a cycle path."""
    edges = {m: {d for d in ds if not _package_edge(m, d)} for m, ds in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_path(edges, sorted(comp)))

    import sys
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for v in sorted(edges):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def _path(edges: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete circle through the component's first module (for the failure message)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles (module -> ... -> module):\n" + "\n".join(
        " -> ".join(c) for c in found)


def test_lower_layers_never_import_synord():
    bad = sorted(f"{m} -> {d}" for m, ds in import_graph().items() if m.split(".")[0] in LOWER
                 for d in ds if d.split(".")[0] == "synord")
    assert not bad, "synord/protocols/runtimes/hwprobe import synord:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_imports_and_skips_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from .b import X\n"
                     "def f():\n    from .c import Y\n    import synord.d\n")
    got = _imported(tree, "synord.a", False)
    assert "synord.c" in got and "synord.d" in got
    assert "synord.b" not in got and "synord.b.X" not in got
    g = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(g) == [["p.a", "p.b", "p.c", "p.a"]]
