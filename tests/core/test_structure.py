"""The core reads in one pass: no import cycles, small functions, one curated public namespace.

These are structural promises to the next reader of ``core/scalarlens``, checked on the source
with ``ast`` so a regression fails the build instead of waiting for a review.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import scalarlens

CORE = Path(scalarlens.__file__).resolve().parent
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _module_level_imports(name: str, path: Path) -> set[str]:
    """Core modules ``name`` imports outside function bodies (``TYPE_CHECKING`` included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if submodule in MODULES else target)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_among_core_modules() -> None:
    graph = {name: _module_level_imports(name, path) for name, path in MODULES.items()}
    assert len(graph) > 30 and graph["scalarlens._plan"], "the walker found no imports"
    assert _cycles(graph) == []


def test_the_walker_detects_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_core_function_is_under_the_limit() -> None:
    too_long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length >= MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


def test_plan_needs_no_type_ignores() -> None:
    assert "type: ignore" not in (CORE / "_plan.py").read_text()


def test_public_namespace_is_sorted_resolves_and_matches_the_lazy_table() -> None:
    names = scalarlens.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(scalarlens, name) is not None, name
    lazy = scalarlens._LAZY_NAMES  # type: ignore[attr-defined]
    assert set(lazy) <= set(names), sorted(set(lazy) - set(names))
    for name, module in lazy.items():
        assert getattr(importlib.import_module(module, "scalarlens"), name) is getattr(
            scalarlens, name
        )

    # isort-style order (ruff RUF022): CONSTANTS, then Classes, then functions and values
    def kind(n: str) -> int:
        return 0 if n.isupper() else 1 if n[:1].isupper() else 2

    assert list(names) == sorted(names, key=lambda n: (kind(n), n))


def test_subpackages_are_reachable_as_attributes_in_a_fresh_interpreter() -> None:
    import subprocess
    import sys

    code = "import scalarlens; print(scalarlens.models.GPT2Adapter.__name__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.stdout.strip() == "GPT2Adapter", run.stderr
