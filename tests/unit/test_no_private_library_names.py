"""No private name of fsspec, s3fs or obstore is used anywhere in lightning_sharing (any minor release may change
them): no ``from fsspec.x import _y``, no ``obj._y`` where ``_y`` is a private attribute of those libraries' modules
or classes, and in storage/ no ``obj._y`` on anything but our own objects. Checked on the source's syntax tree."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_sharing"
LIBRARIES = ("fsspec", "s3fs", "obstore", "aiobotocore", "botocore")
MODULES = ["fsspec", "fsspec.spec", "fsspec.asyn", "fsspec.core", "fsspec.implementations.memory",
           "fsspec.implementations.local", "s3fs", "s3fs.core", "obstore", "obstore.store", "obstore.exceptions"]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_private_names() -> set[str]:
    """Every private name of those libraries' modules and of the classes they define."""
    names: set[str] = set()
    for module in map(importlib.import_module, MODULES):
        names |= {name for name in dir(module) if _private(name) and not inspect.ismodule(getattr(module, name))}
        for value in vars(module).values():
            if inspect.isclass(value):
                names |= {name for name in dir(value) if _private(name)}
    return names


def _own_names(folder: Path) -> set[str]:
    """Private names our own code defines in ``folder``: functions, classes, module variables, attributes of self."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
    return {name for name in names if _private(name)}


def _on_own_object(node: ast.Attribute) -> bool:
    base = node.value
    return (isinstance(base, ast.Name) and base.id in ("self", "cls")) or (
        isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super")


def _uses(folder: Path) -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                found += [(str(path.relative_to(PACKAGE)), node.lineno, f"from {node.module} import {alias.name}",
                           alias.name) for alias in node.names if _private(alias.name) or "._" in node.module]
            elif isinstance(node, ast.Import):
                found += [(str(path.relative_to(PACKAGE)), node.lineno, f"import {alias.name}", alias.name)
                          for alias in node.names if alias.name.split(".")[0] in LIBRARIES and "._" in alias.name]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and not _on_own_object(node):
                found.append((str(path.relative_to(PACKAGE)), node.lineno, ast.unparse(node), node.attr))
    return found


def test_no_private_names_of_fsspec_s3fs_or_obstore_are_used() -> None:
    library = _library_private_names()
    assert {"_call_s3", "_strip_protocol", "_parent", "_cat_file"} <= library  # the check sees what it must
    imports = [use for use in _uses(PACKAGE) if use[2].startswith(("from ", "import "))]
    attributes = [use for use in _uses(PACKAGE) if not use[2].startswith(("from ", "import ")) and use[3] in library]
    assert imports == [] and attributes == [], imports + attributes


def test_storage_touches_no_private_attribute_of_anything_but_its_own_objects() -> None:
    own = _own_names(PACKAGE / "storage")
    assert [use for use in _uses(PACKAGE / "storage") if use[3] not in own] == []
