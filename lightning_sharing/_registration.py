"""Registering ``strategy="sharing"`` with Lightning without importing Lightning ourselves.

``import lightning_sharing`` must not import Lightning (the core serves plain torchrun scripts), yet
``pl.Trainer(strategy="sharing")`` must work once ``lightning_sharing`` is imported, whichever of the
two was imported first. So: if Lightning's strategy registry is already loaded, our adapters are
imported (and register themselves) at once; otherwise a small import hook waits for Lightning's
packages to finish loading and imports them then.

Example:
    >>> import lightning_sharing            # doctest: +SKIP
    >>> import lightning.pytorch as pl      # doctest: +SKIP
    >>> pl.Trainer(strategy="sharing")      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["install"]

# Lightning package whose loading triggers ours -> our adapter module, which registers itself. The
# packages, not their ``strategies`` modules: a package has finished initialising when its hook runs,
# so our adapters can import anything from it.
_TRIGGERS = {
    "lightning.fabric": "lightning_sharing.fabric.strategy",
    "lightning.pytorch": "lightning_sharing.lightning.strategy",
}
_lock = threading.Lock()


def _register(adapter: str) -> None:
    importlib.import_module(adapter)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of a trigger module so ours is imported after it runs."""

    def __init__(self) -> None:
        self._searching: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        adapter = _TRIGGERS.get(fullname)
        if adapter is None or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        finally:
            self._searching.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            original(module)
            _register(adapter)

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


_finder = _AfterImport()


def install() -> None:
    """Make sure our strategies get registered as soon as Lightning's registries exist (idempotent)."""
    with _lock:
        pending = False
        for trigger, adapter in _TRIGGERS.items():
            if trigger in sys.modules:
                _register(adapter)
            else:
                pending = True
        if pending and _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
