"""Choosing the store for a location: a local filesystem for paths, a backend per URL scheme.

Example:
    >>> type(store_for("runs/checkpoints")).__name__
    'LocalStore'
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
    """The store holding ``location`` (a path or an fsspec URL)."""
    text = os.fspath(location)
    if not is_url(text) or text.startswith("file://"):
        if storage_options:
            raise ComponentDeclarationError(
                f"storage_options={storage_options!r} were given for the local path {text!r}; they only "
                "apply to object-store URLs such as s3://bucket/path"
            )
        return LocalStore()
    raise ComponentDeclarationError(
        f"{text!r} is a URL; lightning_sharing writes directories on a filesystem every rank "
        "can see (local or a mounted shared filesystem), so pass a filesystem path"
    )
