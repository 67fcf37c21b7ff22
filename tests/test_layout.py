"""The shape of the package: no import circle inside stabq, no file over 400 lines, no
function over 60 lines without a line at its top that says why (``# long: ...``), and the
few modules that stay at the top level. Read from the source with ``ast``: nothing runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "stabq"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
WHY = "# long:"  # a function may run longer when a line at its top says why
TOP_LEVEL = {"__init__", "__main__", "_version", "errors", "files", "distributed", "estimator"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The stabq modules ``path`` imports anywhere in it (functions too), by their names:
    ``from a import b`` counts ``a.b`` when that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def import_graph() -> dict[str, set[str]]:
    """Who imports whom inside stabq; a package's ``__init__`` re-exports are edges too, but
    the parent package a submodule's import loads first is not (every submodule would
    otherwise import its own package)."""
    known = modules()
    return {name: imported(path, name, set(known)) for name, path in known.items()}


def test_no_import_circle_inside_stabq():
    graph = import_graph()
    graph.pop("stabq")  # the root re-exports the public names; nothing inside imports it
    for name in graph:
        graph[name].discard("stabq")
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_nothing_inside_imports_the_root_package():
    """``from stabq import X`` inside stabq would load every module first: a circle."""
    graph = import_graph()
    assert [n for n, deps in graph.items() if "stabq" in deps and n != "stabq"] == []


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_few_modules_at_the_top_level():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= TOP_LEVEL, sorted(top - TOP_LEVEL)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_file_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(SRC)}: {lines} lines"


def long_functions(path: Path) -> list[str]:
    """Functions of ``path`` over MAX_FUNCTION_LINES lines (its docstring not counted) with
    no ``# long:`` line at their top (the first lines after the signature and docstring)."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            length = node.end_lineno - node.lineno + 1
            if body is not node.body:  # the docstring is documentation, not length
                length -= node.body[0].end_lineno - node.body[0].lineno + 1
            start = (node.body[0].end_lineno if body is not node.body else node.lineno) or 0
            top = lines[start : (body[0].lineno if body else start) + 1]
            if length > MAX_FUNCTION_LINES and not any(WHY in ln for ln in top):
                found.append(f"{node.name} ({length} lines, line {node.lineno})")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_function_over_60_lines_without_a_reason(path):
    assert long_functions(path) == []


def test_the_long_function_check_fails_a_long_function_and_passes_a_reasoned_one(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    bare = tmp_path / "bare.py"
    bare.write_text(f'def f():\n    """Doc."""\n{body}\n')
    assert long_functions(bare) == ["f (71 lines, line 1)"]
    why = tmp_path / "why.py"
    why.write_text(f'def f():\n    """Doc."""\n    # long: one table\n{body}\n')
    assert long_functions(why) == []
