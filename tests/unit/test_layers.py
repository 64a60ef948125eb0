"""The layering rule, checked on the source: the core imports no component, edge and cloud never
import each other (nor partition, the apps or the heavy offline libraries).

Read from the AST rather than by importing, so a violation hidden behind a branch that tests never
take is still caught. The core may reach a component only lazily, inside a function (the CLI root
loads a verb's module when that verb runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "edgecut"
COMPONENTS = ("edgecut.edge", "edgecut.cloud", "edgecut.partition", "edgecut.apps")
# component folder -> what no module in it may import, at any depth (lazily included)
FORBIDDEN = {
    "edge": ("edgecut.cloud", "edgecut.partition", "edgecut.apps", "torch", "onnx"),
    "cloud": ("edgecut.edge", "edgecut.partition", "edgecut.apps"),
}


def _package_of(path: Path) -> list[str]:
    """The package a relative import in `path` starts from."""
    return list(path.relative_to(PACKAGE.parent).parent.parts)


def _imported(node: ast.Import | ast.ImportFrom, package: list[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: `.` is this package, `..` its parent
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    yield base
    yield from (f"{base}.{alias.name}" for alias in node.names)


def imports(path: Path, top_level_only: bool, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for each import in the file; module-level ones only if asked.

    `if TYPE_CHECKING:` blocks count as module level: they are for the type checker, but a
    component named there still ties the core to it.
    """
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = _package_of(path)
    nodes: list[ast.AST]
    if top_level_only:
        nodes = []
        pending = list(tree.body)
        while pending:
            node = pending.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    pending.extend(getattr(node, field, []))
            if isinstance(node, ast.ExceptHandler):
                pending.extend(node.body)
    else:
        nodes = list(ast.walk(tree))
    return [
        (node.lineno, name)
        for node in nodes
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in _imported(node, package)
    ]


def _hits(name: str, banned: tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def _core_files() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_core_module_imports_no_component_at_module_level(path: Path) -> None:
    bad = [f"line {n}: {name}" for n, name in imports(path, top_level_only=True) if _hits(name, COMPONENTS)]
    assert not bad, f"{path.name} (core) imports a component at module level: {bad}"


@pytest.mark.parametrize("component", sorted(FORBIDDEN))
def test_component_never_imports_a_forbidden_layer(component: str) -> None:
    bad = [
        f"{path.relative_to(PACKAGE)} line {n}: {name}"
        for path in sorted((PACKAGE / component).rglob("*.py"))
        for n, name in imports(path, top_level_only=False)
        if _hits(name, FORBIDDEN[component])
    ]
    assert not bad, f"edgecut/{component} imports what it must not: {bad}"


def test_the_checker_sees_lazy_relative_and_guarded_imports() -> None:
    """The rule is only as good as the parser: these spellings must all be found."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from edgecut.cloud import service\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\n"
        "def f():\n    from edgecut.partition.load import load_model\n"
        "from ..cloud import batcher\n"
    )
    path = PACKAGE / "edge" / "probe.py"  # parsed from `source`, never written
    top = {name for _, name in imports(path, top_level_only=True, source=source)}
    every = {name for _, name in imports(path, top_level_only=False, source=source)}
    assert {"edgecut.cloud.service", "torch", "edgecut.cloud.batcher"} <= top
    assert "edgecut.partition.load" not in top and "edgecut.partition.load" in every
