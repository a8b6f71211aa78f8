"""Imports flow one way between the package's rooms (docs/architecture.md), with no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import expire_span

PACKAGE = Path(expire_span.__file__).parent

# room -> the rooms it may import (besides itself); `config` is the leaf everyone may import
ALLOWED = {
    "config": set(),
    "memory": {"config"},
    "policies": {"config", "memory"},
    "model": {"config", "memory", "policies"},
    "tasks": {"config"},
    "training": {"config", "memory", "policies", "model", "tasks"},
    "analysis": {"config", "memory", "policies", "model", "tasks", "training"},
    "benchmarking": {"config", "memory", "policies", "model", "tasks", "training"},
    "cli": {"config", "memory", "policies", "model", "tasks", "training", "analysis",
            "benchmarking"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``expire_span...`` module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("expire_span.")}


def _graph() -> dict[str, set[str]]:
    files = {_module(path): path for path in PACKAGE.rglob("*.py")}
    return {
        module: {name for name in _imports(path) if name in files and name != module}
        for module, path in files.items()
    }


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_room_imports_a_room_to_its_left():
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if _room(module) in ALLOWED
        for target in targets
        if _room(target) != _room(module) and _room(target) not in ALLOWED[_room(module)]
    ]
    assert not wrong


def test_there_are_no_import_cycles_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles
