"""The architecture, checked: SQL stays in the storage package, the model stays pure.

Adapters (transport, backend, CLI, atomic enqueue, history) reach the store only
through ``celery_eventstore.storage``'s face, never a module inside it, and never
build SQL or catch SQLAlchemy's exceptions themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "celery_eventstore"
STORAGE = PACKAGE / "storage"

#: What an adapter may use of SQLAlchemy: types to accept a caller's connection.
ALLOWED_SQLALCHEMY = {"Connection", "Engine", "URL"}
#: The demo plays the part of a user's application: it owns a table of its own.
APPLICATION_CODE = {"demo.py"}


def _modules_outside_storage() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py")
        if STORAGE not in p.parents and p.name not in APPLICATION_CODE
    )


def _imports(tree: ast.AST, path: Path) -> list[str]:
    """Absolute names of every module imported by the file at ``path``."""
    package = ["celery_eventstore", *path.relative_to(PACKAGE).parent.parts]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def _sqlalchemy_uses(tree: ast.AST) -> set[str]:
    """Attributes used on the ``sa``/``sqlalchemy`` module names."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in {"sa", "sqlalchemy"}
    }


@pytest.mark.parametrize("path", _modules_outside_storage(), ids=lambda p: p.name)
def test_adapters_use_only_the_storage_face(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    submodules = {p.stem for p in STORAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    deep = [
        name for name in _imports(tree, path)
        if name.startswith("celery_eventstore.storage.")
        and name.split(".")[2] in submodules - {"__init__"}
    ]
    assert not deep, f"{path.name} reaches inside the storage package: {deep}"
    sql = _sqlalchemy_uses(tree) - ALLOWED_SQLALCHEMY
    assert not sql, f"{path.name} uses SQLAlchemy beyond connection types: {sorted(sql)}"
    from_imports = [n for n in _imports(tree, path) if n.startswith("sqlalchemy.")]
    assert not from_imports, f"{path.name} imports from SQLAlchemy: {from_imports}"


def test_the_model_does_no_io() -> None:
    lifecycle = PACKAGE / "lifecycle"
    paths = sorted(lifecycle.rglob("*.py")) if lifecycle.is_dir() else [PACKAGE / "lifecycle.py"]
    for path in paths:
        imported = _imports(ast.parse(path.read_text(), str(path)), path)
        io = [n for n in imported if n.split(".")[0] in {"sqlalchemy", "kombu", "celery", "os",
                                                          "socket", "time", "threading"}]
        assert not io, f"{path.name} imports {io}"


def test_the_checks_can_fail() -> None:
    """The detectors themselves: a deep import and a SQL builder are both found."""
    bad = PACKAGE / "bad_adapter_for_test.py"
    source = "from .storage.dialects import Dialect\nimport sqlalchemy as sa\nq = sa.select(1)\n"
    tree = ast.parse(source)
    assert "celery_eventstore.storage.dialects" in _imports(tree, bad)
    assert _sqlalchemy_uses(tree) - ALLOWED_SQLALCHEMY == {"select"}
