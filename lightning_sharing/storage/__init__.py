"""Storage backends: where checkpoints live and how a save commits there (``base.CheckpointStore``); ``store_for``
picks one for a path or URL.

Example:
    >>> type(store_for("runs/checkpoints")).__name__, type(store_for("memory://runs/checkpoints")).__name__
    ('LocalStore', 'ObjectStore')
"""

from __future__ import annotations

import os
from typing import Any

from lightning_sharing.errors import ComponentDeclarationError
from lightning_sharing.storage.base import MANIFEST_NAME, CheckpointStore
from lightning_sharing.storage.client import OWN_OPTIONS
from lightning_sharing.storage.local import LocalStore

__all__ = ["MANIFEST_NAME", "OWN_OPTIONS", "CheckpointStore", "LocalStore", "is_url", "library_options",
           "remove_checkpoint", "store_for"]


def library_options(storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` without ``OWN_OPTIONS``: what to hand to fsspec directly (None stays None)."""
    return None if storage_options is None else {k: v for k, v in storage_options.items() if k not in OWN_OPTIONS}


def is_url(location: Any) -> bool:
    """True for ``scheme://...`` locations (``file://`` included)."""
    return "://" in os.fspath(location)


def store_for(location: Any, storage_options: dict[str, Any] | None = None) -> CheckpointStore:
    """The store holding ``location``: ``LocalStore`` for a path or ``file://`` URL, ``ObjectStore`` for any other URL
    (``s3://``, ``memory://``, ...; ``storage_options`` choose and configure its client: ``client.open_client``)."""
    text = os.fspath(location)
    if not is_url(text) or text.startswith("file://"):
        if storage_options:
            raise ComponentDeclarationError(
                f"storage_options={storage_options!r} were given for the local path {text!r}; they only apply to "
                "object-store URLs such as s3://bucket/path")
        return LocalStore()
    from lightning_sharing.storage.object_store import ObjectStore  # object clients load only for URLs

    return ObjectStore.for_url(text, storage_options)


def remove_checkpoint(location: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the checkpoint at ``location`` so that it is never seen half-deleted (the manifest goes first).

    On an object store a prefix holding objects lightning_sharing did not write is refused, not deleted. Run it on
    one rank (rank 0): it is not collective.
    """
    store = store_for(location, storage_options)
    store.remove_checkpoint(store.normalize(os.fspath(location)))
