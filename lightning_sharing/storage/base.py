"""The storage backend interface: the file operations a checkpoint needs, and how a save commits.

A ``CheckpointStore`` serves one kind of storage (a local or shared filesystem, an object store). Locations are
strings native to it (an absolute path, a URL) built with ``join``; paths inside a checkpoint are relative POSIX
paths, as the manifest records them. A save runs, for every store:

1. ``begin_save(target, token)`` on rank 0: clean leftovers of interrupted saves and return the *write root*, where
   every rank writes (a staging directory beside the target on a filesystem with rename; a fresh generation of the
   target prefix on a store without: docs/storage.md);
2. ``check_write_root(write_root, rank)`` on every rank, then each rank's files with ``open_write``;
3. ``commit(write_root, target, token, manifest)`` on rank 0, once ``sizes`` shows every rank's files arrived: the
   manifest is written last and the checkpoint appears at ``target`` in one atomic step (a rename, or a conditional
   put of the manifest); the manifest records ``data_prefix(write_root, target)``, where the files are;
4. on any failure, ``abort(write_root, target)`` on rank 0.

Example:
    >>> store = store_for("runs/ckpt")                              # doctest: +SKIP
    >>> with store.open_write(store.join(root, "x.json")) as sink:  # doctest: +SKIP
    ...     sink.write(b"{}")
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO

from lightning_sharing.format.safetensors_io import ByteSink

__all__ = ["MANIFEST_NAME", "CheckpointStore"]

#: The file whose presence makes a checkpoint complete; every store writes it last, in its commit.
MANIFEST_NAME = "checkpoint_manifest.json"


class CheckpointStore(ABC):
    """The operations the engine runs against where checkpoints live (see the module docstring)."""

    # ------------------------------------------------------------------ locations
    def join(self, base: str, *parts: str) -> str:
        """``base`` with the relative POSIX ``parts`` appended."""
        return posixpath.join(base, *parts)

    def parent(self, location: str) -> str:
        """The directory (or prefix) holding ``location``."""
        return posixpath.dirname(location.rstrip("/"))

    def basename(self, location: str) -> str:
        """The last part of ``location``."""
        return posixpath.basename(location.rstrip("/"))

    @abstractmethod
    def normalize(self, location: str) -> str:
        """The canonical form of ``location`` (an absolute path, a URL without a trailing slash)."""

    def data_prefix(self, write_root: str, target: str) -> str | None:
        """Where a committed save's files are, relative to ``target`` (None: in ``target`` itself)."""
        return None

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def open_read(self, location: str) -> BinaryIO:
        """A binary file object with ``readinto``, ``seek`` and ``tell``, for reading ``location``."""

    @abstractmethod
    def size(self, location: str) -> int | None:
        """The size of the regular file (object) at ``location``; None when there is none."""

    def sizes(self, root: str, rels: list[str]) -> dict[str, int | None]:
        """``size`` of each of ``rels`` under ``root`` (a store may answer them all from one listing)."""
        return {rel: self.size(self.join(root, rel)) for rel in rels}

    def read_bytes(self, location: str) -> bytes:
        """The whole content of ``location``."""
        with self.open_read(location) as handle:
            return handle.read()

    @abstractmethod
    def is_dir(self, location: str) -> bool:
        """True when ``location`` is a directory (a prefix holding objects)."""

    @abstractmethod
    def list_files(self, root: str) -> list[str]:
        """Every file below ``root`` as a sorted relative POSIX path (symbolic links included, as files)."""

    @abstractmethod
    def list_checkpoint_candidates(self, directory: str) -> list[str]:
        """Locations of the entries directly under ``directory`` that may be checkpoints (no hidden names)."""

    def check_inside(self, root: str, rel: str) -> str | None:
        """Why ``rel`` under ``root`` is not a regular file of the checkpoint (a link, outside it), or None."""
        return None

    # ------------------------------------------------------------------ writing
    @abstractmethod
    def open_write(self, location: str) -> AbstractContextManager[ByteSink]:
        """A context manager yielding a ``ByteSink`` for ``location``: leaving it normally makes the file durable
        (fsync, a completed upload), or, inside ``write_batch()``, the batch's end does; an exception discards it."""

    # ------------------------------------------------------------------ incremental saves
    #: How ``reuse_file`` puts an earlier file in a new checkpoint: ``"linked"`` (a hard link), ``"copied"`` (a
    #: server-side copy); None: it cannot, and every file is written.
    reuse_kind: str | None = None

    def stamp(self, location: str) -> str | None:
        """What identifies the file at ``location`` as written, cheaply (an inode and modification time, an ETag);
        recorded in the manifest for ``reuse_file``'s check. None: the store has none."""
        return None

    def reuse_file(self, source: str, size: int, stamp: str, location: str) -> str | None:
        """Put the file at ``source`` (an earlier committed checkpoint's) at ``location`` without sending its bytes
        through this process, only if it still has ``size`` and ``stamp`` (what its manifest recorded; no re-read);
        returns the new file's stamp, or None when it did not (the caller writes the file instead)."""
        return None

    @contextmanager
    def write_batch(self) -> Iterator[None]:
        """A block whose files (``open_write``, this thread) are all durable when it ends normally; a store may
        flush them together at its end (the default flushes each as it is closed)."""
        yield

    # ------------------------------------------------------------------ committing a save
    @abstractmethod
    def begin_save(self, target: str, token: str) -> str:
        """Rank 0, first: remove leftovers of interrupted saves; return the write root for this save."""

    @abstractmethod
    def check_write_root(self, write_root: str, rank: int) -> None:
        """Every rank: raise ``CheckpointError`` when this rank cannot reach ``write_root``."""

    @abstractmethod
    def commit(self, write_root: str, target: str, token: str, manifest: bytes) -> None:
        """Rank 0, last: write ``manifest`` and make the checkpoint at ``target`` complete, atomically."""

    @abstractmethod
    def abort(self, write_root: str, target: str) -> None:
        """Rank 0, after a failed save: remove what the save wrote (never a committed checkpoint)."""

    @abstractmethod
    def remove_checkpoint(self, location: str) -> None:
        """Delete a checkpoint so that it is never seen half-deleted (it stops being complete first)."""
