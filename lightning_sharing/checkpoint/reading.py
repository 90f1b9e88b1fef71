"""Reading a checkpoint's files only as the manifest describes them: its manifest, then each listed file.

Example:
    >>> manifest = read_manifest(store, root)                                  # doctest: +SKIP
    >>> location = verify_entry(store, root, manifest.all_files()[0], VerifyMode.CHECKSUM, "model")
    ... # doctest: +SKIP
"""

from __future__ import annotations

from lightning_sharing._faults import fault_point
from lightning_sharing.checkpoint.manifest import FileEntry
from lightning_sharing.core.options import VerifyMode
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.safetensors_io import CHECKSUM_ALGORITHM, stream_checksum
from lightning_sharing.storage.base import CheckpointStore

__all__ = ["check_algorithm", "checksum_mismatch", "verify_entry"]


def check_algorithm(entry: FileEntry, component: str) -> None:
    """Refuse a manifest entry whose checksum algorithm this version does not know."""
    algorithm = entry.checksum.split(":", 1)[0]
    if algorithm != CHECKSUM_ALGORITHM:
        raise CorruptCheckpointError(
            f"component {component!r}, file {entry.path} (written by rank {entry.rank}) uses checksum algorithm "
            f"{algorithm!r}, which is unknown"
        )


def checksum_mismatch(where: str, actual: str, expected: str) -> CorruptCheckpointError:
    """The error for a file (``where`` names it) whose checksum is not the one the manifest records."""
    return CorruptCheckpointError(
        f"{where} has checksum {actual} but the manifest records {expected}: the file is corrupt "
        "(altered after the save)"
    )


def verify_entry(store: CheckpointStore, root: str, entry: FileEntry, mode: VerifyMode | None,
                 component: str) -> str:
    """Check a listed file against its manifest entry; return its location.

    Always: a regular file inside the checkpoint. ``SIZE``: also its size. ``CHECKSUM``: also its
    checksum (the file is read once for it). ``None``: presence only (the caller verifies the bytes
    while it reads them).
    """
    fault_point("load:read")
    location = store.join(root, entry.path)
    where = f"component {component!r}, file {entry.path} (written by rank {entry.rank})"
    problem = store.check_inside(root, entry.path)
    if problem is not None:
        raise CorruptCheckpointError(f"{where} {problem}")
    size = store.size(location)
    if size is None:
        raise CorruptCheckpointError(f"{where} is missing from {root}")
    if mode is None:
        return location
    if size != entry.size:
        raise CorruptCheckpointError(
            f"{where} has {size} bytes but the manifest records {entry.size}: the file is truncated or "
            "was altered after the save"
        )
    if mode is VerifyMode.CHECKSUM:
        check_algorithm(entry, component)
        with store.open_read(location) as handle:
            actual = stream_checksum(handle)
        if actual != entry.checksum:
            raise checksum_mismatch(where, actual, entry.checksum)
    return location
