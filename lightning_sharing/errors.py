"""Exception types raised by lightning_sharing.

Every refusal the package makes is one of these, so callers can catch ``CheckpointError``
and know it came from checkpoint logic rather than from their own code.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ComponentDeclarationError",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "ManifestError",
    "ReplicationMismatchError",
    "TopologyMismatchError",
    "UnsupportedStateError",
]


class CheckpointError(RuntimeError):
    """Base class of every error raised by lightning_sharing."""


class ComponentDeclarationError(CheckpointError, ValueError):
    """A ``StateComponent`` declaration (or a set of them) is invalid."""


class ManifestError(CheckpointError):
    """The manifest is missing, unreadable, of an unknown version, or inconsistent."""


class CheckpointNotFoundError(ManifestError, FileNotFoundError):
    """Nothing exists at the checkpoint path; a ``FileNotFoundError``, as Lightning raises for a missing file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated, altered, or not listed in the manifest."""


class TopologyMismatchError(CheckpointError):
    """Rank-specific state was saved under a different topology than the current one."""


class ReplicationMismatchError(CheckpointError):
    """State declared REPLICATED differs between ranks."""


class UnsupportedStateError(CheckpointError, TypeError):
    """A state dict holds a value that cannot be stored without pickle."""


class DistributedCheckpointError(CheckpointError):
    """A checkpoint operation failed on one or more ranks; raised on every rank.

    When every failing rank raised the same lightning_sharing error type (say
    ``CorruptCheckpointError``), the error raised on every rank is an instance of that type too,
    so ``except CorruptCheckpointError`` works on all ranks, failing or not.

    Attributes:
        failures: maps each failing global rank to its error message.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})


_COMBINED: dict[type, type] = {}


def distributed_error_class(kind: str | None) -> type[DistributedCheckpointError]:
    """``DistributedCheckpointError``, combined with the package error class named ``kind`` if any."""
    base = globals().get(kind or "")
    if not (isinstance(base, type) and issubclass(base, CheckpointError)) or issubclass(
        base, DistributedCheckpointError
    ) or base is CheckpointError:
        return DistributedCheckpointError
    if base not in _COMBINED:
        _COMBINED[base] = type(f"Distributed{base.__name__}", (DistributedCheckpointError, base), {
            "__module__": __name__,
            "__doc__": f"A {base.__name__} on one or more ranks, raised on every rank.",
        })
    return _COMBINED[base]
