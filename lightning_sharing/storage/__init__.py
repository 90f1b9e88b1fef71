"""Storage backends: where checkpoints live and how a save commits there (see ``base.CheckpointStore``).

``store_for(location)`` picks the backend: a local (or mounted) filesystem for plain paths and
``file://`` URLs (``LocalStore``); the object store for other URLs (``object_store.ObjectStore``, on one of
the object clients of ``client``: fsspec or obstore; imported when first used).

Example:
    >>> store = store_for("runs/checkpoints")
    >>> type(store).__name__
    'LocalStore'
"""

from __future__ import annotations

import os
from typing import Any

from lightning_sharing.storage.base import MANIFEST_NAME, CheckpointStore
from lightning_sharing.storage.local import LocalStore
from lightning_sharing.storage.select import is_url, store_for

__all__ = [
    "MANIFEST_NAME",
    "CheckpointStore",
    "LocalStore",
    "is_url",
    "remove_checkpoint",
    "store_for",
]


def remove_checkpoint(location: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the checkpoint at ``location`` so that it is never seen half-deleted (the manifest goes first).

    On an object store a prefix holding objects lightning_sharing did not write is refused, not deleted.
    Run it on one rank (rank 0): it is not collective.
    """
    store = store_for(location, storage_options)
    store.remove_checkpoint(store.normalize(os.fspath(location)))
