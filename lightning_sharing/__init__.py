"""lightning_sharing: explicit, verified, atomic distributed checkpoints driven by sharing patterns.

The core (declarations, the coordinator, storage) needs only torch; the Lightning adapters
(``SharingStrategy``, ``SharingModelParallelStrategy``, ``SharingCheckpointIO``, ``BuiltinState``,
``FabricSharingStrategy``, ``FabricSharingModelParallelStrategy``) are imported when first used, so
``import lightning_sharing`` does not import Lightning. Once this package is imported, ``strategy="sharing"`` works
in ``pl.Trainer`` and ``Fabric`` (and ``strategy="sharing_model_parallel"`` in ``pl.Trainer``) whatever the import
order.

Example:
    >>> from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent
    >>> coordinator = CheckpointCoordinator([StateComponent("rng", RNGState(), SharingPattern.PER_RANK)])
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_sharing import _registration
from lightning_sharing._version import __version__
from lightning_sharing.checkpoint.discovery import find_latest_checkpoint
from lightning_sharing.checkpoint.manifest import CheckpointManifest, ComponentManifest, FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions, VerifyMode
from lightning_sharing.core.patterns import SharingPattern, ValidationLevel
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.engine.export import HFExport, export_checkpoint
from lightning_sharing.engine.load_plan import LoadResult
from lightning_sharing.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ComponentDeclarationError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    ManifestError,
    ReplicationMismatchError,
    TopologyMismatchError,
    UnsupportedStateError,
)
from lightning_sharing.statefuls.metrics import MetricState
from lightning_sharing.statefuls.optimizer import OptimizerState
from lightning_sharing.statefuls.rng import RNGState

# Public names that need Lightning: imported on first access (PEP 562).
_LIGHTNING_NAMES = {
    "BuiltinState": "lightning_sharing.lightning.builtins",
    "FabricSharingModelParallelStrategy": "lightning_sharing.fabric.model_parallel",
    "FabricSharingStrategy": "lightning_sharing.fabric.strategy",
    "SharingModelParallelStrategy": "lightning_sharing.lightning.model_parallel",
    "SharingCheckpointIO": "lightning_sharing.lightning.checkpoint_io",
    "SharingStrategy": "lightning_sharing.lightning.strategy",
}

__all__ = [
    "BackgroundSaver",
    "BuiltinState",
    "CheckpointCoordinator",
    "CheckpointError",
    "CheckpointManifest",
    "CheckpointNotFoundError",
    "CheckpointOptions",
    "ComponentDeclarationError",
    "ComponentManifest",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "FabricSharingModelParallelStrategy",
    "FabricSharingStrategy",
    "FileEntry",
    "HFExport",
    "LoadResult",
    "ManifestError",
    "MetricState",
    "OptimizerState",
    "RNGState",
    "ReplicationMismatchError",
    "SharingCheckpointIO",
    "SharingModelParallelStrategy",
    "SharingPattern",
    "SharingStrategy",
    "StateComponent",
    "Topology",
    "TopologyMismatchError",
    "UnsupportedStateError",
    "ValidationLevel",
    "VerifyMode",
    "__version__",
    "export_checkpoint",
    "find_latest_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _LIGHTNING_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_sharing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


_registration.install()
