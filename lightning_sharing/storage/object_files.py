"""One file of a checkpoint on an object store: written by ``ObjectFileWriter``, read by ``RangedReader``.

The writer sends a small file as one retried PUT and a larger one as the client's multipart upload; the reader
fetches ranged GETs with an adaptive readahead, several at once. Both run on a ``RetryingClient``.

Example:
    >>> from lightning_sharing.storage.object_store import open_client
    >>> client, key, policy = open_client("memory://bucket/demo")
    >>> calls = RetryingClient(client, policy)
    >>> with ObjectFileWriter(calls, key + "/x", "memory://bucket/demo/x") as sink:
    ...     _ = sink.write(b"hello")
    >>> RangedReader(calls, key + "/x", 5, "memory://bucket/demo/x").read()
    b'hello'
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import ObjectStoreError
from lightning_sharing.storage.retry import RetryingClient, http_status

__all__ = ["PART_SIZE", "ObjectFileWriter", "RangedReader"]

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_SIZE = 16 * 1024 * 1024  # a larger file is a multipart upload of parts this size
# A reader fetches at least _READAHEAD_MIN bytes per request (headers and small tensors come in one GET), doubling
# up to _READAHEAD_MAX while reading on, back after a seek; as ranged GETs of _READ_CHUNK bytes, several at once.
_READAHEAD_MIN, _READAHEAD_MAX, _READ_CHUNK = 1024 * 1024, 64 * 1024 * 1024, 8 * 1024 * 1024


class ObjectFileWriter:
    """One file: a small one is one retried PUT at the end; a larger one goes up as the client's multipart upload
    (its parts retried by the library). Nothing is visible before a normal exit and nothing is left after an error.
    The fault point ``save:write`` fires once the first part (or the single PUT) is handed to the store."""

    def __init__(self, calls: RetryingClient, key: str, location: str) -> None:
        self._calls, self._key, self._location = calls, key, location
        self._buffer, self._stream, self._open = bytearray(), None, True
        #: The object's version (ETag) once a single PUT stored it; None for a multipart upload.
        self.version: str | None = None

    def __enter__(self) -> ObjectFileWriter:
        return self

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if not self._open:
            raise ObjectStoreError(f"{self._location}: the writer is closed")
        try:
            if self._stream is None and len(self._buffer) + len(view) < PART_SIZE:
                self._buffer += view
            elif self._stream is None:
                self._stream = self._run("start writing", lambda: self._calls.client.open_writer(self._key, PART_SIZE))
                self._send(memoryview(self._buffer))
                self._buffer = bytearray()
                self._send(view)
                fault_point("save:write")
            else:
                self._send(view)
        except BaseException:
            self._abort()
            raise
        return len(view)

    def _run(self, what: str, call: Callable[[], T]) -> T:
        return self._calls.run(f"{what} {self._location}", call, retried=False)

    def _send(self, view: memoryview) -> None:
        for start in range(0, len(view), PART_SIZE):
            self._run("write", lambda start=start: self._stream.write(view[start:start + PART_SIZE]))

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            return self._abort()
        try:
            if self._stream is None:
                fault_point("save:write")
                self.version = self._calls.put(self._key, bytes(self._buffer))
                self._buffer = bytearray()
            else:
                self._run("complete", self._stream.commit)
            self._open = False
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        stream, self._stream, self._open, self._buffer = self._stream, None, False, bytearray()
        try:
            if stream is not None:
                stream.abort()
        except Exception as exc:  # the error that made us abort is the one to report
            log.warning("%s: aborting the upload failed (%s); the next save of its checkpoint removes it",
                        self._location, exc)


class RangedReader(io.RawIOBase):
    """A read-only file over one object, read by ranged GETs with an adaptive readahead (see ``_READAHEAD_MIN``)."""

    def __init__(self, calls: RetryingClient, key: str, size: int, location: str) -> None:
        super().__init__()
        self._calls, self._key, self._size, self._pos, self._location = calls, key, size, 0, location
        self._buffer, self._buffer_start = bytearray(), 0
        self._ahead, self._next = _READAHEAD_MIN, -1  # readahead now; where a sequential read would go on

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._pos = position
        return position

    def _fetch(self, start: int, view: memoryview) -> None:
        def one(low: int) -> None:
            high = min(low + _READ_CHUNK, len(view))
            try:
                got = self._calls.read_into(self._key, start + low, view[low:high])
            except ObjectStoreError as exc:
                if http_status(exc) != 416:  # 416: the range starts past the end (the object was replaced since)
                    raise
                got = 0
            if got != high - low:
                raise ObjectStoreError(f"{self._location} has fewer than {start + high} bytes: bytes {start + low}-"
                                       f"{start + high - 1} were asked for")

        lows = range(0, len(view), _READ_CHUNK)
        if len(lows) == 1:
            return one(0)
        pool = ThreadPoolExecutor(min(self._calls.max_concurrency, len(lows)))
        try:
            list(pool.map(one, lows))
        finally:  # nothing may write into the caller's buffer once this returns
            pool.shutdown(cancel_futures=True)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        offset, done = self._pos - self._buffer_start, 0
        if want and 0 <= offset < len(self._buffer):
            done = min(want, len(self._buffer) - offset)
            view[:done] = self._buffer[offset:offset + done]
        if done < want:
            at, rest = self._pos + done, want - done
            sequential = at == self._next or (done and at == self._buffer_start + len(self._buffer))
            self._ahead = min(2 * self._ahead, _READAHEAD_MAX) if sequential else _READAHEAD_MIN
            if rest >= self._ahead:
                self._fetch(at, view[done:want])
            else:
                block = bytearray(min(self._size, at + self._ahead) - at)
                self._fetch(at, memoryview(block))
                self._buffer, self._buffer_start = block, at
                view[done:want] = block[:rest]
        self._pos += want
        self._next = self._pos
        return want
