"""S3 fast paths of the object-store API, on s3fs's own client and event loop.

- ``S3MultipartSink``: parts of a streamed object go up as a multipart upload with several parts in
  flight at once (s3fs's ``open(..., "wb")`` sends one part at a time), from a bounded pool of part
  buffers; an object smaller than one part is a single PUT.
- ``read_range_into``: a byte range read by several ranged GETs at once, straight into the caller's buffer.
- ``put_create_only`` / ``put_if_match``: ``If-None-Match: *`` and ``If-Match: <etag>`` PUTs.
- ``object_info``: one HEAD request (listings and deletion of prefixes are in ``object_s3_prefix``).

Calls go through ``S3FileSystem._call_s3`` so that ``storage_options`` such as ``s3_additional_kwargs``
(server-side encryption) and ``requester_pays`` apply, and every call is wrapped in ``with_retries``.

Example:
    >>> fs = s3fs.S3FileSystem()                                   # doctest: +SKIP
    >>> put_create_only(fs, "bucket/run/step=5.ckpt/checkpoint_manifest.json", b"{}")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import sys
from collections.abc import Awaitable, Iterable
from typing import Any

from fsspec.asyn import sync

from lightning_sharing.storage.object_common import (
    ObjectChangedError,
    ObjectExistsError,
    ObjectInfo,
    ObjectStoreError,
    RetryPolicy,
    error_code,
    with_retries,
    with_retries_async,
)

__all__ = [
    "MAX_PARTS",
    "MIN_PART_SIZE",
    "S3MultipartSink",
    "is_s3",
    "object_info",
    "put_create_only",
    "put_if_match",
    "read_range_into",
    "read_versioned",
    "s3_call",
    "split_path",
]

log = logging.getLogger(__name__)

MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * 1024 * 1024


def is_s3(fs: Any) -> bool:
    """True for an ``s3fs.S3FileSystem`` (without importing s3fs where nothing else has)."""
    module = sys.modules.get("s3fs")
    return module is not None and isinstance(fs, module.S3FileSystem)


def split_path(fs: Any, path: str) -> tuple[str, str]:
    """``(bucket, key)`` of an s3fs path."""
    bucket, key, _ = fs.split_path(path)
    return bucket, key


def s3_call(fs: Any, what: str, policy: RetryPolicy, method: str, **kwargs: Any) -> dict:
    """``fs._call_s3(method, **kwargs)`` from a synchronous caller, retried under ``policy``; ``what`` names it."""
    return with_retries(what, lambda: sync(fs.loop, fs._call_s3, method, **kwargs), policy)


async def _gather_or_cancel(coros: Iterable[Awaitable[Any]]) -> list[Any]:
    """Like ``asyncio.gather``, but the first failure cancels (and waits for) the rest: nothing keeps
    writing into a caller's buffer after the call returned."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    if not tasks:
        return []
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _multipart_etag(parts: list[dict]) -> str:
    """The ETag S3 gives a completed multipart upload: MD5 of the parts' binary MD5s, then ``-<count>``."""
    digest = hashlib.md5(usedforsecurity=False)
    for part in parts:
        digest.update(bytes.fromhex(part["ETag"].strip('"')))
    return f'"{digest.hexdigest()}-{len(parts)}"'


class S3MultipartSink:
    """Receives an object's bytes in order and uploads them; ``commit()`` makes the object appear.

    Memory is bounded by ``max_in_flight + 1`` part buffers. Nothing is visible under the key until
    ``commit()`` completes the upload; ``abort()`` cancels the parts in flight, waits for them, and aborts
    the upload, so no object and no billed parts remain.
    """

    def __init__(self, fs: Any, path: str, part_size: int, max_in_flight: int, policy: RetryPolicy) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 multipart parts must be at least {MIN_PART_SIZE} bytes, not {part_size}")
        self._fs, self._policy = fs, policy
        self._bucket, self._key = split_path(fs, path)
        self._url = f"s3://{self._bucket}/{self._key}"
        self._part_size, self._max_in_flight = part_size, max(1, max_in_flight)
        self._buffer = bytearray()  # grows until the first part is full: a small object never allocates a part
        self._fill = 0
        self._free: list[bytearray] = []
        self._pending: dict[concurrent.futures.Future, bytearray] = {}
        self._tasks: set[asyncio.Task] = set()  # touched on the event loop only
        self._parts: list[dict] = []
        self._upload_id: str | None = None
        self._next_part = 1

    @property
    def parts_started(self) -> int:
        """How many parts have been handed to the uploader so far."""
        return self._next_part - 1

    def write(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            piece = view[done:done + min(len(view) - done, self._part_size - self._fill)]
            if len(self._buffer) == self._part_size:
                self._buffer[self._fill:self._fill + len(piece)] = piece
            else:
                self._buffer += piece
            self._fill += len(piece)
            done += len(piece)
            if self._fill == self._part_size:
                self._submit(self._buffer)
                self._buffer, self._fill = self._take_buffer(), 0

    def _take_buffer(self) -> bytearray:
        while len(self._pending) >= self._max_in_flight:
            self._reap(block=True)
        return self._free.pop() if self._free else bytearray(self._part_size)

    def _submit(self, body: bytearray) -> None:
        if self._upload_id is None:
            created = s3_call(self._fs, f"start a multipart upload of {self._url}", self._policy,
                              "create_multipart_upload", Bucket=self._bucket, Key=self._key)
            self._upload_id = created["UploadId"]
        number = self._next_part
        if number > MAX_PARTS:
            raise ObjectStoreError(
                f"{self._url} needs more than {MAX_PARTS} parts of {self._part_size} bytes; pass size_hint or a "
                "larger part_size"
            )
        self._next_part += 1
        future = asyncio.run_coroutine_threadsafe(self._upload_part(number, body), self._fs.loop)
        self._pending[future] = body
        self._reap(block=False)

    async def _upload_part(self, number: int, body: bytearray) -> dict:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            response = await with_retries_async(
                f"upload part {number} of {self._url}",
                lambda: self._fs._call_s3("upload_part", Bucket=self._bucket, Key=self._key,
                                          UploadId=self._upload_id, PartNumber=number, Body=body),
                self._policy,
            )
        finally:
            self._tasks.discard(task)
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _reap(self, block: bool) -> None:
        if not self._pending:
            return
        done, _ = concurrent.futures.wait(self._pending, timeout=None if block else 0,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            body = self._pending.pop(future)
            self._parts.append(future.result())
            if len(body) == self._part_size:
                self._free.append(body)

    def commit(self) -> None:
        if self._upload_id is None:
            # Still the first, growing buffer: it holds exactly the object's bytes.
            s3_call(self._fs, f"put {self._url}", self._policy, "put_object",
                    Bucket=self._bucket, Key=self._key, Body=self._buffer)
            return
        if self._fill:
            del self._buffer[self._fill:]
            self._submit(self._buffer)
        while self._pending:
            self._reap(block=True)
        parts = sorted(self._parts, key=lambda part: part["PartNumber"])
        try:
            s3_call(self._fs, f"complete the multipart upload of {self._url}", self._policy,
                    "complete_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts})
        except Exception as exc:
            # A retried complete whose first answer was lost finds the upload gone: the object is there if its
            # ETag is the one these parts make.
            if error_code(exc)[0] != "NoSuchUpload" or self._etag() != _multipart_etag(parts):
                raise
            log.info("%s: the completed upload's answer was lost; the object holds these parts", self._url)
        self._upload_id = None

    def _etag(self) -> str | None:
        info = object_info(self._fs, f"{self._bucket}/{self._key}", self._policy)
        return info.version if info else None

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()  # a part not started yet never starts
        sync(self._fs.loop, self._cancel_tasks)  # a part being sent is stopped, and waited for
        self._pending.clear()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            s3_call(self._fs, f"abort the multipart upload of {self._url}", self._policy,
                    "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id)
        except Exception as exc:
            if error_code(exc)[0] != "NoSuchUpload":
                raise


def read_range_into(fs: Any, path: str, start: int, view: memoryview, chunk: int, max_concurrency: int,
                    policy: RetryPolicy) -> None:
    """Fill ``view`` with the object's bytes ``[start, start + len(view))``, ``chunk`` bytes per GET."""
    bucket, key = split_path(fs, path)
    url, length = f"s3://{bucket}/{key}", len(view)

    async def fetch(lo: int, hi: int) -> None:
        async def attempt() -> None:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                         Range=f"bytes={start + lo}-{start + hi - 1}")
            body = response["Body"]
            try:
                if response.get("ContentLength") != hi - lo:
                    raise ObjectStoreError(
                        f"{url} has fewer than {start + hi} bytes: bytes {start + lo}-{start + hi - 1} were asked "
                        f"for and {response.get('ContentLength')} came back"
                    )
                at = lo
                while at < hi:
                    got = await body.readinto(view[at:hi])
                    if not got:
                        raise ConnectionResetError(f"{url}: the response ended after {at - lo} of {hi - lo} bytes")
                    at += got
            finally:
                body.close()

        await with_retries_async(f"read bytes {start + lo}-{start + hi - 1} of {url}", attempt, policy)

    async def run() -> None:
        gate = asyncio.Semaphore(max(1, max_concurrency))

        async def gated(lo: int, hi: int) -> None:
            async with gate:
                await fetch(lo, hi)

        await _gather_or_cancel(gated(lo, min(lo + chunk, length)) for lo in range(0, length, chunk))

    try:
        sync(fs.loop, run)
    except Exception as exc:
        if error_code(exc)[0] == "InvalidRange":
            raise ObjectStoreError(
                f"{url} has fewer than {start + length} bytes: bytes {start}-{start + length - 1} were asked for"
            ) from exc
        raise


def _read_all(fs: Any, bucket: str, key: str, policy: RetryPolicy) -> tuple[bytes, str]:
    async def attempt() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            return await body.read(), response["ETag"]
        finally:
            body.close()

    return with_retries(f"read s3://{bucket}/{key}", lambda: sync(fs.loop, attempt), policy)


def read_versioned(fs: Any, path: str, policy: RetryPolicy) -> tuple[bytes, str]:
    """The object's bytes and its ETag (``FileNotFoundError`` if it does not exist)."""
    return _read_all(fs, *split_path(fs, path), policy)


def _holds(fs: Any, bucket: str, key: str, data: bytes, policy: RetryPolicy) -> str | None:
    """The object's ETag if it holds exactly ``data`` (our own earlier attempt whose answer was lost)."""
    try:
        current, etag = _read_all(fs, bucket, key, policy)
    except FileNotFoundError:
        return None
    return etag if current == data else None


def put_create_only(fs: Any, path: str, data: bytes, policy: RetryPolicy) -> str:
    """PUT with ``If-None-Match: *``; ``ObjectExistsError`` if the object exists. Returns the new ETag."""
    bucket, key = split_path(fs, path)
    url = f"s3://{bucket}/{key}"
    try:
        return s3_call(fs, f"create {url}", policy, "put_object", Bucket=bucket, Key=key, Body=data,
                       IfNoneMatch="*")["ETag"]
    except Exception as exc:
        if error_code(exc)[1] != 412:
            raise
        # botocore and s3fs retry below us: a 412 may answer a retry of our own PUT that had landed.
        etag = _holds(fs, bucket, key, data, policy)
        if etag is not None:
            return etag
        raise ObjectExistsError(f"{url} already exists: another writer created it first") from exc


def put_if_match(fs: Any, path: str, data: bytes, version: str, policy: RetryPolicy) -> str:
    """PUT with ``If-Match: version``; ``ObjectChangedError`` if the object changed or vanished. New ETag."""
    bucket, key = split_path(fs, path)
    url = f"s3://{bucket}/{key}"
    try:
        return s3_call(fs, f"replace {url}", policy, "put_object", Bucket=bucket, Key=key, Body=data,
                       IfMatch=version)["ETag"]
    except Exception as exc:
        code, status, _ = error_code(exc)
        if status != 412 and code != "NoSuchKey":
            raise
        etag = _holds(fs, bucket, key, data, policy)
        if etag is not None:
            return etag
        state = "was deleted" if code == "NoSuchKey" else "was changed by another writer"
        raise ObjectChangedError(f"{url} {state} since version {version} was read") from exc


def object_info(fs: Any, path: str, policy: RetryPolicy) -> ObjectInfo | None:
    """The object at ``path`` (a HEAD request), or None if there is none."""
    bucket, key = split_path(fs, path)
    try:
        head = s3_call(fs, f"look up s3://{bucket}/{key}", policy, "head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return ObjectInfo(f"{bucket}/{key}", head["ContentLength"], head["LastModified"].timestamp(), head.get("ETag"))
