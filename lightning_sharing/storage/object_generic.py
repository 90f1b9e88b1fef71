"""The object-store API on any fsspec filesystem, with exact local and in-memory semantics where fsspec has none.

- Local files (``file://`` and plain paths): a streamed object is written in place and fsynced; a create-only
  put writes a temporary file and hard-links it to its name (``link`` fails if the name exists, and the
  object appears whole); a conditional overwrite holds an ``flock`` on the directory while it compares and
  renames, so it is exclusive between processes of this machine.
- ``memory://``: process-local; create-only and conditional puts are exclusive between threads (a lock).
- Any other fsspec store: streamed writes through ``fs.open(path, "wb")`` (discarded on abort); a
  create-only put through fsspec's ``mode="create"``, which is only as exclusive as that store's
  implementation makes it (a warning says so); conditional overwrites are refused.

Versions (for ``put_if_match``) are the content's ``xxh3_128`` checksum on these stores.

Example:
    >>> fs = fsspec.filesystem("memory")                          # doctest: +SKIP
    >>> put_create_only(fs, "/run/manifest.json", b"{}")         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from lightning_sharing.format.safetensors_io import bytes_checksum
from lightning_sharing.storage.object_common import ObjectChangedError, ObjectExistsError, ObjectInfo, ObjectStoreError

__all__ = [
    "FileSink",
    "LocalSink",
    "MemorySink",
    "delete_objects",
    "delete_prefix",
    "find",
    "is_local",
    "is_memory",
    "list_dir",
    "object_info",
    "put_create_only",
    "put_if_match",
    "read_range_into",
    "read_versioned",
    "shown",
]

log = logging.getLogger(__name__)
_MEMORY_LOCK = threading.Lock()
_WARNED: set[str] = set()


def is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def is_memory(fs: Any) -> bool:
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(fs, MemoryFileSystem)


def _protocol(fs: Any) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else str(protocol)


def _native(fs: Any, path: str) -> str:
    return fs._strip_protocol(path).rstrip("/") or fs._strip_protocol(path)


def shown(fs: Any, path: str) -> str:
    """The object as a user would write it in a message: ``s3://b/x``, ``memory://run/x``, a local path."""
    native = _native(fs, path)
    if is_local(fs):
        return native
    return f"{_protocol(fs)}://{native.lstrip('/')}"


class LocalSink:
    """A local file written in place; ``commit`` fsyncs it, ``abort`` deletes it."""

    def __init__(self, fs: Any, path: str) -> None:
        self._path = _native(fs, path)
        os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
        self._fd: int | None = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.has_sent = False

    def write(self, view: memoryview) -> None:
        assert self._fd is not None
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.has_sent = self.has_sent or bool(view)

    def commit(self) -> None:
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class MemorySink:
    """Bytes gathered in memory and stored at ``commit`` (memory:// files are visible while open for writing)."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs, self._path, self._buffer = fs, path, io.BytesIO()
        self.has_sent = False

    def write(self, view: memoryview) -> None:
        self._buffer.write(view)
        self.has_sent = self.has_sent or bool(view)

    def commit(self) -> None:
        self._fs.pipe_file(self._path, self._buffer.getvalue())

    def abort(self) -> None:
        self._buffer = io.BytesIO()


class FileSink:
    """Any fsspec store: ``fs.open(path, "wb")``; ``abort`` discards the file and deletes what may remain."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs, self._path = fs, path
        with contextlib.suppress(Exception):  # object stores have no directories to make
            fs.makedirs(fs._parent(path), exist_ok=True)
        self._handle = fs.open(path, "wb")
        self.has_sent = False

    def write(self, view: memoryview) -> None:
        self._handle.write(view)
        self.has_sent = self.has_sent or bool(view)

    def commit(self) -> None:
        self._handle.close()

    def abort(self) -> None:
        discard = getattr(self._handle, "discard", None)
        if callable(discard):
            discard()
        else:
            self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            if self._fs.exists(self._path):
                self._fs.rm_file(self._path)


def read_range_into(fs: Any, path: str, start: int, view: memoryview) -> None:
    """Fill ``view`` with the bytes ``[start, start + len(view))`` of the file at ``path``."""
    opener = (lambda: open(_native(fs, path), "rb", buffering=0)) if is_local(fs) else (lambda: fs.open(path, "rb"))
    with opener() as handle:
        handle.seek(start)
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                end = start + len(view)
                raise ObjectStoreError(
                    f"{shown(fs, path)} has fewer than {end} bytes: bytes {start}-{end - 1} were asked for and it "
                    f"ended after {start + done}"
                )
            done += got


def read_versioned(fs: Any, path: str) -> tuple[bytes, str]:
    data = fs.cat_file(path)
    return data, bytes_checksum(data)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: str, name: str, data: bytes) -> str:
    temp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return temp


def put_create_only(fs: Any, path: str, data: bytes) -> str:
    """Create the object holding ``data``; ``ObjectExistsError`` if it exists. Returns its version."""
    if is_local(fs):
        target = _native(fs, path)
        directory, name = os.path.split(target)
        os.makedirs(directory or ".", exist_ok=True)
        temp = _write_temp(directory, name, data)
        try:
            os.link(temp, target)
        except FileExistsError:
            raise ObjectExistsError(f"{target} already exists: another writer created it first") from None
        finally:
            os.unlink(temp)
        _fsync_dir(directory or ".")
    elif is_memory(fs):
        with _MEMORY_LOCK:
            if fs.exists(path):
                raise ObjectExistsError(f"{shown(fs, path)} already exists: another writer created it first")
            fs.pipe_file(path, data)
    else:
        protocol = _protocol(fs)
        if protocol not in _WARNED:
            _WARNED.add(protocol)
            log.warning("%s:// create-only puts rely on fsspec's mode='create' for this store, which may check and "
                        "write in two steps: two writers racing for one checkpoint may both succeed", protocol)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise ObjectExistsError(f"{shown(fs, path)} already exists: another writer created it first") from None
    return bytes_checksum(data)


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[None]:
    import fcntl

    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def put_if_match(fs: Any, path: str, data: bytes, version: str) -> str:
    """Replace the object if it still has ``version``; ``ObjectChangedError`` otherwise. Returns the new version."""
    if is_local(fs):
        target = _native(fs, path)
        directory, name = os.path.split(target)
        with _directory_lock(directory or "."):
            _check_version(target, lambda: _read_file(target), version)
            temp = _write_temp(directory, name, data)
            os.replace(temp, target)
            _fsync_dir(directory or ".")
    elif is_memory(fs):
        with _MEMORY_LOCK:
            _check_version(shown(fs, path), lambda: fs.cat_file(path), version)
            fs.pipe_file(path, data)
    else:
        raise ObjectStoreError(
            f"{_protocol(fs)}:// offers no conditional overwrite here (supported: s3://, file://, memory://)"
        )
    return bytes_checksum(data)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _check_version(where: str, read: Any, version: str) -> None:
    try:
        current = bytes_checksum(read())
    except FileNotFoundError:
        raise ObjectChangedError(f"{where} was deleted since version {version} was read") from None
    if current != version:
        raise ObjectChangedError(f"{where} was changed by another writer since version {version} was read")


def _mtime(entry: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = entry.get(key)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _info(entry: dict) -> ObjectInfo:
    return ObjectInfo(entry["name"], int(entry.get("size") or 0), _mtime(entry), None)


def list_dir(fs: Any, path: str) -> tuple[list[str], list[ObjectInfo]]:
    base = _native(fs, path)
    fs.invalidate_cache(base)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return [], []
    entries = [entry for entry in entries if entry["name"].rstrip("/") != base]
    dirs = sorted(entry["name"].rstrip("/") for entry in entries if entry["type"] == "directory")
    return dirs, sorted((_info(entry) for entry in entries if entry["type"] == "file"), key=lambda i: i.path)


def find(fs: Any, path: str) -> list[ObjectInfo]:
    base = _native(fs, path)
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return []
    return sorted((_info(entry) for name, entry in found.items() if name.startswith(base + "/")),
                  key=lambda info: info.path)


def object_info(fs: Any, path: str) -> ObjectInfo | None:
    fs.invalidate_cache(_native(fs, path))
    try:
        entry = fs.info(path)
    except FileNotFoundError:
        return None
    return _info(entry) if entry.get("type") == "file" else None


def delete_objects(fs: Any, paths: Iterable[str]) -> int:
    count = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
            count += 1
    return count


def delete_prefix(fs: Any, path: str) -> int:
    base = _native(fs, path)
    if base in ("", "/", fs.root_marker) or base == os.path.dirname(base):
        raise ValueError(f"refusing to delete {path!r}: name a prefix below the store's root")
    count = len(find(fs, base))
    fs.invalidate_cache(base)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(base):
            fs.rm(base, recursive=True)
    return count
