"""The shape of the code: imports run one way (no circle) and no module uses another's private names.

An AST scan of every module in ``etl/`` and ``schemas/``: each ``import`` and ``from ... import``
(at the top or inside a function, ``TYPE_CHECKING`` blocks included) is an edge of the import
graph, and a name with one leading underscore, imported from another module or reached as
``module._name``, is a private name used across modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("etl", "schemas")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The project module that ``name`` (a dotted path) is, or is inside."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, *([node.module] if node.module else [])])


def _scan(module: str, path: Path, source: str | None = None) -> Iterator[tuple[str, str | None]]:
    """(kind, detail) pairs: ("edge", target module) and ("private", what is used)."""
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    aliases: dict[str, str] = {}  # local name -> project module it names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owner(alias.name)
                if target and target != module:
                    yield "edge", target
                    if alias.name in MODULES:
                        aliases[alias.asname or alias.name.partition(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = _owner(full) if full in MODULES else _owner(base)
                if not target or target == module:
                    continue
                yield "edge", target
                if full in MODULES:
                    aliases[alias.asname or alias.name] = full
                elif _private(alias.name):
                    yield "private", f"from {base} import {alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr) and (
            node.value.id in aliases
        ):
            yield "private", f"{aliases[node.value.id]}.{node.attr}"


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    private: list[str] = []
    for module, path in MODULES.items():
        for kind, detail in _scan(module, path):
            if kind == "edge" and detail:
                edges[module].add(detail)
            elif detail:
                private.append(f"{module}: {detail}")
    return edges, private


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_whole_project() -> None:
    assert {"etl.cli", "etl.pipeline", "etl.load.loader", "etl.sandbox.app", "schemas.limits"} <= set(MODULES)
    edges, _ = _graph()
    assert "etl.pipeline" in edges["etl.cli"]  # a real edge, to prove the scan reads imports


def test_no_import_circle_in_etl_or_schemas() -> None:
    edges, _ = _graph()
    assert _circles(edges) == []


def test_no_module_uses_another_modules_private_names() -> None:
    _, private = _graph()
    assert sorted(set(private)) == []


def test_the_scan_finds_a_circle_and_a_private_name_when_there_is_one() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(edges) == [["a", "b", "c"]]
    source = "from etl.report import _hidden\nimport etl.pipeline as p\np._secret()\n"
    private = [d for k, d in _scan("etl.cli", ROOT / "etl" / "cli.py", source) if k == "private"]
    assert private == ["from etl.report import _hidden", "etl.pipeline._secret"]
