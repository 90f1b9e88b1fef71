"""Checkpoint objects on any fsspec store: streamed writes, create-only and conditional puts, ranged reads.

The same calls work on ``s3://`` (s3fs, with fast paths: parallel multipart uploads, parallel ranged
GETs, ``If-None-Match`` / ``If-Match`` PUTs), ``file://`` and ``memory://`` (exact local semantics,
see ``object_generic``), and other fsspec stores (generic API, weaker guarantees). Transient failures
(throttling, 5xx, dropped connections) are retried with bounded, logged exponential backoff.

Commit without rename is built from these pieces by ``object_backend.ObjectStore`` (layout and cleanup rules in
``object_layout``; docs/storage.md): every rank streams its files into a fresh generation ``g-<token>-<base>/``
of the checkpoint's prefix with ``ObjectWriter``; rank 0 then puts the manifest naming that generation with
``put_create_only`` (a new checkpoint) or ``put_if_match`` (replacing one, with the version ``read_versioned``
returned when the save began). ``ObjectExistsError`` / ``ObjectChangedError`` mean another job committed first.
What moto's server was shown to do is in tests/unit/test_object_store_s3.py.

Example:
    >>> fs, root = open_store("memory://run/step=5.ckpt")
    >>> with ObjectWriter(fs, root + "/g-1/blob") as writer:
    ...     _ = writer.write(b"hello ")
    ...     _ = writer.write(b"world")
    >>> writer.result[0]
    11
    >>> _ = put_create_only(fs, root + "/checkpoint_manifest.json", b"{}")
    >>> buffer = bytearray(5)
    >>> read_range_into(fs, root + "/g-1/blob", 6, buffer); bytes(buffer)
    b'world'
"""

from __future__ import annotations

import errno
import logging
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xxhash

from lightning_sharing._faults import fault_point
from lightning_sharing.format.safetensors_io import CHECKSUM_ALGORITHM
from lightning_sharing.storage import object_generic as _generic
from lightning_sharing.storage import object_s3 as _s3
from lightning_sharing.storage import object_s3_prefix as _s3_prefix
from lightning_sharing.storage.object_common import (
    DEFAULT_RETRY,
    ObjectChangedError,
    ObjectExistsError,
    ObjectInfo,
    ObjectStoreError,
    RetryPolicy,
    TransientStoreError,
)

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PART_SIZE",
    "DEFAULT_READ_CHUNK",
    "DEFAULT_RETRY",
    "ConditionalSupport",
    "ObjectChangedError",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectStoreError",
    "ObjectWriter",
    "RetryPolicy",
    "TransientStoreError",
    "delete_objects",
    "delete_prefix",
    "find_objects",
    "list_dir",
    "object_info",
    "open_store",
    "probe_conditional_writes",
    "put_create_only",
    "put_if_match",
    "read_range_into",
    "read_versioned",
    "write_object",
]

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 8
DEFAULT_READ_CHUNK = 16 * 1024 * 1024


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` for a URL or local path; ``storage_options`` go to the fsspec filesystem.

    Example:
        >>> fs, path = open_store("memory://bucket/run")
        >>> path
        '/bucket/run'
    """
    from fsspec.core import url_to_fs

    return url_to_fs(url, **(storage_options or {}))


def _byte_view(data: Any) -> memoryview:
    view = memoryview(data)
    if not view.contiguous:
        raise ValueError("object writes need contiguous buffers")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _missing(fs: Any, path: str) -> FileNotFoundError:
    # s3fs's own message ("The specified key does not exist.") does not say which object.
    return FileNotFoundError(errno.ENOENT, "no such object", _generic.shown(fs, path))


def _part_size(part_size: int, size_hint: int | None) -> int:
    if not size_hint:
        return part_size
    mib = 1024 * 1024
    needed = math.ceil(size_hint / (_s3.MAX_PARTS - 1) / mib) * mib  # one part spare: hints may be a bit low
    return max(part_size, needed)


class ObjectWriter:
    """Streams one object to a store; ``(size, checksum)`` of what was written, checksum as ``"xxh3_128:<hex>"``.

    On S3, parts of ``part_size`` bytes go up ``max_in_flight`` at a time while the caller produces the next
    (memory: about ``(max_in_flight + 1) * part_size``); pass ``size_hint`` for objects over 10,000 parts.
    Nothing is staged on local disk. The object appears only at ``commit()``; on ``abort()`` (or an exception
    inside ``with``) it does not appear and no multipart upload remains. The fault point ``save:write`` fires
    once per object, after the first of its bytes were handed to the store.

    Example:
        >>> fs, path = open_store("memory://demo/blob")
        >>> with ObjectWriter(fs, path) as writer:
        ...     _ = writer.write(memoryview(b"abc"))
        >>> writer.result[0]
        3
    """

    def __init__(self, fs: Any, path: str, *, part_size: int = DEFAULT_PART_SIZE,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, size_hint: int | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.path = path
        if _s3.is_s3(fs):
            self._sink: Any = _s3.S3MultipartSink(fs, path, _part_size(part_size, size_hint), max_in_flight, retry)
        elif _generic.is_local(fs):
            self._sink = _generic.LocalSink(fs, path)
        elif _generic.is_memory(fs):
            self._sink = _generic.MemorySink(fs, path)
        else:
            self._sink = _generic.FileSink(fs, path)
        self._digest = xxhash.xxh3_128()
        self._size = 0
        self._state = "open"
        self._fault_fired = False
        self.result: tuple[int, str] | None = None

    def _sent(self) -> bool:
        return getattr(self._sink, "has_sent", False) or getattr(self._sink, "parts_started", 0) > 0

    def _fault(self) -> None:
        if not self._fault_fired:
            self._fault_fired = True
            fault_point("save:write")

    def _check_open(self) -> None:
        if self._state != "open":
            raise ObjectStoreError(f"{self.path}: the writer is {self._state}")

    def write(self, data: Any) -> int:
        """Append ``data`` (any contiguous buffer: bytes, memoryview, NumPy array); returns its byte count."""
        self._check_open()
        view = _byte_view(data)
        try:
            self._digest.update(view)
            self._sink.write(view)
            self._size += len(view)
            if self._sent():
                self._fault()
        except BaseException:
            self._abort_quietly()
            raise
        return len(view)

    def commit(self) -> tuple[int, str]:
        """Make the object appear; returns ``(size, checksum)``."""
        self._check_open()
        try:
            self._fault()
            self._sink.commit()
        except BaseException:
            self._abort_quietly()
            raise
        self._state = "committed"
        self.result = (self._size, f"{CHECKSUM_ALGORITHM}:{self._digest.hexdigest()}")
        return self.result

    def abort(self) -> None:
        """Drop the object: nothing appears under its name and no upload remains (idempotent)."""
        if self._state == "open":
            self._state = "aborted"
            self._sink.abort()

    def _abort_quietly(self) -> None:
        # The error that made us abort is the one to report; a failed abort only leaves an upload behind,
        # which delete_prefix (run by a later save) removes.
        try:
            self.abort()
        except Exception as exc:
            log.warning("%s: aborting the upload failed (%s); a later cleanup of its prefix removes it", self.path, exc)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._abort_quietly()


def write_object(fs: Any, path: str, chunks: Iterable[Any], **options: Any) -> tuple[int, str]:
    """Stream ``chunks`` (contiguous buffers) to one object; ``(size, checksum)``. Options as ``ObjectWriter``.

    Example:
        >>> fs, path = open_store("memory://demo/two-chunks")
        >>> write_object(fs, path, [b"ab", b"c"])[0]
        3
    """
    with ObjectWriter(fs, path, **options) as writer:
        for chunk in chunks:
            writer.write(chunk)
    assert writer.result is not None
    return writer.result


def put_create_only(fs: Any, path: str, data: bytes, *, retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """Create a small object only if none exists (``ObjectExistsError`` otherwise); returns its version.

    S3: one PUT with ``If-None-Match: *``. Local files: a hard link, which fails if the name exists.
    memory://: exclusive between threads. Other stores: fsspec's ``mode="create"`` (see ``object_generic``).

    Example:
        >>> fs, path = open_store("memory://demo/once.json")
        >>> _ = put_create_only(fs, path, b"{}")
        >>> put_create_only(fs, path, b"{}")
        Traceback (most recent call last):
        ...
        lightning_sharing.errors.ObjectExistsError: memory://demo/once.json already exists: ...
    """
    if _s3.is_s3(fs):
        return _s3.put_create_only(fs, path, bytes(data), retry)
    return _generic.put_create_only(fs, path, bytes(data))


def put_if_match(fs: Any, path: str, data: bytes, version: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """Replace an object only if it still has ``version`` (from ``read_versioned``); returns the new version.

    ``ObjectChangedError`` when another writer replaced or deleted it meanwhile. S3: ``If-Match: <ETag>``.
    """
    if _s3.is_s3(fs):
        return _s3.put_if_match(fs, path, bytes(data), version, retry)
    return _generic.put_if_match(fs, path, bytes(data), version)


def read_versioned(fs: Any, path: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> tuple[bytes, str]:
    """A small object's bytes and version (S3 ETag, else content checksum); ``FileNotFoundError`` if missing."""
    try:
        if _s3.is_s3(fs):
            return _s3.read_versioned(fs, path, retry)
        return _generic.read_versioned(fs, path)
    except FileNotFoundError as exc:
        raise _missing(fs, path) from exc


def read_range_into(fs: Any, path: str, start: int, buffer: Any, *, chunk: int = DEFAULT_READ_CHUNK,
                    max_concurrency: int = DEFAULT_MAX_IN_FLIGHT, retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Fill ``buffer`` (any writable contiguous buffer) with the object's bytes from ``start`` on.

    Reads exactly ``len(buffer)`` bytes or raises (``ObjectStoreError`` if the object is shorter,
    ``FileNotFoundError`` if it is missing); checking the bytes is the caller's job. On S3 the range is
    fetched as ranged GETs of ``chunk`` bytes, ``max_concurrency`` at a time.
    """
    view = _byte_view(buffer)
    if view.readonly:
        raise ValueError("read_range_into needs a writable buffer")
    if start < 0:
        raise ValueError(f"start must be >= 0, not {start}")
    if not len(view):
        return
    try:
        if _s3.is_s3(fs):
            _s3.read_range_into(fs, path, start, view, chunk, max_concurrency, retry)
        else:
            _generic.read_range_into(fs, path, start, view)
    except FileNotFoundError as exc:
        raise _missing(fs, path) from exc


def list_dir(fs: Any, path: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> tuple[list[str], list[ObjectInfo]]:
    """``(child prefixes, objects)`` directly below ``path``, fresh from the store (no listing cache)."""
    if _s3.is_s3(fs):
        return _s3_prefix.list_dir(fs, path, retry)
    return _generic.list_dir(fs, path)


def find_objects(fs: Any, path: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> list[ObjectInfo]:
    """Every object below ``path``, at any depth, fresh from the store."""
    if _s3.is_s3(fs):
        return _s3_prefix.find(fs, path, retry)
    return _generic.find(fs, path)


def object_info(fs: Any, path: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> ObjectInfo | None:
    """The object at ``path`` (size, mtime, version), or None when there is none."""
    if _s3.is_s3(fs):
        return _s3.object_info(fs, path, retry)
    return _generic.object_info(fs, path)


def delete_objects(fs: Any, paths: Iterable[str], *, retry: RetryPolicy = DEFAULT_RETRY) -> int:
    """Delete these objects (missing ones are fine); returns how many were asked for (S3) or found."""
    if _s3.is_s3(fs):
        return _s3_prefix.delete_objects(fs, paths, retry)
    return _generic.delete_objects(fs, paths)


def delete_prefix(fs: Any, path: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> int:
    """Delete everything below ``path/`` (not ``path-other``), and on S3 its unfinished uploads; object count."""
    if _s3.is_s3(fs):
        return _s3_prefix.delete_prefix(fs, path, retry)
    return _generic.delete_prefix(fs, path)


@dataclass(frozen=True)
class ConditionalSupport:
    """What a store was seen to enforce: refusing a second create-only put, refusing a stale ``If-Match``."""

    create_only: bool
    if_match: bool


def probe_conditional_writes(fs: Any, prefix: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> ConditionalSupport:
    """Try both conditions on a scratch object below ``prefix`` (then deleted).

    Some S3-compatible stores accept the headers and ignore them; on those the commit protocol above is not
    race-safe, and a backend should say so (or refuse) rather than trust them.
    """
    scratch = f"{prefix.rstrip('/')}/.probe-{uuid.uuid4().hex}"
    try:
        first = put_create_only(fs, scratch, b"first", retry=retry)
        try:
            put_create_only(fs, scratch, b"second", retry=retry)
            create_only = False
        except ObjectExistsError:
            create_only = True
        try:
            put_if_match(fs, scratch, b"third", first, retry=retry)
            put_if_match(fs, scratch, b"fourth", first, retry=retry)  # ``first`` is stale now
            if_match = False
        except ObjectChangedError:
            if_match = True
        except ObjectStoreError as exc:  # a store with no conditional overwrite at all
            log.info("%s: %s", prefix, exc)
            if_match = False
    finally:
        delete_objects(fs, [scratch], retry=retry)
    return ConditionalSupport(create_only=create_only, if_match=if_match)
