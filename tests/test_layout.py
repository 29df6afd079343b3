"""The package's import structure: no cycles, project imports at module top, text and image
stages independent of each other (issue: one layout a newcomer can live in)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "recbole_dppmg"
NAME = "recbole_dppmg"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _targets(node, modules: dict[str, Path]) -> list[str]:
    """Project modules a top-level import statement loads (the module itself and its packages)."""
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [
            f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
            for alias in node.names
        ]
    out = []
    for name in names:
        if not name.startswith(NAME):
            continue
        parts = name.split(".")
        out += [".".join(parts[:k]) for k in range(2, len(parts) + 1) if ".".join(parts[:k]) in modules]
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for node in tree.body:
            edges.update(_targets(node, modules))
        # a submodule's own packages are loaded before it, never through it
        ancestors = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}
        graph[name] = edges - ancestors
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_project_imports_at_module_top():
    """A function-local import of a project module hides a cycle; one is allowed only with a
    comment on its line saying why."""
    offenders = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and any(
                    target.startswith(NAME) for target in _targets(inner, {n: None for n in _modules()})
                ):
                    if "#" not in lines[inner.lineno - 1]:
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    assert not offenders, "function-local project imports without a reason: " + ", ".join(sorted(set(offenders)))


def test_text_and_image_stages_do_not_import_each_other():
    graph = import_graph()
    for source, other in (("text", "image"), ("image", "text")):
        for name, edges in graph.items():
            if name.startswith(f"{NAME}.generation.{source}"):
                crossing = sorted(e for e in edges if e.startswith(f"{NAME}.generation.{other}"))
                assert not crossing, f"{name} imports {crossing}"


def test_layers_point_one_way():
    """data -> model -> tokens -> generation: a lower layer never imports a higher one."""
    order = ["data", "model", "tokens", "generation"]
    graph = import_graph()
    for name, edges in graph.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in order:
            continue
        rank = order.index(parts[1])
        higher = sorted(e for e in edges if len(e.split(".")) > 1 and e.split(".")[1] in order[rank + 1 :])
        assert not higher, f"{name} imports the higher layer {higher}"


def test_no_private_name_imported_from_another_module():
    """What another module needs is public; a leading underscore means "this module only"."""
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(NAME):
                offenders += [
                    f"{name} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not offenders, "; ".join(offenders)
