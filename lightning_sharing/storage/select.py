"""Choosing the store for a location: a local filesystem for paths and ``file://``, the object store for other URLs.

Example:
    >>> type(store_for("runs/checkpoints")).__name__
    'LocalStore'
    >>> type(store_for("memory://runs/checkpoints")).__name__
    'ObjectStore'
"""

from __future__ import annotations

import os
from typing import Any

from lightning_sharing.errors import ComponentDeclarationError
from lightning_sharing.storage.base import CheckpointStore
from lightning_sharing.storage.local import LocalStore

__all__ = ["is_url", "store_for"]


def is_url(location: Any) -> bool:
    """True for ``scheme://...`` locations (``file://`` included)."""
    return "://" in os.fspath(location)


def store_for(location: Any, storage_options: dict[str, Any] | None = None) -> CheckpointStore:
    """The store holding ``location``: ``LocalStore`` for a path or ``file://`` URL (a filesystem with rename),
    ``ObjectStore`` for any other URL (``s3://``, ``memory://``, ...; ``storage_options`` choose and configure its
    client: see ``storage.client.open_client``)."""
    text = os.fspath(location)
    if not is_url(text) or text.startswith("file://"):
        if storage_options:
            raise ComponentDeclarationError(
                f"storage_options={storage_options!r} were given for the local path {text!r}; they only "
                "apply to object-store URLs such as s3://bucket/path"
            )
        return LocalStore()
    from lightning_sharing.storage.object_store import ObjectStore  # object-store clients load only for URLs

    return ObjectStore.for_url(text, storage_options)
