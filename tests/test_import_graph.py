"""No dpjax module imports another in a circle, and secagg primitives import no training code.

The graph is read from the source with ``ast``: every ``import``/``from ... import`` of
a ``dpjax`` module counts, also inside functions and under ``TYPE_CHECKING``;
``from dpjax import name`` counts as an import of the package's ``__init__`` (which
imports its submodules), and ``from dpjax.x import y`` of a submodule ``dpjax.x.y``
as an import of that submodule too.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpjax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_of_dpjax_has_no_cycle():
    graph = import_graph()
    # the package __init__ imports submodules, which must then not import `dpjax` itself
    assert "dpjax.clipping" in graph["dpjax"]
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_secagg_primitives_import_nothing_from_training_code():
    graph = import_graph()
    training = {"dpjax.train", "dpjax.loop", "dpjax.mechanism", "dpjax.aggregation",
                "dpjax.assembly", "dpjax.clipping", "dpjax.fast_clipping", "dpjax.noise"}
    for name, imports in graph.items():
        if name.startswith("dpjax.secagg"):
            assert not {i for i in imports if i.split(".")[:2] == ["dpjax", "secagg"]
                        or i in training} & training, (name, imports)


def test_no_module_imports_a_private_name_of_another():
    """Private helpers stay in their module (a private *module*, like ``_validate``, is a
    shared helper by design and may be imported)."""
    modules = set(import_graph())
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpjax"):
                private = [a.name for a in node.names if a.name.startswith("_")
                           and f"{node.module}.{a.name}" not in modules]
                assert not private, (path.name, node.module, private)
