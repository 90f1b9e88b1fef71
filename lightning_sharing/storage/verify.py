"""Reading a checkpoint's files only as the manifest describes them: its manifest, then each listed file.

Example:
    >>> manifest = read_manifest(store, root)                                  # doctest: +SKIP
    >>> location = verify_entry(store, root, manifest.all_files()[0], VerifyMode.CHECKSUM, "model")
    ... # doctest: +SKIP
"""

from __future__ import annotations

from lightning_sharing._faults import fault_point
from lightning_sharing.core.options import VerifyMode
from lightning_sharing.errors import CheckpointNotFoundError, CorruptCheckpointError, ManifestError
from lightning_sharing.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, CheckpointManifest, FileEntry
from lightning_sharing.format.safetensors_io import CHECKSUM_ALGORITHM, stream_checksum
from lightning_sharing.storage.base import CheckpointStore

__all__ = ["check_algorithm", "checksum_mismatch", "read_manifest", "verify_entry"]


def read_manifest(store: CheckpointStore, root: str, display: str | None = None) -> CheckpointManifest:
    """Read and validate the manifest of the checkpoint at ``root``; raises ``ManifestError``.

    ``display`` is how the checkpoint is named in errors (the caller's spelling of the path).
    """
    shown = display if display is not None else root
    if not store.is_dir(root):
        if store.size(root) is None:  # nothing there, or a dangling link
            raise CheckpointNotFoundError(f"Checkpoint file not found: {shown} does not exist (a "
                                          "lightning_sharing checkpoint is a directory)")
        raise ManifestError(f"{shown} is not a checkpoint directory (it is a file)")
    location = store.join(root, MANIFEST_NAME)
    named = store.join(shown, MANIFEST_NAME)
    if store.check_inside(root, MANIFEST_NAME) is not None:
        raise ManifestError(
            f"{named} is a symbolic link; a checkpoint's manifest must be a regular file inside it "
            "(refusing a checkpoint that may have been tampered with)"
        )
    size = store.size(location)
    if size is None:
        raise ManifestError(
            f"{named} is missing: {shown} is not a complete lightning_sharing checkpoint "
            "(the save may have been interrupted); use find_latest_checkpoint() to pick a complete one"
        )
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{named} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
    return CheckpointManifest.parse(store.read_bytes(location), named)


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
