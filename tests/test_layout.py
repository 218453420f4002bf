"""The import graph has no circle: no module reaches itself through imports, module-level or inside a function.

import-linter (``make test``) checks the layers between the packages; this checks the files inside them,
where the two circles the 2026-12 review found lived (grid -> sweep -> runner -> grid, and the table
registry importing the tables that import it).  grimp, import-linter's graph builder, reads every import
statement, including the function-level ones that keep Ray and torch off the command line's start-up path.
"""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("kebench", "benchmarks", "methods", "orchestrator", "results")


def import_edges() -> dict[str, list[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    return {module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def cycles_of(edges: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges)))
    try:
        for module in sorted(edges):
            if module not in index:
                visit(module)
    finally:
        sys.setrecursionlimit(limit)
    return cycles


def test_no_import_circle() -> None:
    assert cycles_of(import_edges()) == []


def test_the_circle_finder_finds_the_old_circles() -> None:
    """The two circles of fc79b46, as edges: both found, and nothing else."""
    edges = {
        "orchestrator.grid": ["orchestrator.sweep", "orchestrator.scenarios"],
        "orchestrator.sweep": ["orchestrator.grid", "orchestrator.runner"],
        "orchestrator.runner": ["orchestrator.grid"],
        "orchestrator.scenarios": [],
        "results.registry": ["results.shapes", "results.sweeps"],
        "results.shapes": ["results.registry", "results.views"],
        "results.sweeps": ["results.registry", "results.views"],
        "results.views": [],
    }
    assert sorted(cycles_of(edges)) == [["orchestrator.grid", "orchestrator.runner", "orchestrator.sweep"],
                                        ["results.registry", "results.shapes", "results.sweeps"]]
