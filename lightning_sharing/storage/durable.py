"""Making a batch of written files durable together: write-back started at close, one concurrent round of fsyncs.

``LocalStore.write_batch()`` hands each file it writes to a ``DurableBatch`` instead of fsyncing it on close:
``start_writeback`` asks the kernel to begin writing the file's pages at once (the disk works while the next file
is written), and ``DurableBatch.sync`` fsyncs every file at the end, concurrently, on the descriptor that wrote it.

Example:
    >>> import os, tempfile
    >>> batch = DurableBatch()
    >>> fd, name = tempfile.mkstemp()
    >>> os.write(fd, b"data")
    4
    >>> start_writeback(fd); batch.add(fd, Path(name)); batch.sync()   # durable, and fd closed
    >>> os.unlink(name)
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import CheckpointError

__all__ = ["DurableBatch", "start_writeback"]

log = logging.getLogger(__name__)

_SYNC_THREADS = 8
_BATCH_OPEN_FILES = 64  # a batch holding this many open files makes them durable before taking more
_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> object | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_sync_file_range = _libc_sync_file_range() if sys.platform.startswith("linux") else None


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting (Linux ``sync_file_range``).

    The disk then works while the next file is written, and the fsync at the end of the batch only
    waits for what is left. A refusal is harmless: that fsync then does all the work, as it would
    where the call does not exist; write-back errors are reported by the fsync either way.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]


class DurableBatch:
    """The files of one ``LocalStore.write_batch()`` block, fsynced together when it ends.

    Each file stays open until it is fsynced: an fsync reports write-back errors to the descriptors
    that were open when they happened, so syncing a descriptor opened later could miss one. One
    concurrent round of fsyncs lets the filesystem join them into a few journal commits, where an
    fsync per file, in order, waits for one commit each.
    """

    def __init__(self) -> None:
        self.files: list[tuple[int, Path]] = []

    def add(self, fd: int, path: Path) -> None:
        """Take ownership of ``fd`` (``path``, fully written); ``sync`` or ``close`` closes it."""
        self.files.append((fd, path))
        if len(self.files) >= _BATCH_OPEN_FILES:
            self.sync()

    def sync(self) -> None:
        """fsync and close every file taken so far; raises the first failure (after all were tried)."""
        files, self.files = self.files, []
        try:
            if len(files) == 1:
                _fsync(*files[0])
            elif files:
                with ThreadPoolExecutor(max_workers=min(_SYNC_THREADS, len(files)),
                                        thread_name_prefix="lightning_sharing-fsync") as pool:
                    for future in [pool.submit(_fsync, fd, path) for fd, path in files]:
                        future.result()
        finally:
            _close_all(fd for fd, _ in files)

    def close(self) -> None:
        """Close the files not synced yet (the block failed: they need not be durable)."""
        files, self.files = self.files, []
        _close_all(fd for fd, _ in files)


def _fsync(fd: int, path: Path) -> None:
    try:
        fault_point("save:sync")
        os.fsync(fd)
    except OSError as exc:
        raise CheckpointError(f"making {path} durable (fsync) failed: {exc}") from exc


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:  # closing only releases the descriptor; a failed write was reported by fsync
            log.debug("closing descriptor %d: %s", fd, exc)
