"""S3 prefixes: exact listings of ``prefix/`` and deletion of everything below one.

Listings go to the store every time (s3fs's listing cache would hide other processes' writes and deletions)
and name ``prefix/`` exactly, so ``step=5.ckpt`` never takes in ``step=5.ckpt.bak``. Deleting a prefix also
aborts its unfinished multipart uploads: a rank killed mid-upload leaves one, invisible to listings but billed.

Example:
    >>> dirs, objects = list_dir(fs, "bucket/run", DEFAULT_RETRY)      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from fsspec.asyn import sync

from lightning_sharing.storage.object_common import (
    ObjectInfo,
    ObjectStoreError,
    RetryPolicy,
    error_code,
    is_transient,
    with_retries,
    with_retries_async,
)
from lightning_sharing.storage.object_s3 import s3_call, split_path

__all__ = ["Upload", "abort_upload", "delete_objects", "delete_prefix", "find", "list_dir", "unfinished_uploads"]

_DELETE_BATCH = 1000


async def _pages(fs: Any, what: str, policy: RetryPolicy, method: str, next_keys: dict[str, str],
                 **kwargs: Any) -> AsyncIterator[dict]:
    while True:
        page = await with_retries_async(what, lambda: fs._call_s3(method, **kwargs), policy)
        yield page
        if not page.get("IsTruncated"):
            return
        for request_key, response_key in next_keys.items():
            if page.get(response_key) is not None:
                kwargs[request_key] = page[response_key]


def _listing(fs: Any, path: str, policy: RetryPolicy, delimiter: bool) -> tuple[list[str], list[ObjectInfo]]:
    bucket, key = split_path(fs, path)
    prefix = key.rstrip("/") + "/" if key else ""
    extra = {"Delimiter": "/"} if delimiter else {}

    async def run() -> tuple[list[str], list[ObjectInfo]]:
        dirs: list[str] = []
        files: list[ObjectInfo] = []
        async for page in _pages(fs, f"list s3://{bucket}/{prefix}", policy, "list_objects_v2",
                                 {"ContinuationToken": "NextContinuationToken"}, Bucket=bucket, Prefix=prefix,
                                 **extra):
            dirs += [f"{bucket}/{entry['Prefix'].rstrip('/')}" for entry in page.get("CommonPrefixes", [])]
            files += [ObjectInfo(f"{bucket}/{entry['Key']}", entry["Size"], entry["LastModified"].timestamp(),
                                 entry.get("ETag")) for entry in page.get("Contents", [])]
        return dirs, files

    return sync(fs.loop, run)


def list_dir(fs: Any, path: str, policy: RetryPolicy) -> tuple[list[str], list[ObjectInfo]]:
    """The "directories" (common prefixes) and objects directly below ``path/``."""
    return _listing(fs, path, policy, delimiter=True)


def find(fs: Any, path: str, policy: RetryPolicy) -> list[ObjectInfo]:
    """Every object below ``path/``, at any depth."""
    return _listing(fs, path, policy, delimiter=False)[1]


def delete_objects(fs: Any, paths: Iterable[str], policy: RetryPolicy) -> int:
    """Delete these objects (1000 per request); per-key transient failures are retried. Returns the count."""
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
        bucket, key = split_path(fs, path)
        by_bucket.setdefault(bucket, []).append(key)
    count = 0
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), _DELETE_BATCH):
            _delete_batch(fs, bucket, keys[start:start + _DELETE_BATCH], policy)
        count += len(keys)
    return count


def _delete_batch(fs: Any, bucket: str, keys: list[str], policy: RetryPolicy) -> None:
    # DeleteObjects answers 200 even when some keys failed: the failures are listed in its body.
    left = list(keys)

    def attempt() -> None:
        nonlocal left
        response = sync(fs.loop, fs._call_s3, "delete_objects", Bucket=bucket,
                        Delete={"Objects": [{"Key": key} for key in left], "Quiet": True})
        errors = response.get("Errors", [])
        hard = [error for error in errors if not is_transient(_DeleteFailure(error))]
        if hard:
            sample = ", ".join(f"{error['Key']} ({error.get('Code')})" for error in hard[:5])
            raise ObjectStoreError(f"could not delete {len(hard)} object(s) in s3://{bucket}: {sample}")
        left = [error["Key"] for error in errors]
        if left:
            raise _DeleteFailure(errors[0])

    with_retries(f"delete {len(keys)} object(s) in s3://{bucket}", attempt, policy)
    for key in keys:
        fs.invalidate_cache(f"{bucket}/{key}")


class _DeleteFailure(Exception):
    """A per-key DeleteObjects failure, shaped like botocore's ``ClientError`` for ``is_transient``."""

    def __init__(self, error: dict) -> None:
        super().__init__(f"{error.get('Code')}: {error.get('Message')} ({error.get('Key')})")
        self.response = {"Error": error, "ResponseMetadata": {}}


@dataclass(frozen=True)
class Upload:
    """An unfinished multipart upload: the object it would create (``bucket/key``), its id, when it was started."""

    path: str
    upload_id: str
    initiated: float | None


def unfinished_uploads(fs: Any, path: str, policy: RetryPolicy) -> list[Upload]:
    """The multipart uploads started below ``path/`` and neither completed nor aborted (invisible to listings)."""
    bucket, key = split_path(fs, path)
    prefix = key.rstrip("/") + "/" if key else ""

    async def run() -> list[Upload]:
        found: list[Upload] = []
        async for page in _pages(fs, f"list unfinished uploads in s3://{bucket}/{prefix}", policy,
                                 "list_multipart_uploads", {"KeyMarker": "NextKeyMarker",
                                                            "UploadIdMarker": "NextUploadIdMarker"},
                                 Bucket=bucket, Prefix=prefix):
            found += [Upload(f"{bucket}/{upload['Key']}", upload["UploadId"],
                             upload["Initiated"].timestamp() if upload.get("Initiated") else None)
                      for upload in page.get("Uploads", [])]
        return found

    return sync(fs.loop, run)


def abort_upload(fs: Any, upload: Upload, policy: RetryPolicy) -> None:
    """Abort one unfinished upload (its parts stop being stored and billed); one already gone is fine."""
    bucket, key = split_path(fs, upload.path)
    try:
        s3_call(fs, f"abort an unfinished upload of s3://{bucket}/{key}", policy,
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)
    except Exception as exc:
        if error_code(exc)[0] != "NoSuchUpload":
            raise


def delete_prefix(fs: Any, path: str, policy: RetryPolicy) -> int:
    """Delete every object below ``path/`` and abort its unfinished multipart uploads; returns the object count."""
    bucket, key = split_path(fs, path)
    if not key.strip("/"):
        raise ValueError(f"refusing to delete everything in bucket {bucket!r}: name a prefix inside it")
    count = delete_objects(fs, [info.path for info in find(fs, path, policy)], policy)
    for upload in unfinished_uploads(fs, path, policy):
        abort_upload(fs, upload, policy)
    fs.invalidate_cache(path)
    return count
