"""Files handed between the ranks of one node through shared memory (``/dev/shm``), for read-once loads.

On one node, a read-once load's reader writes each file it fetched into a shared-memory file once and the other
ranks map it, instead of receiving it over the process group (a socket per peer under gloo); ``benchmarks/read_once.py``
compares the two. No collective runs here: the ranks learn the files' names from a token the caller broadcasts, and
when to open and remove them from the caller's agreement steps (a file is opened only after the step in which it
was written succeeded on every rank, and removed by its writer only after the next step, once every rank has read
it; on Linux an open mapping outlives the removal anyway). A file shared memory cannot take (a container's small
``/dev/shm``) is reported by ``put``, and the caller sends it over the process group instead.

A process killed during a load (SIGKILL, the OOM killer) cannot remove its files, and a tmpfs file holds its RAM
until it is removed. So a writer keeps a shared ``flock`` on each file while it exists (the kernel drops it when the
process dies), and every ``NodeFiles`` made on a node first removes the files of this package that nobody locks and
that are older than ``_STALE_AFTER_S`` (a file just created may not be locked yet).

Example:
    >>> files = NodeFiles("4f2c")                                     # the same token on every rank
    >>> files.put(0, "3", b"abc")                                     # on the reader   # doctest: +SKIP
    >>> bytes(files.get(0, "3", 3))                                   # on the others   # doctest: +SKIP
    b'abc'
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import mmap
import os
import time
from typing import Any

__all__ = ["SHARED_MEMORY", "NodeFiles", "remove_stale_files"]

log = logging.getLogger(__name__)

#: Where shared-memory files live (a tmpfs on Linux).
SHARED_MEMORY = "/dev/shm"
_PREFIX = "lightning-sharing-"
_STALE_AFTER_S = 60.0


def remove_stale_files(directory: str | None = None, older_than_s: float = _STALE_AFTER_S) -> list[str]:
    """Remove this package's files in ``directory`` (default: shared memory) that no live process holds (their
    writer died); returns them."""
    directory = SHARED_MEMORY if directory is None else directory
    removed = []
    for path in glob.glob(os.path.join(directory, _PREFIX + "*")):
        try:
            if time.time() - os.stat(path).st_mtime < older_than_s:
                continue
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its writer is alive and holds it
            continue
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(path)
        finally:
            os.close(descriptor)
    if removed:
        log.warning("removed %d shared-memory file(s) left by a load whose process died: %s", len(removed),
                    ", ".join(removed[:4]))
    return removed


class NodeFiles:
    """Shared-memory files of one load, named by ``token`` (the same on every rank), the writing rank and a number."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._written: list[str] = []
        self._locks: dict[str, int] = {}  # path -> the descriptor holding its flock while it exists
        if self.available():
            remove_stale_files()

    @staticmethod
    def available() -> bool:
        """Whether this machine has a writable shared-memory directory."""
        return os.path.isdir(SHARED_MEMORY) and os.access(SHARED_MEMORY, os.W_OK | os.X_OK)

    def path(self, writer: int, name: str) -> str:
        """The file ``writer`` writes as ``name``."""
        return os.path.join(SHARED_MEMORY, f"{_PREFIX}{self.token}-{writer}-{name}")

    def written(self) -> list[str]:
        """The files this rank wrote and has not removed yet."""
        return list(self._written)

    def put(self, writer: int, name: str, data: Any) -> bool:
        """Write ``data`` (bytes-like) as file (``writer``, ``name``); ``remove`` removes it. False (and nothing
        left behind) when shared memory cannot take it (a container's small ``/dev/shm``: the caller sends the file
        another way)."""
        path = self.path(writer, name)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.warning("cannot create %s in shared memory (%s); sending it over the process group", path, exc)
            return False
        self._written.append(path)
        fcntl.flock(descriptor, fcntl.LOCK_SH)  # held until remove(): marks the file as alive
        self._locks[path] = descriptor
        try:
            view, done = memoryview(data).cast("B"), 0
            while done < len(view):
                done += os.write(descriptor, view[done:])
        except OSError as exc:  # ENOSPC: a full tmpfs
            log.warning("cannot write %s into shared memory (%s); sending it over the process group", path, exc)
            self.remove([path])
            return False
        return True

    def get(self, writer: int, name: str, size: int) -> memoryview:
        """File (``writer``, ``name``), mapped read-only (``size`` bytes, known from the manifest)."""
        if size == 0:
            return memoryview(b"")
        with open(self.path(writer, name), "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)
        return memoryview(mapped)

    def remove(self, paths: list[str] | None = None) -> None:
        """Remove ``paths`` (default: every file this rank wrote); others may still map them (a mapping outlives
        its name)."""
        for path in list(self._written) if paths is None else paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if path in self._locks:
                os.close(self._locks.pop(path))
            if path in self._written:
                self._written.remove(path)
