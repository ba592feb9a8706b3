"""The package's shape: no import cycle among our modules (function-level imports included) and no
module past the size one person holds in mind.

Modules are read with :mod:`ast`, not imported: ``green_mlops/`` is ``green_mlops``, ``plugins/`` is
``green_mlops.plugins`` and ``integrations/`` is ``green_mlops.integrations`` (setuptools
``package-dir``). Every import counts, at any depth, except those under ``if TYPE_CHECKING:``, which
never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> the package it is installed as.
PACKAGES = {
    "green_mlops": "green_mlops",
    "plugins": "green_mlops.plugins",
    "integrations": "green_mlops.integrations",
}
MAX_LINES = 600


def our_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module we ship."""
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _RuntimeImports(ast.NodeVisitor):
    """Every import statement that can run, at any depth; the body of ``if TYPE_CHECKING:`` is
    left out (its ``else:`` branch is kept)."""

    def __init__(self) -> None:
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append(node)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        for stmt in node.orelse:
            self.visit(stmt)


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    visitor = _RuntimeImports()
    visitor.visit(tree)
    return visitor.found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing ``name`` runs (the longest known prefix), if any."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at run time."""
    modules = our_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = module.split(".")
                    drop = node.level - 1 if is_package else node.level
                    base = base[: len(base) - drop] if drop else base
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # ``from pkg import sub`` imports the module ``pkg.sub`` where there is one.
                names = [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]
            for name in names:
                target = _resolve(name, modules)
                # a module's own packages are imported before it anyway (not an edge of ours)
                if target is not None and not _is_within(module, target):
                    targets.add(target)
        targets |= _named_modules(path, module, is_package, modules)
        graph[module] = targets
    return graph


def _named_modules(path: Path, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """Modules loaded by name (``importlib.import_module``, ``DEFAULT_PLUGINS``, a package's lazy
    ``_LAZY`` map): every string constant that names a module of ours, absolutely or, in a
    package's ``__init__``, relative to the package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        for name in (node.value, f"{module}.{node.value}" if is_package else ""):
            if name in modules and not _is_within(module, name):
                found.add(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (first module repeated at the end), or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_stack:
                return [*stack[stack.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    # The checker itself: a cycle made only through a function-level import is found, and one made
    # only through an ``if TYPE_CHECKING:`` import is not a cycle.
    graph = import_graph()
    assert "green_mlops.plugins.rapl" in graph and "green_mlops.integrations.lightning" in graph
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
    )
    source += "def f():\n    import c\n"
    imported = {alias.name for n in _runtime_imports(ast.parse(source)) for alias in n.names}
    assert imported == {"TYPE_CHECKING", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_our_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_over_600_lines() -> None:
    # Issue #11: every module fits in one person's head. Fails until every split has landed.
    too_long = {
        name: n
        for name, path in our_modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
