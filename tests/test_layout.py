"""The code keeps DESIGN.md §1's shape: imports go one way, and the README maps every module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "drainer"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """drainer modules ``name`` imports at run time (anywhere, functions included; not
    under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "drainer")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] == "drainer":
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return {m for m in found if m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return groups


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The finder itself can fail: a two-module loop and a three-module loop are both found.
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def test_the_drain_loop_never_writes_sql() -> None:
    # STYLE.md 14: the scheduler and the attempt call the store, they hold no SQL of their own.
    for name in ("drainer.scheduler", "drainer.attempt", "drainer.session"):
        source = MODULES[name].read_text(encoding="utf-8")
        assert "sqlalchemy" not in source and "SELECT " not in source, name


def test_readme_module_map_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    for name, path in MODULES.items():
        if name == "drainer" or path.name == "__main__.py":
            continue
        shown = str(path.relative_to(PACKAGE)).replace("/__init__.py", "/")
        assert f"`{shown}`" in table, f"{shown} is missing from the README's module map"


@pytest.mark.parametrize("argv", [
    ["--help"], ["run", "--help"], ["config", "--database-url", "sqlite:///backlog.db"],
    ["config", "--database-url", "postgresql://u:p@db.example:5432/backlog"],
    ["run", "--database-url", "mysql://u@h/db"],  # a usage error
])
def test_commands_that_open_no_database_import_no_database_stack(
        argv: list[str], tmp_path: Path) -> None:
    # Start-up time (issue 11: --help and config under 0.25 s) is mostly SQLAlchemy's import;
    # the figure is in benchmarks/startup.py, the cause is pinned here.
    probe = ("import sys, drainer.cli\n"
             "try:\n    drainer.cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted({m.split('.')[0] for m in sys.modules}\n"
             "               & {'sqlalchemy', 'aiosqlite', 'asyncpg', 'psutil'})\n"
             "print('IMPORTED', *heavy, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("DRAINER_")})
    assert proc.stderr.strip().splitlines()[-1] == "IMPORTED", proc.stderr
