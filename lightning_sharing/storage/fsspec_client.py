"""``ObjectClient`` on any fsspec filesystem (``s3://``, ``gs://``, ``az://``, ``memory://``), by its public API.

Conditional puts are exact where the store checks them: S3 (``mode="create"`` is sent as ``If-None-Match: *``,
``IfMatch=<etag>`` passed on to PutObject) and ``memory://`` (one process: a lock; versions are content checksums).
Elsewhere a create-only put is only as exclusive as that store's ``mode="create"`` (a warning says so), and replacing
is refused. On S3, s3fs's and botocore's retries are off (but botocore's for a streamed upload's parts: ``retry``).

Example:
    >>> client = FsspecClient.open("memory", "demo", {}, RetryPolicy())
    >>> client.put("a/x.json", b"{}", create=True) == client.get("a/x.json")[1]
    True
    >>> client.list("a/", delimiter=True)
    ([], [ObjectInfo(key='a/x.json', size=2)])
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from lightning_sharing.errors import ObjectStoreError
from lightning_sharing.format.safetensors_io import bytes_checksum
from lightning_sharing.storage.client import ObjectInfo, refused
from lightning_sharing.storage.retry import RetryPolicy, http_status

__all__ = ["FsspecClient"]

log = logging.getLogger(__name__)
_LOCK = threading.Lock()  # conditions on memory://, a store in this process
_WARNED: set[str] = set()


class FsspecClient:
    """An ``ObjectClient`` on the fsspec filesystem ``fs`` for ``scheme://bucket`` (see the module docstring)."""

    def __init__(self, fs: Any, scheme: str, bucket: str, stream_fs: Any = None) -> None:
        self.fs, self._stream_fs, self._bucket, self.url = fs, stream_fs or fs, bucket, f"{scheme}://{bucket}"
        self._in_process = "memory" in ([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol)
        self._server_checks = scheme in ("s3", "s3a")
        self.max_concurrency = 1 if self._in_process else 8

    @classmethod
    def open(cls, scheme: str, bucket: str, options: dict[str, Any], policy: RetryPolicy) -> FsspecClient:
        """The client for ``scheme://bucket``; ``options`` go to the fsspec filesystem (s3fs-style for S3)."""
        import fsspec

        if scheme not in ("s3", "s3a"):
            fs = fsspec.filesystem(scheme, **{"use_listings_cache": False, **options})
            if "file" in fs.protocol or "local" in fs.protocol:
                raise ValueError(f"{scheme}:// is a local filesystem: use LocalStore (store_for picks it)")
            return cls(fs, scheme, bucket)

        def s3(attempts: int) -> Any:  # RetryPolicy retries the calls; botocore a streamed upload's parts
            config = {"connect_timeout": policy.timeout, "read_timeout": policy.timeout,
                      **(options.get("config_kwargs") or {}), "retries": {"total_max_attempts": attempts,
                                                                          "mode": "standard"}}
            fs = fsspec.filesystem(scheme, **{**options, "config_kwargs": config, "use_listings_cache": False})
            fs.retries = 1  # s3fs's own retry loop, over botocore's, off
            return fs

        return cls(s3(1), scheme, bucket, s3(policy.attempts))

    def _path(self, key: str) -> str:
        return f"{self._bucket}/{key}".rstrip("/")

    def put(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str:
        path, where = self._path(key), f"{self.url}/{key}"
        if self._in_process:
            with _LOCK:
                current = bytes_checksum(self.fs.cat_file(path)) if self.fs.isfile(path) else None
                if (create and current is not None) or (if_match is not None and current != if_match):
                    raise refused(where, None if create else if_match, gone=current is None)
                self.fs.pipe_file(path, data)
            return bytes_checksum(data)
        if if_match is not None and not self._server_checks:
            raise ObjectStoreError(f"{where}: fsspec offers no conditional overwrite on {self.url} (only s3://)")
        if create and not self._server_checks and self.url not in _WARNED:
            _WARNED.add(self.url)
            log.warning("%s: create-only puts rely on this fsspec store's mode='create', which may check and write in "
                        "two steps: two jobs racing for one checkpoint may both succeed", self.url)
        try:
            out = self.fs.pipe_file(path, data, mode="create" if create else "overwrite",
                                    **({"IfMatch": if_match} if if_match else {}))
        except OSError as exc:
            if (create or if_match) and (http_status(exc) == 412 or isinstance(exc, FileExistsError)):
                raise refused(where, if_match) from exc
            if if_match and isinstance(exc, FileNotFoundError):
                raise refused(where, if_match, gone=True) from exc
            raise
        return (out.get("ETag") if isinstance(out, dict) else None) or bytes_checksum(data)

    def get(self, key: str) -> tuple[bytes, str]:
        with self.fs.open(self._path(key), "rb") as handle:  # s3fs: a HEAD, then a GET with If-Match: its ETag
            data = handle.read()
            version = (getattr(handle, "details", None) or {}).get("ETag")
        return data, version or bytes_checksum(data)

    def read_into(self, key: str, start: int, view: memoryview) -> int:
        data = self.fs.cat_file(self._path(key), start=start, end=start + len(view))
        view[:len(data)] = data
        return len(data)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        version = info.get("ETag") or info.get("etag")
        return ObjectInfo(key, int(info.get("size") or 0), version) if info.get("type") == "file" else None

    def list(self, prefix: str, *, delimiter: bool) -> tuple[list[str], list[ObjectInfo]]:
        path = self._path(prefix.rstrip("/"))
        try:
            entries = self.fs.ls(path, detail=True) if delimiter else self.fs.find(path, detail=True).values()
        except FileNotFoundError:
            return [], []
        keys = [(entry["name"].strip("/")[len(self._bucket) + 1:], entry) for entry in entries]
        keys = [(key, entry) for key, entry in keys if key.startswith(prefix) and key.rstrip("/") != prefix[:-1]]
        return (sorted(key.rstrip("/") for key, entry in keys if entry["type"] == "directory"),
                sorted(ObjectInfo(key, int(entry.get("size") or 0)) for key, entry in keys
                       if entry["type"] != "directory"))

    def delete(self, keys: list[str]) -> None:
        paths = [self._path(key) for key in keys]
        try:
            if paths:
                self.fs.rm(paths)
        except FileNotFoundError:  # a store that refuses the whole batch for one absent object
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def copy(self, source: str, target: str) -> None:
        self.fs.copy(self._path(source), self._path(target))

    def open_writer(self, key: str, part_size: int) -> _FileWriter:
        return _FileWriter(self._stream_fs, self._path(key), part_size)

    def uploads(self, prefix: str) -> list[tuple[str, str]]:
        call, found, marker = getattr(self.fs, "call_s3", None), [], {}  # s3fs; elsewhere uploads expire by themselves
        while call is not None:
            page = call("list_multipart_uploads", Bucket=self._bucket, Prefix=prefix, **marker)
            found += [(upload["Key"], upload["UploadId"]) for upload in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                break
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        return found

    def abort_upload(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # NoSuchUpload: gone already
            self.fs.abort_mpu(self._bucket, key, upload_id)


class _FileWriter:
    """``fs.open(path, "wb")``: ``commit`` closes it; ``abort`` discards it and deletes what may have appeared."""

    def __init__(self, fs: Any, path: str, part_size: int) -> None:
        self._fs, self._path, self._handle = fs, path, fs.open(path, "wb", block_size=part_size)
        self.write, self.commit = self._handle.write, self._handle.close

    def abort(self) -> None:
        self._handle.discard()  # s3fs: aborts the multipart upload
        with contextlib.suppress(AttributeError):  # discarded: never to be flushed (memory:// files have no flag)
            self._handle.closed = True
        with contextlib.suppress(FileNotFoundError):  # memory:// shows a file while it is written
            if self._fs.isfile(self._path):
                self._fs.rm_file(self._path)
