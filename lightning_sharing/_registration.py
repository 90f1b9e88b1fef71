"""Registering ``strategy="sharing"`` (and the load hook) with Lightning without importing Lightning ourselves.

``import lightning_sharing`` must not import Lightning (the core serves plain torchrun scripts), yet
``pl.Trainer(strategy="sharing")`` and ``MyModule.load_from_checkpoint(directory)`` must work once
``lightning_sharing`` is imported, whichever of the two was imported first. So: as soon as Lightning's
``lightning.pytorch`` / ``lightning.fabric`` package has finished loading (now, or later through a small
import hook), its strategy registry gets our names, each bound to a factory that imports the adapter
when the strategy is first built; the adapter module replaces the factory with its class when it is
imported. Nothing of ours that imports Lightning runs while Lightning itself is still being imported.

Example:
    >>> import lightning_sharing            # doctest: +SKIP
    >>> import lightning.pytorch as pl      # doctest: +SKIP
    >>> pl.Trainer(strategy="sharing")      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from lightning_sharing.integration import LAZY_FLAG

__all__ = ["STRATEGIES", "install"]

#: (Lightning package, registry module, registry attribute, name, our module, our class, description)
STRATEGIES: tuple[tuple[str, str, str, str, str, str, str], ...] = (
    ("lightning.pytorch", "lightning.pytorch.strategies", "StrategyRegistry", "sharing",
     "lightning_sharing.lightning.strategy", "SharingStrategy",
     "DDP with lightning_sharing checkpoints (explicit sharing patterns)"),
    ("lightning.pytorch", "lightning.pytorch.strategies", "StrategyRegistry", "sharing_model_parallel",
     "lightning_sharing.lightning.model_parallel", "SharingModelParallelStrategy",
     "ModelParallelStrategy (FSDP2 x tensor parallel) with lightning_sharing checkpoints"),
    ("lightning.fabric", "lightning.fabric.strategies", "STRATEGY_REGISTRY", "sharing",
     "lightning_sharing.fabric.strategy", "FabricSharingStrategy",
     "DDP with lightning_sharing checkpoints (sharing patterns, per-rank RNG, atomic, verified)"),
)
_lock = threading.Lock()
log = logging.getLogger(__name__)


def _factory(module: str, name: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(**kwargs)

    build.__qualname__ = build.__name__ = f"lazy_{name}"
    setattr(build, LAZY_FLAG, True)
    return build


def _read_directory_for_module(path: str | os.PathLike[str], map_location: Any) -> dict[str, Any]:
    from lightning_sharing.lightning.checkpoint_io import SharingCheckpointIO

    return SharingCheckpointIO().load_for_module(path, map_location)


def _refuse_ignored_io(strategy: Any) -> None:
    from lightning_sharing.lightning.base import refuse_ignored_io

    refuse_ignored_io(strategy)


def _claims_url(url: str) -> bool:
    """Whether ``load_from_checkpoint(url)`` is ours to read: an object-store prefix (a checkpoint), not an object."""
    from lightning_sharing.integration.common import is_object_url, is_sharing_checkpoint_url

    if not is_object_url(url):
        return False
    try:
        return is_sharing_checkpoint_url(url)
    except Exception as exc:  # no fsspec backend, no access: Lightning's own reader reports it its way
        log.debug("not reading %s with lightning_sharing: %s", url, exc)
        return False


def _on_loaded(package: str) -> None:
    """``package`` (a Lightning package) has finished loading: give its registries our names."""
    for trigger, registry_module, attribute, name, module, cls, description in STRATEGIES:
        if trigger != package:
            continue
        registry = getattr(importlib.import_module(registry_module), attribute)
        if name not in registry:
            registry.register(name, _factory(module, cls), description=description)
    if package == "lightning.pytorch":
        # LightningModule/LightningDataModule.load_from_checkpoint(directory): see integration/compat.py.
        from lightning_sharing.integration.compat import hook_ignored_checkpoint_io, hook_load_from_checkpoint

        hook_load_from_checkpoint(_read_directory_for_module, claims=_claims_url)
        # SharingCheckpointIO handed to a strategy that never calls it: refused at setup (see integration/compat.py).
        hook_ignored_checkpoint_io(_refuse_ignored_io)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of a Lightning package so ``_on_loaded`` runs after it."""

    def __init__(self) -> None:
        self._searching: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname not in _packages() or fullname in self._searching:
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
            _on_loaded(fullname)

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _packages() -> set[str]:
    return {entry[0] for entry in STRATEGIES}


_finder = _AfterImport()


def install() -> None:
    """Make sure our names reach Lightning as soon as its packages exist (idempotent)."""
    with _lock:
        pending = False
        for package in sorted(_packages()):
            module = sys.modules.get(package)
            if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
                _on_loaded(package)
            else:
                pending = True
        if pending and _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
