"""lightning_sharing: explicit, verified, atomic distributed checkpoints driven by sharing patterns.

Example:
    >>> from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent
    >>> coordinator = CheckpointCoordinator([StateComponent("rng", RNGState(), SharingPattern.PER_RANK)])
"""

from lightning_sharing.async_save import BackgroundSaver
from lightning_sharing.checkpoint_io import SharingCheckpointIO
from lightning_sharing.coordinator import CheckpointCoordinator
from lightning_sharing.errors import (
    CheckpointError,
    ComponentDeclarationError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    ManifestError,
    ReplicationMismatchError,
    TopologyMismatchError,
    UnsupportedStateError,
)
from lightning_sharing.fabric import FabricSharingStrategy
from lightning_sharing.lightning_layout import BuiltinState
from lightning_sharing.loading import LoadResult
from lightning_sharing.manifest import CheckpointManifest, ComponentManifest, FileEntry
from lightning_sharing.metrics import MetricState
from lightning_sharing.rng import RNGState
from lightning_sharing.storage import find_latest_checkpoint
from lightning_sharing.strategy import SharingStrategy
from lightning_sharing.topology import Topology
from lightning_sharing.types import SharingPattern, StateComponent, ValidationLevel

__version__ = "0.1.0"

__all__ = [
    "BackgroundSaver",
    "BuiltinState",
    "CheckpointCoordinator",
    "CheckpointError",
    "CheckpointManifest",
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
