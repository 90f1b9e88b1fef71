"""lightning_sharing: explicit, verified, atomic distributed checkpoints driven by sharing patterns.

Example:
    >>> from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent
    >>> coordinator = CheckpointCoordinator([StateComponent("rng", RNGState(), SharingPattern.PER_RANK)])
"""

from lightning_sharing.core.declarations import SharingPattern, StateComponent, ValidationLevel
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.engine.coordinator import CheckpointCoordinator
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
from lightning_sharing.fabric.strategy import FabricSharingStrategy
from lightning_sharing.format.manifest import CheckpointManifest, ComponentManifest, FileEntry
from lightning_sharing.lightning.checkpoint_io import SharingCheckpointIO
from lightning_sharing.lightning.layout import BuiltinState
from lightning_sharing.lightning.strategy import SharingStrategy
from lightning_sharing.statefuls.metrics import MetricState
from lightning_sharing.statefuls.rng import RNGState
from lightning_sharing.storage.local import find_latest_checkpoint

__version__ = "0.1.0"

__all__ = [
    "BackgroundSaver",
    "BuiltinState",
    "CheckpointCoordinator",
    "CheckpointError",
    "CheckpointManifest",
    "CheckpointNotFoundError",
    "ComponentDeclarationError",
    "ComponentManifest",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "FabricSharingStrategy",
    "FileEntry",
    "LoadResult",
    "ManifestError",
    "MetricState",
    "RNGState",
    "ReplicationMismatchError",
    "SharingCheckpointIO",
    "SharingPattern",
    "SharingStrategy",
    "StateComponent",
    "Topology",
    "TopologyMismatchError",
    "UnsupportedStateError",
    "ValidationLevel",
    "__version__",
    "find_latest_checkpoint",
]
