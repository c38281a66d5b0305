"""The package's shape: no import cycle, no module name used twice, and the core needs torch alone.

The import graph is read from the source (every ``import`` statement, also those inside functions, since a
lazy import that closes a cycle is still a cycle a reader must untangle). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fwdgrad"
#: The library every user imports: it needs torch alone.
CORE = ("fwdgrad", "fwdgrad.errors", "fwdgrad.engine", "fwdgrad.estimators", "fwdgrad.nn", "fwdgrad.parallel")
#: Third-party packages the core may import.
CORE_DEPENDENCIES = {"torch"}


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = module_names()[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> set[str]:
    """Every module of any package that ``module``'s source imports (absolute names)."""
    known = module_names()
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    return {m: {t for t in imports_of(m, p) if t in known and t != m} for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` that re-exports its own submodules is not a cycle with them: drop the edges from a
    package to the modules inside it, and keep every edge from a module up to a package above it."""
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def test_the_package_has_no_import_cycle():
    assert cycles(_package_parents(import_graph())) == []


def test_the_cycle_finder_finds_a_cycle():
    # The checker itself: a two-module cycle and a three-module one are found, a chain is not.
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_no_module_name_is_used_twice():
    names = Counter(m.rsplit(".", 1)[-1] for m in module_names() if m != "fwdgrad")
    assert [n for n, c in names.items() if c > 1] == []


def _in_core(module: str) -> bool:
    return module == "fwdgrad" or any(module == c or module.startswith(c + ".") for c in CORE[1:])


@pytest.mark.parametrize("module", sorted(m for m in module_names() if _in_core(m)))
def test_the_core_imports_torch_alone(module):
    # Third-party imports of every core module, lazy ones included: torch and numpy, nothing of the extra.
    third_party = {name.split(".")[0] for name in imports_of(module, module_names()[module])}
    third_party -= {"fwdgrad", "__future__"}
    third_party -= set(sys.stdlib_module_names)
    assert third_party <= CORE_DEPENDENCIES, f"{module} imports {sorted(third_party - CORE_DEPENDENCIES)}"
