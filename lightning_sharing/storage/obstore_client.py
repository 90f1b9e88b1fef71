"""``ObjectClient`` on ``obstore`` (Rust ``object_store``) for ``s3://``; the default client there (docs/storage.md).

s3fs-style ``storage_options`` are translated (``s3_config``); where one cannot be, ``open`` returns None and logs
why, and the fsspec client serves the URL. obstore cannot list unfinished multipart uploads: those calls go to s3fs.

Example:
    >>> client = ObstoreClient.open("s3", "bucket", {"endpoint_url": "http://127.0.0.1:9000"}, RetryPolicy())
    >>> client.put("run/x.json", b"{}", create=True)  # doctest: +SKIP
    '"99914b932bd37a50b983c5e7c90ae93b"'
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import timedelta
from typing import Any

from lightning_sharing.format.safetensors_io import bytes_checksum
from lightning_sharing.storage.client import ObjectInfo, refused
from lightning_sharing.storage.fsspec_client import FsspecClient
from lightning_sharing.storage.retry import RetryPolicy, http_status

try:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    from obstore.store import S3Store
except ImportError:  # the fsspec client serves every URL
    obstore = None

__all__ = ["ObstoreClient", "s3_config"]

log = logging.getLogger(__name__)

_SIMPLE = {"endpoint_url": "endpoint", "key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
           "anon": "skip_signature", "requester_pays": "request_payer", "region_name": "region",
           "aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
           "aws_session_token": "session_token", "ServerSideEncryption": "server_side_encryption",
           "SSEKMSKeyId": "sse_kms_key_id"}
# fsspec's own options (caches, block sizes), and what the client sets from the retry policy: nothing to translate.
_IGNORED = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size",
            "default_fill_cache", "default_cache_type", "use_ssl", "max_concurrency", "asynchronous", "loop",
            "retries", "connect_timeout", "read_timeout", "fixed_upload_size"}


def s3_config(options: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """obstore's ``S3Config`` for s3fs-style ``options``, and why they cannot be translated (None: they can).

    Example:
        >>> s3_config({"endpoint_url": "http://minio:9000", "client_kwargs": {"region_name": "eu-west-1"}})
        ({'endpoint': 'http://minio:9000', 'region': 'eu-west-1'}, None)
    """
    config: dict[str, Any] = {}
    untranslated: list[str] = []
    nested = ("client_kwargs", "config_kwargs", "s3_additional_kwargs")
    flat = [(k, v) for k, v in options.items() if k not in nested]
    for name, value in flat + [(k, v) for group in nested for k, v in (options.get(group) or {}).items()]:
        if name in _SIMPLE:
            config[_SIMPLE[name]] = value
        elif name == "s3" and set(value) <= {"addressing_style"}:
            config["virtual_hosted_style_request"] = value.get("addressing_style") == "virtual"
        elif name not in _IGNORED:
            untranslated.append(name)
    if not (config.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID")) and os.environ.get("AWS_PROFILE"):
        untranslated.append("AWS_PROFILE (in the environment)")  # obstore reads no AWS profiles
    return config, (f"storage option(s) {sorted(untranslated)} have no obstore equivalent" if untranslated else None)


class ObstoreClient:
    """An ``ObjectClient`` on obstore for one S3 bucket (see the module docstring)."""

    max_concurrency = 8

    def __init__(self, store: Any, stream_store: Any, url: str, options: dict[str, Any]) -> None:
        self._store, self._stream_store, self.url, self._options = store, stream_store, url, options

    @classmethod
    def open(cls, scheme: str, bucket: str, options: dict[str, Any], policy: RetryPolicy) -> ObstoreClient | None:
        """The client for ``scheme://bucket``, or None (logged) where obstore cannot serve it."""
        config, why = s3_config(options) if scheme in ("s3", "s3a") else ({}, f"obstore is not used for {scheme}://")
        why = why or (None if obstore else "obstore is not installed (pip install 'lightning_sharing[s3]')")
        if why:
            log.info("%s://%s: using the fsspec client: %s", scheme, bucket, why)
            return None
        given = options.get("config_kwargs") or {}  # botocore's timeouts, where the options set them
        client = {name: timedelta(seconds=given.get(name, policy.timeout)) for name in ("connect_timeout",
                                                                                      "read_timeout")}
        client.update(timeout=timedelta(seconds=max(policy.deadline, policy.timeout)), allow_http=True)
        backoff = {"init_backoff": timedelta(seconds=policy.initial_delay), "base": 2.0,
                   "max_backoff": timedelta(seconds=policy.max_delay)}

        def store(retries: int) -> Any:  # calls: retried by RetryPolicy; streamed parts: by obstore, as bounded
            return S3Store(bucket, config=config, client_options=client, retry_config={
                "max_retries": retries, "backoff": backoff, "retry_timeout": timedelta(seconds=policy.deadline)})

        return cls(store(0), store(policy.attempts - 1), f"{scheme}://{bucket}", options)

    def put(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str:
        mode: Any = "create" if create else ({"e_tag": if_match} if if_match else "overwrite")
        try:
            result = obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except AlreadyExistsError as exc:
            raise refused(f"{self.url}/{key}", None) from exc
        except (PreconditionError, FileNotFoundError) as exc:
            if if_match is None:
                raise
            raise refused(f"{self.url}/{key}", if_match, gone=http_status(exc) == 404) from exc
        return result["e_tag"] or bytes_checksum(data)

    def get(self, key: str) -> tuple[bytes, str]:
        result = obstore.get(self._store, key)
        data = bytes(result.bytes())
        return data, result.meta["e_tag"] or bytes_checksum(data)

    def read_into(self, key: str, start: int, view: memoryview) -> int:
        data = obstore.get_range(self._store, key, start=start, length=len(view))
        view[:len(data)] = memoryview(data)
        return len(data)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            meta = obstore.head(self._store, key)
            return ObjectInfo(key, meta["size"], meta.get("e_tag"))
        except FileNotFoundError:
            return None

    def list(self, prefix: str, *, delimiter: bool) -> tuple[list[str], list[ObjectInfo]]:
        if delimiter:
            found = obstore.list_with_delimiter(self._store, prefix.rstrip("/") or None)
            objects, dirs = found["objects"], sorted(found["common_prefixes"])
        else:
            objects, dirs = [meta for batch in obstore.list(self._store, prefix.rstrip("/") or None)
                             for meta in batch], []
        return dirs, sorted(ObjectInfo(meta["path"], meta["size"]) for meta in objects)

    def delete(self, keys: list[str]) -> None:
        if keys:
            obstore.delete(self._store, keys)

    def copy(self, source: str, target: str) -> None:
        obstore.copy(self._store, source, target)

    def open_writer(self, key: str, part_size: int) -> _Writer:
        return _Writer(obstore.open_writer(self._stream_store, key, buffer_size=part_size, max_concurrency=8))

    @functools.cached_property
    def _s3fs(self) -> FsspecClient | None:  # obstore cannot list unfinished multipart uploads; s3fs can
        try:
            return FsspecClient.open(*self.url.split("://"), self._options, RetryPolicy(attempts=1))
        except ImportError:
            log.warning("s3fs is not installed: unfinished multipart uploads of killed writers are not found and "
                        "aborted (give the bucket a lifecycle rule that aborts them)")
            return None

    def uploads(self, prefix: str) -> list[tuple[str, str]]:
        return self._s3fs.uploads(prefix) if self._s3fs else []

    def abort_upload(self, key: str, upload_id: str) -> None:
        if self._s3fs:
            self._s3fs.abort_upload(key, upload_id)


class _Writer:
    """``obstore.open_writer``: ``commit`` completes the upload; ``abort`` leaves it with an error, which aborts it."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.write, self.commit = file.write, file.close

    def abort(self) -> None:
        error = InterruptedError("upload aborted")
        self._file.__exit__(type(error), error, None)
