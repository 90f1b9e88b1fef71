"""Finding checkpoints: which entries of a directory (or prefix) are complete, and which is newest.

A checkpoint is complete when its manifest exists and parses; "newest" goes by the step the
manifest records (else the number in the name), then by creation time, never by modification time.

Example:
    >>> find_latest_checkpoint("checkpoints")          # doctest: +SKIP
    PosixPath('checkpoints/step=1500.ckpt')
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from lightning_sharing.checkpoint.manifest import CheckpointManifest, read_manifest
from lightning_sharing.errors import ManifestError
from lightning_sharing.storage import is_url, store_for
from lightning_sharing.storage.base import CheckpointStore

__all__ = ["checkpoint_step", "complete_checkpoints", "find_complete", "find_latest_checkpoint",
           "newest_complete"]

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"step[=_-]?(\d+)")
_LAST_INT_RE = re.compile(r"(\d+)(?!.*\d)")


def checkpoint_step(name: str, manifest: CheckpointManifest | None = None) -> int:
    """The training step of checkpoint ``name``: the manifest's, else parsed from the name, else -1."""
    if manifest is not None and manifest.step is not None:
        return manifest.step
    match = _STEP_RE.search(name) or _LAST_INT_RE.search(name)
    return int(match.group(1)) if match else -1


def _complete(store: CheckpointStore, directory: str) -> list[tuple[str, CheckpointManifest, int]]:
    """Every complete checkpoint directly under ``directory`` as ``(location, manifest, step)``, newest first."""
    found: list[tuple[tuple[int, str, str], str, CheckpointManifest]] = []
    for location in store.list_checkpoint_candidates(directory):
        try:
            manifest = read_manifest(store, location)
        except ManifestError as exc:
            log.debug("skipping %s: %s", location, exc)
            continue
        name = store.basename(location)
        found.append(((checkpoint_step(name, manifest), manifest.created_at, name), location, manifest))
    return [(location, manifest, key[0]) for key, location, manifest in sorted(found, key=lambda item: item[0],
                                                                               reverse=True)]


def find_complete(store: CheckpointStore, directory: str) -> list[tuple[str, int]]:
    """Every complete checkpoint directly under ``directory`` in ``store`` as ``(location, step)``, newest first."""
    return [(location, step) for location, _, step in _complete(store, directory)]


def newest_complete(store: CheckpointStore, directory: str) -> tuple[str, CheckpointManifest] | None:
    """The newest complete checkpoint directly under ``directory`` and its manifest; None if there is none."""
    found = _complete(store, directory)
    return (found[0][0], found[0][1]) if found else None


def complete_checkpoints(directory: str | os.PathLike[str],
                         storage_options: dict[str, Any] | None = None) -> list[tuple[Any, int]]:
    """Every *complete* checkpoint directly under ``directory`` as ``(path, step)``, newest first.

    Local checkpoints come back as ``Path``s spelled like ``directory`` (``directory / name``), those of
    other stores as URLs. Hidden entries (staging leftovers) and symbolic links are ignored.
    """
    store = store_for(directory, storage_options)
    found = find_complete(store, store.normalize(os.fspath(directory)))
    if is_url(directory):
        return found
    return [(Path(directory) / store.basename(location), step) for location, step in found]


def find_latest_checkpoint(directory: str | os.PathLike[str],
                           storage_options: dict[str, Any] | None = None) -> Any:
    """The newest *complete* checkpoint directly under ``directory``, by step; None if there is none.

    ``directory`` is a local path (the result is a ``Path``) or an fsspec URL such as ``s3://bucket/run``
    (the result is a URL string). Ties on the step are broken by the manifest's creation time; hidden
    entries (staging leftovers) and symbolic links are ignored.

    Example:
        >>> find_latest_checkpoint("checkpoints")          # doctest: +SKIP
        PosixPath('checkpoints/step=1500.ckpt')
    """
    found = complete_checkpoints(directory, storage_options)
    return found[0][0] if found else None
