"""The house rules that import-linter's contracts (pyproject.toml) do not state: no import circle
anywhere, and nothing below the CLI prints."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")  # the test extra's; absent on the GPU machine, whose `pytest -m gpu` must still collect

REPO = Path(__file__).resolve().parents[1]
# the terminal's own modules: the click layers, the one-line error printer, the progress bar
# (a bar on a terminal or a line every 30 s in logs) and the filter of decoder noise on stderr
MAY_PRINT = {"featstore/cli.py", "probe/cli.py", "featstore/console.py", "featstore/progress.py", "featstore/loaders/quiet.py"}


def _circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_the_import_graph_has_no_circle():
    graph = grimp.build_graph("featstore", "probe")
    assert len(graph.modules) > 50  # the whole code was read
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert _circles(graph) == [["a.x", "a.y"]]


def _prints(path: Path) -> list[str]:
    """Calls that write to the terminal: print(), click.echo/secho, sys.stdout/stderr.write."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = ast.unparse(f)
        if name == "print" or name.startswith("click.") or name in ("sys.stdout.write", "sys.stderr.write"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    return found


def test_nothing_below_the_cli_prints():
    files = sorted(p for pkg in ("featstore", "probe") for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 50
    offenders = [hit for p in files if str(p.relative_to(REPO)) not in MAY_PRINT for hit in _prints(p)]
    assert offenders == []
    assert _prints(REPO / "featstore" / "cli.py")  # the scan sees the CLI's own output
