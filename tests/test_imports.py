"""The package's imports run one way: no circle between its modules, no private name taken from
another module. Read from the source (every import, the lazy ones inside functions too), so a
circle fails here before it fails anyone at import time."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_trainer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _of_package(module: str | None, modules: set[str]) -> bool:
    return bool(module) and (module in modules or any(m.startswith(f"{module}.") for m in modules))


def _imports(name: str, tree: ast.Module, modules: set[str]) -> tuple[set[str], list[str]]:
    """The package modules `name` imports, and the private names it takes from them."""
    targets: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> package module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    targets.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and _of_package(node.module, modules):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if child in modules:  # `from dist_trainer import tracking`
                    targets.add(child)
                    aliases[alias.asname or alias.name] = child
                elif node.module in modules:
                    targets.add(node.module)
                    if alias.name.startswith("_"):
                        private.append(f"{name}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):  # `tracking._client(...)` is a private name taken too
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            private.append(f"{name}: {node.value.id}.{node.attr}")
    targets.discard(name)
    # A package's __init__ is imported with any of its modules: not an edge of the flow.
    return {t for t in targets if t != "dist_trainer"}, private


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph, private = {}, []
    for name, tree in modules.items():
        graph[name], taken = _imports(name, tree, set(modules))
        private += taken
    return graph, private


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_and_a_private_name():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    tree = ast.parse("from dist_trainer.x import _hidden\nfrom dist_trainer import x\nx._y()\n")
    _, private = _imports("dist_trainer.z", tree, {"dist_trainer.x", "dist_trainer.z"})
    assert private == [
        "dist_trainer.z: from dist_trainer.x import _hidden",
        "dist_trainer.z: x._y",
    ]


def test_no_circle_between_the_package_modules():
    graph, _ = _graph()
    assert len(graph) > 30, "the checker reads the package"
    assert _circles(graph) == []


def test_no_private_name_is_taken_from_another_module():
    _, private = _graph()
    assert private == []


def test_names_that_moved_still_import_from_where_they_were():
    from dist_trainer import config, driver, errors, groups, jobs

    assert config.ConfigError is errors.ConfigError
    for name in ("JobResult", "Prepared", "prepare", "check_user_code", "create_job_run"):
        assert getattr(driver, name) is getattr(jobs, name)
    assert driver.launch is groups.launch and driver.run_group is groups.run_group
