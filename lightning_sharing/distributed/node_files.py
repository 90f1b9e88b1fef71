"""Files handed between the ranks of one node through shared memory (``/dev/shm``), for read-once loads.

On one node, a read-once load's reader writes each file it fetched into a shared-memory file once and the other
ranks map it, instead of receiving it over the process group (a socket per peer under gloo). Measured with
``benchmarks/read_once.py`` (4 ranks, one node): see docs/storage.md. No collective runs here: the ranks learn the
files' names from a token the caller broadcasts, and when to open and remove them from the caller's agreement steps
(a file is opened only after the step in which it was written succeeded on every rank, and removed by its writer
only after the next step, once every rank has read it; on Linux an open mapping outlives the removal anyway).

Example:
    >>> files = NodeFiles("4f2c")                                     # the same token on every rank
    >>> files.put(0, "3", b"abc")                                     # on the reader   # doctest: +SKIP
    >>> bytes(files.get(0, "3", 3))                                   # on the others   # doctest: +SKIP
    b'abc'
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

__all__ = ["SHARED_MEMORY", "NodeFiles"]

#: Where shared-memory files live (a tmpfs on Linux).
SHARED_MEMORY = "/dev/shm"


class NodeFiles:
    """Shared-memory files of one load, named by ``token`` (the same on every rank), the writing rank and a number."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._written: list[str] = []

    @staticmethod
    def available() -> bool:
        """Whether this machine has a writable shared-memory directory."""
        return os.path.isdir(SHARED_MEMORY) and os.access(SHARED_MEMORY, os.W_OK | os.X_OK)

    def path(self, writer: int, name: str) -> str:
        """The file ``writer`` writes as ``name``."""
        return os.path.join(SHARED_MEMORY, f"lightning-sharing-{self.token}-{writer}-{name}")

    def written(self) -> list[str]:
        """The files this rank wrote and has not removed yet."""
        return list(self._written)

    def put(self, writer: int, name: str, data: Any) -> None:
        """Write ``data`` (bytes-like) as file (``writer``, ``name``); ``remove`` removes it."""
        path = self.path(writer, name)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._written.append(path)
        with os.fdopen(descriptor, "wb", buffering=0) as handle:
            view, done = memoryview(data).cast("B"), 0
            while done < len(view):
                done += handle.write(view[done:])

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
            if path in self._written:
                self._written.remove(path)
