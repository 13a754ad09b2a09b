"""The package's dependencies point one way: no two parts import each other.

Parts are the package's top-level modules and subpackages (``normlab.layers``,
``normlab.kernels``, ``normlab.sync``, ...); an edge is a module-level
``from normlab.X import ...`` (function-local imports, which torch's API shape needs in
a few places, are not edges). A cycle means some module holds two jobs.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import normlab

ROOT = Path(normlab.__file__).parent


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        name = "normlab." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normlab."):
                a, b = _part(name.removesuffix(".__init__")), _part(node.module)
                if a != b:
                    edges[a].add(b)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_two_parts_of_the_package_import_each_other():
    edges = _graph()
    assert "normlab.kernels" in edges["normlab.layers"]  # the graph was read
    assert _cycle(edges) is None
