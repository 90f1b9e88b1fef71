"""lightning_sharing: explicit, verified, atomic distributed checkpoints driven by sharing patterns.

The core (declarations, the coordinator, storage) needs only torch; the Lightning adapters
(``SharingStrategy``, ``SharingModelParallelStrategy``, ``SharingCheckpointIO``, ``BuiltinState``,
``FabricSharingStrategy``, ``FabricSharingModelParallelStrategy``) need Lightning. Every public name is
imported when first used (PEP 562), so ``import lightning_sharing`` imports neither torch nor Lightning
(the command line starts at once). Once this package is imported, ``strategy="sharing"`` works
in ``pl.Trainer`` and ``Fabric`` (and ``strategy="sharing_model_parallel"`` in ``pl.Trainer``) whatever the import
order.

Example:
    >>> from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent
    >>> coordinator = CheckpointCoordinator([StateComponent("rng", RNGState(), SharingPattern.PER_RANK)])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_sharing import _registration
from lightning_sharing._version import __version__

if TYPE_CHECKING:
    from lightning_sharing.checkpoint.discovery import find_latest_checkpoint
    from lightning_sharing.checkpoint.manifest import CheckpointManifest, ComponentManifest, FileEntry
    from lightning_sharing.core.declarations import StateComponent
    from lightning_sharing.core.local_tier import LocalTier
    from lightning_sharing.core.options import CheckpointOptions, VerifyMode
    from lightning_sharing.core.patterns import SharingPattern, ValidationLevel
    from lightning_sharing.core.topology import Topology
    from lightning_sharing.distributed.async_save import BackgroundSaver
    from lightning_sharing.engine.coordinator import CheckpointCoordinator
    from lightning_sharing.engine.export import HFExport, export_checkpoint
    from lightning_sharing.engine.hf_import import HFLoadResult, load_hf_weights
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
    from lightning_sharing.fabric.model_parallel import FabricSharingModelParallelStrategy
    from lightning_sharing.fabric.strategy import FabricSharingStrategy
    from lightning_sharing.lightning.builtins import BuiltinState
    from lightning_sharing.lightning.checkpoint_io import SharingCheckpointIO
    from lightning_sharing.lightning.model_parallel import SharingModelParallelStrategy
    from lightning_sharing.lightning.strategy import SharingStrategy
    from lightning_sharing.statefuls.metrics import MetricState
    from lightning_sharing.statefuls.optimizer import OptimizerState
    from lightning_sharing.statefuls.rng import RNGState
    from lightning_sharing.statefuls.sampler import ElasticSampler

# Every public name and the module that defines it: imported on first access (PEP 562).
_PUBLIC = {
    "BackgroundSaver": "lightning_sharing.distributed.async_save",
    "BuiltinState": "lightning_sharing.lightning.builtins",
    "CheckpointCoordinator": "lightning_sharing.engine.coordinator",
    "CheckpointError": "lightning_sharing.errors",
    "CheckpointManifest": "lightning_sharing.checkpoint.manifest",
    "CheckpointNotFoundError": "lightning_sharing.errors",
    "CheckpointOptions": "lightning_sharing.core.options",
    "ComponentDeclarationError": "lightning_sharing.errors",
    "ElasticSampler": "lightning_sharing.statefuls.sampler",
    "ComponentManifest": "lightning_sharing.checkpoint.manifest",
    "CorruptCheckpointError": "lightning_sharing.errors",
    "DistributedCheckpointError": "lightning_sharing.errors",
    "FabricSharingModelParallelStrategy": "lightning_sharing.fabric.model_parallel",
    "FabricSharingStrategy": "lightning_sharing.fabric.strategy",
    "FileEntry": "lightning_sharing.checkpoint.manifest",
    "HFExport": "lightning_sharing.engine.export",
    "HFLoadResult": "lightning_sharing.engine.hf_import",
    "LoadResult": "lightning_sharing.engine.load_plan",
    "LocalTier": "lightning_sharing.core.local_tier",
    "ManifestError": "lightning_sharing.errors",
    "MetricState": "lightning_sharing.statefuls.metrics",
    "OptimizerState": "lightning_sharing.statefuls.optimizer",
    "RNGState": "lightning_sharing.statefuls.rng",
    "ReplicationMismatchError": "lightning_sharing.errors",
    "SharingCheckpointIO": "lightning_sharing.lightning.checkpoint_io",
    "SharingModelParallelStrategy": "lightning_sharing.lightning.model_parallel",
    "SharingPattern": "lightning_sharing.core.patterns",
    "SharingStrategy": "lightning_sharing.lightning.strategy",
    "StateComponent": "lightning_sharing.core.declarations",
    "Topology": "lightning_sharing.core.topology",
    "TopologyMismatchError": "lightning_sharing.errors",
    "UnsupportedStateError": "lightning_sharing.errors",
    "ValidationLevel": "lightning_sharing.core.patterns",
    "VerifyMode": "lightning_sharing.core.options",
    "export_checkpoint": "lightning_sharing.engine.export",
    "find_latest_checkpoint": "lightning_sharing.checkpoint.discovery",
    "load_hf_weights": "lightning_sharing.engine.hf_import",
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
    "ElasticSampler",
    "FabricSharingModelParallelStrategy",
    "FabricSharingStrategy",
    "FileEntry",
    "HFExport",
    "HFLoadResult",
    "LoadResult",
    "LocalTier",
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
    "load_hf_weights",
]


# Imported with the first public name: they register adapters that StateComponent applies (a torchmetrics Metric
# declared as it is becomes MetricState(metric)), as an eager import of the package would have done.
_ADAPTER_MODULES = ("lightning_sharing.statefuls.metrics",)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_sharing' has no attribute {name!r}")
    for adapters in _ADAPTER_MODULES:
        importlib.import_module(adapters)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


_registration.install()
