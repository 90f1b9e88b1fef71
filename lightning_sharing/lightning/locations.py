"""Where a ``SharingStrategy``'s checkpoints are: comparing locations, retention, fallback and ``"last"``.

Every location may be a local path or an object-store URL (``s3://bucket/run/last.ckpt``), so none goes
through ``Path()`` or ``os.path.realpath()`` (``Path("s3://b/x")`` is ``s3:/b/x``): locations are compared by
``location_key`` (the real path, or the store's normalized URL), directories found with the store's ``parent``,
and checkpoints listed and read with the storage options that apply to each (``options_for(path)``).

Example:
    >>> locations = CheckpointLocations(lambda path: None)
    >>> locations.parent("memory://runs/a/last.ckpt/")
    'memory://runs/a'
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_sharing.checkpoint.discovery import complete_checkpoints
from lightning_sharing.checkpoint.manifest import CheckpointManifest
from lightning_sharing.errors import ManifestError
from lightning_sharing.integration.common import is_object_url, location_key
from lightning_sharing.integration.compat import checkpoint_dir
from lightning_sharing.storage import store_for

__all__ = ["CheckpointLocations"]

log = logging.getLogger(__name__)

OptionsFor = Callable[[Any], "dict[str, Any] | None"]


class CheckpointLocations:
    """Location logic of one strategy; ``options_for(path)`` gives the storage options for a path."""

    def __init__(self, options_for: OptionsFor) -> None:
        self.options_for = options_for

    def key(self, path: Any) -> str:
        """``path`` in a form equal for equal locations (see ``integration.common.location_key``)."""
        return location_key(path, self.options_for(path))

    def parent(self, path: Any) -> str:
        """The directory (prefix) holding the checkpoint at ``path``."""
        text = os.fspath(path)
        if is_object_url(text):
            store = store_for(text, self.options_for(text))
            return store.parent(store.normalize(text))
        return str(Path(text).parent)  # spelled like ``path`` (relative stays relative)

    # ------------------------------------------------------------------ retention
    def reason_to_keep(self, path: str, resumed_from: str | None, trainer: Any) -> str | None:
        """Why retention must not delete ``path`` (None: it may).

        Kept: the checkpoint training resumed from (``resumed_from`` is its ``key``), the newest complete checkpoint
        in its directory, and, for a URL, one outside every ModelCheckpoint directory: Lightning's ModelCheckpoint
        only spares those on local filesystems, and asks to remove any URL (``_should_remove_checkpoint``).
        """
        key = self.key(path)
        if resumed_from is not None and key == resumed_from:
            return "training resumed from it"
        newest = complete_checkpoints(self.parent(path), self.options_for(path))
        if newest and self.key(newest[0][0]) == key:
            return "it is the newest complete checkpoint in its directory"
        if is_object_url(path) and trainer is not None:
            dirs = [self.key(d) for d in _checkpoint_dirs(trainer) if is_object_url(d)]
            if dirs and not any(key.startswith(d.rstrip("/") + "/") for d in dirs):
                return f"it is outside the ModelCheckpoint directory ({', '.join(dirs)})"
        return None

    # ------------------------------------------------------------------ fallback
    def previous_checkpoints(self, failed: Any) -> list[str]:
        """Complete checkpoints beside ``failed``, newest first by step, not newer than it, itself excluded."""
        options = self.options_for(failed)
        failed_key = self.key(failed)
        try:
            limit = CheckpointManifest.load(failed, options).step
        except ManifestError:
            limit = None
        return [str(path) for path, step in complete_checkpoints(self.parent(failed), options)
                if self.key(path) != failed_key and (limit is None or step <= limit)]

    # ------------------------------------------------------------------ ckpt_path="last"
    def resolve_last(self, trainer: Any) -> Any:
        """The newest complete ``last*.ckpt`` of the Trainer's ModelCheckpoints when one of them saves to a URL.

        Newest by the manifest's step, then its creation time (never by modification time); None (with a warning)
        when there is none; ``NotImplemented`` when every directory is local, for Lightning to resolve.
        """
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        dirs = [(cb, directory) for cb in callbacks if (directory := checkpoint_dir(cb, trainer))]
        if not any(is_object_url(directory) for _, directory in dirs):
            return NotImplemented
        found: list[tuple[int, str, str]] = []
        for callback, directory in dirs:
            last = re.compile(rf"{re.escape(callback.CHECKPOINT_NAME_LAST)}(-\d+)?{re.escape(callback.FILE_EXTENSION)}")
            options = self.options_for(directory)
            # Newest first: the first "last" of a directory is its newest.
            for path, step in complete_checkpoints(directory, options):
                if last.fullmatch(os.path.basename(os.fspath(path).rstrip("/"))):
                    found.append((step, CheckpointManifest.load(path, options).created_at, str(path)))
                    break
        if not found:
            rank_zero_warn(f'ckpt_path="last" is set, but there is no complete last checkpoint in '
                           f"{', '.join(str(d) for _, d in dirs)}. No checkpoint will be loaded.")
            return None
        newest = max(found)[2]
        log.info("ckpt_path='last' resolves to %s (the newest complete last checkpoint)", newest)
        return newest


def _checkpoint_dirs(trainer: Any) -> list[str]:
    return [directory for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
            if (directory := checkpoint_dir(cb, trainer))]
